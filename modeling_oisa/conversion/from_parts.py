"""
The OISA model that training stage 1 starts from, assembled from the parts the original training uses: InternVL2-1B
(InternViT, `mlp1`, Qwen2), the InternOmni Whisper encoder and the ViT-Adapter of a Mask2Former `model_final.pth`.
Everything else (audio projector, mask head) is freshly initialised.
"""

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.utils import logging

from ..configuration_oisa import OisaConfig
from ..modeling_oisa import OisaForReferringSegmentation
from .original import (
    OisaCheckpointError,
    adapter_config_from_weights,
    audio_config_from_weights,
    check_converted_state_dict,
    check_original_behaviour,
    convert_original_state_dict,
    expected_parameter_shapes,
    load_json_config,
    read_original_checkpoint,
    read_original_config,
    read_weight_file,
    text_config_from_original,
    vision_config_from_original,
    weight_files,
)


logger = logging.get_logger(__name__)

OISA_VOCAB_SIZE = 151664

# What each part provides, in original key names. InternVL2's ViT wins over the copy inside `model_final.pth`, as in
# the original, where `from_pretrained(InternVL2-1B)` overwrites the adapter file's backbone.
_INTERNVL2_PREFIXES = ("vision_model.embeddings.", "vision_model.encoder.", "mlp1.", "language_model.")
_VIT_PREFIXES = ("vision_model.embeddings.", "vision_model.encoder.")


@dataclass
class Stage1Report:
    r"""
    initialized (`list[str]`): our parameters that no part provided, freshly initialised by `_init_weights`.
    new_token_rows (`range`): rows of the input embeddings and LM head added by the vocabulary resize (mean-resized).
    ignored (`list[str]`): original tensors of the parts that were not used, e.g. the adapter file's copy of the ViT.
    """

    initialized: list[str] = field(default_factory=list)
    new_token_rows: range = range(0)
    ignored: list[str] = field(default_factory=list)


def read_whisper_encoder(whisper_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """
    The encoder tensors of an InternOmni `AudioWhisperModel` folder (keys `encoder.*` or `model.encoder.*`), renamed
    to the original OISA layout `audio_model.encoder.*`, and the folder's WhisperConfig dict.
    """
    directory = Path(whisper_dir)
    config = load_json_config(directory / "config.json")
    tensors = {}
    for path in weight_files(directory):
        for key, tensor in read_weight_file(path).items():
            match = re.match(r"^(model\.)?encoder\.(?P<rest>.+)$", key)
            if match is None:
                raise OisaCheckpointError(
                    f"Unexpected tensor {key!r} in {path}: a Whisper encoder folder holds `encoder.*` or "
                    f"`model.encoder.*` keys."
                )
            tensors[f"audio_model.encoder.{match['rest']}"] = tensor
    return tensors, config


def read_adapter_backbone(adapter_pth: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The `backbone.*` tensors of a ViT-Adapter Mask2Former `model_final.pth`, as original `vision_model.*` keys."""
    try:
        checkpoint = torch.load(adapter_pth, map_location="cpu", weights_only=True)
    except Exception as error:
        raise OisaCheckpointError(f"Cannot read the adapter checkpoint {adapter_pth}: {error}") from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise OisaCheckpointError(f"{adapter_pth} has no `model` state dict.")
    backbone = {
        f"vision_model.{key[len('backbone.') :]}": tensor
        for key, tensor in checkpoint["model"].items()
        if key.startswith("backbone.")
    }
    if not backbone:
        raise OisaCheckpointError(f"{adapter_pth} has no `backbone.*` tensors.")
    return backbone


def build_stage1_model(
    internvl2_dir: str | os.PathLike,
    whisper_dir: str | os.PathLike,
    adapter_pth: str | os.PathLike,
    vocab_size: int = OISA_VOCAB_SIZE,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **config_overrides,
) -> tuple[OisaForReferringSegmentation, Stage1Report]:
    """
    OISA assembled from InternVL2 (`internvl2_dir`, original layout), the InternOmni Whisper encoder (`whisper_dir`)
    and the ViT-Adapter of `adapter_pth`; the audio projector and the mask head are initialised with `seed`. The LLM's
    embeddings and head are mean-resized to `vocab_size`. `config_overrides` set the other [`OisaConfig`] fields (token
    ids, mask-head sizes). Returns the model and the report of what was initialised.
    """
    internvl2_config = read_original_config(internvl2_dir)
    check_original_behaviour(internvl2_config)
    internvl2 = read_original_checkpoint(internvl2_dir)
    whisper, whisper_config = read_whisper_encoder(whisper_dir)
    adapter = read_adapter_backbone(adapter_pth)
    for key in internvl2.tensors:
        if not key.startswith(_INTERNVL2_PREFIXES):
            raise OisaCheckpointError(
                f"Unexpected tensor {key!r} in {internvl2.files[key]} for an InternVL2 checkpoint."
            )

    provided = {
        **{k: v for k, v in adapter.items() if not k.startswith(_VIT_PREFIXES)},
        **internvl2.tensors,
        **whisper,
    }
    ignored = sorted(key for key in adapter if key.startswith(_VIT_PREFIXES))
    shapes = {key: tuple(tensor.shape) for key, tensor in provided.items()}

    if "language_model.model.embed_tokens.weight" not in shapes:
        raise OisaCheckpointError(f"{internvl2_dir} has no language_model.model.embed_tokens.weight: not InternVL2.")
    vision_config = vision_config_from_original(internvl2_config)
    internvl2_vocab = shapes["language_model.model.embed_tokens.weight"][0]
    if vocab_size < internvl2_vocab:
        raise OisaCheckpointError(
            f"vocab_size {vocab_size} is smaller than InternVL2's vocabulary ({internvl2_vocab})."
        )
    text_config = text_config_from_original(internvl2_config, internvl2_vocab)
    text_config["tie_word_embeddings"] = "language_model.lm_head.weight" not in shapes
    fields = {
        "vision_config": vision_config,
        "text_config": text_config,
        "audio_config": audio_config_from_weights(shapes, whisper_config, source=str(whisper_dir)),
        "downsample_ratio": internvl2_config.get("downsample_ratio", 0.5),
        "tie_word_embeddings": text_config["tie_word_embeddings"],
        **adapter_config_from_weights(shapes, vision_config["num_hidden_layers"], vision_config["hidden_size"]),
        **config_overrides,
    }
    config = OisaConfig(**fields)

    state_dict = convert_original_state_dict(provided)
    expected = expected_parameter_shapes(OisaForReferringSegmentation, config)
    sources = {
        **internvl2.files,
        **dict.fromkeys(whisper, str(whisper_dir)),
        **dict.fromkeys(adapter, str(adapter_pth)),
    }
    check_converted_state_dict(state_dict, expected, config, sources, "the parts", allow_missing=True)
    initialized = sorted(set(expected) - set(state_dict))

    # the fresh parts and the new token rows are random: draw them from `seed` without touching the global generator
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = OisaForReferringSegmentation.from_pretrained(None, config=config, state_dict=state_dict, dtype=dtype)
        if vocab_size > internvl2_vocab:
            model.resize_token_embeddings(vocab_size, mean_resizing=True)
    new_token_rows = range(internvl2_vocab, vocab_size)
    logger.info(
        "Stage-1 OISA from parts: %d tensors loaded, %d parameters initialised with seed %d (%s), token rows %d..%d "
        "mean-resized.",
        len(state_dict),
        len(initialized),
        seed,
        sorted({key.split(".")[0] for key in initialized}),
        new_token_rows.start,
        new_token_rows.stop,
    )
    return model, Stage1Report(initialized=initialized, new_token_rows=new_token_rows, ignored=ignored)


__all__ = ["Stage1Report", "build_stage1_model", "read_adapter_backbone", "read_whisper_encoder"]
