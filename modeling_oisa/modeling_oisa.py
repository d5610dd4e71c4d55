"""OISA: InternViT + ViT-Adapter, Qwen2, a Whisper encoder and a `[SEG]`-driven mask head."""

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

import torch
from torch import nn
from transformers import AutoModel, GenerationConfig, GenerationMixin, InternVLVisionModel, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.mask2former.modeling_mask2former import Mask2FormerPixelDecoder
from transformers.utils import ModelOutput

from .audio_encoder import OisaAudioEncoder, audio_token_counts
from .configuration_oisa import OVERRIDABLE_FIELDS, OisaConfig
from .deformable_attention import OisaMultiscaleDeformableAttention
from .losses import point_mask_losses, presence_loss
from .mask_head import OisaMaskHead, OisaQueryDecoder, OisaQueryDecoderLayer, OisaQueryDecoderOutput
from .pretrained import OisaCheckpointError, check_model_folder, find_original_checkpoint
from .vision_adapter import OisaExtractorAttention, OisaViTAdapter


class ImageTokenMode(IntEnum):
    """How an image reaches the LLM (the evaluation `frame_flag` of the original)."""

    HIDDEN = 0  # segmented by the mask head, not shown to the LLM
    POOLED = 1  # one token: the mean of its projected tokens
    DENSE = 2  # all its projected tokens


class AudioTokenMode(IntEnum):
    """How an audio clip reaches the LLM (the `audio_flags` of the original)."""

    UNUSED = 0  # a placeholder clip that is not injected
    EXPRESSION = 1  # fills `<AUDIO_CONTEXT>` slots
    SOUNDTRACK = 2  # fills `<AUDIO_CONTEXT>` slots and, again, the per-frame `<SUB_AUDIO_CONTEXT>` slots


MULTIMODAL_INPUT_NAMES = (
    "pixel_values",
    "image_token_modes",
    "input_features",
    "audio_feature_lengths",
    "audio_token_modes",
    "images_per_sample",
    "segmentation_frame_mask",
    "gt_masks",
    "gt_mask_valid",
)


# dtypes in which the deformable-attention blocks keep float32 weights (`deformable_attention_fp32`)
LOW_PRECISION = (torch.float16, torch.bfloat16)


class OisaInjectionError(ValueError):
    """The prompt's placeholder tokens do not match the multimodal embeddings given."""


@dataclass
class OisaImageFeatures(ModelOutput):
    r"""
    vision_embeds (`torch.Tensor` of shape `(num_images, num_image_tokens, text_hidden_size)`):
        Projected ViT tokens, the LLM's view of each image.
    image_maps (`list[torch.Tensor]`):
        The adapter's four maps `(num_images, vision_hidden_size, H/s, W/s)` at strides s = 4, 8, 16, 32, in float32,
        of the images they were asked for (`maps_for` of `get_image_features`; all by default).
    vit_last_hidden_state (`torch.Tensor` of shape `(num_images, 1 + num_patches, vision_hidden_size)`):
        InternViT's last hidden state, CLS first.
    """

    vision_embeds: torch.Tensor | None = None
    image_maps: list[torch.Tensor] | None = None
    vit_last_hidden_state: torch.Tensor | None = None


@dataclass
class OisaOutput(ModelOutput):
    r"""
    loss (`torch.Tensor`, *optional*):
        Weighted sum of the LM, presence, Dice and BCE losses (weights from the config).
    lm_loss (`torch.Tensor`, *optional*):
        Next-token cross-entropy over the supervised tokens.
    class_loss (`torch.Tensor`, *optional*):
        Per-frame presence cross-entropy of the `[SEG]` queries.
    dice_loss (`torch.Tensor`, *optional*):
        Point-sampled Dice loss of the masks.
    bce_loss (`torch.Tensor`, *optional*):
        Point-sampled binary cross-entropy of the masks.
    logits (`torch.Tensor` of shape `(batch_size, sequence_length, vocab_size)`):
        LM logits.
    cache (`Cache`, *optional*):
        The LLM's key/value cache.
    last_hidden_state (`torch.Tensor` of shape `(batch_size, sequence_length, text_hidden_size)`):
        The LLM's last hidden state after its final norm: what feeds the mask head.
    hidden_states (`tuple[torch.Tensor]`, *optional*):
        The LLM's hidden states, when asked for.
    attentions (`tuple[torch.Tensor]`, *optional*):
        The LLM's attentions, when asked for.
    mask_logits (`tuple[torch.Tensor]`, *optional*):
        For each `[SEG]` of the batch in order, its mask logits `(num_frames, H/4, W/4)` over its sample's frames.
    class_logits (`tuple[torch.Tensor]`, *optional*):
        For each `[SEG]` of the batch in order, its presence logits `(num_frames, 2)`.
    mask_point_coords (`torch.Tensor`, *optional*):
        The points at which the mask losses were evaluated, `(num_supervised_frames, num_points, 2)`.
    """

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    class_loss: torch.Tensor | None = None
    dice_loss: torch.Tensor | None = None
    bce_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Cache | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    mask_logits: tuple[torch.Tensor, ...] | None = None
    class_logits: tuple[torch.Tensor, ...] | None = None
    mask_point_coords: torch.Tensor | None = None


class OisaProjector(nn.Module):
    """LayerNorm, linear, activation, linear: the vision (`mlp1`) and audio (`mlp2`) projectors."""

    def __init__(self, input_dim: int, output_dim: int, hidden_act: str):
        super().__init__()
        self.layer_norm = nn.LayerNorm(input_dim)
        self.linear_1 = nn.Linear(input_dim, output_dim)
        self.act = ACT2FN[hidden_act]
        self.linear_2 = nn.Linear(output_dim, output_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.layer_norm(hidden_states))))


def pixel_shuffle(patch_tokens: torch.Tensor, ratio: float) -> torch.Tensor:
    """
    (N, g*g, C) ViT patch tokens -> (N, (g*ratio)^2, C/ratio^2): token (r, c) concatenates the input tokens
    (2r, 2c), (2r, 2c+1), (2r+1, 2c), (2r+1, 2c+1) for ratio 0.5 (InternVL's pixel shuffle, `ps_version` v2).
    """
    batch_size, num_patches, channels = patch_tokens.shape
    grid = int(num_patches**0.5)
    factor = int(round(1 / ratio))
    tokens = patch_tokens.reshape(batch_size, grid // factor, factor, grid // factor, factor, channels)
    tokens = tokens.permute(0, 1, 3, 2, 4, 5)
    return tokens.reshape(batch_size, (grid // factor) ** 2, factor * factor * channels)


class OisaPreTrainedModel(PreTrainedModel):
    config: OisaConfig
    base_model_prefix = "oisa"
    main_input_name = "input_ids"
    input_modalities = ("image", "video", "audio", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = [
        "InternVLVisionLayer",
        "Qwen2DecoderLayer",
        "WhisperEncoderLayer",
        "OisaAdapterExtractor",
        "OisaQueryDecoderLayer",
    ]
    _skip_keys_device_placement = ["cache"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    @classmethod
    def is_custom_code(cls) -> bool:
        # `_init_weights` below uses `transformers.initialization` throughout, as native models do. The custom-code
        # heuristic would skip every module without direct parameters, such as the deformable attention and the
        # decoder layers whose init is set here.
        return False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, OisaMultiscaleDeformableAttention):
            init.zeros_(module.sampling_offsets.weight)
            init.copy_(module.sampling_offsets.bias, module.offset_grid())
            init.zeros_(module.attention_weights.weight)
            init.zeros_(module.attention_weights.bias)
            init.xavier_uniform_(module.value_proj.weight)
            init.zeros_(module.value_proj.bias)
            init.xavier_uniform_(module.output_proj.weight)
            init.zeros_(module.output_proj.bias)
        elif isinstance(module, OisaViTAdapter):
            init.normal_(module.level_embed, std=1.0)
        elif isinstance(module, Mask2FormerPixelDecoder):
            init.normal_(module.level_embed, std=1.0)
            for projection in module.input_projections:
                init.xavier_uniform_(projection[0].weight)
                init.zeros_(projection[0].bias)
            for conv in (module.adapter_1[0], module.layer_1[0], module.mask_projection):
                # detectron2's c2_xavier_fill
                init.kaiming_uniform_(conv.weight, a=1)
                if conv.bias is not None:
                    init.zeros_(conv.bias)
        elif isinstance(module, OisaQueryDecoderLayer):
            for parameter in module.parameters():
                if parameter.dim() > 1:
                    init.xavier_uniform_(parameter)
            init.zeros_(module.cross_attn.in_proj_bias)
        elif isinstance(module, OisaQueryDecoder):
            init.normal_(module.level_embed.weight, std=1.0)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "OisaPreTrainedModel":
        """
        As `nn.Module._apply`, except that the tensors of `_keep_in_fp32_modules_strict` stay float32 when `fn` casts
        them to float16 or bfloat16 (`model.to(torch.bfloat16)`, `.bfloat16()`, `.half()`), as they do on loading;
        device moves still apply, and they keep their full float32 values.
        """
        kept = self._float32_tensor_ids()
        if not kept:
            return super()._apply(fn, recurse)

        def keep_float32(tensor: torch.Tensor) -> torch.Tensor:
            converted = fn(tensor)
            if id(tensor) in kept and tensor.dtype == torch.float32 and converted.dtype in LOW_PRECISION:
                return tensor.to(converted.device)
            return converted

        return super()._apply(keep_float32, recurse)

    def _float32_tensor_ids(self) -> set[int]:
        """Ids of the parameters, their gradients and the buffers that `_keep_in_fp32_modules_strict` names."""
        if not self._keep_in_fp32_modules_strict:
            return set()
        # the patterns as transformers matches them on loading: `*` is a wildcard, searched anywhere in the name
        pattern = re.compile("|".join(name.replace("*", ".*") for name in self._keep_in_fp32_modules_strict))
        ids = set()
        for name, tensor in [*self.named_parameters(), *self.named_buffers()]:
            if pattern.search(name):
                ids.add(id(tensor))
                if tensor.grad is not None:
                    ids.add(id(tensor.grad))
        return ids


class OisaForReferringSegmentation(OisaPreTrainedModel, GenerationMixin):
    """
    OISA: answers a referring expression made of text, speech, sound and an image about an audio-visual video, and
    segments the referred object in every frame from the hidden state of the `[SEG]` token it generates.
    """

    _tied_weights_keys = {"lm_head.weight": "language_model.embed_tokens.weight"}

    def __init__(self, config: OisaConfig):
        super().__init__(config)
        self.loss_type = "ForCausalLM"
        self.vision_tower = InternVLVisionModel(config.vision_config)
        self.vision_adapter = OisaViTAdapter(config)
        vision_tokens_width = config.vision_config.hidden_size * int(round(1 / config.downsample_ratio)) ** 2
        self.multi_modal_projector = OisaProjector(
            vision_tokens_width, config.text_config.hidden_size, config.projector_hidden_act
        )
        self.language_model = AutoModel.from_config(config.text_config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.audio_tower = OisaAudioEncoder(config.audio_config)
        self.audio_projector = OisaProjector(
            config.audio_config.d_model, config.text_config.hidden_size, config.projector_hidden_act
        )
        self.mask_head = OisaMaskHead(config)
        # the blocks that run in float32 (the extractors' deformable attention and the pixel decoder) keep float32
        # weights in a bfloat16 or float16 model: on loading (transformers reads `_keep_in_fp32_modules_strict`), when
        # cast (`_apply`) and when built under a lower-precision default dtype (below), so that a call only casts its
        # activations
        float32_blocks = (OisaExtractorAttention, Mask2FormerPixelDecoder)
        float32_modules = [
            name
            for name, module in self.named_modules()
            if config.deformable_attention_fp32 and isinstance(module, float32_blocks)
        ]
        self._keep_in_fp32_modules_strict = float32_modules
        self.post_init()
        for name in float32_modules:
            self.get_submodule(name)._apply(lambda tensor: tensor.float() if tensor.dtype in LOW_PRECISION else tensor)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike | None, *model_args, **kwargs
    ) -> "OisaForReferringSegmentation":
        r"""
        Loads OISA from our format, or from an original OISA checkpoint (`model_type: internvl_chat`, e.g. the released
        `FudanCVL/OISA-1B-OmniAVS`), which is converted in memory: LoRA pairs merged, weights renamed and checked
        strictly, config rebuilt from the weights. The original does not describe its Whisper encoder's head count;
        it comes from an `internomni_whisper_config.json` or `audio_encoder_config.json` beside the weights, or from
        the extra argument `audio_encoder_config` (a WhisperConfig dict or the path of its JSON). Any other size the
        checkpoint cannot say is given as a keyword argument named as the `OisaConfig` field
        (`adapter_interaction_indexes=[[0, 1], [2, 4]]`, `vision_config={"num_attention_heads": 8}`).
        """
        original_dir = None
        if pretrained_model_name_or_path is not None:
            if os.path.isdir(pretrained_model_name_or_path):
                # one message naming the file, before transformers fails deeper or loads the folder wrongly
                check_model_folder(pretrained_model_name_or_path, config_given=kwargs.get("config") is not None)
            download_kwargs = {name: value for name, value in kwargs.items() if name != "config"}
            original_dir = find_original_checkpoint(
                pretrained_model_name_or_path, kwargs.get("config"), **download_kwargs
            )
        if original_dir is None:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        try:
            # the converter loads only for original folders; Hub remote code carries the model, not the converter
            from modeling_oisa.conversion.original import convert_original_in_memory
        except ImportError as error:
            raise OisaCheckpointError(
                f"{pretrained_model_name_or_path} is an original OISA checkpoint: converting it needs the oisa "
                "package installed"
            ) from error

        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        config_overrides = {name: kwargs.pop(name) for name in OVERRIDABLE_FIELDS if name in kwargs}
        converted = convert_original_in_memory(
            original_dir,
            cls,
            audio_encoder_config=kwargs.pop("audio_encoder_config", None),
            dtype=dtype if isinstance(dtype, torch.dtype) else None,
            config_overrides=config_overrides,
        )
        for name in ("cache_dir", "revision", "token", "force_download", "local_files_only", "trust_remote_code"):
            kwargs.pop(name, None)
        kwargs["config"] = converted.config
        loaded = super().from_pretrained(None, *model_args, state_dict=converted.state_dict, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.config.name_or_path = str(pretrained_model_name_or_path)
        # the original's chat loop stops at <|im_end|>, which it passes to `generate` explicitly
        model.generation_config = GenerationConfig(
            bos_token_id=converted.config.text_config.bos_token_id,
            eos_token_id=converted.end_of_turn_token_id,
            pad_token_id=converted.pad_token_id,
        )
        return loaded

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_image_features(
        self, pixel_values: torch.Tensor, chunk_size: int | None = None, maps_for: torch.Tensor | None = None
    ) -> OisaImageFeatures:
        """
        pixel_values (N, 3, H, W) normalised images -> the LLM tokens of each image and the adapter's four maps.
        Images go through the towers `chunk_size` at a time (all at once by default); every image is independent.
        `maps_for` (N,) bool: the images whose maps are needed (the frames to segment); the others go through the ViT
        alone, which gives the same tokens, and `image_maps` then holds the maps of the chosen images only, in order.
        """
        if maps_for is not None and not bool(maps_for.all()):
            return self._image_features_with_some_maps(pixel_values, chunk_size, maps_for)
        chunk_size = chunk_size or pixel_values.shape[0]
        vision_embeds, vit_states, image_maps = [], [], []
        for start in range(0, pixel_values.shape[0], chunk_size):
            chunk = pixel_values[start : start + chunk_size].to(self.vision_tower.dtype)
            vit_last_hidden_state, maps = self.vision_adapter(chunk, self.vision_tower)
            vision_embeds.append(self._project_vit_tokens(vit_last_hidden_state))
            vit_states.append(vit_last_hidden_state)
            image_maps.append(maps)
        return OisaImageFeatures(
            vision_embeds=torch.cat(vision_embeds),
            image_maps=[torch.cat(level) for level in zip(*image_maps)],
            vit_last_hidden_state=torch.cat(vit_states),
        )

    def _image_features_with_some_maps(
        self, pixel_values: torch.Tensor, chunk_size: int | None, maps_for: torch.Tensor
    ) -> OisaImageFeatures:
        """`get_image_features` with the adapter run on the `maps_for` images only (referring images need no maps)."""
        maps_for = maps_for.to(device=pixel_values.device, dtype=torch.bool)
        mapped, plain = torch.nonzero(maps_for).flatten(), torch.nonzero(~maps_for).flatten()
        vit_states = [self.vision_tower(pixel_values[plain].to(self.vision_tower.dtype)).last_hidden_state]
        image_maps: list[torch.Tensor] = []
        if mapped.numel() > 0:
            with_maps = self.get_image_features(pixel_values[mapped], chunk_size)
            vit_states.insert(0, with_maps.vit_last_hidden_state)
            image_maps = with_maps.image_maps
        # back to the order of `pixel_values`
        vit_last_hidden_state = torch.cat(vit_states)[torch.argsort(torch.cat([mapped, plain]))]
        return OisaImageFeatures(
            vision_embeds=self._project_vit_tokens(vit_last_hidden_state),
            image_maps=image_maps,
            vit_last_hidden_state=vit_last_hidden_state,
        )

    def _project_vit_tokens(self, vit_last_hidden_state: torch.Tensor) -> torch.Tensor:
        """ViT states (N, 1 + patches, vision_hidden), CLS first -> LLM tokens (N, num_image_tokens, text_hidden)."""
        return self.multi_modal_projector(pixel_shuffle(vit_last_hidden_state[:, 1:], self.config.downsample_ratio))

    def get_vision_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """
        The LLM tokens of each image (N, num_image_tokens, text_hidden) without the adapter's maps: the ViT alone,
        which the adapter never modifies, so the tokens equal those of `get_image_features`.
        """
        return self._project_vit_tokens(self.vision_tower(pixel_values.to(self.vision_tower.dtype)).last_hidden_state)

    def get_audio_features(
        self, input_features: torch.Tensor, audio_feature_lengths: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """
        input_features (A, mel_bins, frames) log-mel clips, batched together as the original batches one expression's
        clips; audio_feature_lengths (A,) real mel frames. Returns one (tokens_i, text_hidden) tensor per clip.
        """
        if audio_feature_lengths is None:
            audio_feature_lengths = torch.full(
                (input_features.shape[0],), input_features.shape[-1], dtype=torch.long, device=input_features.device
            )
        encoded = self.audio_tower(input_features, audio_feature_lengths).last_hidden_state
        projected = self.audio_projector(encoded)
        counts = audio_token_counts(audio_feature_lengths).tolist()
        return [clip[:count] for clip, count in zip(projected, counts)]

    def inject_multimodal_embeddings(
        self,
        input_ids: torch.Tensor,
        inputs_embeds: torch.Tensor,
        vision_embeds: torch.Tensor | None = None,
        image_token_modes: torch.Tensor | None = None,
        audio_embeds: list[torch.Tensor] | None = None,
        audio_token_modes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Writes the multimodal embeddings into the placeholder slots of `inputs_embeds`, in order over the flattened
        batch: each image's tokens (dense) or their mean (pooled) into `<IMG_CONTEXT>`; every used audio clip into
        `<AUDIO_CONTEXT>`; the soundtrack clips again into `<SUB_AUDIO_CONTEXT>`. A count mismatch is an error.
        """
        image_slots = []
        if vision_embeds is not None:
            if image_token_modes is None:
                image_token_modes = torch.full((vision_embeds.shape[0],), int(ImageTokenMode.DENSE))
            for embeds, mode in zip(vision_embeds, image_token_modes.tolist()):
                if mode == ImageTokenMode.DENSE:
                    image_slots.append(embeds)
                elif mode == ImageTokenMode.POOLED:
                    image_slots.append(embeds.mean(0, keepdim=True))
        audio_slots, sub_audio_slots = [], []
        if audio_embeds is not None:
            if audio_token_modes is None:
                audio_token_modes = torch.full((len(audio_embeds),), int(AudioTokenMode.EXPRESSION))
            for embeds, mode in zip(audio_embeds, audio_token_modes.tolist()):
                if mode != AudioTokenMode.UNUSED:
                    audio_slots.append(embeds)
                if mode == AudioTokenMode.SOUNDTRACK:
                    sub_audio_slots.append(embeds)

        for token_id, name, slots in (
            (self.config.image_token_id, "image (<IMG_CONTEXT>)", image_slots),
            (self.config.audio_token_id, "audio (<AUDIO_CONTEXT>)", audio_slots),
            (self.config.sub_audio_token_id, "per-frame soundtrack (<SUB_AUDIO_CONTEXT>)", sub_audio_slots),
        ):
            placeholder_mask = input_ids == token_id
            num_placeholders = int(placeholder_mask.sum())
            num_embeddings = sum(slot.shape[0] for slot in slots)
            if num_placeholders != num_embeddings:
                raise OisaInjectionError(
                    f"The prompt has {num_placeholders} {name} placeholder tokens but {num_embeddings} {name} "
                    f"embeddings were given; build the prompt with the processor from the same inputs."
                )
            if num_placeholders:
                values = torch.cat(slots).to(inputs_embeds.device, inputs_embeds.dtype)
                inputs_embeds = inputs_embeds.masked_scatter(placeholder_mask[..., None], values)
        return inputs_embeds

    def segment_frames(
        self,
        seg_hidden_states: torch.Tensor,
        image_maps: list[torch.Tensor],
        chunk_size: int | None = None,
        output_intermediate: bool = False,
    ) -> OisaQueryDecoderOutput:
        """
        Per-frame mask and presence logits of `[SEG]` hidden states (Q, text_hidden) over frames whose adapter maps
        are `image_maps` (four tensors (T, C, h, w), temporal order). The query is carried from frame to frame, and
        frames go through the pixel decoder `chunk_size` at a time (`config.mask_head_chunk_size` by default).
        """
        return self.mask_head(seg_hidden_states, image_maps, chunk_size, output_intermediate)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_token_modes: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        audio_feature_lengths: torch.Tensor | None = None,
        audio_token_modes: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        images_per_sample: torch.Tensor | None = None,
        segmentation_frame_mask: torch.Tensor | None = None,
        gt_masks: torch.Tensor | None = None,
        gt_mask_valid: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> OisaOutput:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
            Prompt ids with `<IMG_CONTEXT>`, `<AUDIO_CONTEXT>` and `<SUB_AUDIO_CONTEXT>` placeholders.
        pixel_values (`torch.Tensor` of shape `(num_images, 3, image_size, image_size)`, *optional*):
            Every image of the batch (frames, then the referring image), sample after sample.
        image_token_modes (`torch.Tensor` of shape `(num_images,)`, *optional*):
            [`ImageTokenMode`] of each image; all dense when omitted.
        input_features (`torch.Tensor` of shape `(num_clips, mel_bins, 3000)`, *optional*):
            Log-mel features of every audio clip of the batch, in prompt order.
        audio_feature_lengths (`torch.Tensor` of shape `(num_clips,)`, *optional*):
            Real mel frames of each clip (its samples // 160).
        audio_token_modes (`torch.Tensor` of shape `(num_clips,)`, *optional*):
            [`AudioTokenMode`] of each clip.
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            LM targets, -100 where not supervised.
        images_per_sample (`torch.Tensor` of shape `(batch_size,)`, *optional*):
            How many rows of `pixel_values` each sample owns (needed for a batch of several samples with masks).
        segmentation_frame_mask (`torch.Tensor` of shape `(num_images,)`, *optional*):
            True for the frames the mask head segments (False for referring images); all True when omitted.
        gt_masks (`torch.Tensor` of shape `(num_masks, H, W)`, *optional*):
            Ground-truth masks: for each sample, for each of its `[SEG]` tokens, one per segmentation frame.
        gt_mask_valid (`torch.Tensor` of shape `(num_masks,)`, *optional*):
            Which ground-truth masks are supervised; all when omitted.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Give exactly one of `input_ids` and `inputs_embeds`.")
        image_features = None
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
            if pixel_values is not None and pixel_values.shape[0] > 0:
                # in training only the frames to segment need the adapter's maps
                maps_for = segmentation_frame_mask if gt_masks is not None else None
                image_features = self.get_image_features(pixel_values, maps_for=maps_for)
            audio_embeds = None
            if input_features is not None and input_features.shape[0] > 0:
                audio_embeds = self.get_audio_features(input_features, audio_feature_lengths)
            inputs_embeds = self.inject_multimodal_embeddings(
                input_ids,
                inputs_embeds,
                image_features.vision_embeds if image_features is not None else None,
                image_token_modes,
                audio_embeds,
                audio_token_modes,
            )

        outputs: BaseModelOutputWithPast = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        last_hidden_state = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(last_hidden_state[:, slice_indices, :])

        result = OisaOutput(
            logits=logits,
            cache=outputs.cache,
            last_hidden_state=last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        if labels is not None:
            result.lm_loss = self._lm_loss(logits, labels)
        if gt_masks is not None and (gt_masks.shape[0] > 0 or image_features is not None):
            if input_ids is None or image_features is None:
                raise ValueError("Mask supervision needs `input_ids` and `pixel_values`.")
            self._add_mask_losses(
                result,
                input_ids,
                image_features.vision_embeds.shape[0],
                image_features.image_maps,
                images_per_sample,
                segmentation_frame_mask,
                gt_masks,
                gt_mask_valid,
            )
        if result.lm_loss is not None or result.class_loss is not None:
            result.loss = self._total_loss(result)
        return result

    def _lm_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] != labels.shape[1]:
            raise ValueError("`labels` need the logits of every position: leave `logits_to_keep` at 0 when training.")
        if not (labels[:, 1:] != -100).any():
            # a batch with nothing to predict contributes nothing, instead of a NaN mean (B22)
            return logits.sum() * 0.0
        return self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size)

    def _add_mask_losses(
        self,
        result: OisaOutput,
        input_ids: torch.Tensor,
        num_images: int,
        image_maps: list[torch.Tensor],
        images_per_sample: torch.Tensor | None,
        segmentation_frame_mask: torch.Tensor | None,
        gt_masks: torch.Tensor,
        gt_mask_valid: torch.Tensor | None,
    ) -> None:
        """`image_maps` hold the segmentation frames only (all images when `segmentation_frame_mask` is None)."""
        batch_size = input_ids.shape[0]
        if images_per_sample is None:
            if batch_size != 1:
                raise ValueError("A batch of several samples with masks needs `images_per_sample`.")
            images_per_sample = torch.tensor([num_images])
        if int(images_per_sample.sum()) != num_images:
            raise ValueError(f"`images_per_sample` sums to {int(images_per_sample.sum())} but {num_images} images were given.")
        if segmentation_frame_mask is None:
            segmentation_frame_mask = torch.ones(num_images, dtype=torch.bool)
        if gt_mask_valid is None:
            gt_mask_valid = torch.ones(gt_masks.shape[0], dtype=torch.bool, device=gt_masks.device)
        segmentation_frame_mask = segmentation_frame_mask.to(input_ids.device)
        # row of each segmentation frame in `image_maps`
        map_rows = torch.cumsum(segmentation_frame_mask.long(), 0) - 1

        seg_positions = input_ids == self.config.seg_token_id
        first_image = torch.cumsum(images_per_sample, 0) - images_per_sample
        mask_logits, class_logits, targets, target_valid = [], [], [], []
        mask_offset = 0
        for sample in range(batch_size):
            seg_hidden_states = result.last_hidden_state[sample][seg_positions[sample]]
            if seg_hidden_states.shape[0] == 0:
                continue
            start = int(first_image[sample])
            sample_frames = segmentation_frame_mask[start : start + int(images_per_sample[sample])]
            frame_rows = map_rows[start + torch.nonzero(sample_frames).flatten()]
            if frame_rows.numel() == 0:
                raise ValueError(f"Sample {sample} has [SEG] tokens but no segmentation frame.")
            decoded = self.segment_frames(seg_hidden_states, [level[frame_rows] for level in image_maps])
            num_masks = decoded.mask_logits.shape[0] * decoded.mask_logits.shape[1]
            if mask_offset + num_masks > gt_masks.shape[0]:
                raise ValueError(
                    f"Sample {sample} has {seg_hidden_states.shape[0]} [SEG] token(s) over {len(frame_rows)} "
                    f"segmentation frame(s), but only {gt_masks.shape[0] - mask_offset} ground-truth masks are left."
                )
            mask_logits.extend(decoded.mask_logits)
            class_logits.extend(decoded.class_logits)
            targets.append(gt_masks[mask_offset : mask_offset + num_masks])
            target_valid.append(gt_mask_valid[mask_offset : mask_offset + num_masks])
            mask_offset += num_masks
        if mask_offset != gt_masks.shape[0]:
            raise ValueError(
                f"{gt_masks.shape[0]} ground-truth masks were given but the batch's [SEG] tokens and segmentation "
                f"frames need {mask_offset}."
            )
        result.mask_logits = tuple(mask_logits)
        result.class_logits = tuple(class_logits)

        if mask_offset == 0 or not bool(torch.cat(target_valid).any()):
            # nothing to supervise: keep the mask branch in the graph with a zero loss
            zero = sum(level.sum() for level in image_maps) * 0.0 + sum(p.sum() for p in self.mask_head.parameters()) * 0.0
            result.class_loss, result.dice_loss, result.bce_loss = zero, zero, zero
            return
        valid = torch.cat(target_valid).bool()
        predicted_masks = torch.cat([logits for logits in mask_logits])[valid]
        predicted_classes = torch.cat([logits for logits in class_logits])[valid]
        target_masks = torch.cat(targets)[valid].to(predicted_masks.device)
        result.class_loss = presence_loss(predicted_classes.float(), target_masks, self.config.no_object_weight)
        point_losses = point_mask_losses(
            predicted_masks,
            target_masks,
            self.config.train_num_points,
            self.config.oversample_ratio,
            self.config.importance_sample_ratio,
        )
        result.bce_loss = point_losses["bce"]
        result.dice_loss = point_losses["dice"]
        result.mask_point_coords = point_losses["point_coords"]

    def _total_loss(self, result: OisaOutput) -> torch.Tensor:
        config = self.config
        total = 0.0
        if result.lm_loss is not None:
            total = total + config.lm_loss_weight * result.lm_loss
        if result.class_loss is not None:
            total = (
                total
                + config.class_loss_weight * result.class_loss
                + config.dice_loss_weight * result.dice_loss
                + config.bce_loss_weight * result.bce_loss
            )
        return total

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool = False,
        **kwargs,
    ) -> dict:
        # images and audio are injected at the first step only; later steps read them from the cache
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            cache=cache,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        if not is_first_iteration and kwargs.get("use_cache", True):
            for name in MULTIMODAL_INPUT_NAMES:
                model_inputs.pop(name, None)
        return model_inputs


__all__ = [
    "AudioTokenMode",
    "ImageTokenMode",
    "OisaForReferringSegmentation",
    "OisaImageFeatures",
    "OisaInjectionError",
    "OisaOutput",
    "OisaPreTrainedModel",
    "pixel_shuffle",
]
