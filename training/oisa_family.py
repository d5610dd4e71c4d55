"""OISA in the training loop: stages of LoRA and full modules, samples from every format of the original mixture."""

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from transformers import AutoModel

from processing_oisa.data.audio_text import AUDIO_TEXT_SAMPLE_BUILDERS
from processing_oisa.data.image_sets import IMAGE_SAMPLE_BUILDERS
from processing_oisa.data.image_text import IMAGE_TEXT_SAMPLE_BUILDERS
from processing_oisa.data.mixture import OisaTrainingCollator, build_omniavs_sample, build_refavs_sample
from processing_oisa.data.omniavs import OmniAVSReader
from processing_oisa.data.refavs import RefAVSReader
from processing_oisa.data.video_sets import VIDEO_SAMPLE_BUILDERS
from processing_oisa.tokenization_oisa import OISA_SPECIAL_TOKENS

from .family import TrainingFamily
from .setup import TrainingSetup, apply_training_setup, merge_training_setup
from .stage_config import StageConfig


LOSS_WEIGHT_NAMES = ("lm_loss_weight", "class_loss_weight", "dice_loss_weight", "bce_loss_weight")

# the dataset formats that train: their reader and how one of its records becomes a sample
SAMPLE_BUILDERS = {
    "omniavs": (OmniAVSReader, build_omniavs_sample),
    "refavs": (RefAVSReader, build_refavs_sample),
    **IMAGE_SAMPLE_BUILDERS,
    **VIDEO_SAMPLE_BUILDERS,
    **AUDIO_TEXT_SAMPLE_BUILDERS,
    **IMAGE_TEXT_SAMPLE_BUILDERS,
}


class OisaTraining(TrainingFamily):
    """OISA's stages: LoRA through peft, modules in full, the new token rows; a stage's end may merge LoRA back."""

    model_types = ("oisa", "internvl_chat")
    name = "oisa"
    logged_losses = ("loss", "lm_loss", "class_loss", "dice_loss", "bce_loss")

    @property
    def readers(self) -> Mapping[str, type]:
        return {data_format: reader for data_format, (reader, _) in SAMPLE_BUILDERS.items()}

    def build_model(self, config: StageConfig, model_path: str, processor: Any) -> nn.Module:
        """The checkpoint with the stage's loss weights and its trainable parts (LoRA, modules, token rows)."""
        if config.train_parameters:
            raise ValueError("train_parameters is EEMC's rule; an OISA stage trains train_modules and LoRA.")
        model = AutoModel.from_pretrained(model_path, dtype=torch.float32)
        for name, weight in config.loss_weights.items():
            if name not in LOSS_WEIGHT_NAMES:
                raise ValueError(f"loss_weights: {name!r} is not one of {LOSS_WEIGHT_NAMES}")
            setattr(model.config, name, weight)
        if config.gradient_checkpointing:
            model.activation_checkpointing_enable()
        new_token_ids = (
            processor.tokenizer.convert_tokens_to_ids(OISA_SPECIAL_TOKENS) if config.train_new_token_rows else []
        )
        return apply_training_setup(
            model,
            TrainingSetup(
                train_modules=config.train_modules,
                llm_lora_rank=config.llm_lora_rank,
                audio_lora_rank=config.audio_lora_rank,
                new_token_ids=new_token_ids,
            ),
        )

    def sample_builder(
        self, data_format: str, processor: Any, config: StageConfig, profile: str
    ) -> Callable[[Any], dict[str, torch.Tensor]]:
        _, build_sample = SAMPLE_BUILDERS[data_format]

        def build(record) -> dict[str, torch.Tensor]:
            return build_sample(record, processor, config.num_frames, config.num_dense_frames, profile)

        return build

    def collator(self, processor: Any) -> OisaTrainingCollator:
        return OisaTrainingCollator(processor.tokenizer.pad_token_id)

    def final_model(self, model: nn.Module, merge: bool) -> nn.Module:
        return merge_training_setup(model) if merge else model
