"""
Conversion of original OISA checkpoints (the `internvl_chat` layout of FudanCVL/OmniAVS, as released in
`FudanCVL/OISA-1B-OmniAVS`) to OISA's own config and weight names.

The original stores no description of its audio encoder (its `audio_config` holds WhisperConfig defaults) and
hard-codes the ViT-Adapter and mask-head sizes in Python, so the config is rebuilt from the weights' shapes, plus the
Whisper head count from a companion config. Weights may be safetensors or `.bin` shards, bf16 or fp32, merged or
still LoRA-wrapped (PEFT keys, merged here in float32).

Imported only when an original checkpoint is loaded or converted. transformers' checkpoint conversion mapping
(`WeightRenaming` / `WeightConverter`, applied at load) cannot serve alone: it renames keys of a model whose config is
known, while here the config is rebuilt from the weights' shapes and LoRA pairs are merged before a model exists.
"""

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModel, AutoTokenizer, WhisperConfig
from transformers.utils import logging

from ..configuration_oisa import (
    ORIGINAL_MODEL_TYPE,
    OVERRIDABLE_FIELDS,
    SUB_CONFIG_CLASSES,
    OisaConfig,
)
from ..pretrained import OisaCheckpointError, find_original_checkpoint, resolve_model_name


logger = logging.get_logger(__name__)

# Sampling points per head of the ViT-Adapter's deformable attention, hard-coded by the original: the weights give only
# heads x points.
ORIGINAL_ADAPTER_N_POINTS = 4

# Original tensors that OISA does not have, with the reason. Everything else maps to exactly one parameter (the
# fused ViT `attn.qkv` to three).
DROPPED_ORIGINAL_KEYS = {
    "mask_decoder.predictor.query_feat.weight": "Mask2Former's 100 learned query features; OISA's comes from [SEG]",
    "mask_decoder.predictor.query_embed.weight": "Mask2Former's 100 learned query positions; OISA's comes from [SEG]",
}

# Files next to an original checkpoint that may describe its Whisper encoder (the original reads its encoder from
# `playground/pretrained/internomni_whisper`, never from the checkpoint's own `audio_config`).
AUDIO_ENCODER_CONFIG_NAMES = ("internomni_whisper_config.json", "audio_encoder_config.json")

# LoRA scales alpha / r of the original wrappers: the LLM uses alpha = 2r; the audio wrapper doubles the alpha it is
# passed (2r) again, so 4r; the (unused) backbone wrapper uses 2r.
LORA_SCALES = {"language_model.": 2.0, "audio_model.": 4.0, "vision_model.": 2.0}

TOKEN_ID_FIELDS = {
    "image_token_id": "<IMG_CONTEXT>",
    "audio_token_id": "<AUDIO_CONTEXT>",
    "sub_audio_token_id": "<SUB_AUDIO_CONTEXT>",
    "seg_token_id": "[SEG]",
}
END_OF_TURN_TOKEN = "<|im_end|>"

_QWEN2_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "tie_word_embeddings",
    "rope_theta",
    "rope_scaling",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


# --------------------------------------------------------------------------------------------------------------------
# Key renaming. Each rule pairs an original name with ours; `{i}`, `{j}` stand for layer indexes and `{block}` for the
# last interaction block, which holds the extra extractors. A rule matches whole dotted components, so a prefix rule
# also renames every key below it. The same table runs in both directions.
# --------------------------------------------------------------------------------------------------------------------

_EXTRACTOR_PARTS = (
    ("query_norm", "attention.query_norm"),
    ("feat_norm", "attention.feat_norm"),
    ("attn", "attention.attn"),
    ("ffn_norm", "ffn_norm"),
    ("ffn", "ffn"),
)

_RENAME_RULES: tuple[tuple[str, str], ...] = (
    # InternViT
    ("vision_model.embeddings.class_embedding", "vision_tower.embeddings.cls_token"),
    ("vision_model.embeddings.position_embedding", "vision_tower.embeddings.position_embeddings"),
    ("vision_model.embeddings.patch_embedding", "vision_tower.embeddings.patch_embeddings.projection"),
    ("vision_model.encoder.layers.{i}.ls1", "vision_tower.encoder.layer.{i}.lambda_1"),
    ("vision_model.encoder.layers.{i}.ls2", "vision_tower.encoder.layer.{i}.lambda_2"),
    ("vision_model.encoder.layers.{i}.attn.proj", "vision_tower.encoder.layer.{i}.attention.projection_layer"),
    ("vision_model.encoder.layers.{i}.norm1", "vision_tower.encoder.layer.{i}.layernorm_before"),
    ("vision_model.encoder.layers.{i}.norm2", "vision_tower.encoder.layer.{i}.layernorm_after"),
    ("vision_model.encoder.layers.{i}.mlp", "vision_tower.encoder.layer.{i}.mlp"),
    # ViT-Adapter
    ("vision_model.level_embed", "vision_adapter.level_embed"),
    ("vision_model.spm", "vision_adapter.spatial_prior"),
    *(
        (f"vision_model.interactions.{{i}}.extractor.{original}", f"vision_adapter.extractors.{{i}}.{ours}")
        for original, ours in _EXTRACTOR_PARTS
    ),
    *(
        (
            f"vision_model.interactions.{{block}}.extra_extractors.{{j}}.{original}",
            f"vision_adapter.extra_extractors.{{j}}.{ours}",
        )
        for original, ours in _EXTRACTOR_PARTS
    ),
    ("vision_model.up", "vision_adapter.up"),
    *((f"vision_model.norm{level + 1}", f"vision_adapter.output_norms.{level}") for level in range(4)),
    # projectors
    ("mlp1.0", "multi_modal_projector.layer_norm"),
    ("mlp1.1", "multi_modal_projector.linear_1"),
    ("mlp1.3", "multi_modal_projector.linear_2"),
    ("mlp2.0", "audio_projector.layer_norm"),
    ("mlp2.1", "audio_projector.linear_1"),
    ("mlp2.3", "audio_projector.linear_2"),
    # LLM and audio encoder
    ("language_model.lm_head", "lm_head"),
    ("language_model.model", "language_model"),
    ("audio_model.encoder", "audio_tower"),
    # pixel decoder (Mask2Former names of transformers)
    ("mask_decoder.pixel_decoder.input_proj", "mask_head.pixel_decoder.input_projections"),
    ("mask_decoder.pixel_decoder.transformer.level_embed", "mask_head.pixel_decoder.level_embed"),
    (
        "mask_decoder.pixel_decoder.transformer.encoder.layers.{i}.self_attn",
        "mask_head.pixel_decoder.encoder.layers.{i}.self_attn",
    ),
    (
        "mask_decoder.pixel_decoder.transformer.encoder.layers.{i}.linear1",
        "mask_head.pixel_decoder.encoder.layers.{i}.fc1",
    ),
    (
        "mask_decoder.pixel_decoder.transformer.encoder.layers.{i}.linear2",
        "mask_head.pixel_decoder.encoder.layers.{i}.fc2",
    ),
    (
        "mask_decoder.pixel_decoder.transformer.encoder.layers.{i}.norm1",
        "mask_head.pixel_decoder.encoder.layers.{i}.self_attn_layer_norm",
    ),
    (
        "mask_decoder.pixel_decoder.transformer.encoder.layers.{i}.norm2",
        "mask_head.pixel_decoder.encoder.layers.{i}.final_layer_norm",
    ),
    ("mask_decoder.pixel_decoder.mask_features", "mask_head.pixel_decoder.mask_projection"),
    ("mask_decoder.pixel_decoder.adapter_1.norm", "mask_head.pixel_decoder.adapter_1.1"),
    ("mask_decoder.pixel_decoder.adapter_1.weight", "mask_head.pixel_decoder.adapter_1.0.weight"),
    ("mask_decoder.pixel_decoder.layer_1.norm", "mask_head.pixel_decoder.layer_1.1"),
    ("mask_decoder.pixel_decoder.layer_1.weight", "mask_head.pixel_decoder.layer_1.0.weight"),
    # query decoder
    ("mask_decoder.predictor.seg_token_proj.layers.{i}", "mask_head.query_decoder.seg_token_projection.{i}.0"),
    ("mask_decoder.predictor.level_embed", "mask_head.query_decoder.level_embed"),
    (
        "mask_decoder.predictor.transformer_cross_attention_layers.{i}.multihead_attn",
        "mask_head.query_decoder.layers.{i}.cross_attn",
    ),
    (
        "mask_decoder.predictor.transformer_cross_attention_layers.{i}.norm",
        "mask_head.query_decoder.layers.{i}.cross_attn_layer_norm",
    ),
    ("mask_decoder.predictor.transformer_ffn_layers.{i}.linear1", "mask_head.query_decoder.layers.{i}.fc1"),
    ("mask_decoder.predictor.transformer_ffn_layers.{i}.linear2", "mask_head.query_decoder.layers.{i}.fc2"),
    (
        "mask_decoder.predictor.transformer_ffn_layers.{i}.norm",
        "mask_head.query_decoder.layers.{i}.final_layer_norm",
    ),
    ("mask_decoder.predictor.decoder_norm", "mask_head.query_decoder.layer_norm"),
    ("mask_decoder.predictor.class_embed", "mask_head.query_decoder.class_predictor"),
    ("mask_decoder.predictor.mask_embed.layers.{i}", "mask_head.query_decoder.mask_predictor.mask_embedder.{i}.0"),
)

# InternViT's fused attention input projection, split into transformers' q/k/v projections (in that order).
_FUSED_QKV = ("vision_model.encoder.layers.{i}.attn.qkv", "vision_tower.encoder.layer.{i}.attention.{part}_proj")
_QKV_PARTS = ("q", "k", "v")


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name in ("i", "j", "block"):
        pattern = pattern.replace(re.escape(f"{{{name}}}"), f"(?P<{name}>\\d+)")
    pattern = pattern.replace(re.escape("{part}"), "(?P<part>[qkv])")
    return re.compile(f"^{pattern}(?P<rest>(\\..+)?)$")


_FORWARD_RULES = [(_template_regex(original), ours) for original, ours in _RENAME_RULES]
_REVERSE_RULES = [(_template_regex(ours), original) for original, ours in _RENAME_RULES]
_QKV_FORWARD = _template_regex(_FUSED_QKV[0])
_QKV_REVERSE = _template_regex(_FUSED_QKV[1])


def original_to_oisa_keys(key: str) -> list[str] | None:
    """Our parameter name(s) for an original key (three for the fused `attn.qkv`), or None if no rule matches."""
    match = _QKV_FORWARD.match(key)
    if match:
        return [_FUSED_QKV[1].format(i=match["i"], part=part) + match["rest"] for part in _QKV_PARTS]
    for regex, ours in _FORWARD_RULES:
        match = regex.match(key)
        if match:
            fields = {name: value for name, value in match.groupdict().items() if name != "rest"}
            return [ours.format(**fields) + match["rest"]]
    return None


def oisa_to_original_key(key: str, config: OisaConfig) -> str | None:
    """The original key a parameter of ours comes from (q/k/v of InternViT share `attn.qkv`), or None."""
    match = _QKV_REVERSE.match(key)
    if match:
        return _FUSED_QKV[0].format(i=match["i"]) + match["rest"]
    last_block = len(config.adapter_interaction_indexes) - 1
    for regex, original in _REVERSE_RULES:
        match = regex.match(key)
        if match:
            fields = {name: value for name, value in match.groupdict().items() if name != "rest"}
            return original.format(block=last_block, **fields) + match["rest"]
    return None


# --------------------------------------------------------------------------------------------------------------------
# Reading original checkpoints
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class OriginalCheckpoint:
    """The tensors of an original checkpoint (LoRA already merged) and the file each came from."""

    tensors: dict[str, torch.Tensor]
    files: dict[str, str]


def load_json_config(path: str | os.PathLike) -> dict:
    """A JSON config file as a dict."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise OisaCheckpointError(f"Cannot read the config {path}: {error}") from error


def read_original_config(directory: str | os.PathLike) -> dict:
    """The `config.json` of a checkpoint directory as a dict."""
    return load_json_config(Path(directory) / "config.json")


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, from its index when sharded."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = directory / index_name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as error:
                raise OisaCheckpointError(f"Cannot read the shard index {index_path}: {error}") from error
            files = sorted(set(weight_map.values()))
            for name in files:
                if not (directory / name).is_file():
                    keys = sorted(key for key, shard in weight_map.items() if shard == name)
                    raise OisaCheckpointError(
                        f"Shard {directory / name} listed in {index_path} is missing (it holds {keys[0]!r} and "
                        f"{len(keys) - 1} other keys)."
                    )
            return [directory / name for name in files]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return [directory / name]
    raise OisaCheckpointError(
        f"No weights in {directory}: expected model.safetensors, pytorch_model.bin or a sharded index of either."
    )


def read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors or `.bin` file; a file that cannot be read raises naming it (and the key)."""
    if path.suffix == ".safetensors":
        tensors = {}
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as error:
            raise OisaCheckpointError(f"Cannot read the weight file {path}: {error}") from error
        with handle:
            for key in handle.keys():
                try:
                    tensors[key] = handle.get_tensor(key)
                except Exception as error:
                    raise OisaCheckpointError(f"Cannot read tensor {key!r} from {path}: {error}") from error
        return tensors
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise OisaCheckpointError(f"Cannot read the weight file {path}: {error}") from error
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise OisaCheckpointError(f"The weight file {path} does not hold a flat state dict of tensors.")
    return dict(state_dict)


def _strip_peft_wrappers(key: str) -> str:
    # PEFT wraps a module as `<name>.base_model.model.<inner>`; a wrapped linear keeps its weight in `base_layer`
    return key.replace(".base_model.model.", ".").replace(".base_layer.", ".")


def merge_lora(
    tensors: Mapping[str, torch.Tensor], files: Mapping[str, str], dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """
    Unwraps PEFT keys and merges every LoRA pair into its base weight, W + scale * B @ A computed in float32 and
    stored in `dtype` (W's own by default), so it is rounded once (scale 2 for the LLM and the ViT, 4 for the audio
    encoder). Returns the merged tensors and the file each came from.
    """
    merged, merged_files, lora = {}, {}, {}
    for key, tensor in tensors.items():
        unwrapped = _strip_peft_wrappers(key)
        match = re.match(r"^(?P<module>.+)\.lora_(?P<side>[AB])(\.[^.]+)?\.weight$", unwrapped)
        if match:
            lora.setdefault(match["module"], {})[match["side"]] = (key, tensor)
            continue
        if "lora_" in unwrapped:
            raise OisaCheckpointError(f"Unsupported LoRA tensor {key!r} in {files[key]}.")
        if unwrapped in merged:
            raise OisaCheckpointError(f"Key {key!r} in {files[key]} duplicates {unwrapped!r} once unwrapped.")
        merged[unwrapped] = tensor
        merged_files[unwrapped] = files[key]
    for module, sides in sorted(lora.items()):
        if set(sides) != {"A", "B"}:
            key = next(iter(sides.values()))[0]
            raise OisaCheckpointError(
                f"LoRA tensor {key!r} in {files[key]} has no lora_{'A' if 'B' in sides else 'B'}."
            )
        base_key = f"{module}.weight"
        if base_key not in merged:
            key = sides["A"][0]
            raise OisaCheckpointError(f"LoRA tensor {key!r} in {files[key]} has no base weight {base_key!r}.")
        scale = next((value for prefix, value in LORA_SCALES.items() if module.startswith(prefix)), None)
        if scale is None:
            raise OisaCheckpointError(
                f"LoRA on {module!r} ({files[sides['A'][0]]}) is not part of the original model."
            )
        base = merged[base_key]
        lora_a, lora_b = sides["A"][1].float(), sides["B"][1].float()
        if (lora_b.shape[0], lora_a.shape[1]) != tuple(base.shape):
            raise OisaCheckpointError(
                f"LoRA pair of {base_key!r} ({files[sides['A'][0]]}) has shapes {tuple(lora_a.shape)} and "
                f"{tuple(lora_b.shape)}, which do not fit the base weight {tuple(base.shape)}."
            )
        merged[base_key] = (base.float() + scale * (lora_b @ lora_a)).to(dtype or base.dtype)
    return merged, merged_files


def read_original_checkpoint(directory: str | os.PathLike, dtype: torch.dtype | None = None) -> OriginalCheckpoint:
    """Reads every weight file of an original checkpoint directory and merges LoRA pairs (into `dtype` if given)."""
    directory = Path(directory)
    tensors, files = {}, {}
    for path in weight_files(directory):
        for key, tensor in read_weight_file(path).items():
            if key in tensors:
                raise OisaCheckpointError(f"Key {key!r} appears in both {files[key]} and {path}.")
            tensors[key] = tensor
            files[key] = str(path)
    tensors, files = merge_lora(tensors, files, dtype)
    return OriginalCheckpoint(tensors=tensors, files=files)


# --------------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------------


def _count_indexes(keys: list[str], prefix: str) -> int:
    pattern = re.compile(f"^{re.escape(prefix)}(\\d+)\\.")
    indexes = {int(match[1]) for key in keys if (match := pattern.match(key))}
    if indexes and indexes != set(range(len(indexes))):
        raise OisaCheckpointError(f"The layers under {prefix!r} are not numbered 0..n-1: {sorted(indexes)}.")
    return len(indexes)


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise OisaCheckpointError(f"The original checkpoint has no {key!r}, which sets a size of the model.")
    return tuple(shapes[key])


def audio_encoder_dims(shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """The Whisper encoder sizes that its weights fix: width, FFN, layers, mel bins and positions."""
    keys = list(shapes)
    prefix = "audio_model.encoder."
    d_model, num_mel_bins, _ = _shape(shapes, f"{prefix}conv1.weight")
    return {
        "d_model": d_model,
        "num_mel_bins": num_mel_bins,
        "encoder_layers": _count_indexes(keys, f"{prefix}layers."),
        "encoder_ffn_dim": _shape(shapes, f"{prefix}layers.0.fc1.weight")[0],
        "max_source_positions": _shape(shapes, f"{prefix}embed_positions.weight")[0],
    }


def find_audio_encoder_config(directory: str | os.PathLike) -> dict | None:
    """A companion Whisper config next to an original checkpoint (see `AUDIO_ENCODER_CONFIG_NAMES`), if any."""
    for name in AUDIO_ENCODER_CONFIG_NAMES:
        path = Path(directory) / name
        if path.is_file():
            return load_json_config(path)
    return None


def audio_config_from_weights(
    shapes: Mapping[str, tuple[int, ...]],
    companion: Mapping | None,
    original_audio_config: Mapping | None = None,
    source: str = "the checkpoint",
) -> dict:
    """
    The Whisper encoder config of OISA: sizes from the weights, the head count (which weights cannot give) and the
    activation from `companion` (e.g. `internomni_whisper_config.json`), else from the original's own `audio_config`
    when that describes these weights. Raises when the head count cannot be known.
    """
    dims = audio_encoder_dims(shapes)
    described_by = None
    for candidate, name in ((companion, "the audio encoder config"), (original_audio_config, "its `audio_config`")):
        if candidate is None:
            continue
        mismatched = {field: candidate.get(field) for field, value in dims.items() if candidate.get(field) != value}
        if candidate is companion and mismatched:
            raise OisaCheckpointError(
                f"The audio encoder config given for {source} does not describe its Whisper weights: the weights have "
                f"{dims}, the config has {mismatched}."
            )
        if not mismatched and candidate.get("encoder_attention_heads"):
            described_by = (candidate, name)
            break
    if described_by is None:
        raise OisaCheckpointError(
            f"The number of attention heads of the Whisper encoder of {source} cannot be known from its weights "
            f"({dims}), and no config describes them: put the encoder's WhisperConfig next to the checkpoint as one "
            f"of {AUDIO_ENCODER_CONFIG_NAMES} or pass `audio_encoder_config` (a dict or a path; for OISA-1B, the "
            f"`config.json` of FudanCVL/OISA-Train `internomni_whisper`, 20 heads)."
        )
    candidate, name = described_by
    logger.info(
        "Whisper encoder of %s: sizes from the weights, %d heads from %s.",
        source,
        candidate["encoder_attention_heads"],
        name,
    )
    return {
        "model_type": "whisper",
        **dims,
        "encoder_attention_heads": candidate["encoder_attention_heads"],
        "activation_function": candidate.get("activation_function", "gelu"),
        "encoder_layerdrop": 0.0,
    }


def check_original_behaviour(original_config: Mapping) -> None:
    """Raises unless the original config selects the behaviour OISA implements (pixel shuffle v2, last ViT layer...)."""
    for field, supported in (("ps_version", "v2"), ("select_layer", -1), ("qwa_version", "internomni")):
        if original_config.get(field, supported) != supported:
            raise OisaCheckpointError(
                f"OISA runs with {field} = {supported!r}; this checkpoint has {original_config[field]!r}."
            )


def _override_hint(name: str, example: str) -> str:
    section, _, field = name.partition(".")
    keyword = f"{section}={{{field!r}: {example}}}" if field else f"{name}={example}"
    return f"give it with `oisa convert --set {name}={example}` or `from_pretrained(..., {keyword})`"


def _required_field(section: Mapping, name: str, where: str):
    if name not in section:
        raise OisaCheckpointError(
            f"The original config.json has no {where}.{name}, which sets a size of the model: "
            f"{_override_hint(f'{where}.{name}', 'N')}."
        )
    return section[name]


def vision_config_from_original(original_config: Mapping, given: Mapping | None = None) -> dict:
    """
    InternVLVisionConfig fields from the original InternViT config (`intern_vit_6b`), updated with the `given` fields
    (which may supply a size the config lacks).
    """
    vision = {**(original_config.get("vision_config") or {}), **(given or {})}
    required = {
        name: _required_field(vision, name, "vision_config")
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size")
    }
    image_size = original_config.get("force_image_size") or _required_field(vision, "image_size", "vision_config")
    return {
        **required,
        "attention_bias": vision.get("qkv_bias", True),
        "use_qk_norm": vision.get("qk_normalization", False),
        "norm_type": vision.get("norm_type", "rms_norm"),
        "layer_norm_eps": vision.get("layer_norm_eps", 1e-6),
        "hidden_act": vision.get("hidden_act", "gelu"),
        "image_size": image_size,
        # InternViT has no final norm before the LLM projector
        "use_mean_pooling": True,
        **(given or {}),
    }


def text_config_from_original(original_config: Mapping, vocab_size: int, given: Mapping | None = None) -> dict:
    """
    Qwen2Config fields from the original `llm_config`, with the vocabulary size of the weights, updated with the
    `given` fields (which may supply a size the config lacks).
    """
    llm = {**(original_config.get("llm_config") or {}), **(given or {})}
    architectures = llm.get("architectures") or ["Qwen2ForCausalLM"]
    if llm.get("model_type", "qwen2") != "qwen2" or architectures != ["Qwen2ForCausalLM"]:
        raise OisaCheckpointError(
            f"OISA's LLM is Qwen2; this checkpoint's is {llm.get('model_type')} {architectures}."
        )
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        _required_field(llm, name, "llm_config")
    text_config = {"model_type": "qwen2", **{field: llm[field] for field in _QWEN2_FIELDS if field in llm}}
    text_config["vocab_size"] = vocab_size
    return {**text_config, **(given or {})}


def _width_ratio(width: int, hidden_size: int) -> float:
    """The ratio r with int(hidden_size * r) == width, as the original computes widths from ratios."""
    ratio = width / hidden_size
    while int(hidden_size * ratio) < width:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def adapter_config_from_weights(
    shapes: Mapping[str, tuple[int, ...]],
    num_vit_layers: int,
    hidden_size: int,
    overrides: Mapping | None = None,
) -> dict:
    """
    The ViT-Adapter sizes the original hard-codes, read from its weights. Two cannot be read: where each interaction
    block starts (taken as an equal split of the ViT layers) and the sampling points per head (the original's 4),
    which with the head count make the attention's rows; `overrides` gives either.
    """
    overrides = overrides or {}
    keys = list(shapes)
    num_blocks = _count_indexes(keys, "vision_model.interactions.")
    if num_blocks == 0:
        raise OisaCheckpointError("The original checkpoint has no ViT-Adapter interaction blocks (vision_model.interactions).")
    interaction_indexes = overrides.get("adapter_interaction_indexes")
    if interaction_indexes is None:
        if num_vit_layers % num_blocks:
            example = json.dumps([[0, num_vit_layers // 2 - 1], [num_vit_layers // 2, num_vit_layers - 1]])
            raise OisaCheckpointError(
                f"{num_blocks} adapter interaction blocks cannot split the {num_vit_layers} ViT layers equally, and "
                f"the weights do not say which layers each block runs: "
                f"{_override_hint('adapter_interaction_indexes', example.replace(' ', ''))} (one [first, last] pair "
                f"per block)."
            )
        per_block = num_vit_layers // num_blocks
        interaction_indexes = [[block * per_block, (block + 1) * per_block - 1] for block in range(num_blocks)]
        logger.info(
            "The %d adapter interaction blocks are read as an equal split, %s, of the ViT layers (the weights do not "
            "say it): if they are not, %s.",
            num_blocks,
            json.dumps(interaction_indexes),
            _override_hint("adapter_interaction_indexes", "[[FIRST,LAST],...]"),
        )
    elif len(interaction_indexes) != num_blocks:
        raise OisaCheckpointError(
            f"`adapter_interaction_indexes` has {len(interaction_indexes)} blocks, but the checkpoint has {num_blocks}."
        )
    last_block = f"vision_model.interactions.{num_blocks - 1}."
    misplaced = [key for key in keys if ".extra_extractors." in key and not key.startswith(last_block)]
    if misplaced:
        raise OisaCheckpointError(f"{misplaced[0]!r}: the extra extractors must belong to the last interaction block.")
    extractor = "vision_model.interactions.0.extractor."
    value_dim = _shape(shapes, f"{extractor}attn.value_proj.weight")[0]
    cffn_dim = _shape(shapes, f"{extractor}ffn.fc1.weight")[0]
    # one value level: the attention weights have heads x points rows
    heads_times_points = _shape(shapes, f"{extractor}attn.attention_weights.weight")[0]
    n_points = overrides.get("adapter_n_points", ORIGINAL_ADAPTER_N_POINTS)
    num_heads = overrides.get("adapter_deform_num_heads", heads_times_points // n_points)
    if num_heads * n_points != heads_times_points:
        raise OisaCheckpointError(
            f"The adapter's deformable attention has {heads_times_points} attention weights per query (heads x "
            f"points), which {num_heads} heads of {n_points} points do not make: "
            f"{_override_hint('adapter_n_points', 'N')} or `adapter_deform_num_heads`."
        )
    if hidden_size % num_heads or value_dim % num_heads:
        raise OisaCheckpointError(
            f"The adapter's deformable attention read as {num_heads} heads of {n_points} points does not divide the "
            f"ViT width ({hidden_size}) and its value width ({value_dim}): if the checkpoint's heads have another "
            f"number of points, {_override_hint('adapter_n_points', 'N')}."
        )
    return {
        "adapter_conv_inplane": _shape(shapes, "vision_model.spm.stem.0.weight")[0],
        "adapter_interaction_indexes": [list(block) for block in interaction_indexes],
        "adapter_deform_num_heads": num_heads,
        "adapter_n_points": n_points,
        "adapter_deform_ratio": _width_ratio(value_dim, hidden_size),
        "adapter_cffn_ratio": _width_ratio(cffn_dim, hidden_size),
        "adapter_num_extra_extractors": _count_indexes(
            keys, f"vision_model.interactions.{num_blocks - 1}.extra_extractors."
        ),
    }


def mask_head_config_from_weights(shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """The mask-head sizes (widths, layers, FFNs, heads) that the original takes from yaml or hard-codes."""
    keys = list(shapes)
    pixel = "mask_decoder.pixel_decoder."
    predictor = "mask_decoder.predictor."
    hidden_dim, in_channels = _shape(shapes, f"{pixel}input_proj.0.0.weight")[:2]
    # the pixel decoder's deformable attention reads 3 levels with 4 points per head
    attention_outputs = _shape(shapes, f"{pixel}transformer.encoder.layers.0.self_attn.attention_weights.weight")[0]
    if attention_outputs % (3 * 4):
        raise OisaCheckpointError(
            f"The pixel decoder's deformable attention has {attention_outputs} attention weights per query, not a "
            f"multiple of its 3 levels x 4 points."
        )
    return {
        "mask_head_in_channels": in_channels,
        "mask_hidden_dim": hidden_dim,
        "mask_feature_dim": _shape(shapes, f"{pixel}mask_features.weight")[0],
        "mask_num_heads": attention_outputs // (3 * 4),
        "pixel_decoder_layers": _count_indexes(keys, f"{pixel}transformer.encoder.layers."),
        "pixel_decoder_ffn_dim": _shape(shapes, f"{pixel}transformer.encoder.layers.0.linear1.weight")[0],
        "query_decoder_layers": _count_indexes(keys, f"{predictor}transformer_cross_attention_layers."),
        "query_decoder_ffn_dim": _shape(shapes, f"{predictor}transformer_ffn_layers.0.linear1.weight")[0],
        "seg_token_projection_dim": _shape(shapes, f"{predictor}seg_token_proj.layers.0.weight")[0],
    }


def split_config_overrides(overrides: Mapping) -> tuple[dict, dict[str, dict]]:
    """
    Checks conversion overrides and splits them into OisaConfig fields and sub-config fields. A sub-config field is
    given as `vision_config.num_attention_heads` (as `oisa convert --set` passes it) or as a dict under the
    sub-config's name (as `from_pretrained(..., text_config={...})` passes it).
    """
    top, sub = {}, {name: {} for name in SUB_CONFIG_CLASSES}
    for key, value in overrides.items():
        name, _, field = key.partition(".")
        if name in SUB_CONFIG_CLASSES and (field or isinstance(value, Mapping)):
            fields = {field: value} if field else dict(value)
            for field_name in fields:
                if not hasattr(SUB_CONFIG_CLASSES[name](), field_name):
                    raise OisaCheckpointError(
                        f"Unknown size {name}.{field_name}: {SUB_CONFIG_CLASSES[name].__name__} has no such field."
                    )
            sub[name].update(fields)
        elif key in OVERRIDABLE_FIELDS and not field:
            top[key] = value
        else:
            raise OisaCheckpointError(
                f"Unknown size {key!r}: give an OisaConfig field "
                f"({', '.join(name for name in OVERRIDABLE_FIELDS if name not in SUB_CONFIG_CLASSES)}) or a field of "
                f"vision_config, text_config or audio_config as `vision_config.NAME`."
            )
    return top, sub


def oisa_config_from_original(
    original_config: Mapping,
    shapes: Mapping[str, tuple[int, ...]],
    audio_encoder_config: Mapping | None = None,
    token_ids: Mapping[str, int] | None = None,
    **overrides,
) -> OisaConfig:
    """
    The [`OisaConfig`] of an original checkpoint. Sizes come from where the original takes them: the ViT and the LLM
    from its `config.json` (vocabulary from the weights), the adapter, mask head and Whisper encoder from the weights'
    shapes, the Whisper head count from `audio_encoder_config`. `token_ids` maps `image_token_id`, `audio_token_id`,
    `sub_audio_token_id` and `seg_token_id` to the tokenizer's ids. `overrides` set any OisaConfig field (sub-config
    fields as `vision_config.NAME` or a dict) where the checkpoint cannot say it.
    """
    if original_config.get("model_type") != ORIGINAL_MODEL_TYPE:
        raise OisaCheckpointError(
            f"Not an original OISA config: model_type is {original_config.get('model_type')!r}, not "
            f"{ORIGINAL_MODEL_TYPE!r}."
        )
    top_overrides, sub_overrides = split_config_overrides(overrides)
    check_original_behaviour(original_config)
    if "mask_decoder.predictor.seg_token_proj.layers.0.weight" not in shapes:
        raise OisaCheckpointError(
            "This internvl_chat checkpoint has no mask head (enable_mask was off): it is InternVL2 or an OISA "
            "stage-1 model, not a segmentation model. Build from parts with `build_stage1_model`, or load a plain "
            "InternVL2 with `trust_remote_code=True`."
        )
    vision_config = vision_config_from_original(original_config, sub_overrides["vision_config"])
    vocab_size = _shape(shapes, "language_model.model.embed_tokens.weight")[0]
    text_config = text_config_from_original(original_config, vocab_size, sub_overrides["text_config"])
    tie_word_embeddings = "language_model.lm_head.weight" not in shapes
    if tie_word_embeddings and not text_config.get("tie_word_embeddings", False):
        raise OisaCheckpointError("The checkpoint has no language_model.lm_head.weight but its LLM is not tied.")
    text_config["tie_word_embeddings"] = tie_word_embeddings
    audio_config = {
        **audio_config_from_weights(shapes, audio_encoder_config, original_config.get("audio_config")),
        **sub_overrides["audio_config"],
    }
    fields = {
        "vision_config": vision_config,
        "text_config": text_config,
        "audio_config": audio_config,
        "downsample_ratio": original_config.get("downsample_ratio", 0.5),
        "tie_word_embeddings": tie_word_embeddings,
        **adapter_config_from_weights(
            shapes, vision_config["num_hidden_layers"], vision_config["hidden_size"], top_overrides
        ),
        **mask_head_config_from_weights(shapes),
        **(token_ids or {}),
        **top_overrides,
    }
    try:
        return OisaConfig(**fields)
    except (ValueError, TypeError) as error:
        raise OisaCheckpointError(f"The sizes read from the checkpoint make no valid OisaConfig: {error}") from error


def token_ids_from_tokenizer(tokenizer) -> dict[str, int]:
    """The config's special-token ids, read from the tokenizer (`convert_tokens_to_ids`)."""
    vocab = tokenizer.get_vocab()
    missing = [token for token in (*TOKEN_ID_FIELDS.values(), END_OF_TURN_TOKEN) if token not in vocab]
    if missing:
        raise OisaCheckpointError(f"The checkpoint's tokenizer lacks OISA's special tokens {missing}.")
    return {field: tokenizer.convert_tokens_to_ids(token) for field, token in TOKEN_ID_FIELDS.items()}


def load_original_tokenizer(directory: str | os.PathLike, named_special_tokens: Mapping[str, str] | None = None):
    """The original Qwen2 tokenizer of a checkpoint directory, with `named_special_tokens` as attributes if given."""
    extra = {"extra_special_tokens": dict(named_special_tokens)} if named_special_tokens else {}
    try:
        return AutoTokenizer.from_pretrained(str(directory), **extra)
    except (OSError, ValueError) as error:
        raise OisaCheckpointError(f"Cannot load the tokenizer of {directory}: {error}") from error


# --------------------------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------------------------


def convert_original_state_dict(
    tensors: Mapping[str, torch.Tensor], files: Mapping[str, str] | None = None, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """
    Renames (and splits the fused ViT `attn.qkv` of) merged original tensors to our names, drops
    `DROPPED_ORIGINAL_KEYS`, and casts floating tensors to `dtype` when given. An unknown key raises.
    """
    files = files or {}
    converted = {}
    for key, tensor in tensors.items():
        if key in DROPPED_ORIGINAL_KEYS:
            continue
        targets = original_to_oisa_keys(key)
        if targets is None:
            raise OisaCheckpointError(f"Unknown original key {key!r} in {files.get(key, 'the checkpoint')}.")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        parts = tensor.chunk(len(targets), dim=0) if len(targets) > 1 else (tensor,)
        for target, part in zip(targets, parts):
            converted[target] = part.contiguous()
    return converted


def oisa_state_dict_to_original(
    state_dict: Mapping[str, torch.Tensor], config: OisaConfig
) -> dict[str, torch.Tensor]:
    """
    The inverse of [`convert_original_state_dict`]: our tensors under the original names, InternViT's q/k/v fused back
    into `attn.qkv`, the tied LM head left out. `DROPPED_ORIGINAL_KEYS` are not written.
    """
    original, fused = {}, {}
    for key, tensor in state_dict.items():
        if config.tie_word_embeddings and key == "lm_head.weight":
            continue
        original_key = oisa_to_original_key(key, config)
        if original_key is None:
            raise OisaCheckpointError(f"Our weight {key!r} has no original name.")
        match = _QKV_REVERSE.match(key)
        if match:
            fused.setdefault(original_key, {})[match["part"]] = tensor
        else:
            original[original_key] = tensor
    for original_key, parts in fused.items():
        original[original_key] = torch.cat([parts[part] for part in _QKV_PARTS])
    return original


def original_config_from_oisa(config: OisaConfig) -> dict:
    """
    The inverse of [`oisa_config_from_original`] for what an original `config.json` holds: InternViT's
    `vision_config`, Qwen2's `llm_config` and the image settings. The sizes the original reads from its weights or
    hard-codes are not in it, and, as in the original, its `audio_config` holds WhisperConfig's defaults: the Whisper
    head count goes in a companion file (`AUDIO_ENCODER_CONFIG_NAMES`).
    """
    vision = config.vision_config
    text = config.text_config.to_dict()
    rope = text.get("rope_parameters") or {}
    llm_config = {field: text[field] for field in _QWEN2_FIELDS if field in text and field != "rope_scaling"}
    llm_config.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], rope_theta=rope.get("rope_theta"))
    if rope.get("rope_type", "default") != "default":
        llm_config["rope_scaling"] = {key: value for key, value in rope.items() if key != "rope_theta"}
    return {
        "model_type": ORIGINAL_MODEL_TYPE,
        "architectures": ["InternVLChatModel"],
        "force_image_size": config.image_size,
        "downsample_ratio": config.downsample_ratio,
        "ps_version": "v2",
        "select_layer": -1,
        "template": "Hermes-2",
        "enable_mask": True,
        "vision_config": {
            "model_type": "intern_vit_6b",
            "hidden_size": vision.hidden_size,
            "num_hidden_layers": vision.num_hidden_layers,
            "num_attention_heads": vision.num_attention_heads,
            "intermediate_size": vision.intermediate_size,
            "qkv_bias": vision.attention_bias,
            "qk_normalization": vision.use_qk_norm,
            "norm_type": vision.norm_type,
            "layer_norm_eps": vision.layer_norm_eps,
            "hidden_act": vision.hidden_act,
            "image_size": config.image_size,
            "patch_size": vision.patch_size[0],
        },
        "llm_config": llm_config,
        "audio_config": WhisperConfig().to_dict(),
    }


def check_converted_state_dict(
    converted: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    config: OisaConfig,
    files: Mapping[str, str],
    source: str,
    allow_missing: bool = False,
) -> None:
    """
    Raises naming the original key and its file when a parameter is unexpected, of the wrong shape or (unless
    `allow_missing`) missing. `files` maps original keys to their files, `source` names all of them.
    """
    for key, shape in expected.items():
        original = oisa_to_original_key(key, config)
        if key not in converted:
            if allow_missing:
                continue
            raise OisaCheckpointError(
                f"Missing weight: {original!r} (our {key!r}, shape {tuple(shape)}) is in none of the weight files "
                f"{source}."
            )
        if tuple(converted[key].shape) != tuple(shape):
            raise OisaCheckpointError(
                f"Shape mismatch: {original!r} in {files.get(original, source)} gives our {key!r} the shape "
                f"{tuple(converted[key].shape)}, but the config needs {tuple(shape)}."
            )
    unexpected = sorted(set(converted) - set(expected))
    if unexpected:
        original = oisa_to_original_key(unexpected[0], config)
        raise OisaCheckpointError(
            f"Unexpected weight {original!r} in {files.get(original, source)} (our {unexpected[0]!r}): the model "
            f"built from the checkpoint's config has no such parameter."
        )


def expected_parameter_shapes(model_class: type, config: OisaConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor a model of `config` loads (tied weights once), built on the meta device."""
    with torch.device("meta"):
        model = model_class(config)
    shapes = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    if config.tie_word_embeddings:
        for target in model_class._tied_weights_keys:
            shapes.pop(target, None)
    return shapes


@dataclass
class ConvertedCheckpoint:
    """An original checkpoint converted in memory: our config, our state dict and the special-token ids."""

    config: OisaConfig
    state_dict: dict[str, torch.Tensor]
    end_of_turn_token_id: int
    pad_token_id: int | None


def convert_original_in_memory(
    directory: str | os.PathLike,
    model_class: type,
    audio_encoder_config: Mapping | str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    config_overrides: Mapping | None = None,
) -> ConvertedCheckpoint:
    """
    Converts an original checkpoint directory: reads and merges its weights, builds the config (Whisper head count
    from `audio_encoder_config`, else from a companion file; `config_overrides` for what the checkpoint cannot say),
    renames the weights and checks them strictly against a `model_class` of that config. Floating tensors are cast to
    `dtype` when given.
    """
    directory = Path(directory)
    original_config = read_original_config(directory)
    checkpoint = read_original_checkpoint(directory, dtype)
    if isinstance(audio_encoder_config, (str, os.PathLike)):
        audio_encoder_config = load_json_config(audio_encoder_config)
    if audio_encoder_config is None:
        audio_encoder_config = find_audio_encoder_config(directory)
    tokenizer = load_original_tokenizer(directory)
    shapes = {key: tuple(tensor.shape) for key, tensor in checkpoint.tensors.items()}
    config = oisa_config_from_original(
        original_config, shapes, audio_encoder_config, token_ids_from_tokenizer(tokenizer), **(config_overrides or {})
    )
    converted = convert_original_state_dict(checkpoint.tensors, checkpoint.files, dtype)
    weight_file_names = ", ".join(sorted(set(checkpoint.files.values())))
    check_converted_state_dict(
        converted, expected_parameter_shapes(model_class, config), config, checkpoint.files, weight_file_names
    )
    logger.info(
        "Converted the original checkpoint %s: %d tensors, dropped %s.",
        directory,
        len(checkpoint.tensors),
        sorted(set(DROPPED_ORIGINAL_KEYS) & set(checkpoint.tensors)),
    )
    return ConvertedCheckpoint(
        config=config,
        state_dict=converted,
        end_of_turn_token_id=tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN),
        pad_token_id=tokenizer.pad_token_id,
    )


# --------------------------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------------------------

def convert_original_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    audio_encoder_config: Mapping | str | os.PathLike | None = None,
    named_special_tokens: Mapping[str, str] | None = None,
    dtype: torch.dtype | str = "auto",
    config_overrides: Mapping | None = None,
    **download_kwargs,
) -> None:
    """
    Converts an original OISA checkpoint (`src`: a directory or a Hub repo id) to OISA's format in `dst`: weights with
    our names (`save_pretrained(save_original_format=False)`), config, a generation config that stops at `<|im_end|>`
    and the tokenizer, which exposes `named_special_tokens` as attributes (`tokenizer.seg_token_id`; the `oisa convert`
    command passes `processing_oisa`'s `NAMED_SPECIAL_TOKENS`). `dtype` "auto" keeps the checkpoint's dtype;
    `config_overrides` sets the sizes the checkpoint cannot say (see [`oisa_config_from_original`]).
    """
    top_overrides, sub_overrides = split_config_overrides(config_overrides or {})
    overrides = {**top_overrides, **{name: fields for name, fields in sub_overrides.items() if fields}}
    # a missing folder, a malformed config or truncated weights: one message naming the file, before any download
    resolve_model_name(str(src))
    directory = find_original_checkpoint(src, **download_kwargs)
    if directory is None:
        raise OisaCheckpointError(
            f"{src} is not an original OISA checkpoint (config.json with model_type {ORIGINAL_MODEL_TYPE}); a folder "
            "in OISA's format (model_type oisa) needs no conversion"
        )
    # AutoModel routes the original folder to OisaForReferringSegmentation, which converts it (the model module
    # imports this one on demand, so this one does not import the model)
    model = AutoModel.from_pretrained(
        directory, audio_encoder_config=audio_encoder_config, dtype=dtype, **overrides
    )
    model.save_pretrained(dst, save_original_format=False)
    tokenizer = load_original_tokenizer(directory, named_special_tokens)
    tokenizer.save_pretrained(dst)
    logger.info("Wrote OISA converted from %s to %s.", src, dst)
