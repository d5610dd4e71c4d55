"""Training of OISA: what a stage trains (LoRA, full modules, new token rows) and the Accelerate loop of `train.py`."""

from .loop import StageConfig, train
from .setup import TrainingSetup, apply_training_setup, merge_training_setup


__all__ = ["StageConfig", "TrainingSetup", "apply_training_setup", "merge_training_setup", "train"]
