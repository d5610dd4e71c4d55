"""Checkpoints that ship inside the package, the names that stand for them, and how an original checkpoint is recognised."""

import json
import os
from pathlib import Path

from huggingface_hub import snapshot_download
from transformers.utils import cached_file

from .configuration_oisa import ORIGINAL_MODEL_TYPE, OisaOriginalConfig


TINY_SYNTHETIC_NAME = "oisa-tiny-synthetic"
CHECKPOINTS_DIR = Path(__file__).resolve().parent / "checkpoints"
SHIPPED_CHECKPOINTS = {TINY_SYNTHETIC_NAME: CHECKPOINTS_DIR / TINY_SYNTHETIC_NAME}


class MissingCheckpointError(FileNotFoundError):
    """A checkpoint that should ship with the package is not in this installation."""


class OisaCheckpointError(ValueError):
    """An original checkpoint cannot be converted exactly: unreadable file, unknown or missing key, wrong shape."""


def tiny_synthetic_path() -> Path:
    """
    The folder of OISA-tiny-synthetic, the small OISA trained on the synthetic moving-shapes task that ships with the
    package; `from_pretrained` loads it offline.
    """
    path = SHIPPED_CHECKPOINTS[TINY_SYNTHETIC_NAME]
    if not (path / "model.safetensors").is_file():
        raise MissingCheckpointError(
            f"OISA-tiny-synthetic is not in this installation (no {path / 'model.safetensors'}); "
            "train it with examples/train_oisa_tiny_synthetic.sh or name another model with --model"
        )
    return path


def resolve_model_name(name_or_path: str) -> str:
    """A shipped checkpoint's name (`oisa-tiny-synthetic`) -> its folder; any other folder or Hub id unchanged."""
    if name_or_path == TINY_SYNTHETIC_NAME:
        return str(tiny_synthetic_path())
    return name_or_path


def is_original_checkpoint_dir(directory: str | os.PathLike) -> bool:
    """Whether a local directory holds an original OISA checkpoint (`model_type: internvl_chat`)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("model_type") == ORIGINAL_MODEL_TYPE
    except (OSError, json.JSONDecodeError):
        return False


_DOWNLOAD_KWARGS = ("cache_dir", "revision", "token", "force_download", "local_files_only")


def find_original_checkpoint(
    pretrained_model_name_or_path: str | os.PathLike, config: object = None, **download_kwargs
) -> Path | None:
    """
    The local directory of an original OISA checkpoint, or None when `pretrained_model_name_or_path` is something else
    (our format). A Hub repo id is recognised from its `config.json` and then fetched with
    `huggingface_hub.snapshot_download`; a local path is never sent to the Hub.
    """
    if os.path.isdir(pretrained_model_name_or_path):
        is_original = isinstance(config, OisaOriginalConfig) or is_original_checkpoint_dir(
            pretrained_model_name_or_path
        )
        return Path(pretrained_model_name_or_path) if is_original else None
    if config is not None and not isinstance(config, OisaOriginalConfig):
        return None
    if config is None:
        config_file = cached_file(
            str(pretrained_model_name_or_path),
            "config.json",
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **{name: value for name, value in download_kwargs.items() if name in _DOWNLOAD_KWARGS},
        )
        if config_file is None or not is_original_checkpoint_dir(Path(config_file).parent):
            return None
    snapshot_kwargs = {
        name: download_kwargs[name] for name in _DOWNLOAD_KWARGS if download_kwargs.get(name) is not None
    }
    return Path(snapshot_download(str(pretrained_model_name_or_path), **snapshot_kwargs))
