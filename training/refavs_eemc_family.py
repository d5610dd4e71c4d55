"""
EEMC (`modeling_refavs`) in the training loop: the original's substring rule for what trains, one Ref-AVS row as one
sample (every frame of its clip, its expression, its soundtrack, its masks at the loss's size), BCE as the only loss.
"""

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import AutoModel

from modeling_refavs import PROFILE_SWITCHES, PROFILES
from processing_oisa.data.errors import OisaDataError
from processing_oisa.data.refavs import RefAVSReader, RefAVSRecord

from .family import TrainingFamily
from .stage_config import StageConfig


logger = logging.getLogger(__name__)

LOSS_WEIGHT_NAMES = ("bce_loss_weight",)
# what the EEMC processor gives each row, stacked sample after sample into a batch
SAMPLE_KEYS = ("pixel_values", "input_ids", "attention_mask", "audio_input_features", "labels")


def build_eemc_sample(record: RefAVSRecord, processor: Any) -> dict[str, torch.Tensor]:
    """
    One training sample from a Ref-AVS row, as the original's dataset builds it: every frame of the clip, the
    expression, the clip's soundtrack and the row's masks (zeros for a null row) at the model's mask size.
    """
    encoding = processor(
        videos=record.media_dir / "frames",
        text=record.text,
        audio=record.audio_path,
        masks=record.gt_masks(),
        return_tensors="pt",
    )
    return {key: encoding[key][0] for key in SAMPLE_KEYS}


def collate_eemc_samples(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stacks the samples; the clips of one batch must agree in frames and audio examples, as in the original."""
    batch = {}
    for key in SAMPLE_KEYS:
        shapes = {tuple(sample[key].shape) for sample in samples}
        if len(shapes) != 1:
            raise OisaDataError(
                f"the samples of one batch differ in {key} shape ({sorted(shapes)}): EEMC stacks its clips, which "
                "must have as many frames and seconds of audio as each other",
                dataset="refavs",
            )
        batch[key] = torch.stack([sample[key] for sample in samples])
    return batch


def frozen_modules_to_eval(model: nn.Module) -> None:
    """Every module none of whose parameters trains runs as in evaluation (no dropout, no drop path)."""
    for module in model.modules():
        parameters = list(module.parameters())
        if parameters and not any(parameter.requires_grad for parameter in parameters):
            module.eval()


class RefAvsEemcTraining(TrainingFamily):
    """
    EEMC's recipes: the parameters whose names contain one of `train_parameters` train (the original's
    `--train_params` substring rule), everything else is frozen; one sample per Ref-AVS row; BCE on every frame.
    Frozen modules run in evaluation mode: the original's dataset runs its text encoder so, but its frozen Swin ran in
    training mode, with drop path (`docs/refavs-eemc.md`, Training, says why that is not reproduced).
    """

    model_types = ("refavs_eemc",)
    name = "refavs_eemc"
    logged_losses = ("loss",)

    @property
    def readers(self) -> Mapping[str, type]:
        return {"refavs": RefAVSReader}

    def build_model(self, config: StageConfig, model_path: str, processor: Any) -> nn.Module:
        unused = [
            name
            for name, value in (
                ("train_modules", config.train_modules),
                ("llm_lora_rank", config.llm_lora_rank),
                ("audio_lora_rank", config.audio_lora_rank),
                ("train_new_token_rows", config.train_new_token_rows),
            )
            if value
        ]
        if unused:
            raise ValueError(f"{', '.join(unused)}: OISA's settings; an EEMC run trains by train_parameters.")
        if not config.train_parameters:
            raise ValueError("train_parameters is empty: an EEMC run needs the names of what it trains.")
        model = AutoModel.from_pretrained(model_path, dtype=torch.float32, **profile_overrides(config.profile))
        for name, weight in config.loss_weights.items():
            if name not in LOSS_WEIGHT_NAMES:
                raise ValueError(f"loss_weights: {name!r} is not one of {LOSS_WEIGHT_NAMES}")
            setattr(model.config, name, weight)
        trainable = select_trainable_parameters(model, config.train_parameters)
        logger.info(
            "trainable parameters: %d in %d tensors (names containing one of %s)",
            sum(parameter.numel() for _, parameter in trainable),
            len(trainable),
            config.train_parameters,
        )
        return model

    def sample_builder(
        self, data_format: str, processor: Any, config: StageConfig, profile: str
    ) -> Callable[[RefAVSRecord], dict[str, torch.Tensor]]:
        def build(record: RefAVSRecord) -> dict[str, torch.Tensor]:
            return build_eemc_sample(record, processor)

        return build

    def collator(self, processor: Any) -> Callable[[Sequence[dict[str, torch.Tensor]]], dict[str, torch.Tensor]]:
        return collate_eemc_samples

    def train_mode(self, model: nn.Module) -> None:
        model.train()
        frozen_modules_to_eval(model)


def profile_overrides(profile: str | None) -> dict[str, str]:
    """The config values that put an EEMC checkpoint under `profile` (every switch), or none for its own."""
    if profile is None:
        return {}
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    return {"profile": profile, **{switch: values[profile] for switch, values in PROFILE_SWITCHES.items()}}


def select_trainable_parameters(model: nn.Module, substrings: Sequence[str]) -> list[tuple[str, nn.Parameter]]:
    """
    Freezes `model` but for the parameters whose name contains one of `substrings`, as the original's
    `--train_params`; returns those. A substring that matches nothing is an error, not a silently frozen part.
    """
    model.requires_grad_(False)
    trainable = [
        (name, parameter) for name, parameter in model.named_parameters() if any(text in name for text in substrings)
    ]
    unmatched = [text for text in substrings if not any(text in name for name, _ in trainable)]
    if unmatched:
        raise ValueError(f"train_parameters {unmatched} match no parameter of the model.")
    for _, parameter in trainable:
        parameter.requires_grad_(True)
    return trainable
