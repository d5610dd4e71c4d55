"""Configuration of OISA, the omnimodal referring audio-visual segmentation model, and of its original checkpoints."""

import dataclasses

from huggingface_hub.dataclasses import strict
from transformers import (
    AutoConfig,
    InternVLVisionConfig,
    Mask2FormerConfig,
    PreTrainedConfig,
    Qwen2Config,
    WhisperConfig,
)
from transformers.configuration_utils import SubConfigSpec


PROFILES = ("release", "fixed")

# Each behaviour switch with its value under the `release` and the `fixed` profile (DESIGN §5).
PROFILE_SWITCHES = {
    "seg_hidden_state_source": {"release": "before_seg", "fixed": "seg"},
    "sub_audio_layout": {"release": "release", "fixed": "per_frame"},
    "frame_sampler": {"release": "release", "fixed": "linspace"},
    "mask_upsampling": {"release": "binarize_then_upsample", "fixed": "upsample_logits"},
    "use_presence_gating": {"release": False, "fixed": False},
}

SWITCH_CHOICES = {
    "seg_hidden_state_source": ("before_seg", "seg"),
    "sub_audio_layout": ("release", "per_frame"),
    "frame_sampler": ("release", "linspace"),
    "mask_upsampling": ("binarize_then_upsample", "upsample_logits"),
}

INTERNVIT_300M = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "attention_bias": True,
    "use_qk_norm": False,
    "norm_type": "layer_norm",
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu",
    "image_size": 448,
    "patch_size": 14,
    "use_mean_pooling": True,
}

QWEN2_0_5B = {
    "model_type": "qwen2",
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
    "hidden_act": "silu",
    "vocab_size": 151664,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}

WHISPER_LARGE_V3_ENCODER = {
    "model_type": "whisper",
    "d_model": 1280,
    "encoder_layers": 32,
    "encoder_attention_heads": 20,
    "encoder_ffn_dim": 5120,
    "num_mel_bins": 128,
    "max_source_positions": 1500,
    "activation_function": "gelu",
    "encoder_layerdrop": 0.0,
}


@strict
class OisaConfig(PreTrainedConfig):
    r"""
    Configuration of [`OisaForReferringSegmentation`]. `OisaConfig()` with no arguments is OISA-1B, the released
    `FudanCVL/OISA-1B-OmniAVS`: InternViT-300M with a ViT-Adapter, Qwen2-0.5B, a Whisper-large-v3 encoder and a
    Mask2Former-style mask head.

    Args:
        vision_config (`InternVLVisionConfig` or `dict`, *optional*):
            InternViT settings; defaults to InternViT-300M-448px. Its `image_size` is the model's input size.
        text_config (`Qwen2Config` or `dict`, *optional*):
            The language model; defaults to Qwen2-0.5B with OISA's vocabulary of 151664 tokens and an untied head.
        audio_config (`WhisperConfig` or `dict`, *optional*):
            The audio encoder (only its encoder fields are used); defaults to the Whisper-large-v3 encoder.
        downsample_ratio (`float`, *optional*, defaults to 0.5):
            Pixel-shuffle ratio applied to the ViT patch grid before the vision projector.
        projector_hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of the vision and audio projectors.
        adapter_conv_inplane (`int`, *optional*, defaults to 64):
            Width of the ViT-Adapter's spatial prior module stem (its stages are 1x, 2x, 4x and 4x this).
        adapter_interaction_indexes (`list[list[int]]`, *optional*):
            For each interaction block, the first and last ViT layer it runs. Defaults to four blocks of six layers.
        adapter_deform_num_heads (`int`, *optional*, defaults to 16):
            Heads of the adapter's deformable attention.
        adapter_n_points (`int`, *optional*, defaults to 4):
            Sampling points per head of the adapter's deformable attention.
        adapter_deform_ratio (`float`, *optional*, defaults to 0.25):
            Value width of the adapter's deformable attention as a fraction of the ViT width.
        adapter_cffn_ratio (`float`, *optional*, defaults to 0.25):
            Hidden width of the extractors' convolutional FFN as a fraction of the ViT width.
        adapter_num_extra_extractors (`int`, *optional*, defaults to 2):
            Extra extractors applied after the last interaction block.
        mask_head_in_channels (`int`, *optional*):
            Channels of the four adapter maps fed to the mask head; must equal the ViT width (the original
            hard-codes 1024).
        mask_hidden_dim (`int`, *optional*, defaults to 256):
            Width of the pixel decoder and of the query decoder.
        mask_feature_dim (`int`, *optional*, defaults to 256):
            Channels of the per-pixel mask embeddings.
        mask_num_heads (`int`, *optional*, defaults to 8):
            Heads of the pixel decoder's deformable attention and of the query decoder's cross-attention.
        pixel_decoder_layers (`int`, *optional*, defaults to 6):
            Deformable encoder layers of the pixel decoder.
        pixel_decoder_ffn_dim (`int`, *optional*, defaults to 1024):
            FFN width of the pixel decoder's deformable layers.
        query_decoder_layers (`int`, *optional*, defaults to 9):
            Cross-attention + FFN layers of the query decoder.
        query_decoder_ffn_dim (`int`, *optional*, defaults to 2048):
            FFN width of the query decoder.
        seg_token_projection_dim (`int`, *optional*, defaults to 512):
            Hidden width of the MLP that maps the `[SEG]` hidden state to the query position and content.
        mask_head_chunk_size (`int`, *optional*, defaults to 10):
            Frames run through the pixel decoder at once; longer videos are processed chunk by chunk.
        deformable_attention_fp32 (`bool`, *optional*, defaults to `True`):
            Compute the adapter's extractors and the pixel decoder in float32 whatever the model dtype, as released.
        image_token_id (`int`, *optional*, defaults to 151648):
            Id of `<IMG_CONTEXT>`, the slot of one vision embedding.
        audio_token_id (`int`, *optional*, defaults to 151657):
            Id of `<AUDIO_CONTEXT>`, the slot of one audio embedding.
        sub_audio_token_id (`int`, *optional*, defaults to 151663):
            Id of `<SUB_AUDIO_CONTEXT>`, the slot of one per-frame soundtrack embedding.
        seg_token_id (`int`, *optional*, defaults to 151660):
            Id of `[SEG]`.
        profile (`str`, *optional*, defaults to `"release"`):
            Behaviour profile, `"release"` (as the released checkpoint was trained and evaluated) or `"fixed"`. It
            sets every switch below that is not given explicitly.
        seg_hidden_state_source (`str`, *optional*):
            Hidden state fed to the mask head at inference: `"before_seg"` (the token before `[SEG]`, bug B9, release)
            or `"seg"` (the `[SEG]` position).
        sub_audio_layout (`str`, *optional*):
            Per-frame soundtrack layout of prompts: `"release"` or `"per_frame"` (used by the processor).
        frame_sampler (`str`, *optional*):
            Frame sampler: `"release"` (first, last and strided middle frames) or `"linspace"` (used by the processor).
        mask_upsampling (`str`, *optional*):
            `"binarize_then_upsample"` (B15, release) or `"upsample_logits"`.
        use_presence_gating (`bool`, *optional*):
            Empty the masks of frames whose presence logits say "no object" (B16).
        lm_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the language-model cross-entropy.
        class_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the per-frame presence cross-entropy.
        dice_loss_weight (`float`, *optional*, defaults to 2.0):
            Weight of the point-sampled Dice loss (release-effective value, B8).
        bce_loss_weight (`float`, *optional*, defaults to 0.5):
            Weight of the point-sampled binary cross-entropy (release-effective value, B8).
        no_object_weight (`float`, *optional*, defaults to 0.1):
            Class weight of "no object" in the presence cross-entropy.
        train_num_points (`int`, *optional*, defaults to 12544):
            Points sampled per frame for the mask losses.
        oversample_ratio (`float`, *optional*, defaults to 3.0):
            Oversampling of the uncertainty point sampler.
        importance_sample_ratio (`float`, *optional*, defaults to 0.75):
            Fraction of points chosen by uncertainty.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal init of linear and convolution weights outside the reused towers.
        tie_word_embeddings (`bool`, *optional*, defaults to `False`):
            Tie the LM head to the input embeddings (OISA-1B keeps them untied).
    """

    model_type = "oisa"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=InternVLVisionConfig, init_kwargs=INTERNVIT_300M),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2", init_kwargs=QWEN2_0_5B),
        "audio_config": SubConfigSpec(
            config_class=AutoConfig, model_type="whisper", init_kwargs=WHISPER_LARGE_V3_ENCODER
        ),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    audio_config: dict | PreTrainedConfig | None = None
    downsample_ratio: float = 0.5
    projector_hidden_act: str = "gelu"

    adapter_conv_inplane: int = 64
    adapter_interaction_indexes: list[list[int]] | None = None
    adapter_deform_num_heads: int = 16
    adapter_n_points: int = 4
    adapter_deform_ratio: float = 0.25
    adapter_cffn_ratio: float = 0.25
    adapter_num_extra_extractors: int = 2

    mask_head_in_channels: int | None = None
    mask_hidden_dim: int = 256
    mask_feature_dim: int = 256
    mask_num_heads: int = 8
    pixel_decoder_layers: int = 6
    pixel_decoder_ffn_dim: int = 1024
    query_decoder_layers: int = 9
    query_decoder_ffn_dim: int = 2048
    seg_token_projection_dim: int = 512
    mask_head_chunk_size: int = 10
    deformable_attention_fp32: bool = True

    image_token_id: int = 151648
    audio_token_id: int = 151657
    sub_audio_token_id: int = 151663
    seg_token_id: int = 151660

    profile: str = "release"
    seg_hidden_state_source: str | None = None
    sub_audio_layout: str | None = None
    frame_sampler: str | None = None
    mask_upsampling: str | None = None
    use_presence_gating: bool | None = None

    lm_loss_weight: float = 1.0
    class_loss_weight: float = 1.0
    dice_loss_weight: float = 2.0
    bce_loss_weight: float = 0.5
    no_object_weight: float = 0.1
    train_num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75

    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.adapter_interaction_indexes is None:
            self.adapter_interaction_indexes = [[0, 5], [6, 11], [12, 17], [18, 23]]
        if self.profile not in PROFILES:
            raise ValueError(f"`profile` must be one of {PROFILES}, got {self.profile!r}.")
        for switch, values in PROFILE_SWITCHES.items():
            if getattr(self, switch) is None:
                setattr(self, switch, values[self.profile])
        for switch, choices in SWITCH_CHOICES.items():
            if getattr(self, switch) not in choices:
                raise ValueError(f"`{switch}` must be one of {choices}, got {getattr(self, switch)!r}.")
        super().__post_init__(**kwargs)
        if self.mask_head_in_channels is None:
            self.mask_head_in_channels = self.vision_config.hidden_size
        self._check_geometry()

    def _check_geometry(self) -> None:
        image_size = self.image_size
        patch_size = self.vision_config.patch_size[0]
        if image_size % 32 != 0:
            raise ValueError(
                f"OISA needs an image size that is a multiple of 32 (the ViT-Adapter works at strides 4 to 32); "
                f"got {image_size}."
            )
        if (image_size // patch_size) % int(1 / self.downsample_ratio) != 0:
            raise ValueError(
                f"The ViT grid {image_size}//{patch_size} must be divisible by {int(1 / self.downsample_ratio)} for "
                f"the pixel shuffle; got image size {image_size}."
            )
        vision = self.vision_config
        if self.mask_head_in_channels != vision.hidden_size:
            raise ValueError(
                f"`mask_head_in_channels` ({self.mask_head_in_channels}) must equal the ViT width "
                f"({vision.hidden_size}): the mask head reads the adapter's maps."
            )
        value_dim = int(vision.hidden_size * self.adapter_deform_ratio)
        if vision.hidden_size % self.adapter_deform_num_heads or value_dim % self.adapter_deform_num_heads:
            raise ValueError(
                f"The adapter's deformable attention needs the ViT width ({vision.hidden_size}) and its value width "
                f"({value_dim}) to be divisible by `adapter_deform_num_heads` ({self.adapter_deform_num_heads})."
            )
        last_layer = -1
        for start, end in self.adapter_interaction_indexes:
            if start != last_layer + 1 or end < start:
                raise ValueError(
                    f"`adapter_interaction_indexes` must cover consecutive ViT layers, got "
                    f"{self.adapter_interaction_indexes}."
                )
            last_layer = end
        if last_layer != vision.num_hidden_layers - 1:
            raise ValueError(
                f"`adapter_interaction_indexes` must end at the last ViT layer ({vision.num_hidden_layers - 1}), got "
                f"{self.adapter_interaction_indexes}."
            )

    @property
    def image_size(self) -> int:
        """Side of the square frames the model takes."""
        return self.vision_config.image_size[0]

    @property
    def num_image_tokens(self) -> int:
        """LLM tokens of one dense image."""
        grid = self.image_size // self.vision_config.patch_size[0]
        return int(grid * self.downsample_ratio) ** 2

    def pixel_decoder_config(self) -> Mask2FormerConfig:
        """The `Mask2FormerConfig` that builds the reused `Mask2FormerPixelDecoder`."""
        return Mask2FormerConfig(
            feature_size=self.mask_hidden_dim,
            mask_feature_size=self.mask_feature_dim,
            hidden_dim=self.mask_hidden_dim,
            encoder_layers=self.pixel_decoder_layers,
            encoder_feedforward_dim=self.pixel_decoder_ffn_dim,
            num_attention_heads=self.mask_num_heads,
            dropout=0.0,
            common_stride=4,
            feature_strides=[4, 8, 16, 32],
        )



# `model_type` of the original OISA checkpoints (InternVL's chat model layout)
ORIGINAL_MODEL_TYPE = "internvl_chat"

SUB_CONFIG_CLASSES = {
    "vision_config": InternVLVisionConfig,
    "text_config": Qwen2Config,
    "audio_config": WhisperConfig,
}
# the OisaConfig fields a conversion may be given: OISA's own, not PreTrainedConfig's
OVERRIDABLE_FIELDS = tuple(
    field.name
    for field in dataclasses.fields(OisaConfig)
    if field.name not in {base.name for base in dataclasses.fields(PreTrainedConfig)}
)


class OisaOriginalConfig(PreTrainedConfig):
    r"""
    The config of an original OISA checkpoint (`model_type: internvl_chat`: `vision_config`, `llm_config`,
    `audio_config`, `force_image_size`, `use_llm_lora`...), its fields kept as written and untyped, as hand-edited
    releases may differ. It is only read to be converted: registering it with `AutoConfig` lets `AutoModel` route
    original checkpoints to [`OisaForReferringSegmentation`], whose `from_pretrained` converts them.
    """

    model_type = ORIGINAL_MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        # sizes given to `AutoModel.from_pretrained` for the conversion (`vision_config={...}` too) are not updates of
        # this config: leave them in the unused kwargs, which reach the model's `from_pretrained`
        conversion = {name: kwargs.pop(name) for name in OVERRIDABLE_FIELDS if name in kwargs}
        loaded = super().from_dict(config_dict, **kwargs)
        if kwargs.get("return_unused_kwargs"):
            config, unused = loaded
            return config, {**unused, **conversion}
        return loaded


__all__ = ["OisaConfig", "OisaOriginalConfig"]
