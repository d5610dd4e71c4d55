"""The settings of one `train.py` run (a stage of OISA, an EEMC recipe), read from a JSON file in `configs/`."""

import json
from dataclasses import dataclass, field, fields
from pathlib import Path


@dataclass
class StageConfig:
    """One run's settings, read from a JSON file in `configs/` (every field is documented in docs/training.md)."""

    mixture: list[dict]
    # the model family the run trains (the checkpoint's `model_type`): "oisa" or "refavs_eemc"
    model_type: str = "oisa"
    stage: int | None = None
    description: str = ""
    # OISA: top-level modules trained in full, LoRA, the rows of the new special tokens
    train_modules: list[str] = field(default_factory=list)
    llm_lora_rank: int = 0
    audio_lora_rank: int = 0
    train_new_token_rows: bool = False
    # EEMC: a parameter trains when its name contains one of these (the original's `--train_params` rule, our names)
    train_parameters: list[str] = field(default_factory=list)
    learning_rate: float = 4e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    # None: no gradient clipping
    max_grad_norm: float | None = 1.0
    per_device_batch_size: int = 2
    gradient_accumulation_steps: int = 1
    epochs: float = 1.0
    max_steps: int | None = None
    save_steps: int = 500
    logging_steps: int = 1
    num_frames: int = 10
    num_dense_frames: int = 4
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = True
    num_workers: int = 4
    shuffle_buffer: int = 1000
    seed: int = 42
    profile: str | None = None
    # the model's loss weights for this run (`lm_loss_weight`, `dice_loss_weight`...), saved with the final model
    loss_weights: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: str | Path) -> "StageConfig":
        values = json.loads(Path(path).read_text())
        known = {item.name for item in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"{path}: unknown training settings {sorted(unknown)}.")
        return cls(**values)
