"""
Configuration of EEMC, the Ref-AVS benchmark's baseline (Wang et al., ECCV 2024, GitHub GeWu-Lab/Ref-AVS), and of its
VGGish audio encoder.
"""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, Mask2FormerConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


PROFILES = ("release", "fixed")

# Each behaviour switch with its value under the `release` profile (what the released code computes, spec refavs.md
# §2.3) and the `fixed` one (what the paper describes, §2.2).
PROFILE_SWITCHES = {
    # release: the Swin map [T, C, h, w] is cut with `.view` into C-wide chunks of its channel-major memory, so a
    # "token" is ~C/(h*w) channels x h*w positions; fixed: one token per position (the channel vector)
    "visual_token_layout": {"release": "flat_view", "fixed": "per_position"},
    # release: output = 2F - cumsum(F)/k, the mean including the current step, along the token axis (all T*h*w visual
    # tokens in a row); fixed: the paper's mean over the previous frames only (0 at the first), per position over time
    "cached_memory": {"release": "inclusive_over_tokens", "fixed": "exclusive_over_time"},
    # release: `mha_mm` gets a batch-first tensor while it is sequence-first, so it attends across the videos of the
    # batch; fixed: over the integration tokens of one frame
    "integration_attention_over": {"release": "batch", "fixed": "tokens"},
    # release: Swin as transformers 4.30 ran it, where a stage whose map is no larger than the window gets one window
    # and no shift (Swin-B's stage 4: 12x12 maps, window 12); fixed: shifted windows at every size, as transformers 5
    # (and the original Swin of Mask2Former) compute it
    "swin_small_map_windows": {"release": "clamp", "fixed": "always_partition"},
    # release: the pixel decoder's adapters replace the deformable attention's output (in series); fixed: residual
    "adapter_placement": {"release": "series", "fixed": "residual"},
}

SWITCH_CHOICES = {
    "swin_small_map_windows": ("clamp", "always_partition"),
    "visual_token_layout": ("flat_view", "per_position"),
    "cached_memory": ("inclusive_over_tokens", "exclusive_over_time"),
    "integration_attention_over": ("batch", "tokens"),
    "adapter_placement": ("series", "residual"),
}

# `facebook/mask2former-swin-base-ade-semantic`, the Mask2Former the original loads (its released hub config)
MASK2FORMER_SWIN_BASE_ADE = {
    "backbone_config": {
        "model_type": "swin",
        "embed_dim": 128,
        "depths": [2, 2, 18, 2],
        "num_heads": [4, 8, 16, 32],
        "window_size": 12,
        "image_size": 384,
        "drop_path_rate": 0.3,
        "out_features": ["stage1", "stage2", "stage3", "stage4"],
    },
    "num_labels": 150,
    "encoder_layers": 6,
    "decoder_layers": 10,
    "encoder_feedforward_dim": 1024,
    "dim_feedforward": 2048,
}
# `distilbert/distilroberta-base`, the text encoder the original's dataset runs
DISTILROBERTA_BASE = {
    "vocab_size": 50265,
    "hidden_size": 768,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 514,
    "type_vocab_size": 1,
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "pad_token_id": 1,
    "eos_token_id": 2,
}


@strict
class VggishConfig(PreTrainedConfig):
    r"""
    Configuration of [`VggishAudioEncoder`], VGGish (Hershey et al., ICASSP 2017) as EEMC runs it. Defaults are the
    public VGGish (the torchvggish state dict) with the output the original's towhee operator `audio_embedding.vggish`
    returns: the last linear layer's output without ReLU, PCA or quantisation (docs/refavs-eemc.md, "VGGish").

    Args:
        num_frames (`int`, *optional*, defaults to 96):
            Log-mel frames of one example (0.96 s at a 10 ms hop).
        num_mel_bins (`int`, *optional*, defaults to 64):
            Mel bands of one example.
        conv_channels (`list[list[int]]`, *optional*, defaults to `[[64], [128], [256, 256], [512, 512]]`):
            Output channels of the 3x3 convolutions (each followed by a ReLU), one list per stage; every stage ends
            with a 2x2 max-pool.
        hidden_sizes (`list[int]`, *optional*, defaults to `[4096, 4096]`):
            Widths of the fully connected layers (each followed by a ReLU) between the convolutions and the embedding.
        embedding_size (`int`, *optional*, defaults to 128):
            Width of the embedding, one vector per example.
        final_relu (`bool`, *optional*, defaults to `False`):
            ReLU on the embedding layer's output. torchvggish applies it; towhee's VGGish, which the original runs,
            does not.
        postprocess (`bool`, *optional*, defaults to `False`):
            AudioSet's post-processing (torchvggish's `Postprocessor`): PCA with whitening, clipping to [-2, 2] and
            8-bit quantisation to the values 0..255 (returned as floats). The original does not apply it.
    """

    model_type = "vggish"

    num_frames: int = 96
    num_mel_bins: int = 64
    conv_channels: list[list[int]] | None = None
    hidden_sizes: list[int] | None = None
    embedding_size: int = 128
    final_relu: bool = False
    postprocess: bool = False

    def __post_init__(self, **kwargs):
        if self.conv_channels is None:
            self.conv_channels = [[64], [128], [256, 256], [512, 512]]
        if self.hidden_sizes is None:
            self.hidden_sizes = [4096, 4096]
        if not self.conv_channels or not all(self.conv_channels):
            raise ValueError(f"`conv_channels` needs at least one stage of one convolution; got {self.conv_channels}.")
        downsampling = 2 ** len(self.conv_channels)
        if self.num_frames % downsampling or self.num_mel_bins % downsampling:
            raise ValueError(
                f"An example of {self.num_frames} x {self.num_mel_bins} cannot pass {len(self.conv_channels)} 2x2 "
                f"max-pools evenly; both sides must be multiples of {downsampling}."
            )
        super().__post_init__(**kwargs)

    @property
    def flattened_size(self) -> int:
        """Width of the last convolution stage's map flattened, the first linear layer's input."""
        downsampling = 2 ** len(self.conv_channels)
        return self.conv_channels[-1][-1] * (self.num_frames // downsampling) * (self.num_mel_bins // downsampling)


@strict
class RefAvsConfig(PreTrainedConfig):
    r"""
    Configuration of [`RefAvsForReferringSegmentation`], the EEMC baseline of Ref-AVS. Defaults are the released
    model: Mask2Former Swin-B (ADE20K semantic) with its 100 queries, DistilRoBERTa text features, VGGish audio
    features, and the original's hard-coded widths.

    Args:
        mask2former_config (`dict` or `Mask2FormerConfig`, *optional*):
            The Mask2Former (Swin backbone, pixel decoder, masked-attention decoder) that segments every frame.
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            The RoBERTa text encoder (the original runs it in its dataset, frozen).
        audio_config (`dict` or `VggishConfig`, *optional*):
            The VGGish audio encoder (the original runs it in its dataset, frozen). `None`: the model has none and
            takes precomputed `audio_features` only.
        audio_feature_dim (`int`, *optional*, defaults to 128):
            Width of the audio features (VGGish, one vector per 0.96 s); equals `audio_config.embedding_size`.
        fusion_dim (`int`, *optional*, defaults to 1024):
            Width of the fusion tokens; the Swin's last stage must have this many channels.
        projection_hidden_dim (`int`, *optional*, defaults to 2048):
            Hidden width of the audio, text and prompt MLPs.
        fusion_num_heads (`int`, *optional*, defaults to 8):
            Heads of the three fusion attentions (audio-text, visual-text, integration).
        prompt_num_heads (`int`, *optional*, defaults to 4):
            Heads of the cross-attention from the Mask2Former queries to the prompts.
        adapter_hidden_dim (`int`, *optional*, defaults to 64):
            Bottleneck width of the adapters in the pixel decoder's deformable layers.
        cache_memory_beta (`float`, *optional*, defaults to 1.0):
            beta of the cached memory, output = (beta + 1) * F - beta * C.
        readout_class_index (`int`, *optional*, defaults to 0):
            Class column whose probability against the no-object column weights each query's mask (ADE20K "wall").
        mask_size (`int`, *optional*, defaults to 256):
            Side of the foreground-logit maps the model returns and its loss compares.
        profile (`str`, *optional*, defaults to `"release"`):
            `"release"` (as the released code computes) or `"fixed"`; sets every switch of `PROFILE_SWITCHES` left
            `None`.
        visual_token_layout, cached_memory, integration_attention_over, adapter_placement, swin_small_map_windows (`str`, *optional*):
            The behaviour switches, see `PROFILE_SWITCHES`.
        bce_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the per-pixel BCE, the released code's only loss.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal init of the layers EEMC adds.
    """

    model_type = "refavs_eemc"
    sub_configs_defaults = {
        "mask2former_config": SubConfigSpec(config_class=Mask2FormerConfig, init_kwargs=MASK2FORMER_SWIN_BASE_ADE),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="roberta", init_kwargs=DISTILROBERTA_BASE),
        "audio_config": SubConfigSpec(config_class=VggishConfig, optional=True),
    }

    mask2former_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    audio_config: dict | VggishConfig | None = None
    audio_feature_dim: int = 128
    fusion_dim: int = 1024
    projection_hidden_dim: int = 2048
    fusion_num_heads: int = 8
    prompt_num_heads: int = 4
    adapter_hidden_dim: int = 64
    cache_memory_beta: float = 1.0
    readout_class_index: int = 0
    mask_size: int = 256

    profile: str = "release"
    visual_token_layout: str | None = None
    cached_memory: str | None = None
    integration_attention_over: str | None = None
    adapter_placement: str | None = None
    swin_small_map_windows: str | None = None

    bce_loss_weight: float = 1.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if self.profile not in PROFILES:
            raise ValueError(f"`profile` must be one of {PROFILES}, got {self.profile!r}.")
        for switch, values in PROFILE_SWITCHES.items():
            if getattr(self, switch) is None:
                setattr(self, switch, values[self.profile])
        for switch, choices in SWITCH_CHOICES.items():
            if getattr(self, switch) not in choices:
                raise ValueError(f"`{switch}` must be one of {choices}, got {getattr(self, switch)!r}.")
        super().__post_init__(**kwargs)
        last_stage_channels = self.mask2former_config.backbone_config.embed_dim * 2 ** (
            len(self.mask2former_config.backbone_config.depths) - 1
        )
        if last_stage_channels != self.fusion_dim:
            raise ValueError(
                f"`fusion_dim` ({self.fusion_dim}) must equal the Swin's last-stage channels ({last_stage_channels}): "
                "the visual tokens enter the fusion without a projection."
            )
        if self.audio_config is not None and self.audio_config.embedding_size != self.audio_feature_dim:
            raise ValueError(
                f"`audio_feature_dim` ({self.audio_feature_dim}) must equal the audio encoder's `embedding_size` "
                f"({self.audio_config.embedding_size})."
            )

    @property
    def text_feature_dim(self) -> int:
        """Width of the text encoder's hidden states."""
        return self.text_config.hidden_size
