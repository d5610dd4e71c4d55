"""
Conversion of original OISA checkpoints of every size, without the original code: a random OISA of each config below
is written back in the original layout (config.json, fused `attn.qkv`, original names, optionally LoRA-wrapped), and
`oisa convert` and `AutoModel.from_pretrained` must give back the same config and bit-identical weights. The sizes
that the checkpoint cannot say stop the conversion with one error naming them, and `--set` / keyword overrides give
them.
"""

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from modeling_oisa import OisaCheckpointError, OisaConfig, OisaForReferringSegmentation
from modeling_oisa.conversion.original import (
    AUDIO_ENCODER_CONFIG_NAMES,
    DROPPED_ORIGINAL_KEYS,
    oisa_state_dict_to_original,
    original_config_from_oisa,
)
from oisa_cli.main import main as oisa_main
from oisa_tiny import build_tiny_tokenizer


# alpha / r of the original's LoRA wrappers (spec/model.md): 2 for the LLM, 4 for the Whisper encoder, whose wrapper
# doubles the alpha it is given
LORA_SCALES = {"language_model.": 2.0, "audio_model.": 4.0}
TOKENIZER = build_tiny_tokenizer()
TOKEN_IDS = {
    "image_token_id": TOKENIZER.convert_tokens_to_ids("<IMG_CONTEXT>"),
    "audio_token_id": TOKENIZER.convert_tokens_to_ids("<AUDIO_CONTEXT>"),
    "seg_token_id": TOKENIZER.convert_tokens_to_ids("[SEG]"),
    "sub_audio_token_id": TOKENIZER.convert_tokens_to_ids("<SUB_AUDIO_CONTEXT>"),
}


def _vision(hidden: int, layers: int, heads: int, image_size: int) -> dict:
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": 2 * hidden + 16,
        "attention_bias": True,
        "use_qk_norm": False,
        "norm_type": "layer_norm",
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu",
        "image_size": image_size,
        "patch_size": 16,
        "use_mean_pooling": True,
    }


def _text(hidden: int, layers: int, heads: int, kv_heads: int, vocab: int, tied: bool, theta: float) -> dict:
    return {
        "model_type": "qwen2",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": 3 * hidden,
        "hidden_act": "silu",
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": theta, "rope_type": "default"},
        "tie_word_embeddings": tied,
        "bos_token_id": TOKENIZER.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": TOKENIZER.convert_tokens_to_ids("<|im_end|>"),
    }


def _audio(d_model: int, layers: int, heads: int, ffn: int, mel_bins: int) -> dict:
    return {
        "model_type": "whisper",
        "d_model": d_model,
        "encoder_layers": layers,
        "encoder_attention_heads": heads,
        "encoder_ffn_dim": ffn,
        "num_mel_bins": mel_bins,
        "max_source_positions": 1500,
        "activation_function": "gelu",
        "encoder_layerdrop": 0.0,
    }


# Each config differs from the others in every size conversion reads: adapter heads 8 / 4 / 16 (the first one with a
# value width of 24, 3 channels a head), interaction blocks, extra extractors, widths and FFNs of every part, depths,
# vocabulary, tied or untied LM head.
CONFIGS = {
    "adapter-8-heads": OisaConfig(
        vision_config=_vision(hidden=96, layers=4, heads=4, image_size=64),
        text_config=_text(hidden=64, layers=1, heads=4, kv_heads=2, vocab=400, tied=False, theta=1e6),
        audio_config=_audio(d_model=32, layers=1, heads=2, ffn=64, mel_bins=80),
        adapter_conv_inplane=8,
        adapter_interaction_indexes=[[0, 1], [2, 3]],
        adapter_deform_num_heads=8,
        adapter_cffn_ratio=0.5,
        adapter_num_extra_extractors=1,
        mask_hidden_dim=64,
        mask_feature_dim=32,
        mask_num_heads=4,
        pixel_decoder_layers=2,
        pixel_decoder_ffn_dim=48,
        query_decoder_layers=2,
        query_decoder_ffn_dim=80,
        seg_token_projection_dim=48,
        **TOKEN_IDS,
    ),
    "adapter-4-heads": OisaConfig(
        vision_config=_vision(hidden=64, layers=6, heads=8, image_size=128),
        text_config=_text(hidden=96, layers=3, heads=6, kv_heads=2, vocab=448, tied=True, theta=1e4),
        audio_config=_audio(d_model=64, layers=2, heads=4, ffn=96, mel_bins=128),
        adapter_conv_inplane=16,
        adapter_interaction_indexes=[[0, 1], [2, 3], [4, 5]],
        adapter_deform_num_heads=4,
        adapter_deform_ratio=0.5,
        adapter_num_extra_extractors=2,
        mask_hidden_dim=32,
        mask_feature_dim=64,
        mask_num_heads=8,
        pixel_decoder_layers=1,
        pixel_decoder_ffn_dim=64,
        query_decoder_layers=3,
        query_decoder_ffn_dim=32,
        seg_token_projection_dim=64,
        tie_word_embeddings=True,
        **TOKEN_IDS,
    ),
    # 112 * (61 / 112) is just under 61: the ratio read back must still give a 61-wide FFN
    "adapter-16-heads": OisaConfig(
        vision_config=_vision(hidden=112, layers=8, heads=8, image_size=64),
        text_config=_text(hidden=32, layers=2, heads=2, kv_heads=1, vocab=512, tied=False, theta=1e5),
        audio_config=_audio(d_model=48, layers=1, heads=3, ffn=40, mel_bins=128),
        adapter_conv_inplane=4,
        adapter_interaction_indexes=[[0, 1], [2, 3], [4, 5], [6, 7]],
        adapter_deform_num_heads=16,
        adapter_deform_ratio=32 / 112,
        adapter_cffn_ratio=0.546,
        adapter_num_extra_extractors=0,
        mask_hidden_dim=64,
        mask_feature_dim=64,
        mask_num_heads=2,
        pixel_decoder_layers=3,
        pixel_decoder_ffn_dim=24,
        query_decoder_layers=1,
        query_decoder_ffn_dim=16,
        seg_token_projection_dim=24,
        **TOKEN_IDS,
    ),
}


def random_model(config: OisaConfig, seed: int = 0) -> OisaForReferringSegmentation:
    """A model of `config` with every tensor drawn at random, so that any swapped or misread tensor shows."""
    generator = torch.Generator().manual_seed(seed)
    model = OisaForReferringSegmentation(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model


def lora_wrapped(tensors: dict[str, torch.Tensor], rank: int, zero_b: bool) -> dict[str, torch.Tensor]:
    """
    The tensors as an unmerged stage output holds them: the LLM and the Whisper encoder wrapped by PEFT
    (`<part>.base_model.model.<inner>`), a LoRA pair on every linear of their layers with the base weight holding
    W - scale * B @ A. With `zero_b` (PEFT's initial state) the pair adds nothing, so merging must be exact.
    """
    generator = torch.Generator().manual_seed(1)
    wrapped = {}
    for key, tensor in tensors.items():
        prefix = next((p for p in ("language_model.", "audio_model.") if key.startswith(p)), None)
        if prefix is None:
            wrapped[key] = tensor
            continue
        module, _, parameter = key.rpartition(".")
        inner = module.replace(prefix, f"{prefix}base_model.model.", 1)
        if ".layers." in module and tensor.dim() == 2 and "norm" not in module:
            if parameter == "weight":
                lora_a = torch.randn(rank, tensor.shape[1], generator=generator)
                lora_b = torch.zeros(tensor.shape[0], rank)
                if not zero_b:
                    lora_b = torch.randn(tensor.shape[0], rank, generator=generator) * 0.01
                scale = LORA_SCALES[prefix]
                tensor = tensor - scale * lora_b @ lora_a
                wrapped[f"{inner}.lora_A.default.weight"] = lora_a
                wrapped[f"{inner}.lora_B.default.weight"] = lora_b
            wrapped[f"{inner}.base_layer.{parameter}"] = tensor.contiguous()
        elif ".layers." in module and module.endswith(("proj", "fc1", "fc2")):
            wrapped[f"{inner}.base_layer.{parameter}"] = tensor
        else:
            wrapped[f"{inner}.{parameter}"] = tensor
    return wrapped


def write_original(
    model: OisaForReferringSegmentation,
    directory: Path,
    lora_rank: int | None = None,
    zero_b: bool = True,
    config_edit=None,
) -> Path:
    """`model` as an original OISA checkpoint folder, written with the inverse key map."""
    directory.mkdir(parents=True)
    original = oisa_state_dict_to_original(model.state_dict(), model.config)
    hidden_dim = model.config.mask_hidden_dim
    for key in DROPPED_ORIGINAL_KEYS:
        original[key] = torch.randn(100, hidden_dim)
    if lora_rank is not None:
        original = lora_wrapped(original, lora_rank, zero_b)
    save_file({key: tensor.contiguous() for key, tensor in original.items()}, directory / "model.safetensors")
    config = original_config_from_oisa(model.config)
    if lora_rank is not None:
        config["use_llm_lora"] = config["use_audio_lora"] = lora_rank
    if config_edit is not None:
        config_edit(config)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / AUDIO_ENCODER_CONFIG_NAMES[0]).write_text(json.dumps(model.config.audio_config.to_dict()))
    TOKENIZER.save_pretrained(directory)
    return directory


# fields that describe where a config was saved, not the model
UNSAVED_FIELDS = {"_name_or_path", "name_or_path", "transformers_version", "architectures", "auto_map", "dtype"}


def config_fields(config: OisaConfig) -> dict:
    """The config as a dict, the adapter's width ratios as the widths they give (0.546 and 0.5446 both give 61)."""

    def strip(fields: dict) -> dict:
        return {
            key: strip(value) if isinstance(value, dict) else value
            for key, value in fields.items()
            if key not in UNSAVED_FIELDS
        }

    fields = strip(config.to_dict())
    for ratio in ("adapter_deform_ratio", "adapter_cffn_ratio"):
        fields[ratio] = int(config.vision_config.hidden_size * fields[ratio])
    return fields


def assert_same_model(loaded: OisaForReferringSegmentation, expected: OisaForReferringSegmentation) -> None:
    assert config_fields(loaded.config) == config_fields(expected.config)
    state, reference = loaded.state_dict(), expected.state_dict()
    assert state.keys() == reference.keys()
    for key in reference:
        assert state[key].dtype == reference[key].dtype, key
        assert torch.equal(state[key], reference[key]), key


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    model = random_model(CONFIGS[request.param])
    return model, write_original(model, tmp_path_factory.mktemp(request.param) / "original")


def test_oisa_convert_gives_back_the_config_and_the_weights(case, tmp_path):
    model, original = case
    assert oisa_main(["convert", str(original), str(tmp_path / "converted")]) == 0
    assert_same_model(AutoModel.from_pretrained(tmp_path / "converted"), model)
    # the weights on disk bear our names and the config our model type
    assert load_file(tmp_path / "converted" / "model.safetensors").keys() <= model.state_dict().keys()
    assert json.loads((tmp_path / "converted" / "config.json").read_text())["model_type"] == "oisa"


def test_from_pretrained_of_the_original_folder(case):
    model, original = case
    assert_same_model(AutoModel.from_pretrained(original), model)


def test_lora_wrapped_original_is_merged_exactly(case, tmp_path):
    model, _ = case
    wrapped = write_original(model, tmp_path / "lora", lora_rank=3, zero_b=True)
    assert_same_model(OisaForReferringSegmentation.from_pretrained(wrapped), model)


def test_lora_pairs_are_merged_with_their_scales(case, tmp_path):
    """Nonzero pairs: W - scale * B @ A + scale * B @ A rounds to within float32 noise of W, a wrong scale does not."""
    model, _ = case
    wrapped = write_original(model, tmp_path / "lora", lora_rank=3, zero_b=False)
    merged, reference = OisaForReferringSegmentation.from_pretrained(wrapped).state_dict(), model.state_dict()
    for key in reference:
        torch.testing.assert_close(merged[key], reference[key], rtol=0, atol=1e-5, msg=key)


# --------------------------------------------------------------------------------------------------------------------
# sizes the checkpoint cannot say
# --------------------------------------------------------------------------------------------------------------------


def test_unequal_interaction_blocks_need_their_layers(tmp_path, caplog):
    """The weights give the number of interaction blocks, not their layers: 5 layers in 2 blocks cannot be guessed."""
    fields = CONFIGS["adapter-8-heads"].to_dict()
    fields["vision_config"]["num_hidden_layers"] = 5
    model = random_model(OisaConfig(**{**fields, "adapter_interaction_indexes": [[0, 1], [2, 4]]}))
    original = write_original(model, tmp_path / "original")
    assert oisa_main(["convert", str(original), str(tmp_path / "refused")]) == 2
    message = caplog.text
    assert "adapter_interaction_indexes" in message and "--set" in message and "Traceback" not in message
    with pytest.raises(OisaCheckpointError, match="adapter_interaction_indexes"):
        OisaForReferringSegmentation.from_pretrained(original)

    given = ["--set", "adapter_interaction_indexes=[[0,1],[2,4]]"]
    assert oisa_main(["convert", str(original), str(tmp_path / "converted"), *given]) == 0
    assert_same_model(AutoModel.from_pretrained(tmp_path / "converted"), model)
    loaded = AutoModel.from_pretrained(original, adapter_interaction_indexes=[[0, 1], [2, 4]])
    assert_same_model(loaded, model)


def test_an_equal_split_of_the_vit_layers_is_said(case, caplog):
    model, original = case
    with caplog.at_level(logging.INFO):
        AutoModel.from_pretrained(original)
    blocks = model.config.adapter_interaction_indexes
    assert f"as an equal split, {json.dumps(blocks)}" in caplog.text


def test_sampling_points_per_head_are_given_when_not_the_originals(tmp_path):
    """2 points x 16 heads has the shapes of the original's 4 points x 8 heads: the weights alone read it as the latter."""
    config = OisaConfig(
        **{**CONFIGS["adapter-4-heads"].to_dict(), "adapter_deform_num_heads": 16, "adapter_n_points": 2}
    )
    model = random_model(config)
    original = write_original(model, tmp_path / "original")
    read = AutoModel.from_pretrained(original)
    assert (read.config.adapter_deform_num_heads, read.config.adapter_n_points) == (8, 4)
    assert_same_model(AutoModel.from_pretrained(original, adapter_n_points=2), model)
    assert oisa_main(["convert", str(original), str(tmp_path / "converted"), "--set", "adapter_n_points=2"]) == 0
    assert_same_model(AutoModel.from_pretrained(tmp_path / "converted"), model)


def test_sampling_points_that_do_not_divide_the_attention_are_an_error(tmp_path):
    model = random_model(CONFIGS["adapter-8-heads"])
    original = write_original(model, tmp_path / "original")
    with pytest.raises(OisaCheckpointError, match="32 attention weights per query.*adapter_n_points"):
        AutoModel.from_pretrained(original, adapter_n_points=3)


def test_a_size_missing_from_the_original_config_is_named(tmp_path, caplog):
    model = random_model(CONFIGS["adapter-8-heads"])

    def drop_vision_heads(config):
        del config["vision_config"]["num_attention_heads"]

    original = write_original(model, tmp_path / "original", config_edit=drop_vision_heads)
    assert oisa_main(["convert", str(original), str(tmp_path / "refused")]) == 2
    assert "vision_config.num_attention_heads" in caplog.text and "Traceback" not in caplog.text
    given = ["--set", "vision_config.num_attention_heads=4"]
    assert oisa_main(["convert", str(original), str(tmp_path / "converted"), *given]) == 0
    assert_same_model(AutoModel.from_pretrained(tmp_path / "converted"), model)
    assert_same_model(AutoModel.from_pretrained(original, vision_config={"num_attention_heads": 4}), model)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("adapter_num_heads=8", "Unknown size 'adapter_num_heads'"),
        ("vision_config.num_heads=8", "Unknown size vision_config.num_heads"),
        ("adapter_n_points", "expected KEY=VALUE"),
    ],
)
def test_a_wrong_setting_is_one_clear_error(case, tmp_path, caplog, setting, message):
    _, original = case
    assert oisa_main(["convert", str(original), str(tmp_path / "converted"), "--set", setting]) == 2
    assert message in caplog.text and "Traceback" not in caplog.text
    assert not (tmp_path / "converted").exists()
