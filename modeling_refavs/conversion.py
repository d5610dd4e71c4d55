"""
The original EEMC state dict (`REFAVS_Model_Base.state_dict()`, saved as `ckpt_best_miou.pth`, transformers 4.30
names) and the original text encoder's (`AutoModel` RoBERTa) to ours. Every original key is renamed, or dropped for a
stated reason; an unknown or missing key is an error.
"""

import re

import torch


class RefAvsConversionError(ValueError):
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


def convert_original_key(key: str) -> str | None:
    """Our name for one original key, or None where the key is dropped; raises on a key of no known part."""
    for pattern, replacement in ORIGINAL_KEY_RULES:
        if re.search(pattern, key):
            return None if replacement is None else re.sub(pattern, replacement, key)
    raise RefAvsConversionError(f"The original key {key!r} belongs to no known part of EEMC.")


def convert_original_state_dict(
    state_dict: dict[str, torch.Tensor], text_state_dict: dict[str, torch.Tensor] | None = None
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
        converted[f"text_model.{key}"] = tensor
    return converted


def load_original_state_dict(
    model: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    text_state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Loads an original checkpoint into `model` strictly: every key of ours filled, every original key used."""
    converted = convert_original_state_dict(state_dict, text_state_dict)
    ours = model.state_dict()
    allowed_missing = [pattern for pattern in KEYS_WITHOUT_ORIGINAL]
    if text_state_dict is None:
        allowed_missing.append(r"^text_model\.")
    missing = [k for k in ours if k not in converted and not any(re.search(p, k) for p in allowed_missing)]
    unexpected = [k for k in converted if k not in ours]
    mismatched = [k for k in converted if k in ours and converted[k].shape != ours[k].shape]
    if missing or unexpected or mismatched:
        raise RefAvsConversionError(
            f"The original checkpoint does not fit this config: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)}), shape mismatch {mismatched[:5]} ({len(mismatched)})."
        )
    # the dropped Swin index buffers must be the ones the model rebuilt from its window size
    buffers = dict(model.named_buffers())
    for key, tensor in state_dict.items():
        if key.endswith(".relative_position_index"):
            ours_key = convert_original_key(key.replace(".relative_position_index", ".relative_position_bias_table"))
            ours_key = ours_key.replace("relative_position_bias_table", "relative_position_index")
            if ours_key not in buffers or not torch.equal(
                buffers[ours_key].cpu().flatten(), tensor.flatten().to(buffers[ours_key].dtype)
            ):
                raise RefAvsConversionError(f"{key} differs from the index this config builds ({ours_key}).")
    model.load_state_dict(converted, strict=False)
