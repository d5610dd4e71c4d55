"""
The original EEMC checkpoint to ours and back. The original state dict (`REFAVS_Model_Base.state_dict()`, saved as
`ckpt_best_miou.pth` with transformers 4.30 names) and the original text encoder's (`AutoModel` RoBERTa) map to ours
strictly: every original key is renamed, or dropped for a stated reason, and an unknown or missing key or a wrong shape
is an error naming the key and its file. The config is rebuilt from the weights' shapes. Imported only when an
original checkpoint is loaded (`RefAvsForReferringSegmentation.from_pretrained`) or converted (`oisa convert`).
"""

import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, Mask2FormerConfig, PreTrainedConfig
from transformers.models.swin.modeling_swin import SwinRelativePositionBias

from modeling_oisa.pretrained import OisaCheckpointError

from .configuration_refavs import MASK2FORMER_SWIN_BASE_ADE, RefAvsConfig, VggishConfig
from .conversion_vggish import AUDIO_ENCODER_PREFIX, convert_torchvggish_state_dict
from .pretrained import MASK2FORMER_CONFIG_NAME, TEXT_ENCODER_DIR, VGGISH_PCA_PARAMS_NAME, VGGISH_WEIGHTS_NAME


logger = logging.getLogger(__name__)


class RefAvsConversionError(OisaCheckpointError):
    """An original state dict that does not match the EEMC layout."""


# (pattern, replacement) applied in order, first match wins; None drops the key
ORIGINAL_KEY_RULES: tuple[tuple[str, str | None], ...] = (
    # Mask2Former's loss weights: a constant buffer of the loss module, which EEMC never runs
    (r"^model_v\.criterion\.empty_weight$", None),
    # Swin: transformers 5 nests the backbone's model under `swin.` and renames the attention and MLP layers
    (r"^model_v\.model\.pixel_level_module\.encoder\.(embeddings\..*)$", r"pixel_level_module.encoder.swin.\1"),
    # a constant buffer, rebuilt from the window size (non-persistent in transformers 5)
    (r"^model_v\.model\.pixel_level_module\.encoder\.encoder\..*\.relative_position_index$", None),
    (
        r"^model_v\.model\.pixel_level_module\.encoder\.encoder\.(layers\.\d+\.blocks\.\d+)\.attention\.self\."
        r"relative_position_bias_table$",
        r"pixel_level_module.encoder.swin.encoder.\1.attention.relative_position_bias.relative_position_bias_table",
    ),
    (
        r"^model_v\.model\.pixel_level_module\.encoder\.encoder\.(layers\.\d+\.blocks\.\d+)\.attention\.self\.query\.",
        r"pixel_level_module.encoder.swin.encoder.\1.attention.q_proj.",
    ),
    (
        r"^model_v\.model\.pixel_level_module\.encoder\.encoder\.(layers\.\d+\.blocks\.\d+)\.attention\.self\.key\.",
        r"pixel_level_module.encoder.swin.encoder.\1.attention.k_proj.",
    ),
    (
        r"^model_v\.model\.pixel_level_module\.encoder\.encoder\.(layers\.\d+\.blocks\.\d+)\.attention\.self\.value\.",
        r"pixel_level_module.encoder.swin.encoder.\1.attention.v_proj.",
    ),
    (
        r"^model_v\.model\.pixel_level_module\.encoder\.encoder\.(layers\.\d+\.blocks\.\d+)\.attention\.output\.dense\.",
        r"pixel_level_module.encoder.swin.encoder.\1.attention.o_proj.",
    ),
    (
        r"^model_v\.model\.pixel_level_module\.encoder\.encoder\.(layers\.\d+\.blocks\.\d+)\.intermediate\.dense\.",
        r"pixel_level_module.encoder.swin.encoder.\1.mlp.fc1.",
    ),
    (
        r"^model_v\.model\.pixel_level_module\.encoder\.encoder\.(layers\.\d+\.blocks\.\d+)\.output\.dense\.",
        r"pixel_level_module.encoder.swin.encoder.\1.mlp.fc2.",
    ),
    (
        r"^model_v\.model\.pixel_level_module\.encoder\.encoder\.(layers\.\d+\.blocks\.\d+\.layernorm_(?:before|after)\.)",
        r"pixel_level_module.encoder.swin.encoder.\1",
    ),
    (
        r"^model_v\.model\.pixel_level_module\.encoder\.encoder\.(layers\.\d+\.downsample\.)",
        r"pixel_level_module.encoder.swin.encoder.\1",
    ),
    (r"^model_v\.model\.pixel_level_module\.encoder\.(hidden_states_norms\.)", r"pixel_level_module.encoder.\1"),
    # the pixel decoder's adapters
    (
        r"^model_v\.model\.pixel_level_module\.decoder\.(encoder\.layers\.\d+\.self_attn)\.avs_adapt\.",
        r"pixel_level_module.decoder.\1.adapter.",
    ),
    (
        r"^model_v\.model\.pixel_level_module\.decoder\.((?:level_embed|input_projections|mask_projection|adapter_\d+|"
        r"layer_\d+|encoder\.layers\.\d+\.(?:self_attn\.(?:sampling_offsets|attention_weights|value_proj|output_proj)|"
        r"self_attn_layer_norm|fc1|fc2|final_layer_norm))(?:\.|$))",
        r"pixel_level_module.decoder.\1",
    ),
    # the prompt-driven queries
    (r"^model_v\.model\.transformer_module\.ref_avs_attn\.beta_source_attn$", r"query_prompter.attention_gate"),
    (r"^model_v\.model\.transformer_module\.ref_avs_attn\.beta_source_pool$", r"query_prompter.pool_gate"),
    (r"^model_v\.model\.transformer_module\.ref_avs_attn\.query_embedding\.", r"query_prompter.q_proj."),
    (r"^model_v\.model\.transformer_module\.ref_avs_attn\.key_embedding\.", r"query_prompter.k_proj."),
    (r"^model_v\.model\.transformer_module\.ref_avs_attn\.value_embedding\.", r"query_prompter.v_proj."),
    (r"^model_v\.model\.transformer_module\.ref_avs_attn\.out_projection\.", r"query_prompter.o_proj."),
    (
        r"^model_v\.model\.transformer_module\.((?:queries_embedder|queries_features|decoder|level_embed|"
        r"input_projections)\.)",
        r"transformer_module.\1",
    ),
    (r"^model_v\.class_predictor\.", r"class_predictor."),
    (r"^audio_proj\.", r"audio_projection."),
    (r"^text_proj\.", r"text_projection."),
    (r"^prompt_proj\.", r"prompt_projection."),
    (r"^mha_A_T\.", r"audio_text_attention."),
    (r"^mha_V_T\.", r"visual_text_attention."),
    (r"^mha_mm\.", r"integration_attention."),
)

# our keys no original provides: the Swin model's final LayerNorm, which the backbone built in transformers 5 holds
# but never applies (its stages have their own `hidden_states_norms`)
KEYS_WITHOUT_ORIGINAL = (r"^pixel_level_module\.encoder\.swin\.layernorm\.",)
TEXT_PREFIX = "text_model."

_SWIN_BLOCK = r"^pixel_level_module\.encoder\.swin\.encoder\.(layers\.\d+\.blocks\.\d+)\."
_ORIGINAL_SWIN_BLOCK = r"model_v.model.pixel_level_module.encoder.encoder.\1."
# ours -> the original (the inverse of ORIGINAL_KEY_RULES), first match wins; None: the original has no such tensor
OURS_TO_ORIGINAL_RULES: tuple[tuple[str, str | None], ...] = (
    (KEYS_WITHOUT_ORIGINAL[0], None),
    (r"^pixel_level_module\.encoder\.swin\.(embeddings\.)", r"model_v.model.pixel_level_module.encoder.\1"),
    (
        _SWIN_BLOCK + r"attention\.relative_position_bias\.relative_position_bias_table$",
        _ORIGINAL_SWIN_BLOCK + "attention.self.relative_position_bias_table",
    ),
    (_SWIN_BLOCK + r"attention\.q_proj\.", _ORIGINAL_SWIN_BLOCK + "attention.self.query."),
    (_SWIN_BLOCK + r"attention\.k_proj\.", _ORIGINAL_SWIN_BLOCK + "attention.self.key."),
    (_SWIN_BLOCK + r"attention\.v_proj\.", _ORIGINAL_SWIN_BLOCK + "attention.self.value."),
    (_SWIN_BLOCK + r"attention\.o_proj\.", _ORIGINAL_SWIN_BLOCK + "attention.output.dense."),
    (_SWIN_BLOCK + r"mlp\.fc1\.", _ORIGINAL_SWIN_BLOCK + "intermediate.dense."),
    (_SWIN_BLOCK + r"mlp\.fc2\.", _ORIGINAL_SWIN_BLOCK + "output.dense."),
    (_SWIN_BLOCK + r"(layernorm_(?:before|after)\.)", _ORIGINAL_SWIN_BLOCK + r"\2"),
    (
        r"^pixel_level_module\.encoder\.swin\.encoder\.(layers\.\d+\.downsample\.)",
        r"model_v.model.pixel_level_module.encoder.encoder.\1",
    ),
    (r"^pixel_level_module\.encoder\.(hidden_states_norms\.)", r"model_v.model.pixel_level_module.encoder.\1"),
    (
        r"^pixel_level_module\.decoder\.(encoder\.layers\.\d+\.self_attn)\.adapter\.",
        r"model_v.model.pixel_level_module.decoder.\1.avs_adapt.",
    ),
    (r"^pixel_level_module\.decoder\.", "model_v.model.pixel_level_module.decoder."),
    (r"^query_prompter\.attention_gate$", "model_v.model.transformer_module.ref_avs_attn.beta_source_attn"),
    (r"^query_prompter\.pool_gate$", "model_v.model.transformer_module.ref_avs_attn.beta_source_pool"),
    (r"^query_prompter\.q_proj\.", "model_v.model.transformer_module.ref_avs_attn.query_embedding."),
    (r"^query_prompter\.k_proj\.", "model_v.model.transformer_module.ref_avs_attn.key_embedding."),
    (r"^query_prompter\.v_proj\.", "model_v.model.transformer_module.ref_avs_attn.value_embedding."),
    (r"^query_prompter\.o_proj\.", "model_v.model.transformer_module.ref_avs_attn.out_projection."),
    (r"^transformer_module\.", "model_v.model.transformer_module."),
    (r"^class_predictor\.", "model_v.class_predictor."),
    (r"^audio_projection\.", "audio_proj."),
    (r"^text_projection\.", "text_proj."),
    (r"^prompt_projection\.", "prompt_proj."),
    (r"^audio_text_attention\.", "mha_A_T."),
    (r"^visual_text_attention\.", "mha_V_T."),
    (r"^integration_attention\.", "mha_mm."),
)

# where the original's parts sit in its state dict
SWIN = "model_v.model.pixel_level_module.encoder."
PIXEL_DECODER = "model_v.model.pixel_level_module.decoder."
TRANSFORMER_MODULE = "model_v.model.transformer_module."
LOSS_WEIGHT_KEY = "model_v.criterion.empty_weight"
# transformers' Mask2Former pixel decoder attends over 3 feature levels with 4 sampling points each
DEFORMABLE_LEVELS, DEFORMABLE_POINTS = 3, 4
# SwinConfig fields derived from others, dropped from a base config so that they follow the inferred sizes
DERIVED_SWIN_FIELDS = ("hidden_size", "num_layers", "stage_names", "out_indices")


def convert_original_key(key: str) -> str | None:
    """Our name for one original key, or None where the key is dropped; raises on a key of no known part."""
    for pattern, replacement in ORIGINAL_KEY_RULES:
        if re.search(pattern, key):
            return None if replacement is None else re.sub(pattern, replacement, key)
    raise RefAvsConversionError(f"The original key {key!r} belongs to no known part of EEMC.")


def ours_to_original_key(key: str) -> str | None:
    """The original's name for one of our keys (not the text encoder's), or None where the original has none."""
    for pattern, replacement in OURS_TO_ORIGINAL_RULES:
        if re.search(pattern, key):
            return None if replacement is None else re.sub(pattern, replacement, key)
    raise RefAvsConversionError(f"Our key {key!r} has no place in the original EEMC layout.")


def convert_original_state_dict(
    state_dict: Mapping[str, torch.Tensor], text_state_dict: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """
    The original model's state dict, and optionally its text encoder's (RoBERTa `AutoModel` names), in our names. Of
    the text encoder, the pooler is dropped (EEMC reads the last hidden state only) and so is the constant
    `position_ids` buffer (0, 1, 2, ...), which transformers 5 no longer saves.
    """
    converted = {}
    for key, tensor in state_dict.items():
        new_key = convert_original_key(key)
        if new_key is not None:
            converted[new_key] = tensor
    for key, tensor in (text_state_dict or {}).items():
        if key.startswith("pooler."):
            continue
        if key == "embeddings.position_ids":
            if not torch.equal(tensor.flatten(), torch.arange(tensor.numel(), dtype=tensor.dtype)):
                raise RefAvsConversionError("The text encoder's `embeddings.position_ids` is not 0, 1, 2, ...")
            continue
        converted[TEXT_PREFIX + key] = tensor
    return converted


def original_state_dict_from_ours(
    state_dict: Mapping[str, torch.Tensor], config: RefAvsConfig
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """
    Our state dict in the original layout: (what `torch.save(REFAVS_Model_Base.state_dict())` holds, the text
    encoder's state dict in RoBERTa `AutoModel` names). The original's constant buffers are added as it builds them:
    each Swin block's `relative_position_index` and the loss module's `criterion.empty_weight` (1 per class, the
    no-object weight last). The Swin's unused final LayerNorm has no original and is left out; so is the audio encoder,
    whose original is torchvggish's own file.
    """
    original, text = {}, {}
    for key, tensor in state_dict.items():
        if key.startswith(TEXT_PREFIX):
            text[key.removeprefix(TEXT_PREFIX)] = tensor
            continue
        if key.startswith(AUDIO_ENCODER_PREFIX):
            continue
        original_key = ours_to_original_key(key)
        if original_key is None:
            continue
        original[original_key] = tensor
        if original_key.endswith(".relative_position_bias_table"):
            window_size = window_size_of_table(tuple(tensor.shape), original_key)
            index_key = original_key.replace(".relative_position_bias_table", ".relative_position_index")
            original[index_key] = swin_relative_position_index(window_size)
        elif original_key == "model_v.class_predictor.bias":
            loss_weight = torch.ones(tensor.shape[0])
            loss_weight[-1] = config.mask2former_config.no_object_weight
            original[LOSS_WEIGHT_KEY] = loss_weight
    return original, text


# --------------------------------------------------------------------------------------------------------------------
# Swin's constant index buffers
# --------------------------------------------------------------------------------------------------------------------


def swin_relative_position_index(window_size: int) -> torch.Tensor:
    """The (window^2, window^2) int64 index a Swin block of this window size builds (the original saves it)."""
    bias = SwinRelativePositionBias(1, (window_size, window_size))
    return bias.relative_position_index.view(window_size**2, window_size**2)


def window_size_of_table(shape: tuple[int, ...], key: str, source: str | os.PathLike = "the state dict") -> int:
    """The window size w of a relative-position-bias table of shape ((2w - 1)^2, heads)."""
    side = math.isqrt(shape[0]) if len(shape) == 2 else 0
    if side % 2 == 0 or side * side != shape[0]:
        raise RefAvsConversionError(
            f"{key} in {source} has the shape {shape}, not ((2w - 1)^2, heads) of a Swin window."
        )
    return (side + 1) // 2


def check_swin_index_buffers(state_dict: Mapping[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Each original `relative_position_index` (dropped by the conversion) must be the one its window size builds."""
    for key, index in state_dict.items():
        if not key.endswith(".relative_position_index"):
            continue
        table_key = key.replace(".relative_position_index", ".relative_position_bias_table")
        if table_key not in state_dict:
            raise RefAvsConversionError(f"{key} in {source} has no {table_key.rsplit('.', 1)[-1]} beside it.")
        window_size = window_size_of_table(tuple(state_dict[table_key].shape), table_key, source)
        expected = swin_relative_position_index(window_size)
        if index.shape != expected.shape or not torch.equal(index.cpu().long(), expected):
            raise RefAvsConversionError(
                f"{key} in {source} differs from the index a Swin window of {window_size} builds, which this package "
                "uses instead."
            )


# --------------------------------------------------------------------------------------------------------------------
# Reading the files
# --------------------------------------------------------------------------------------------------------------------


# numpy's array reconstruction, which torchvggish's PCA parameters may need: float arrays only, the reconstruction
# function under its numpy 1 and numpy 2 module names
_NUMPY_RECONSTRUCT = np.zeros(1).__reduce__()[0]
NUMPY_ARRAY_GLOBALS = [
    np.ndarray,
    np.dtype,
    type(np.dtype(np.float32)),
    type(np.dtype(np.float64)),
    (_NUMPY_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),
    (_NUMPY_RECONSTRUCT, "numpy._core.multiarray._reconstruct"),
]


def read_state_dict_file(path: str | os.PathLike, what: str, numpy_arrays: bool = False) -> dict[str, torch.Tensor]:
    """
    A flat state dict from a `torch.save` file, read with `torch.load(weights_only=True)` onto the CPU (tensors saved
    on a GPU included): a file holding anything but tensors (and, with `numpy_arrays`, numpy arrays, returned as
    tensors) is refused, never unpickled. `what` names the file's role in the messages.
    """
    path = Path(path)
    if not path.is_file():
        raise OisaCheckpointError(f"{path}: no such file ({what})")
    allowed = NUMPY_ARRAY_GLOBALS if numpy_arrays else []
    try:
        with torch.serialization.safe_globals(allowed):
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        refused = _globals_named_in(path)
        if refused:
            raise OisaCheckpointError(
                f"{path}: holds objects other than tensors ({', '.join(refused[:3])}), which torch.load(weights_only="
                f"True) refuses to unpickle; only a plain state dict is read ({what})"
            ) from error
        raise OisaCheckpointError(f"{path}: not a readable PyTorch file ({_load_failure(error)}; {what})") from error
    if not isinstance(state_dict, Mapping):
        raise OisaCheckpointError(f"{path}: holds a {type(state_dict).__name__}, not a state dict ({what})")
    tensors = {}
    for key, value in state_dict.items():
        if numpy_arrays and isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise OisaCheckpointError(
                f"{path}: not a flat state dict of tensors ({key!r} holds a {type(value).__name__}; {what})"
            )
        tensors[key] = value
    return tensors


def _globals_named_in(path: Path) -> list[str]:
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        return []


def _load_failure(error: BaseException) -> str:
    """What `torch.load` found wrong, without its advice to load with `weights_only=False`."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip()
        return detail.splitlines()[0] if detail else "refused by the weights-only unpickler"
    return _first_line(error)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def read_original_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The original `ckpt_best_miou.pth` (`REFAVS_Model_Base.state_dict()`), refused when it is not EEMC's."""
    state_dict = read_state_dict_file(path, "the original EEMC state dict")
    if not any(key.startswith("model_v.") for key in state_dict):
        ours = any(key.startswith(("pixel_level_module.", "transformer_module.")) for key in state_dict)
        hint = "; it is in this package's layout already" if ours else ""
        raise OisaCheckpointError(
            f"{path}: not an original EEMC state dict (no model_v.* keys, found {sorted(state_dict)[:3]}){hint}"
        )
    return state_dict


def load_text_encoder(source: str | os.PathLike) -> tuple[PreTrainedConfig, dict[str, torch.Tensor]]:
    """
    The text encoder the original's dataset runs (a folder or Hub id of e.g. `distilbert/distilroberta-base`), loaded
    as the original loads it (`AutoModel.from_pretrained`) without the pooler it never reads: its config and state dict.
    """
    path = Path(source)
    if path.is_file() or (not path.exists() and (path.is_absolute() or str(source).startswith("."))):
        raise OisaCheckpointError(f"{source}: no such folder (the text encoder: a folder or a Hub repo id)")
    try:
        model, info = AutoModel.from_pretrained(str(source), add_pooling_layer=False, output_loading_info=True)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise OisaCheckpointError(f"{source}: cannot load the text encoder ({_first_line(error)})") from error
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise OisaCheckpointError(f"{source}: the text encoder's weights lack {missing[:3]} ({len(missing)} keys)")
    return model.config, model.state_dict()


def load_vggish(
    weights: str | os.PathLike, pca_params: str | os.PathLike | None, config: VggishConfig
) -> dict[str, torch.Tensor]:
    """torchvggish's weights (and PCA parameters) as the state dict of our audio encoder of `config`."""
    state_dict = read_state_dict_file(weights, "torchvggish weights")
    pca = None if pca_params is None else read_state_dict_file(pca_params, "torchvggish PCA parameters", True)
    try:
        return convert_torchvggish_state_dict(state_dict, pca, config)
    except (KeyError, ValueError) as error:
        raise OisaCheckpointError(f"{weights}: not the VGGish of this audio_config ({_first_line(error)})") from error


# --------------------------------------------------------------------------------------------------------------------
# The config from the weights
# --------------------------------------------------------------------------------------------------------------------


def _without_local_path(values: dict) -> dict:
    """A config dict without the folder it was read from, which a saved or published config should not carry."""
    return {key: value for key, value in values.items() if key != "_name_or_path"}


def _count(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> int:
    """How many numbered children `prefix<i>.` has."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({match.group(1) for key in shapes if (match := pattern.match(key))})


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str, source: str | os.PathLike) -> tuple[int, ...]:
    if key not in shapes:
        raise RefAvsConversionError(f"{source}: no {key!r}, which every EEMC checkpoint holds.")
    return shapes[key]


def mask2former_config_from_original(
    shapes: Mapping[str, tuple[int, ...]],
    base: Mask2FormerConfig | Mapping | str | os.PathLike | None = None,
    source: str | os.PathLike = "the state dict",
) -> dict:
    """
    The Mask2Former config of an original state dict: every size its weights show (Swin widths, depths, heads, window,
    patch and MLP ratio; pixel-decoder layers, widths and heads; queries, decoder layers and widths; classes), the rest
    (image size, drop path, loss weights, ...) from `base`: a Mask2FormerConfig, its dict or JSON file, by default
    the released model's (`facebook/mask2former-swin-base-ade-semantic`).
    """
    if base is None:
        base = Mask2FormerConfig(**MASK2FORMER_SWIN_BASE_ADE)
    elif isinstance(base, (str, os.PathLike)):
        try:
            base = Mask2FormerConfig.from_pretrained(base)
        except (OSError, ValueError) as error:
            raise OisaCheckpointError(f"{base}: not a readable Mask2Former config ({_first_line(error)})") from error
    elif isinstance(base, Mapping):
        base = Mask2FormerConfig.from_dict(dict(base))
    values = base.to_dict()
    backbone = {key: value for key, value in values["backbone_config"].items() if key not in DERIVED_SWIN_FIELDS}

    shape = lambda key: _shape(shapes, key, source)  # noqa: E731
    embed_dim, num_channels, patch_size, _ = shape(SWIN + "embeddings.patch_embeddings.projection.weight")
    depths = [
        _count(shapes, f"{SWIN}encoder.layers.{stage}.blocks.")
        for stage in range(_count(shapes, f"{SWIN}encoder.layers."))
    ]
    tables = [
        shape(f"{SWIN}encoder.layers.{stage}.blocks.0.attention.self.relative_position_bias_table")
        for stage in range(len(depths))
    ]
    window_sizes = {
        window_size_of_table(table, f"stage {stage + 1}'s bias table", source) for stage, table in enumerate(tables)
    }
    if len(window_sizes) != 1:
        raise RefAvsConversionError(f"{source}: Swin stages with different window sizes {sorted(window_sizes)}.")
    block = f"{SWIN}encoder.layers.0.blocks.0."
    stages = sorted(
        {
            match.group(1)
            for key in shapes
            if (match := re.match(re.escape(SWIN) + r"hidden_states_norms\.(stage\d+)\.", key))
        },
        key=lambda name: int(name.removeprefix("stage")),
    )
    backbone.update(
        model_type="swin",
        embed_dim=embed_dim,
        num_channels=num_channels,
        patch_size=patch_size,
        depths=depths,
        num_heads=[table[1] for table in tables],
        window_size=window_sizes.pop(),
        mlp_ratio=shape(block + "intermediate.dense.weight")[0] / embed_dim,
        qkv_bias=block + "attention.self.query.bias" in shapes,
        out_features=stages,
    )

    num_queries, hidden_dim = shape(TRANSFORMER_MODULE + "queries_features.weight")
    feature_size = shape(PIXEL_DECODER + "input_projections.0.0.weight")[0]
    encoder_layers = _count(shapes, PIXEL_DECODER + "encoder.layers.")
    num_labels = shape("model_v.class_predictor.weight")[0] - 1
    values.update(
        backbone_config=backbone,
        feature_size=feature_size,
        mask_feature_size=shape(PIXEL_DECODER + "mask_projection.weight")[0],
        encoder_layers=encoder_layers,
        num_queries=num_queries,
        hidden_dim=hidden_dim,
        decoder_layers=_count(shapes, TRANSFORMER_MODULE + "decoder.layers.") + 1,
        dim_feedforward=shape(TRANSFORMER_MODULE + "decoder.layers.0.fc1.weight")[0],
        enforce_input_projection=feature_size == hidden_dim
        and TRANSFORMER_MODULE + "input_projections.0.weight" in shapes,
    )
    if encoder_layers:
        layer = PIXEL_DECODER + "encoder.layers.0."
        values["encoder_feedforward_dim"] = shape(layer + "fc1.weight")[0]
        attention_weights = shape(layer + "self_attn.attention_weights.weight")[0]
        values["num_attention_heads"] = attention_weights // (DEFORMABLE_LEVELS * DEFORMABLE_POINTS)
    if num_labels != len(values.get("id2label") or {}):
        values.pop("id2label", None)
        values.pop("label2id", None)
        values["num_labels"] = num_labels
    return values


def refavs_config_from_original(
    shapes: Mapping[str, tuple[int, ...]],
    text_config: PreTrainedConfig | Mapping,
    mask2former_config: Mask2FormerConfig | Mapping | str | os.PathLike | None = None,
    source: str | os.PathLike = "the state dict",
    **overrides,
) -> RefAvsConfig:
    """
    The `RefAvsConfig` of an original state dict (shapes by key): the Mask2Former's sizes and EEMC's widths from the
    weights, the text encoder's config as given; what the weights cannot say (the fusion and prompt head counts, the
    map size, the profile, an audio encoder's config) keeps its default unless given in `overrides`.
    """
    shape = lambda key: _shape(shapes, key, source)  # noqa: E731
    projection_hidden_dim, audio_feature_dim = shape("audio_proj.0.weight")
    values = {
        "mask2former_config": mask2former_config_from_original(shapes, mask2former_config, source),
        "text_config": _without_local_path(
            text_config.to_dict() if isinstance(text_config, PreTrainedConfig) else dict(text_config)
        ),
        "audio_feature_dim": audio_feature_dim,
        "projection_hidden_dim": projection_hidden_dim,
        "fusion_dim": shape("audio_proj.2.weight")[0],
    }
    adapter = PIXEL_DECODER + "encoder.layers.0.self_attn.avs_adapt.0.weight"
    if adapter in shapes:
        values["adapter_hidden_dim"] = shapes[adapter][0]
    values.update(overrides)
    try:
        return RefAvsConfig(**values)
    except (TypeError, ValueError) as error:
        raise OisaCheckpointError(f"{source}: no EEMC config fits these weights ({_first_line(error)})") from error


# --------------------------------------------------------------------------------------------------------------------
# The strict check and the entry points
# --------------------------------------------------------------------------------------------------------------------


def describe_key(key: str) -> str:
    """One of our keys as the original names it, for messages."""
    if key.startswith(TEXT_PREFIX):
        return f"the text encoder's {key.removeprefix(TEXT_PREFIX)!r}"
    if key.startswith(AUDIO_ENCODER_PREFIX):
        return f"VGGish's {key!r}"
    try:
        original = ours_to_original_key(key)
    except RefAvsConversionError:
        original = None
    return repr(original) if original else repr(key)


def expected_state_shapes(
    model_class: type, config: RefAvsConfig, source: str | os.PathLike = "the checkpoint"
) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor a model of `config` loads, from a model built on the meta device."""
    try:
        with torch.device("meta"):
            model = model_class(config)
    except (AssertionError, ValueError, RuntimeError) as error:
        raise OisaCheckpointError(
            f"{source}: no EEMC model can be built with this config ({_first_line(error)})"
        ) from error
    return {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}


def check_converted_state_dict(
    converted: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    sources: Mapping[str, str | os.PathLike],
    allow_missing: tuple[str, ...] = KEYS_WITHOUT_ORIGINAL,
) -> None:
    """
    Raises, naming the original key and its file, when one of `expected`'s tensors is missing (unless a pattern of
    `allow_missing` matches it), when a converted tensor is unexpected, or of the wrong shape. `sources` names the
    files: "model", "text" (the text encoder) and "audio" (VGGish).
    """

    def source_of(key: str) -> str:
        if key.startswith(TEXT_PREFIX):
            return str(sources.get("text") or "the text encoder")
        if key.startswith(AUDIO_ENCODER_PREFIX):
            return str(sources.get("audio") or f"the VGGish weights ({VGGISH_WEIGHTS_NAME} beside the checkpoint)")
        return str(sources.get("model") or "the original state dict")

    missing = [key for key in expected if key not in converted and not any(re.search(p, key) for p in allow_missing)]
    if missing:
        key = missing[0]
        more = f"; {len(missing) - 1} more are missing" if len(missing) > 1 else ""
        raise RefAvsConversionError(
            f"Missing weight: {describe_key(key)} (our {key!r}, shape {expected[key]}) is not in "
            f"{source_of(key)}{more}."
        )
    for key, tensor in converted.items():
        if key not in expected:
            raise RefAvsConversionError(
                f"Unexpected weight {describe_key(key)} in {source_of(key)} (our {key!r}): the model built from the "
                "checkpoint's config has no such tensor."
            )
        if tuple(tensor.shape) != expected[key]:
            raise RefAvsConversionError(
                f"Shape mismatch: {describe_key(key)} in {source_of(key)} has the shape {tuple(tensor.shape)}, but our "
                f"{key!r} needs {expected[key]} (set the sizes the weights cannot say: see docs/refavs-eemc.md)."
            )


def load_original_state_dict(
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    text_state_dict: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Loads an original checkpoint into `model` strictly: every key of ours filled, every original key used."""
    check_swin_index_buffers(state_dict, "the original state dict")
    converted = convert_original_state_dict(state_dict, text_state_dict)
    expected = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    allow_missing = KEYS_WITHOUT_ORIGINAL + (() if text_state_dict is not None else (rf"^{re.escape(TEXT_PREFIX)}",))
    check_converted_state_dict(converted, expected, {}, allow_missing)
    model.load_state_dict(converted, strict=False)


@dataclass
class ConvertedCheckpoint:
    """An original checkpoint converted in memory: our config and our state dict."""

    config: RefAvsConfig
    state_dict: dict[str, torch.Tensor]


def convert_original_in_memory(
    checkpoint: str | os.PathLike,
    model_class: type,
    text_encoder: str | os.PathLike | None = None,
    vggish: str | os.PathLike | None = None,
    vggish_pca_params: str | os.PathLike | None = None,
    mask2former_config: Mask2FormerConfig | Mapping | str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    config_overrides: Mapping | None = None,
) -> ConvertedCheckpoint:
    """
    Converts an original checkpoint (`checkpoint`: its `ckpt_best_miou.pth`) with the parts the original loads
    elsewhere: the text encoder (`text_encoder`, a folder or Hub id; by default `text_encoder/` beside the file),
    VGGish (`vggish`, `vggish_pca_params`: torchvggish's files; by default `vggish.pth` and `vggish_pca_params.pth`
    beside it, if there; without them the model takes precomputed audio features) and the Mask2Former config
    (`mask2former_config`; by default `mask2former_config.json` beside it, if there). Builds the config from the
    weights, renames them and checks them strictly against a `model_class` of that config; floating tensors are cast
    to `dtype` when given.
    """
    checkpoint = Path(checkpoint)
    folder = checkpoint.parent
    state_dict = read_original_state_dict(checkpoint)
    check_swin_index_buffers(state_dict, checkpoint)
    if text_encoder is None:
        if not (folder / TEXT_ENCODER_DIR).is_dir():
            raise OisaCheckpointError(
                f"{checkpoint}: EEMC needs the text encoder its original loads from the Hub, which the checkpoint does "
                f"not hold: put distilbert/distilroberta-base's files (config.json, model.safetensors, tokenizer) in "
                f"{folder / TEXT_ENCODER_DIR}, or name a folder or Hub id with text_encoder= (oisa convert "
                "--text-encoder)"
            )
        text_encoder = folder / TEXT_ENCODER_DIR
    text_config, text_state_dict = load_text_encoder(text_encoder)
    if mask2former_config is None and (folder / MASK2FORMER_CONFIG_NAME).is_file():
        mask2former_config = folder / MASK2FORMER_CONFIG_NAME
    overrides = dict(config_overrides or {})
    if vggish is None and (folder / VGGISH_WEIGHTS_NAME).is_file():
        vggish = folder / VGGISH_WEIGHTS_NAME
    audio_state_dict = {}
    if vggish is not None:
        # by default the real VGGish with the output the original's towhee operator gives (no PCA)
        audio_config = overrides.setdefault("audio_config", {})
        try:
            vggish_config = audio_config if isinstance(audio_config, VggishConfig) else VggishConfig(**audio_config)
        except (TypeError, ValueError) as error:
            raise OisaCheckpointError(f"audio_config: not a VggishConfig ({_first_line(error)})") from error
        if vggish_pca_params is None and vggish_config.postprocess and (folder / VGGISH_PCA_PARAMS_NAME).is_file():
            vggish_pca_params = folder / VGGISH_PCA_PARAMS_NAME
        audio_state_dict = load_vggish(vggish, vggish_pca_params, vggish_config)

    shapes = {key: tuple(tensor.shape) for key, tensor in state_dict.items()}
    config = refavs_config_from_original(shapes, text_config, mask2former_config, checkpoint, **overrides)
    try:
        converted = {**convert_original_state_dict(state_dict, text_state_dict), **audio_state_dict}
    except RefAvsConversionError as error:
        raise RefAvsConversionError(f"{checkpoint}: {error}") from error
    sources = {"model": checkpoint, "text": text_encoder, "audio": vggish}
    check_converted_state_dict(converted, expected_state_shapes(model_class, config, checkpoint), sources)
    if dtype is not None:
        converted = {
            key: tensor.to(dtype) if tensor.is_floating_point() else tensor for key, tensor in converted.items()
        }
    logger.info(
        "Converted the original EEMC checkpoint %s: %d tensors, dropped %d constant buffers.",
        checkpoint,
        len(state_dict),
        sum(convert_original_key(key) is None for key in state_dict),
    )
    return ConvertedCheckpoint(config=config, state_dict=converted)
