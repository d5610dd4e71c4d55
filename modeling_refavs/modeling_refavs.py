"""
EEMC ("Expression Enhancing with Multimodal Cues"), the Ref-AVS baseline, on transformers' Mask2Former and RoBERTa.
Only what EEMC adds is written here: the audio/text projections, the audio-text and visual-text fusion with its cached
memory, the per-frame integration, the prompt projection, the prompt-driven queries, the pixel decoder's adapters, the
binary read-out and the loss. The `release` profile reproduces the released code (spec refavs.md §2.3).
"""

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import ModelOutput
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerPixelDecoder,
    Mask2FormerPixelLevelModule,
    Mask2FormerPixelLevelModuleOutput,
    Mask2FormerTransformerModule,
)

from modeling_oisa.deformable_attention import OisaMultiscaleDeformableAttention

from .configuration_refavs import RefAvsConfig
from .modeling_vggish import VggishAudioEncoder, VggishPostprocessor


@dataclass
class RefAvsOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor`, *optional*):
        Mean per-pixel BCE between `logits` and the masks given as `labels`.
    logits (`torch.FloatTensor` of shape `(batch_size, num_frames, mask_size, mask_size)`):
        Foreground logit of every pixel of every frame.
    audio_embeds (`torch.FloatTensor` of shape `(batch_size, audio_steps, fusion_dim)`):
        Audio after its projection.
    text_embeds (`torch.FloatTensor` of shape `(batch_size, text_tokens, fusion_dim)`):
        Text after its projection.
    audio_cues, visual_cues, text_cues (`torch.FloatTensor`):
        The cached-memory outputs for audio (B, A, D) and video (B, T*tokens, D), and the text cue (B, L, D).
    integrated_tokens (`torch.FloatTensor` of shape `(batch_size, num_frames, tokens, fusion_dim)`):
        Output of the integration attention per frame.
    prompts (`torch.FloatTensor` of shape `(batch_size * num_frames, tokens, hidden_dim)`):
        The projected prompts the queries attend to.
    prompted_queries (`torch.FloatTensor` of shape `(num_queries, batch_size * num_frames, hidden_dim)`):
        The Mask2Former query features after the prompts are written into them.
    encoder_last_hidden_state (`torch.FloatTensor` of shape `(batch_size * num_frames, channels, height, width)`):
        The Swin's last map.
    pixel_decoder_last_hidden_state (`torch.FloatTensor`):
        The per-pixel mask features (batch_size * num_frames, mask_feature_size, H/4, W/4).
    transformer_decoder_last_hidden_state (`torch.FloatTensor`):
        The masked-attention decoder's last hidden state (batch_size * num_frames, num_queries, hidden_dim).
    class_queries_logits (`torch.FloatTensor`):
        Class logits of each query (batch_size * num_frames, num_queries, num_labels + 1).
    masks_queries_logits (`torch.FloatTensor`):
        Mask logits of each query (batch_size * num_frames, num_queries, H/4, W/4).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    audio_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    audio_cues: torch.FloatTensor | None = None
    visual_cues: torch.FloatTensor | None = None
    text_cues: torch.FloatTensor | None = None
    integrated_tokens: torch.FloatTensor | None = None
    prompts: torch.FloatTensor | None = None
    prompted_queries: torch.FloatTensor | None = None
    encoder_last_hidden_state: torch.FloatTensor | None = None
    pixel_decoder_last_hidden_state: torch.FloatTensor | None = None
    transformer_decoder_last_hidden_state: torch.FloatTensor | None = None
    class_queries_logits: torch.FloatTensor | None = None
    masks_queries_logits: torch.FloatTensor | None = None


def projection_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear, ReLU, Linear (indices 0 and 2 hold the weights, as in the original)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim))


def cached_memory(features: torch.Tensor, beta: float, mode: str) -> torch.Tensor:
    """
    (beta + 1) * F - beta * C along dim 1. `inclusive_over_tokens` (release): C is the running mean including the
    current step. `exclusive_over_time` (fixed, the paper): C is the mean of the previous steps, 0 at the first.
    """
    steps = torch.arange(1, features.shape[1] + 1, device=features.device, dtype=features.dtype)
    steps = steps.view(1, -1, *([1] * (features.dim() - 2)))
    running_sum = features.cumsum(1)
    if mode == "inclusive_over_tokens":
        if beta == 1.0:
            # the released arithmetic, 2F - cumsum/k, so the result matches it bit for bit
            return 2 * features - running_sum / steps
        return (beta + 1) * features - beta * running_sum / steps
    previous_mean = (running_sum - features) / (steps - 1).clamp(min=1)
    return (beta + 1) * features - beta * previous_mean


class RefAvsAdaptedDeformableAttention(OisaMultiscaleDeformableAttention):
    """The pixel decoder's deformable attention with EEMC's bottleneck adapter on its output."""

    def __init__(self, embed_dim: int, num_heads: int, n_levels: int, n_points: int, adapter_dim: int, placement: str):
        super().__init__(embed_dim, num_heads, n_levels, n_points)
        self.adapter = projection_mlp(embed_dim, adapter_dim, embed_dim)
        self.placement = placement

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        output, attention_weights = super().forward(hidden_states, *args, **kwargs)
        adapted = self.adapter(output)
        # release: the adapter replaces the attention's output (in series), so an untrained adapter perturbs it
        return (adapted if self.placement == "series" else output + adapted), attention_weights


class RefAvsQueryPrompter(nn.Module):
    """
    Writes the prompts into the Mask2Former query features:
    q + sigmoid(attention_gate) * CrossAttention(q; prompts) + sigmoid(pool_gate) * mean over the prompt tokens.
    """

    def __init__(self, hidden_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_dim // num_heads
        self.q_proj = nn.Linear(hidden_dim, hidden_dim)
        self.k_proj = nn.Linear(hidden_dim, hidden_dim)
        self.v_proj = nn.Linear(hidden_dim, hidden_dim)
        self.o_proj = nn.Linear(hidden_dim, hidden_dim)
        self.attention_gate = nn.Parameter(torch.ones(1))
        self.pool_gate = nn.Parameter(torch.ones(1))

    def forward(self, queries: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """queries (Q, N, C) sequence-first as Mask2Former keeps them; prompts (N, S, C). Returns (Q, N, C)."""
        num_queries, batch_size, channels = queries.shape
        target = queries.transpose(0, 1)
        query = self.q_proj(target).view(batch_size, num_queries, self.num_heads, self.head_dim).transpose(1, 2)
        key = self.k_proj(prompts).view(batch_size, -1, self.num_heads, self.head_dim).transpose(1, 2)
        value = self.v_proj(prompts).view(batch_size, -1, self.num_heads, self.head_dim).transpose(1, 2)
        weights = (query @ key.transpose(-1, -2) / self.head_dim**0.5).softmax(-1)
        attended = (weights @ value).transpose(1, 2).reshape(batch_size, num_queries, channels)
        attended = self.o_proj(attended)
        pooled = prompts.mean(1, keepdim=True)
        output = target + torch.sigmoid(self.attention_gate) * attended + torch.sigmoid(self.pool_gate) * pooled
        return output.transpose(0, 1)


class RefAvsTransformerModule(Mask2FormerTransformerModule):
    """Mask2Former's transformer module whose query features may be given per image (the prompted queries)."""

    def forward(self, multi_scale_features, mask_features, query_features=None, **kwargs):
        if query_features is None:
            return super().forward(multi_scale_features, mask_features, **kwargs)
        features, positions, sizes = [], [], []
        for level in range(self.num_feature_levels):
            level_map = multi_scale_features[level]
            sizes.append(level_map.shape[-2:])
            # (N, C, h, w) -> (h*w, N, C)
            positions.append(
                self.position_embedder(level_map.shape, level_map.device, level_map.dtype, None)
                .flatten(2)
                .permute(2, 0, 1)
            )
            projected = (
                self.input_projections[level](level_map).flatten(2) + self.level_embed.weight[level][None, :, None]
            )
            features.append(projected.permute(2, 0, 1))
        batch_size = features[0].shape[1]
        query_embeddings = self.queries_embedder.weight.unsqueeze(1).repeat(1, batch_size, 1)
        return self.decoder(
            inputs_embeds=query_features,
            multi_stage_positional_embeddings=positions,
            pixel_embeddings=mask_features,
            encoder_hidden_states=features,
            query_position_embeddings=query_embeddings,
            feature_size_list=sizes,
            output_hidden_states=True,
            return_dict=True,
        )


class RefAvsPreTrainedModel(PreTrainedModel):
    config: RefAvsConfig
    base_model_prefix = "refavs"
    main_input_name = "pixel_values"
    input_modalities = ("video", "audio", "text")
    _keys_to_ignore_on_load_missing = [r"swin\.layernorm\."]

    @classmethod
    def is_custom_code(cls) -> bool:
        # `_init_weights` uses `transformers.initialization` as native models do (see modeling_oisa's note)
        return False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Mask2Former and RoBERTa come from pretrained checkpoints; what EEMC adds starts as the original's
        # `from_pretrained` leaves it: N(0, initializer_range) weights, zero biases, both gates at 1
        super()._init_weights(module)
        if isinstance(module, RefAvsQueryPrompter):
            init.ones_(module.attention_gate)
            init.ones_(module.pool_gate)
        elif isinstance(module, Mask2FormerPixelDecoder):
            # a bare parameter that PreTrainedModel's own init leaves as allocated; N(0, 1) as Mask2Former's init
            init.normal_(module.level_embed, std=1.0)
        elif isinstance(module, VggishPostprocessor):
            # the identity until the real PCA parameters are loaded
            init.eye_(module.pca_eigen_vectors)
            init.zeros_(module.pca_means)
        elif isinstance(module, RefAvsAdaptedDeformableAttention):
            init.zeros_(module.sampling_offsets.weight)
            init.copy_(module.sampling_offsets.bias, module.offset_grid())
            init.zeros_(module.attention_weights.weight)
            init.zeros_(module.attention_weights.bias)
            init.xavier_uniform_(module.value_proj.weight)
            init.zeros_(module.value_proj.bias)
            init.xavier_uniform_(module.output_proj.weight)
            init.zeros_(module.output_proj.bias)
            if module.placement == "residual":
                # a residual adapter starts as the identity, leaving the pretrained pixel decoder as it is
                init.zeros_(module.adapter[2].weight)
                init.zeros_(module.adapter[2].bias)


class RefAvsForReferringSegmentation(RefAvsPreTrainedModel):
    """EEMC: per-frame Mask2Former whose queries are prompted by audio, visual and text cues fused over the clip."""

    def __init__(self, config: RefAvsConfig):
        super().__init__(config)
        m2f = config.mask2former_config
        self.text_model = AutoModel.from_config(config.text_config, add_pooling_layer=False)
        self.pixel_level_module = Mask2FormerPixelLevelModule(m2f)
        # 3 levels x 4 points, as transformers' Mask2Former pixel decoder hard-codes them
        for layer in self.pixel_level_module.decoder.encoder.layers:
            layer.self_attn = RefAvsAdaptedDeformableAttention(
                m2f.feature_size,
                m2f.num_attention_heads,
                n_levels=3,
                n_points=4,
                adapter_dim=config.adapter_hidden_dim,
                placement=config.adapter_placement,
            )
        self.transformer_module = RefAvsTransformerModule(in_features=m2f.feature_size, config=m2f)
        self.class_predictor = nn.Linear(m2f.hidden_dim, m2f.num_labels + 1)
        self.query_prompter = RefAvsQueryPrompter(m2f.hidden_dim, config.prompt_num_heads)

        dim, hidden = config.fusion_dim, config.projection_hidden_dim
        self.audio_projection = projection_mlp(config.audio_feature_dim, hidden, dim)
        self.text_projection = projection_mlp(config.text_feature_dim, hidden, dim)
        self.prompt_projection = projection_mlp(dim, hidden, m2f.hidden_dim)
        # left at their random init and frozen by the original recipe; sequence-first, as the original's
        self.audio_text_attention = nn.MultiheadAttention(dim, config.fusion_num_heads)
        self.visual_text_attention = nn.MultiheadAttention(dim, config.fusion_num_heads)
        self.integration_attention = nn.MultiheadAttention(dim, config.fusion_num_heads)
        # VGGish, frozen: the original runs it in its dataset and never trains it
        self.audio_encoder = None
        if config.audio_config is not None:
            self.audio_encoder = VggishAudioEncoder(config.audio_config).requires_grad_(False)
        self.post_init()

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike | None, *model_args, **kwargs
    ) -> "RefAvsForReferringSegmentation":
        r"""
        Loads EEMC from our format, or from an original checkpoint, converted in memory: the released
        `ckpt_best_miou.pth` (`torch.save` of the original model's state dict, read with `weights_only=True`) or a
        folder holding it, with the text encoder the original loads from the Hub in `text_encoder/` beside it and,
        optionally, torchvggish's `vggish.pth` and the Mask2Former's `mask2former_config.json` (docs/refavs-eemc.md,
        "Checkpoints"). The sizes come from the weights. For an original, `text_encoder`, `vggish`,
        `vggish_pca_params` and `mask2former_config` name those parts elsewhere, and a `RefAvsConfig` field the
        weights cannot say is a keyword argument (`profile="fixed"`, `fusion_num_heads=8`, `audio_config={...}`).
        """
        try:
            # the package's loader of original checkpoints; Hub remote code carries the model, which loads our format
            from modeling_refavs.pretrained import (
                ORIGINAL_CONFIG_FIELDS,
                ORIGINAL_PARTS,
                OisaCheckpointError,
                find_original_checkpoint,
            )
        except ImportError:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        checkpoint = None
        if pretrained_model_name_or_path is not None:
            checkpoint = find_original_checkpoint(pretrained_model_name_or_path)
        if checkpoint is None:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        if kwargs.get("config") is not None:
            raise OisaCheckpointError(
                f"{pretrained_model_name_or_path} is an original EEMC checkpoint, whose config is rebuilt from its "
                "weights: give what they cannot say as RefAvsConfig fields (profile=..., fusion_num_heads=...), not "
                "config="
            )
        try:
            from modeling_refavs.conversion import convert_original_in_memory
        except ImportError as error:
            raise OisaCheckpointError(
                f"{pretrained_model_name_or_path}: the EEMC converter is not installed"
            ) from error

        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        parts = {name: kwargs.pop(name) for name in ORIGINAL_PARTS if name in kwargs}
        overrides = {name: kwargs.pop(name) for name in ORIGINAL_CONFIG_FIELDS if name in kwargs}
        converted = convert_original_in_memory(
            checkpoint,
            cls,
            **parts,
            dtype=dtype if isinstance(dtype, torch.dtype) else None,
            config_overrides=overrides,
        )
        kwargs.pop("config", None)
        loaded = super().from_pretrained(
            None, *model_args, config=converted.config, state_dict=converted.state_dict, **kwargs
        )
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.config.name_or_path = str(pretrained_model_name_or_path)
        return loaded

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, L) -> text features (B, L, text_hidden), the encoder's last hidden state."""
        return self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def encode_audio(self, audio_input_features: torch.Tensor) -> torch.Tensor:
        """
        VGGish log-mel examples (B, N, 96, 64) -> audio features (B, N, audio_feature_dim). VGGish runs without
        autograd whatever its parameters' `requires_grad` (which `from_pretrained` sets back to True): the original
        computes these features in its dataset and never trains VGGish.
        """
        if self.audio_encoder is None:
            raise ValueError(
                "This model has no audio encoder (`config.audio_config` is None): give precomputed `audio_features`."
            )
        with torch.no_grad():
            return self.audio_encoder(audio_input_features)

    def pixel_level(self, frames: torch.Tensor) -> Mask2FormerPixelLevelModuleOutput:
        """Swin and pixel decoder over frames (N, 3, H, W), with the Swin run as `swin_small_map_windows` says."""
        backbone = self.pixel_level_module.encoder
        # `SwinBackbone.forward` always partitions; its Swin model is called directly to choose. Under "clamp" each
        # Swin layer sets its own shift and window for small maps (and keeps them), as transformers 4.30 did
        swin_output = backbone.swin(
            frames,
            always_partition=self.config.swin_small_map_windows == "always_partition",
            output_hidden_states=True,
            output_hidden_states_before_downsampling=True,
        )
        feature_maps = []
        for stage, hidden_state in zip(backbone.stage_names, swin_output.reshaped_hidden_states):
            if stage in backbone.out_features:
                # (N, C, h, w) -> normalised over C -> (N, C, h, w), as `SwinBackbone.forward`
                normed = backbone.hidden_states_norms[stage](hidden_state.permute(0, 2, 3, 1))
                feature_maps.append(normed.permute(0, 3, 1, 2).contiguous())
        decoded = self.pixel_level_module.decoder(feature_maps)
        return Mask2FormerPixelLevelModuleOutput(
            encoder_last_hidden_state=feature_maps[-1],
            decoder_last_hidden_state=decoded.mask_features,
            decoder_hidden_states=decoded.multi_scale_features,
        )

    def visual_tokens(self, last_map: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Swin last map (B*T, C, h, w) -> visual tokens (B, T*tokens_per_frame, fusion_dim)."""
        if self.config.visual_token_layout == "flat_view":
            # the released `.view` without a permute: chunks of the channel-major memory of each video's maps
            return last_map.reshape(batch_size, -1, self.config.fusion_dim)
        # (B*T, C, h, w) -> (B*T, h*w, C) -> (B, T*h*w, C)
        return last_map.flatten(2).transpose(1, 2).reshape(batch_size, -1, last_map.shape[1])

    def fuse(
        self, audio_embeds: torch.Tensor, text_embeds: torch.Tensor, visual: torch.Tensor, num_frames: int
    ) -> tuple[torch.Tensor, ...]:
        """Audio-text and visual-text attention, cached memory, and the text cue."""
        audio_steps, text_tokens = audio_embeds.shape[1], text_embeds.shape[1]
        audio_text = torch.cat([audio_embeds, text_embeds], 1).transpose(0, 1)
        audio_text = self.audio_text_attention(audio_text, audio_text, audio_text, need_weights=False)[0].transpose(
            0, 1
        )
        visual_text = torch.cat([visual, text_embeds], 1).transpose(0, 1)
        visual_text = self.visual_text_attention(visual_text, visual_text, visual_text, need_weights=False)[0]
        visual_text = visual_text.transpose(0, 1)
        audio_part, text_from_audio = audio_text[:, :audio_steps], audio_text[:, audio_steps:]
        visual_part, text_from_visual = visual_text[:, :-text_tokens], visual_text[:, -text_tokens:]

        beta, mode = self.config.cache_memory_beta, self.config.cached_memory
        audio_cues = cached_memory(audio_part, beta, mode)
        if mode == "inclusive_over_tokens":
            visual_cues = cached_memory(visual_part, beta, mode)
        else:
            batch_size, tokens, dim = visual_part.shape
            per_frame = visual_part.view(batch_size, num_frames, tokens // num_frames, dim)
            visual_cues = cached_memory(per_frame, beta, mode).view(batch_size, tokens, dim)
        text_cues = (text_embeds + text_from_audio + text_from_visual) / 3
        return audio_cues, visual_cues, text_cues

    def integrate(
        self, audio_cues: torch.Tensor, visual_cues: torch.Tensor, text_cues: torch.Tensor, num_frames: int
    ) -> torch.Tensor:
        """Per frame [audio cues; [aud]; the frame's visual cues; [vis]; text cues] -> integration attention."""
        batch_size, _, dim = audio_cues.shape
        visual_per_frame = visual_cues.view(batch_size, num_frames, -1, dim)
        # the modality tags are constants: all zeros after audio, all ones after video
        audio_tag = audio_cues.new_zeros(batch_size, num_frames, 1, dim)
        visual_tag = audio_cues.new_ones(batch_size, num_frames, 1, dim)
        tokens = torch.cat(
            [
                audio_cues[:, None].expand(-1, num_frames, -1, -1),
                audio_tag,
                visual_per_frame,
                visual_tag,
                text_cues[:, None].expand(-1, num_frames, -1, -1),
            ],
            2,
        )  # (B, T, S, D)
        num_tokens = tokens.shape[2]
        if self.config.integration_attention_over == "batch":
            # release: the batch axis is the attention's sequence axis; every (frame, token) is its own "batch"
            sequence = tokens.reshape(batch_size, num_frames * num_tokens, dim)
            out = self.integration_attention(sequence, sequence, sequence, need_weights=False)[0]
            return out.view(batch_size, num_frames, num_tokens, dim)
        sequence = tokens.reshape(batch_size * num_frames, num_tokens, dim).transpose(0, 1)
        out = self.integration_attention(sequence, sequence, sequence, need_weights=False)[0]
        return out.transpose(0, 1).reshape(batch_size, num_frames, num_tokens, dim)

    def read_out(
        self, class_logits: torch.Tensor, mask_logits: torch.Tensor, image_size: tuple[int, int]
    ) -> torch.Tensor:
        """
        Binary read-out: each query's mask logits weighted by P(readout class) of a 2-way softmax against no-object,
        summed at the input size, then resized to `mask_size`. Returns (N, mask_size, mask_size) logits.
        """
        pair = torch.stack([class_logits[..., self.config.readout_class_index], class_logits[..., -1]], -1)
        weights = pair.softmax(-1)[..., 0]
        masks = F.interpolate(mask_logits, size=image_size, mode="bilinear", align_corners=False)
        maps = torch.einsum("nq,nqhw->nhw", weights, masks)
        size = (self.config.mask_size, self.config.mask_size)
        return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]

    def forward(
        self,
        pixel_values: torch.Tensor,
        audio_features: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        text_features: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        audio_input_features: torch.Tensor | None = None,
        **kwargs,
    ) -> RefAvsOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_frames, 3, height, width)`):
            The frames of each clip.
        audio_features (`torch.FloatTensor` of shape `(batch_size, audio_steps, audio_feature_dim)`, *optional*):
            Precomputed VGGish features of each clip, instead of `audio_input_features`.
        input_ids, attention_mask (`torch.LongTensor` of shape `(batch_size, text_tokens)`, *optional*):
            The expression's token ids; the mask acts inside the text encoder only (as released).
        text_features (`torch.FloatTensor` of shape `(batch_size, text_tokens, text_hidden)`, *optional*):
            Precomputed text-encoder states, instead of `input_ids`.
        labels (`torch.FloatTensor` of shape `(batch_size, num_frames, mask_size, mask_size)`, *optional*):
            0/1 target masks; gives the BCE loss.
        audio_input_features (`torch.FloatTensor` of shape `(batch_size, audio_steps, 96, 64)`, *optional*):
            VGGish log-mel examples of each clip (`VggishFeatureExtractor`), run through the audio encoder; needs
            `config.audio_config`.
        """
        if (audio_features is None) == (audio_input_features is None):
            raise ValueError("Give exactly one of `audio_features` and `audio_input_features`.")
        if audio_features is None:
            audio_features = self.encode_audio(audio_input_features)
        if text_features is None:
            if input_ids is None:
                raise ValueError("Give either `input_ids` or `text_features`.")
            text_features = self.encode_text(input_ids, attention_mask)
        batch_size, num_frames = pixel_values.shape[:2]
        frames = pixel_values.flatten(0, 1)

        audio_embeds = self.audio_projection(audio_features)
        text_embeds = self.text_projection(text_features)
        # one pixel-level pass serves both the fusion (Swin's last map) and the segmentation; the original runs the
        # whole Mask2Former twice and gets the same pixel-level tensors both times
        pixel_level = self.pixel_level(frames)
        visual = self.visual_tokens(pixel_level.encoder_last_hidden_state, batch_size)
        audio_cues, visual_cues, text_cues = self.fuse(audio_embeds, text_embeds, visual, num_frames)
        integrated = self.integrate(audio_cues, visual_cues, text_cues, num_frames)
        prompts = self.prompt_projection(integrated).flatten(0, 1)  # (B*T, S, hidden)

        queries = self.transformer_module.queries_features.weight.unsqueeze(1).repeat(1, prompts.shape[0], 1)
        prompted = self.query_prompter(queries, prompts)
        decoded = self.transformer_module(
            pixel_level.decoder_hidden_states, pixel_level.decoder_last_hidden_state, query_features=prompted
        )
        class_logits = self.class_predictor(decoded.intermediate_hidden_states[-1].transpose(0, 1))
        mask_logits = decoded.masks_queries_logits[-1]
        maps = self.read_out(class_logits, mask_logits, tuple(frames.shape[-2:]))
        logits = maps.view(batch_size, num_frames, *maps.shape[-2:])

        loss = None
        if labels is not None:
            loss = self.config.bce_loss_weight * F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        return RefAvsOutput(
            loss=loss,
            logits=logits,
            audio_embeds=audio_embeds,
            text_embeds=text_embeds,
            audio_cues=audio_cues,
            visual_cues=visual_cues,
            text_cues=text_cues,
            integrated_tokens=integrated,
            prompts=prompts,
            prompted_queries=prompted,
            encoder_last_hidden_state=pixel_level.encoder_last_hidden_state,
            pixel_decoder_last_hidden_state=pixel_level.decoder_last_hidden_state,
            transformer_decoder_last_hidden_state=decoded.last_hidden_state,
            class_queries_logits=class_logits,
            masks_queries_logits=mask_logits,
        )
