"""OISA as a transformers model. Importing this package registers `oisa` with AutoConfig and AutoModel."""

from transformers import AutoConfig, AutoModel

from .audio_encoder import OisaAudioEncoder, audio_lengths_after_conv, audio_token_counts
from .configuration_oisa import OisaConfig
from .deformable_attention import OisaMultiscaleDeformableAttention
from .mask_head import OisaMaskHead, OisaQueryDecoderOutput
from .modeling_oisa import (
    AudioTokenMode,
    ImageTokenMode,
    OisaForReferringSegmentation,
    OisaImageFeatures,
    OisaInjectionError,
    OisaOutput,
    OisaPreTrainedModel,
)
from .tiny import tiny_oisa_config


AutoConfig.register("oisa", OisaConfig)
AutoModel.register(OisaConfig, OisaForReferringSegmentation)
OisaConfig.register_for_auto_class()
OisaForReferringSegmentation.register_for_auto_class("AutoModel")

__all__ = [
    "AudioTokenMode",
    "ImageTokenMode",
    "OisaAudioEncoder",
    "OisaConfig",
    "OisaForReferringSegmentation",
    "OisaImageFeatures",
    "OisaInjectionError",
    "OisaMaskHead",
    "OisaMultiscaleDeformableAttention",
    "OisaOutput",
    "OisaPreTrainedModel",
    "OisaQueryDecoderOutput",
    "audio_lengths_after_conv",
    "audio_token_counts",
    "tiny_oisa_config",
]
