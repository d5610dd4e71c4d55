"""
Training: the Accelerate loop of `train.py` (`loop.py`), shared by the model families, and what each family trains
(`oisa_family.py`: OISA's stages, with LoRA, full modules and new token rows from `setup.py`; `refavs_eemc_family.py`:
EEMC's recipes, by the original's substring rule).
"""

from .family import TrainingFamily
from .loop import StageConfig, train
from .setup import TrainingSetup, apply_training_setup, merge_training_setup


__all__ = ["StageConfig", "TrainingFamily", "TrainingSetup", "apply_training_setup", "merge_training_setup", "train"]
