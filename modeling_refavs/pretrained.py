"""
How an original EEMC checkpoint is recognised, and the layout of a folder holding one (docs/refavs-eemc.md,
"Checkpoints"): the released `ckpt_best_miou.pth`, a `torch.save`d state dict of the original `REFAVS_Model_Base`, with
the parts the original loads elsewhere beside it.
"""

import json
import os
from pathlib import Path

from modeling_oisa.pretrained import OisaCheckpointError

from .configuration_refavs import PROFILE_SWITCHES, RefAvsConfig


# the file the original's training script writes (`run_refavs.py`: the best validation mIoU so far)
ORIGINAL_CHECKPOINT_NAME = "ckpt_best_miou.pth"
# suffixes of a state-dict file given directly
ORIGINAL_CHECKPOINT_SUFFIXES = (".pth", ".pt")
# beside it, what the original does not save: the text encoder its dataset runs (DistilRoBERTa: config and weights,
# as `save_pretrained` or the Hub repo lays them out), torchvggish's weights and PCA parameters, and optionally the
# Mask2Former config the weights were trained from (for what the weights cannot say, such as the Swin's image size)
TEXT_ENCODER_DIR = "text_encoder"
VGGISH_WEIGHTS_NAME = "vggish.pth"
VGGISH_PCA_PARAMS_NAME = "vggish_pca_params.pth"
MASK2FORMER_CONFIG_NAME = "mask2former_config.json"


def find_original_checkpoint(path: str | os.PathLike) -> Path | None:
    """
    The state-dict file of an original EEMC checkpoint, or None when `path` is something else (our format, a Hub id):
    `path` itself when it is a `.pth` or `.pt` file, `path/ckpt_best_miou.pth` when `path` is a folder holding one and
    no `config.json`. A folder holding both the original file and a `config.json` of another model is refused.
    """
    path = Path(path)
    if path.is_file():
        return path if path.suffix in ORIGINAL_CHECKPOINT_SUFFIXES else None
    checkpoint = path / ORIGINAL_CHECKPOINT_NAME
    if not (path.is_dir() and checkpoint.is_file()):
        return None
    config_path = path / "config.json"
    if not config_path.is_file():
        return checkpoint
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
        raise OisaCheckpointError(f"{config_path}: not a readable JSON config ({error})") from error
    if model_type == RefAvsConfig.model_type:
        return None
    raise OisaCheckpointError(
        f"{path}: holds an original {ORIGINAL_CHECKPOINT_NAME} and a config.json of model_type {model_type!r}; "
        f"name the original's Mask2Former config {MASK2FORMER_CONFIG_NAME}"
    )


# the extra `from_pretrained` arguments that name an original's parts kept elsewhere
ORIGINAL_PARTS = ("text_encoder", "vggish", "vggish_pca_params", "mask2former_config")
# the RefAvsConfig fields an original's weights cannot say, given to `from_pretrained` as keyword arguments
ORIGINAL_CONFIG_FIELDS = (
    "profile",
    *PROFILE_SWITCHES,
    "audio_config",
    "fusion_num_heads",
    "prompt_num_heads",
    "mask_size",
    "cache_memory_beta",
    "readout_class_index",
    "bce_loss_weight",
    "initializer_range",
)
