"""What trains in each OISA stage: frozen towers, trainable modules, LoRA through peft, and merging it back."""

import logging
from dataclasses import dataclass, field

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn


logger = logging.getLogger(__name__)

# LoRA on the LLM's linear layers only: the vision and audio towers and the mask head have layers of the same names.
LLM_LORA_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
AUDIO_LORA_TARGETS = r".*audio_tower\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|fc1|fc2)"


@dataclass
class TrainingSetup:
    """
    The trainable part of a stage. `train_modules` are top-level modules trained in full (e.g. `vision_adapter`,
    `mask_head`, `audio_projector`); `llm_lora_rank` / `audio_lora_rank` add LoRA (0 = none) with alpha =
    `lora_alpha_ratio` x rank; `new_token_ids` are embedding and LM-head rows trained on their own (B3).
    """

    train_modules: list[str] = field(default_factory=list)
    llm_lora_rank: int = 0
    audio_lora_rank: int = 0
    lora_alpha_ratio: float = 2.0
    audio_lora_alpha_ratio: float = 4.0
    lora_dropout: float = 0.05
    new_token_ids: list[int] = field(default_factory=list)


def apply_training_setup(model: nn.Module, setup: TrainingSetup) -> nn.Module:
    """Freezes `model` but for the stage's trainable parts; returns it, wrapped in a `PeftModel` when LoRA is used."""
    model.requires_grad_(False)
    known = {name for name, _ in model.named_children()}
    unknown = set(setup.train_modules) - known
    if unknown:
        raise ValueError(f"Unknown modules to train: {sorted(unknown)}; the model has {sorted(known)}.")
    if setup.llm_lora_rank and setup.audio_lora_rank:
        raise ValueError("A stage trains LoRA on the LLM or on the audio encoder, not both.")
    if not (setup.llm_lora_rank or setup.audio_lora_rank or setup.new_token_ids):
        for name in setup.train_modules:
            getattr(model, name).requires_grad_(True)
        return model

    if setup.audio_lora_rank:
        rank, alpha, target = setup.audio_lora_rank, setup.audio_lora_rank * setup.audio_lora_alpha_ratio, AUDIO_LORA_TARGETS
    else:
        rank, alpha, target = setup.llm_lora_rank, setup.llm_lora_rank * setup.lora_alpha_ratio, LLM_LORA_TARGETS
    config = LoraConfig(
        r=max(rank, 1),
        lora_alpha=max(alpha, 1),
        lora_dropout=setup.lora_dropout,
        target_modules=target if rank else [],
        modules_to_save=list(setup.train_modules) or None,
        trainable_token_indices=(
            {"embed_tokens": list(setup.new_token_ids), "lm_head": list(setup.new_token_ids)}
            if setup.new_token_ids
            else None
        ),
    )
    peft_model = get_peft_model(model, config)
    trainable = sum(parameter.numel() for parameter in peft_model.parameters() if parameter.requires_grad)
    logger.info("trainable parameters: %d (LoRA rank %d; in full: %s)", trainable, rank, setup.train_modules)
    return peft_model


def merge_training_setup(model: nn.Module) -> nn.Module:
    """Folds LoRA into the weights and unwraps the trained modules: a plain OISA model again."""
    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model
