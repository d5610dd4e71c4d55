"""
Conversion of original OISA checkpoints and assembly of the stage-1 model from its training parts: key coverage on the
real OISA-1B manifest, transparent loading, round trips, LoRA merging, strict errors, and `oisa init-from-parts`.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoTokenizer

from modeling_oisa import OisaCheckpointError, OisaConfig, OisaForReferringSegmentation, OisaOriginalConfig
from modeling_oisa.conversion import DROPPED_ORIGINAL_KEYS
from modeling_oisa.conversion.from_parts import build_stage1_model
from modeling_oisa.conversion.original import (
    oisa_config_from_original,
    oisa_to_original_key,
    original_to_oisa_keys,
)
from oisa_cli.main import main as oisa_main

from ..conftest import SHARED, make_sample


REFERENCE = Path(os.environ.get("OISA_REFERENCE_DIR", SHARED / "reference"))
TINY_ORIGINAL = REFERENCE / "tiny_original"
MANIFEST = REFERENCE / "oisa1b_original_state_dict.tsv"
TINY_TOKEN_IDS = {"image_token_id": 384, "audio_token_id": 393, "seg_token_id": 396, "sub_audio_token_id": 399}
CHECKPOINT_FILES = (
    "config.json",
    "internomni_whisper_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "added_tokens.json",
    "special_tokens_map.json",
)


pytestmark = pytest.mark.reference


# config.json of OISA-1B as the original writes it (spec/model.md §6.1), reduced to the fields conversion reads
ORIGINAL_1B_CONFIG = {
    "model_type": "internvl_chat",
    "force_image_size": 448,
    "downsample_ratio": 0.5,
    "vision_config": {
        "model_type": "intern_vit_6b",
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "qkv_bias": True,
        "qk_normalization": False,
        "norm_type": "layer_norm",
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu",
        "image_size": 448,
        "patch_size": 14,
    },
    "llm_config": {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "hidden_act": "silu",
        "vocab_size": 151664,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
    # WhisperConfig defaults: the original never builds its encoder from this
    "audio_config": {
        "model_type": "whisper",
        "d_model": 384,
        "encoder_layers": 4,
        "encoder_attention_heads": 6,
        "encoder_ffn_dim": 1536,
        "num_mel_bins": 80,
        "max_source_positions": 1500,
    },
}
INTERNOMNI_WHISPER_1B = {
    "model_type": "whisper",
    "d_model": 1280,
    "encoder_layers": 32,
    "encoder_attention_heads": 20,
    "encoder_ffn_dim": 5120,
    "num_mel_bins": 128,
    "max_source_positions": 1500,
}


def read_manifest() -> dict[str, tuple[int, ...]]:
    rows = [line.split("\t") for line in MANIFEST.read_text().splitlines() if line]
    return {key: tuple(int(size) for size in shape.split("x")) for key, shape, _ in rows}


def copy_original(destination: Path, tensors: dict | None = None, config_edit=None) -> Path:
    """The tiny original checkpoint in `destination`, with other tensors or an edited config when given."""
    destination.mkdir(parents=True, exist_ok=True)
    for name in CHECKPOINT_FILES:
        shutil.copy(TINY_ORIGINAL / name, destination / name)
    if tensors is None:
        shutil.copy(TINY_ORIGINAL / "model.safetensors", destination / "model.safetensors")
    else:
        save_file(tensors, destination / "model.safetensors")
    if config_edit is not None:
        config = json.loads((destination / "config.json").read_text())
        config_edit(config)
        (destination / "config.json").write_text(json.dumps(config))
    return destination


@pytest.fixture(scope="module")
def original_tensors():
    return load_file(TINY_ORIGINAL / "model.safetensors")


@pytest.fixture(scope="module")
def converted(original_tensors):
    return OisaForReferringSegmentation.from_pretrained(TINY_ORIGINAL, dtype=torch.float32).eval()


def outputs(model, sample):
    with torch.no_grad():
        output = model(**{key: value for key, value in sample.items() if key != "labels"})
    return output.logits, output.mask_logits[0]


def assert_same_state(first, second):
    first, second = first.state_dict(), second.state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


# --------------------------------------------------------------------------------------------------------------------
# coverage of the real OISA-1B key set
# --------------------------------------------------------------------------------------------------------------------


def test_every_original_1b_key_maps_to_exactly_one_parameter():
    manifest = read_manifest()
    config = OisaConfig()
    with torch.device("meta"):
        model = OisaForReferringSegmentation(config)
    ours = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}

    produced = {}
    for key, shape in manifest.items():
        if key in DROPPED_ORIGINAL_KEYS:
            continue
        targets = original_to_oisa_keys(key)
        assert targets, f"no rule for {key}"
        # the fused InternViT attn.qkv splits into q, k and v along the output dimension
        part_shape = (shape[0] // len(targets), *shape[1:])
        for target in targets:
            assert target in ours, f"{key} -> {target}, which OISA does not have"
            assert ours[target] == part_shape, f"{key} -> {target}: {part_shape} vs {ours[target]}"
            assert target not in produced, f"{target} from both {produced.get(target)} and {key}"
            produced[target] = key
            assert oisa_to_original_key(target, config) == key
    assert set(produced) == set(ours), sorted(set(ours) - set(produced))[:5]
    # the only original tensors left out are the ones listed as dropped (Mask2Former's unused learned queries)
    assert {key for key in manifest if original_to_oisa_keys(key) is None} == set(DROPPED_ORIGINAL_KEYS)


def test_config_rebuilt_from_the_1b_manifest_is_oisa_1b():
    config = oisa_config_from_original(ORIGINAL_1B_CONFIG, read_manifest(), INTERNOMNI_WHISPER_1B)
    default = OisaConfig()
    for field in (
        "adapter_conv_inplane",
        "adapter_interaction_indexes",
        "adapter_deform_ratio",
        "adapter_cffn_ratio",
        "adapter_num_extra_extractors",
        "mask_head_in_channels",
        "mask_hidden_dim",
        "mask_feature_dim",
        "mask_num_heads",
        "pixel_decoder_layers",
        "pixel_decoder_ffn_dim",
        "query_decoder_layers",
        "query_decoder_ffn_dim",
        "seg_token_projection_dim",
        "downsample_ratio",
        "tie_word_embeddings",
    ):
        assert getattr(config, field) == getattr(default, field), field
    for sub_config, fields in (
        (
            "vision_config",
            (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
                "attention_bias",
                "use_qk_norm",
                "norm_type",
                "layer_norm_eps",
                "image_size",
                "patch_size",
            ),
        ),
        (
            "text_config",
            (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "intermediate_size",
                "vocab_size",
                "rms_norm_eps",
                "rope_parameters",
                "tie_word_embeddings",
            ),
        ),
        (
            "audio_config",
            (
                "d_model",
                "encoder_layers",
                "encoder_attention_heads",
                "encoder_ffn_dim",
                "num_mel_bins",
                "max_source_positions",
            ),
        ),
    ):
        for field in fields:
            assert getattr(getattr(config, sub_config), field) == getattr(getattr(default, sub_config), field), field


def test_whisper_head_count_must_come_from_a_config():
    with pytest.raises(OisaCheckpointError, match="attention heads"):
        oisa_config_from_original(ORIGINAL_1B_CONFIG, read_manifest())
    wrong = {**INTERNOMNI_WHISPER_1B, "encoder_layers": 24}
    with pytest.raises(OisaCheckpointError, match="does not describe"):
        oisa_config_from_original(ORIGINAL_1B_CONFIG, read_manifest(), wrong)


# --------------------------------------------------------------------------------------------------------------------
# loading original checkpoints
# --------------------------------------------------------------------------------------------------------------------


def test_auto_classes_route_an_original_checkpoint_to_oisa(converted):
    assert isinstance(AutoConfig.from_pretrained(TINY_ORIGINAL), OisaOriginalConfig)
    model = AutoModel.from_pretrained(TINY_ORIGINAL, dtype=torch.float32)
    assert isinstance(model, OisaForReferringSegmentation)
    assert model.config.model_type == "oisa"
    assert {field: getattr(model.config, field) for field in TINY_TOKEN_IDS} == TINY_TOKEN_IDS
    assert model.generation_config.eos_token_id == 381  # <|im_end|>
    assert model.config.audio_config.encoder_attention_heads == 4  # from internomni_whisper_config.json
    # loading the same original twice gives the same model
    assert_same_state(model, converted)


def test_conversion_is_a_renaming(converted, original_tensors):
    state = converted.state_dict()
    for key, tensor in original_tensors.items():
        if key in DROPPED_ORIGINAL_KEYS:
            continue
        targets = original_to_oisa_keys(key)
        assert torch.equal(torch.cat([state[target] for target in targets]), tensor), key


def test_convert_command_round_trip_is_exact(converted, tmp_path):
    assert oisa_main(["convert", str(TINY_ORIGINAL), str(tmp_path)]) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "oisa" and config["seg_token_id"] == 396
    # our names on disk, not the original's
    assert load_file(tmp_path / "model.safetensors").keys() == converted.state_dict().keys()
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == 381
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert (tokenizer.seg_token_id, tokenizer.image_token_id, tokenizer.sub_audio_token_id) == (396, 384, 399)
    # a processor in the release profile, at the checkpoint's image size, so `oisa segment` and eval.py run on it
    from transformers import AutoProcessor

    import processing_oisa

    processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(processor, processing_oisa.OisaProcessor)
    assert (processor.num_image_tokens, processor.sub_audio_layout) == (64, "release")
    assert processor.video_processor.frame_sampler == "release"
    assert processor.image_processor.size["height"] == 224

    reloaded = AutoModel.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert_same_state(reloaded, converted)
    sample = make_sample()
    for before, after in zip(outputs(converted, sample), outputs(reloaded, sample)):
        assert torch.equal(before, after)


def test_bf16_checkpoint_loads_in_its_dtype(original_tensors, tmp_path):
    bf16 = {key: tensor.to(torch.bfloat16) for key, tensor in original_tensors.items()}
    directory = copy_original(tmp_path / "bf16", bf16)
    model = OisaForReferringSegmentation.from_pretrained(directory)
    assert model.dtype == torch.bfloat16
    assert torch.equal(model.lm_head.weight, bf16["language_model.lm_head.weight"])
    upcast = OisaForReferringSegmentation.from_pretrained(directory, dtype=torch.float32)
    assert upcast.dtype == torch.float32
    assert torch.equal(upcast.lm_head.weight, bf16["language_model.lm_head.weight"].float())


def test_sharded_safetensors_and_bin_checkpoints(converted, original_tensors, tmp_path):
    sharded = copy_original(tmp_path / "sharded")
    (sharded / "model.safetensors").unlink()
    keys = sorted(original_tensors)
    weight_map = {}
    for index, shard_keys in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"model-{index + 1:05d}-of-00002.safetensors"
        save_file({key: original_tensors[key] for key in shard_keys}, sharded / name)
        weight_map.update(dict.fromkeys(shard_keys, name))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same_state(OisaForReferringSegmentation.from_pretrained(sharded, dtype=torch.float32), converted)

    pickled = copy_original(tmp_path / "bin")
    (pickled / "model.safetensors").unlink()
    torch.save(original_tensors, pickled / "pytorch_model.bin")
    assert_same_state(OisaForReferringSegmentation.from_pretrained(pickled, dtype=torch.float32), converted)


def test_lora_wrapped_checkpoint_is_merged_on_load(converted, original_tensors, tmp_path):
    """Stage outputs before `merge_lora.py`: PEFT keys, LLM LoRA with alpha = 2r, audio LoRA with alpha = 4r."""
    rank = 4
    generator = torch.Generator().manual_seed(0)
    wrapped = {}
    lora_modules = {
        "language_model.model.layers.0.self_attn.q_proj": 2.0,
        "language_model.model.layers.1.mlp.down_proj": 2.0,
        "audio_model.encoder.layers.0.fc1": 4.0,
    }
    for key, tensor in original_tensors.items():
        prefix = next((p for p in ("language_model.", "audio_model.") if key.startswith(p)), None)
        module, _, parameter = key.rpartition(".")
        if module in lora_modules:
            if parameter == "weight":
                lora_a = torch.randn(rank, tensor.shape[1], generator=generator) * 0.1
                lora_b = torch.randn(tensor.shape[0], rank, generator=generator) * 0.1
                tensor = tensor - lora_modules[module] * lora_b @ lora_a
                peft_module = module.replace(prefix, f"{prefix}base_model.model.", 1)
                wrapped[f"{peft_module}.lora_A.default.weight"] = lora_a
                wrapped[f"{peft_module}.lora_B.default.weight"] = lora_b
            key = f"{module}.base_layer.{parameter}"
        if prefix is not None:
            key = key.replace(prefix, f"{prefix}base_model.model.", 1)
        wrapped[key] = tensor.contiguous()

    def set_lora_ranks(config):
        config["use_llm_lora"] = config["use_audio_lora"] = rank

    model = OisaForReferringSegmentation.from_pretrained(
        copy_original(tmp_path / "lora", wrapped, set_lora_ranks), dtype=torch.float32
    )
    merged, reference = model.state_dict(), converted.state_dict()
    assert merged.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(merged[key], reference[key], atol=1e-5, rtol=0, msg=key)


# --------------------------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------------------------


def test_corrupted_shard_is_an_error_naming_the_file(tmp_path):
    directory = copy_original(tmp_path / "corrupt")
    data = (directory / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(OisaCheckpointError, match=str(directory / "model.safetensors")):
        OisaForReferringSegmentation.from_pretrained(directory)


def test_missing_key_is_an_error_naming_the_key_and_the_file(original_tensors, tmp_path):
    key = "mask_decoder.predictor.class_embed.weight"
    directory = copy_original(tmp_path / "missing", {k: v for k, v in original_tensors.items() if k != key})
    with pytest.raises(OisaCheckpointError, match="Missing weight") as error:
        OisaForReferringSegmentation.from_pretrained(directory)
    assert key in str(error.value) and str(directory / "model.safetensors") in str(error.value)


def test_shape_mismatch_is_an_error_naming_the_key_and_the_file(original_tensors, tmp_path):
    key = "mlp2.3.weight"
    directory = copy_original(tmp_path / "shape", {**original_tensors, key: torch.zeros(64, 32)})
    with pytest.raises(OisaCheckpointError, match="Shape mismatch") as error:
        OisaForReferringSegmentation.from_pretrained(directory)
    assert key in str(error.value) and str(directory / "model.safetensors") in str(error.value)


def test_unknown_key_is_an_error(original_tensors, tmp_path):
    directory = copy_original(
        tmp_path / "unknown", {**original_tensors, "mask_decoder.predictor.extra.weight": torch.zeros(1)}
    )
    with pytest.raises(OisaCheckpointError, match="Unknown original key 'mask_decoder.predictor.extra.weight'"):
        OisaForReferringSegmentation.from_pretrained(directory)


def test_whisper_heads_from_an_explicit_config(converted, tmp_path):
    directory = copy_original(tmp_path / "no-whisper-config")
    (directory / "internomni_whisper_config.json").unlink()
    with pytest.raises(OisaCheckpointError, match="attention heads"):
        OisaForReferringSegmentation.from_pretrained(directory)
    # the command reports it in one line and fails
    assert oisa_main(["convert", str(directory), str(tmp_path / "out")]) == 2
    model = OisaForReferringSegmentation.from_pretrained(
        directory, audio_encoder_config=TINY_ORIGINAL / "internomni_whisper_config.json", dtype=torch.float32
    )
    assert_same_state(model, converted)


# --------------------------------------------------------------------------------------------------------------------
# stage 1 from the training parts
# --------------------------------------------------------------------------------------------------------------------

INTERNVL2_VOCAB = 391  # the tiny vocabulary without OISA's last 9 tokens, as InternVL2-1B lacks them


@pytest.fixture(scope="module")
def training_parts(original_tensors, tmp_path_factory):
    """InternVL2, an InternOmni Whisper folder (both layouts) and a model_final.pth, cut from the tiny checkpoint."""
    root = tmp_path_factory.mktemp("parts")
    internvl2 = {
        key: tensor
        for key, tensor in original_tensors.items()
        if key.startswith(("vision_model.embeddings.", "vision_model.encoder.", "mlp1.", "language_model."))
    }
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        internvl2[key] = internvl2[key][:INTERNVL2_VOCAB].clone()

    def as_internvl2(config):
        config["enable_mask"] = False
        config["llm_config"]["vocab_size"] = INTERNVL2_VOCAB

    copy_original(root / "InternVL2", internvl2, as_internvl2)
    (root / "InternVL2" / "internomni_whisper_config.json").unlink()

    encoder = {key[len("audio_model.") :]: v for key, v in original_tensors.items() if key.startswith("audio_model.")}
    for layout in ("encoder", "model.encoder"):
        folder = root / f"whisper-{layout}"
        folder.mkdir()
        shutil.copy(TINY_ORIGINAL / "internomni_whisper_config.json", folder / "config.json")
        tensors = {key.replace("encoder.", f"{layout}.", 1): tensor for key, tensor in encoder.items()}
        if layout == "encoder":
            save_file(tensors, folder / "model.safetensors")
        else:
            torch.save(tensors, folder / "pytorch_model.bin")

    backbone = {
        f"backbone.{k[len('vision_model.') :]}": v
        for k, v in original_tensors.items()
        if k.startswith("vision_model.")
    }
    torch.save(
        {"model": {**backbone, "sem_seg_head.predictor.class_embed.weight": torch.zeros(2, 256)}},
        root / "model_final.pth",
    )
    return root


@pytest.mark.parametrize("whisper_layout", ["encoder", "model.encoder"])
def test_stage1_model_from_parts(training_parts, converted, whisper_layout):
    model, report = build_stage1_model(
        training_parts / "InternVL2",
        training_parts / f"whisper-{whisper_layout}",
        training_parts / "model_final.pth",
        vocab_size=400,
        pixel_decoder_layers=1,
        pixel_decoder_ffn_dim=64,
        query_decoder_layers=3,
        query_decoder_ffn_dim=64,
        **TINY_TOKEN_IDS,
    )
    state, reference = model.state_dict(), converted.state_dict()
    assert state.keys() == reference.keys()
    fresh = {key for key in state if key.startswith(("audio_projector.", "mask_head."))}
    assert set(report.initialized) == fresh
    assert report.new_token_rows == range(INTERNVL2_VOCAB, 400)
    assert report.ignored and all(
        key.startswith(("vision_model.embeddings.", "vision_model.encoder.")) for key in report.ignored
    )
    for key in sorted(set(state) - fresh):
        if key in ("language_model.embed_tokens.weight", "lm_head.weight"):
            old_rows = reference[key][:INTERNVL2_VOCAB]
            assert torch.equal(state[key][:INTERNVL2_VOCAB], old_rows), key
            # mean resizing: new rows drawn around the mean of the old ones
            torch.testing.assert_close(state[key][INTERNVL2_VOCAB:], old_rows.mean(0).expand(9, -1), atol=1e-3, rtol=0)
        else:
            assert torch.equal(state[key], reference[key]), key
    for key in fresh:
        assert torch.isfinite(state[key]).all() and not torch.equal(state[key], reference[key]), key


def test_init_from_parts_command(training_parts, tmp_path):
    out = tmp_path / "stage1"
    assert (
        oisa_main(
            [
                "init-from-parts",
                "--internvl2",
                str(training_parts / "InternVL2"),
                "--whisper",
                str(training_parts / "whisper-encoder"),
                "--adapter",
                str(training_parts / "model_final.pth"),
                str(out),
            ]
        )
        == 0
    )
    model = AutoModel.from_pretrained(out, dtype=torch.float32)
    assert model.config.text_config.vocab_size == 400
    assert {field: getattr(model.config, field) for field in TINY_TOKEN_IDS} == TINY_TOKEN_IDS
    assert model.config.pixel_decoder_layers == 6  # the mask head at OISA-1B's sizes, freshly initialised
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == 400 and tokenizer.seg_token_id == 396
