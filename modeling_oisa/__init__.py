"""OISA as a transformers model. Importing this package registers `oisa` with AutoConfig and AutoModel."""

from transformers import AutoConfig, AutoModel

from .audio_encoder import OisaAudioEncoder, audio_lengths_after_conv, audio_token_counts
from .build_from_parts import Stage1Report, build_stage1_model
from .configuration_oisa import PROFILE_SWITCHES, OisaConfig
from .convert_original import (
    DROPPED_ORIGINAL_KEYS,
    OisaCheckpointError,
    OisaOriginalConfig,
    convert_original_checkpoint,
)
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
from .pretrained import TINY_SYNTHETIC_NAME, MissingCheckpointError, resolve_model_name, tiny_synthetic_path
from .tiny import init_tiny_synthetic_weights, tiny_oisa_config, tiny_synthetic_config
from .training import TrainingSetup, apply_training_setup, merge_training_setup


AutoConfig.register("oisa", OisaConfig)
AutoModel.register(OisaConfig, OisaForReferringSegmentation)
# Original checkpoints (`internvl_chat`) route to our class, whose `from_pretrained` converts them. `AutoModel.register`
# would refuse the pair because the class's `config_class` is `OisaConfig`, hence the mapping's own `register`.
AutoConfig.register("internvl_chat", OisaOriginalConfig)
AutoModel._model_mapping.register(OisaOriginalConfig, OisaForReferringSegmentation)
OisaConfig.register_for_auto_class()
OisaForReferringSegmentation.register_for_auto_class("AutoModel")

__all__ = [
    "DROPPED_ORIGINAL_KEYS",
    "PROFILE_SWITCHES",
    "AudioTokenMode",
    "ImageTokenMode",
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
    "TrainingSetup",
    "apply_training_setup",
    "Stage1Report",
    "audio_lengths_after_conv",
    "audio_token_counts",
    "build_stage1_model",
    "convert_original_checkpoint",
    "merge_training_setup",
    "MissingCheckpointError",
    "resolve_model_name",
    "TINY_SYNTHETIC_NAME",
    "init_tiny_synthetic_weights",
    "tiny_oisa_config",
    "tiny_synthetic_config",
    "tiny_synthetic_path",
]
