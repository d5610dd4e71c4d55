"""Checkpoints that ship inside the package, and the names that stand for them."""

from pathlib import Path


TINY_SYNTHETIC_NAME = "oisa-tiny-synthetic"
CHECKPOINTS_DIR = Path(__file__).resolve().parent / "checkpoints"
SHIPPED_CHECKPOINTS = {TINY_SYNTHETIC_NAME: CHECKPOINTS_DIR / TINY_SYNTHETIC_NAME}


class MissingCheckpointError(FileNotFoundError):
    """A checkpoint that should ship with the package is not in this installation."""


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
