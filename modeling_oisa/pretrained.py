"""Checkpoints that ship inside the package, the names that stand for them, and how an original checkpoint is recognised."""

import json
import os
import struct
from pathlib import Path

from huggingface_hub import constants, snapshot_download, try_to_load_from_cache
from transformers.utils import cached_file

from .configuration_oisa import ORIGINAL_MODEL_TYPE, OisaOriginalConfig


TINY_SYNTHETIC_NAME = "oisa-tiny-synthetic"
CHECKPOINTS_DIR = Path(__file__).resolve().parent / "checkpoints"
SHIPPED_CHECKPOINTS = {TINY_SYNTHETIC_NAME: CHECKPOINTS_DIR / TINY_SYNTHETIC_NAME}


class MissingCheckpointError(FileNotFoundError):
    """A checkpoint that should ship with the package is not in this installation."""


class OisaCheckpointError(ValueError):
    """
    A checkpoint cannot be loaded or converted: no such folder or repo, unreadable or truncated file, another model
    type, pickle-only weights, or, for an original checkpoint, an unknown or missing key or a wrong shape.
    """


# model types an OISA folder may declare: ours, and the original's, which is converted on load
LOADABLE_MODEL_TYPES = ("oisa", ORIGINAL_MODEL_TYPE)
# EEMC, the package's second model family (`modeling_refavs`, which imports this package, so it is named here)
REFAVS_MODEL_TYPE = "refavs_eemc"
# model types the entry points (`oisa segment`, train.py, eval.py) accept: both families
ENTRY_POINT_MODEL_TYPES = (*LOADABLE_MODEL_TYPES, REFAVS_MODEL_TYPE)
FAMILY_NAMES = {"oisa": "OISA", ORIGINAL_MODEL_TYPE: "OISA", REFAVS_MODEL_TYPE: "EEMC"}


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


def resolve_model_name(name_or_path: str, model_types: tuple[str, ...] = ENTRY_POINT_MODEL_TYPES) -> str:
    """
    A shipped checkpoint's name (`oisa-tiny-synthetic`) -> its folder; any other folder or Hub id unchanged, after
    checking that it can be loaded (see [`check_model_folder`]; a folder may declare any of `model_types`, by default
    an OISA or an EEMC): a path that is no folder, or a Hub id that is not in the cache while offline, fails at once
    rather than after the Hub's retries.
    """
    if name_or_path == TINY_SYNTHETIC_NAME:
        return str(tiny_synthetic_path())
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        check_model_folder(path, model_types=model_types)
        return str(path)
    if path.exists():
        raise OisaCheckpointError(f"{name_or_path}: a file, not a model folder")
    if not _is_repo_id(name_or_path):
        raise OisaCheckpointError(
            f"{name_or_path}: no such model folder, nor a Hub repo id (owner/name); the shipped model is "
            f"{TINY_SYNTHETIC_NAME}"
        )
    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        raise OisaCheckpointError(
            f"{name_or_path}: no such local folder, and the Hub repo is not in the cache (offline: HF_HUB_OFFLINE=1)"
        )
    return name_or_path


def _is_repo_id(name: str) -> bool:
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    parts = name.split("/")
    return len(parts) == 2 and all(part and set(part) <= allowed for part in parts)


def check_model_folder(
    folder: str | os.PathLike, config_given: bool = False, model_types: tuple[str, ...] = LOADABLE_MODEL_TYPES
) -> None:
    """
    Refuses, with one message naming the file, a local folder that `from_pretrained` would fail on later or load
    wrongly: no or unreadable `config.json` (unless `config_given`), a `model_type` not in `model_types` (by default
    OISA's), no weights, pickle-only weights (never unpickled), a safetensors file that is truncated or corrupt.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    model_type = "oisa"
    if config_path.is_file() or not config_given:
        if not config_path.is_file():
            contents = "empty" if not any(folder.iterdir()) else "no config.json"
            raise OisaCheckpointError(f"{folder}: not a model folder ({contents})")
        try:
            model_type = json.loads(config_path.read_text()).get("model_type")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
            raise OisaCheckpointError(f"{config_path}: not a readable JSON config ({error})") from error
    if model_type not in model_types:
        families = " or ".join(dict.fromkeys(FAMILY_NAMES.get(name, name) for name in model_types))
        raise OisaCheckpointError(
            f"{config_path}: model_type {model_type!r} is not {families} (expected one of {', '.join(model_types)})"
        )
    safetensors = sorted(folder.glob("*.safetensors"))
    if not safetensors:
        pickled = sorted(path.name for path in folder.iterdir() if path.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickled and model_type != ORIGINAL_MODEL_TYPE:
            raise OisaCheckpointError(
                f"{folder}: only pickle weights ({', '.join(pickled)}), which are never unpickled here; save the model "
                "with save_pretrained (safetensors)"
            )
        if not pickled:
            raise OisaCheckpointError(f"{folder}: no weights (*.safetensors)")
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            shards = set(json.loads(index_path.read_text())["weight_map"].values())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, AttributeError) as error:
            raise OisaCheckpointError(f"{index_path}: not a readable shard index ({error})") from error
        missing = sorted(name for name in shards if not (folder / name).is_file())
        if missing:
            raise OisaCheckpointError(f"{index_path}: names shards that are not in the folder: {', '.join(missing)}")
    for path in safetensors:
        check_safetensors_file(path)


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Refuses a safetensors file whose header is unreadable or whose size is not what its header says (truncated)."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with path.open("rb") as file:
            (header_size,) = struct.unpack("<Q", file.read(8))
            if header_size > size - 8:
                raise ValueError(f"header of {header_size} bytes in a file of {size}")
            header = json.loads(file.read(header_size))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (OSError, struct.error, ValueError, KeyError, TypeError, IndexError) as error:
        raise OisaCheckpointError(f"{path}: not a readable safetensors file ({error})") from error
    if size != 8 + header_size + end:
        raise OisaCheckpointError(
            f"{path}: truncated or corrupt safetensors file ({size} bytes, its header describes {8 + header_size + end})"
        )


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
