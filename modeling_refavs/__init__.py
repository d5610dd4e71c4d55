"""
EEMC, the Ref-AVS benchmark's baseline (ECCV 2024), as a transformers model. Importing this package registers
`refavs_eemc` with AutoConfig and AutoModel. The converter from the original checkpoint layout lives in
`modeling_refavs.conversion` and is imported only when an original checkpoint is loaded.
"""

from transformers import AutoConfig, AutoModel

from .configuration_refavs import PROFILE_SWITCHES, PROFILES, RefAvsConfig, VggishConfig
from .modeling_refavs import (
    RefAvsAdaptedDeformableAttention,
    RefAvsForReferringSegmentation,
    RefAvsOutput,
    RefAvsPreTrainedModel,
    RefAvsQueryPrompter,
    RefAvsTransformerModule,
    cached_memory,
)
from .modeling_vggish import VggishAudioEncoder, VggishPostprocessor


AutoConfig.register("refavs_eemc", RefAvsConfig)
AutoModel.register(RefAvsConfig, RefAvsForReferringSegmentation)

__all__ = [
    "PROFILES",
    "PROFILE_SWITCHES",
    "RefAvsAdaptedDeformableAttention",
    "RefAvsConfig",
    "RefAvsForReferringSegmentation",
    "RefAvsOutput",
    "RefAvsPreTrainedModel",
    "RefAvsQueryPrompter",
    "RefAvsTransformerModule",
    "VggishAudioEncoder",
    "VggishConfig",
    "VggishPostprocessor",
    "cached_memory",
]
