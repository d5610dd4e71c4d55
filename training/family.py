"""What the training loop takes from a model family: the model it trains, its samples and batches, its losses."""

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .stage_config import StageConfig


class TrainingFamily(ABC):
    """
    The part of a training run that depends on the model family (OISA, EEMC): which parameters of the checkpoint
    train, how a record of a mixture's dataset becomes a sample and samples a batch, and which losses are logged.
    The loop (Accelerate, the streamed mixture, checkpoints that resume exactly, logging) is the same for all.
    """

    # the `model_type`s of the checkpoints the family trains
    model_types: tuple[str, ...]
    # the `model_type` a run config names to train this family (`StageConfig.model_type`)
    name: str
    # the output fields logged as `loss/<name>` when the model returns them
    logged_losses: tuple[str, ...]

    @property
    @abstractmethod
    def readers(self) -> Mapping[str, type]:
        """The dataset formats that train, each with the reader of its records."""

    @abstractmethod
    def build_model(self, config: StageConfig, model_path: str, processor: Any) -> nn.Module:
        """The checkpoint in float32 with the run's loss weights, frozen but for what the run trains."""

    @abstractmethod
    def sample_builder(
        self, data_format: str, processor: Any, config: StageConfig, profile: str
    ) -> Callable[[Any], dict[str, torch.Tensor]]:
        """How a record of `data_format` becomes one training sample."""

    @abstractmethod
    def collator(self, processor: Any) -> Callable[[Sequence[dict[str, torch.Tensor]]], dict[str, torch.Tensor]]:
        """How samples become one batch, which holds `input_ids` (one row per sample) and the model's inputs."""

    def train_mode(self, model: nn.Module) -> None:
        """Puts the model in training mode for the run's steps."""
        model.train()

    def final_model(self, model: nn.Module, merge: bool) -> nn.Module:
        """The model to save at the end (`merge`: `train.py --merge`)."""
        return model
