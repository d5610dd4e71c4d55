"""
OISA as a transformers model. Importing this package registers `oisa` with AutoConfig and AutoModel, and routes
original checkpoints (`internvl_chat`) to the same class, which converts them on load. The converters themselves live
in `modeling_oisa.conversion` and are imported only when an original checkpoint is loaded or converted.
"""

from transformers import AutoConfig, AutoModel

from .audio_encoder import OisaAudioEncoder, audio_lengths_after_conv, audio_token_counts
from .configuration_oisa import PROFILE_SWITCHES, OisaConfig, OisaOriginalConfig
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
from .pretrained import (
    TINY_SYNTHETIC_NAME,
    MissingCheckpointError,
    OisaCheckpointError,
    resolve_model_name,
    tiny_synthetic_path,
)


AutoConfig.register("oisa", OisaConfig)
AutoModel.register(OisaConfig, OisaForReferringSegmentation)
# Original checkpoints (`internvl_chat`) route to our class, whose `from_pretrained` converts them. `AutoModel.register`
# would refuse the pair because the class's `config_class` is `OisaConfig`, hence the mapping's own `register`.
AutoConfig.register("internvl_chat", OisaOriginalConfig)
AutoModel._model_mapping.register(OisaOriginalConfig, OisaForReferringSegmentation)
OisaConfig.register_for_auto_class()
OisaForReferringSegmentation.register_for_auto_class("AutoModel")

__all__ = [
    "PROFILE_SWITCHES",
    "TINY_SYNTHETIC_NAME",
    "AudioTokenMode",
    "ImageTokenMode",
    "MissingCheckpointError",
    "OisaAudioEncoder",
    "OisaCheckpointError",
    "OisaConfig",
    "OisaForReferringSegmentation",
    "OisaImageFeatures",
    "OisaInjectionError",
    "OisaMaskHead",
    "OisaMultiscaleDeformableAttention",
    "OisaOriginalConfig",
    "OisaOutput",
    "OisaPreTrainedModel",
    "OisaQueryDecoderOutput",
    "audio_lengths_after_conv",
    "audio_token_counts",
    "resolve_model_name",
    "tiny_synthetic_path",
]
