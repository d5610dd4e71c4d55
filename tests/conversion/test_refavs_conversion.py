"""
EEMC's original checkpoints (`modeling_refavs.conversion`): an original-format state dict written from our model at
several sizes converts back bit for bit through `from_pretrained` and `oisa convert`; the `.pth` is read with
`torch.load(weights_only=True)` only; bad input gets one error naming the file and the problem.
"""

import json
import logging
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
from transformers import AutoModel, AutoProcessor

from modeling_oisa import OisaCheckpointError
from modeling_refavs import RefAvsForReferringSegmentation
from modeling_refavs.conversion import (
    RefAvsConversionError,
    convert_original_key,
    original_state_dict_from_ours,
    ours_to_original_key,
    read_state_dict_file,
)
from modeling_refavs.conversion_vggish import torchvggish_state_dict_from_ours
from oisa_cli.main import main as oisa_main
from oisa_tiny.refavs import TINY_MASK2FORMER, TINY_TEXT, TINY_VGGISH, tiny_refavs_config
from oisa_tiny.refavs_tokenizer import build_tiny_refavs_tokenizer
from processing_oisa.refavs_eemc import RefAvsProcessor


# the config fields an original's weights cannot say, given to from_pretrained as the docs say
UNSAID = ("profile", "fusion_num_heads", "prompt_num_heads", "mask_size")
SWIN_LAYERNORM = "pixel_level_module.encoder.swin.layernorm."


def variant_config(name: str):
    """Tiny EEMCs of different sizes: layers, widths, window, decoder depth, text encoder, VGGish, profile."""
    if name == "release":
        return tiny_refavs_config(with_vggish=False)
    if name == "fixed":
        return tiny_refavs_config(profile="fixed", with_vggish=False)
    if name == "deeper":
        mask2former = {
            **TINY_MASK2FORMER,
            "backbone_config": {**TINY_MASK2FORMER["backbone_config"], "depths": [2, 1, 3, 2]},
            "encoder_layers": 3,
            "decoder_layers": 5,
        }
        return tiny_refavs_config(
            with_vggish=False, mask2former_config=mask2former, text_config={**TINY_TEXT, "num_hidden_layers": 2}
        )
    if name == "wider":
        mask2former = {
            **TINY_MASK2FORMER,
            "backbone_config": {
                **TINY_MASK2FORMER["backbone_config"],
                "embed_dim": 8,
                "num_heads": [2, 2, 4, 4],
                "window_size": 4,
                "image_size": 128,
                "mlp_ratio": 2.0,
            },
            "num_labels": 5,
            "num_queries": 6,
            "hidden_dim": 48,
            "feature_size": 64,
            "mask_feature_size": 32,
            "num_attention_heads": 2,
            "encoder_feedforward_dim": 40,
            "dim_feedforward": 56,
        }
        return tiny_refavs_config(
            with_vggish=False,
            mask2former_config=mask2former,
            text_config={**TINY_TEXT, "hidden_size": 32, "num_attention_heads": 4},
            audio_feature_dim=10,
            fusion_dim=64,
            projection_hidden_dim=40,
            adapter_hidden_dim=6,
            fusion_num_heads=2,
            prompt_num_heads=2,
            mask_size=24,
        )
    if name == "vggish":
        return tiny_refavs_config(profile="fixed", with_vggish=True)
    if name == "vggish_pca":
        return tiny_refavs_config(audio_config={**TINY_VGGISH, "final_relu": True, "postprocess": True})
    raise ValueError(name)


VARIANTS = ("release", "fixed", "deeper", "wider", "vggish", "vggish_pca")


def make_model(config, seed: int = 0) -> RefAvsForReferringSegmentation:
    torch.manual_seed(seed)
    model = RefAvsForReferringSegmentation(config).eval()
    # trained-looking gates, away from their initial value of 1; the pixel decoder's `level_embed`, which the model's
    # init leaves as uninitialised memory (possibly NaN, which equals nothing), drawn as the other weights
    with torch.no_grad():
        model.pixel_level_module.decoder.level_embed.normal_()
        model.query_prompter.attention_gate.fill_(0.25)
        model.query_prompter.pool_gate.fill_(-1.5)
        if model.audio_encoder is not None and model.audio_encoder.postprocessor is not None:
            model.audio_encoder.postprocessor.pca_eigen_vectors.normal_()
            model.audio_encoder.postprocessor.pca_means.normal_()
    return model


def write_original(model: RefAvsForReferringSegmentation, folder: Path, mask2former_config: bool = True) -> Path:
    """The original layout of docs/refavs-eemc.md: ckpt_best_miou.pth, text_encoder/, vggish.pth, the M2F config."""
    folder.mkdir(parents=True, exist_ok=True)
    original, text = original_state_dict_from_ours(model.state_dict(), model.config)
    torch.save(original, folder / "ckpt_best_miou.pth")
    # the text encoder as the original's dataset loads it: a RoBERTa `AutoModel` folder
    text_encoder = AutoModel.from_config(model.config.text_config, add_pooling_layer=False)
    text_encoder.load_state_dict(text, strict=True)
    text_encoder.save_pretrained(folder / "text_encoder")
    if model.audio_encoder is not None:
        network, pca = torchvggish_state_dict_from_ours(model.state_dict(), model.config.audio_config)
        torch.save(network, folder / "vggish.pth")
        if pca is not None:
            # as torchvggish's file may hold them: numpy arrays, the means a column
            arrays = {
                "pca_eigen_vectors": pca["pca_eigen_vectors"].double().numpy(),
                "pca_means": pca["pca_means"].double().numpy()[:, None],
            }
            torch.save(arrays, folder / "vggish_pca_params.pth")
    if mask2former_config:
        model.config.mask2former_config.to_json_file(folder / "mask2former_config.json")
    return folder


def unsaid_fields(config) -> dict:
    fields = {name: getattr(config, name) for name in UNSAID}
    if config.audio_config is not None:
        fields["audio_config"] = config.audio_config.to_dict()
    return fields


def assert_same_weights(loaded: torch.nn.Module, model: torch.nn.Module) -> None:
    """Every tensor bit for bit, in the same dtype, but the Swin's final LayerNorm, which has no original."""
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert set(ours) == set(theirs)
    compared = [key for key in ours if not key.startswith(SWIN_LAYERNORM)]
    assert [key for key in compared if not torch.equal(ours[key], theirs[key])] == []
    assert [key for key in compared if ours[key].dtype != theirs[key].dtype] == []


def config_values(config) -> dict:
    values = config.to_dict()
    for key in ("_name_or_path", "transformers_version", "dtype"):
        values.pop(key, None)
    for sub in ("mask2former_config", "text_config", "audio_config"):
        for key in ("_name_or_path", "transformers_version", "dtype", "architectures"):
            (values.get(sub) or {}).pop(key, None)
    return values


@pytest.mark.parametrize("variant", VARIANTS)
def test_original_layout_round_trip_is_bit_identical(variant, tmp_path):
    model = make_model(variant_config(variant))
    folder = write_original(model, tmp_path / "original")
    loaded = RefAvsForReferringSegmentation.from_pretrained(folder, **unsaid_fields(model.config))
    assert_same_weights(loaded, model)
    # the Swin's final LayerNorm has no original: it keeps its identity initialisation
    layernorm = {key: tensor for key, tensor in loaded.state_dict().items() if key.startswith(SWIN_LAYERNORM)}
    assert sorted(layernorm) == [SWIN_LAYERNORM + "bias", SWIN_LAYERNORM + "weight"]
    assert torch.equal(layernorm[SWIN_LAYERNORM + "weight"], torch.ones_like(layernorm[SWIN_LAYERNORM + "weight"]))
    assert config_values(loaded.config) == config_values(model.config)
    assert loaded.config.name_or_path == str(folder)


def test_sizes_come_from_the_weights_without_a_mask2former_config(tmp_path):
    # without mask2former_config.json only what the weights cannot say (the Swin's image size, loss weights) falls back
    # to the released model's config
    model = make_model(variant_config("wider"))
    checkpoint = write_original(model, tmp_path / "original", mask2former_config=False) / "ckpt_best_miou.pth"
    loaded = RefAvsForReferringSegmentation.from_pretrained(checkpoint, **unsaid_fields(model.config))
    assert_same_weights(loaded, model)
    ours, theirs = model.config.mask2former_config, loaded.config.mask2former_config
    for name in (
        "feature_size",
        "mask_feature_size",
        "hidden_dim",
        "num_queries",
        "encoder_layers",
        "decoder_layers",
        "dim_feedforward",
        "encoder_feedforward_dim",
        "num_attention_heads",
        "num_labels",
    ):
        assert getattr(theirs, name) == getattr(ours, name), name
    for name in ("embed_dim", "depths", "num_heads", "window_size", "mlp_ratio", "patch_size", "out_features"):
        assert getattr(theirs.backbone_config, name) == getattr(ours.backbone_config, name), name
    assert theirs.backbone_config.image_size == 384
    for name in ("audio_feature_dim", "fusion_dim", "projection_hidden_dim", "adapter_hidden_dim"):
        assert getattr(loaded.config, name) == getattr(model.config, name), name
    inputs = {
        "pixel_values": torch.randn(1, 2, 3, 128, 128, generator=torch.Generator().manual_seed(0)),
        "audio_features": torch.randn(1, 2, 10, generator=torch.Generator().manual_seed(1)),
        "input_ids": torch.tensor([[0, 5, 9, 2, 1]]),
    }
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_inverse_map_names_every_key_as_the_original(tmp_path):
    model = make_model(variant_config("deeper"))
    original, text = original_state_dict_from_ours(model.state_dict(), model.config)
    # every original key maps back to the key it came from; the buffers the original adds map to nothing
    for key, tensor in original.items():
        ours = convert_original_key(key)
        if ours is None:
            assert key.endswith(".relative_position_index") or key == "model_v.criterion.empty_weight", key
        else:
            assert ours_to_original_key(ours) == key
            assert torch.equal(tensor, model.state_dict()[ours])
    index = original[
        "model_v.model.pixel_level_module.encoder.encoder.layers.0.blocks.0.attention.self.relative_position_index"
    ]
    assert index.shape == (4, 4) and index.dtype == torch.int64
    loss_weight = original["model_v.criterion.empty_weight"]
    assert loss_weight.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.1])
    assert set(text) == {key.removeprefix("text_model.") for key in model.state_dict() if key.startswith("text_model.")}
    with pytest.raises(RefAvsConversionError, match="no place in the original"):
        ours_to_original_key("something.new.weight")


def test_a_checkpoint_saved_on_a_gpu_loads_on_the_cpu(tmp_path):
    model = make_model(variant_config("release"))
    folder = write_original(model, tmp_path / "original")
    original = torch.load(folder / "ckpt_best_miou.pth", weights_only=True)
    # torch.save records each storage's device; the released file's are CUDA's
    with mock.patch.object(torch.serialization, "location_tag", lambda storage: "cuda:0"):
        torch.save(original, folder / "ckpt_best_miou.pth")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(folder / "ckpt_best_miou.pth", weights_only=True)
    loaded = RefAvsForReferringSegmentation.from_pretrained(folder, **unsaid_fields(model.config))
    assert_same_weights(loaded, model)
    assert {tensor.device.type for tensor in loaded.state_dict().values()} == {"cpu"}


class NotATensor:
    """Stands for any object a pickle may name: torch.load(weights_only=True) must refuse to build it."""

    built = False

    def __setstate__(self, state):
        NotATensor.built = True


def test_a_pickle_beyond_tensors_is_refused_never_unpickled(tmp_path, caplog):
    model = make_model(variant_config("release"))
    folder = write_original(model, tmp_path / "original")
    original = torch.load(folder / "ckpt_best_miou.pth", weights_only=True)
    torch.save({**original, "extra": NotATensor()}, folder / "ckpt_best_miou.pth")
    with pytest.raises(
        OisaCheckpointError, match=r"ckpt_best_miou\.pth: holds objects other than tensors .*NotATensor"
    ):
        RefAvsForReferringSegmentation.from_pretrained(folder)
    assert oisa_main(["convert", str(folder), str(tmp_path / "out")]) == 2
    assert not NotATensor.built
    assert "weights_only=True) refuses to unpickle" in caplog.text and not (tmp_path / "out").exists()


def test_numpy_arrays_are_read_only_where_allowed(tmp_path):
    import numpy as np

    path = tmp_path / "pca.pth"
    torch.save({"pca_means": np.zeros(3, dtype=np.float64)}, path)
    assert read_state_dict_file(path, "PCA", numpy_arrays=True)["pca_means"].dtype == torch.float64
    with pytest.raises(OisaCheckpointError, match="holds objects other than tensors"):
        read_state_dict_file(path, "the original EEMC state dict")


def expect_convert_error(arguments: list[str], message: str, caplog) -> None:
    caplog.clear()
    assert oisa_main(["convert", *arguments]) == 2
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert message in errors[0], errors[0]


@pytest.fixture(scope="module")
def original_folder(tmp_path_factory) -> Path:
    return write_original(make_model(variant_config("release")), tmp_path_factory.mktemp("original") / "eemc")


def broken_copy(original_folder: Path, tmp_path: Path, change) -> Path:
    folder = tmp_path / "broken"
    folder.mkdir(parents=True)
    for name in ("text_encoder", "mask2former_config.json"):
        target = folder / name
        target.symlink_to(original_folder / name, target_is_directory=name == "text_encoder")
    state_dict = torch.load(original_folder / "ckpt_best_miou.pth", weights_only=True)
    torch.save(change(state_dict), folder / "ckpt_best_miou.pth")
    return folder


def test_convert_bad_input_is_one_line_and_exit_2(original_folder, tmp_path, caplog):
    out = str(tmp_path / "out")
    expect_convert_error([str(tmp_path / "nowhere.pth"), out], "nowhere.pth: no such file or folder", caplog)
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    expect_convert_error([str(tmp_path / "list.pth"), out], "list.pth: holds a list, not a state dict", caplog)
    (tmp_path / "text.pth").write_text("not a checkpoint")
    expect_convert_error(
        [str(tmp_path / "text.pth"), out], "text.pth: not a readable PyTorch file (Unsupported operand", caplog
    )
    torch.save({"pixel_level_module.x": torch.zeros(1)}, tmp_path / "ours.pth")
    expect_convert_error([str(tmp_path / "ours.pth"), out], "in this package's layout already", caplog)

    missing = broken_copy(
        original_folder, tmp_path / "missing", lambda sd: {k: v for k, v in sd.items() if k != "mha_mm.out_proj.bias"}
    )
    expect_convert_error(
        [str(missing), out],
        "Missing weight: 'mha_mm.out_proj.bias' (our 'integration_attention.out_proj.bias', shape (128,)) is not in",
        caplog,
    )
    reshaped = broken_copy(
        original_folder, tmp_path / "shape", lambda sd: {**sd, "text_proj.0.weight": torch.zeros(48, 20)}
    )
    expect_convert_error([str(reshaped), out], "Shape mismatch: 'text_proj.0.weight' in", caplog)
    unknown = broken_copy(
        original_folder, tmp_path / "unknown", lambda sd: {**sd, "model_v.model.extra.weight": torch.zeros(1)}
    )
    expect_convert_error([str(unknown), out], "'model_v.model.extra.weight' belongs to no known part of EEMC", caplog)
    index_key = (
        "model_v.model.pixel_level_module.encoder.encoder.layers.0.blocks.0.attention.self.relative_position_index"
    )
    shuffled = broken_copy(original_folder, tmp_path / "index", lambda sd: {**sd, index_key: sd[index_key].flip(0)})
    expect_convert_error([str(shuffled), out], "relative_position_index in", caplog)

    no_text = tmp_path / "no_text"
    no_text.mkdir()
    (no_text / "ckpt_best_miou.pth").symlink_to(original_folder / "ckpt_best_miou.pth")
    expect_convert_error([str(no_text), out], "EEMC needs the text encoder", caplog)
    expect_convert_error(
        [str(original_folder), out, "--text-encoder", str(tmp_path / "nowhere")], "nowhere: no such folder", caplog
    )
    expect_convert_error(
        [str(original_folder), out, "--set", "fusion_num_heads=3"],
        "no EEMC model can be built with this config",
        caplog,
    )
    expect_convert_error(
        [str(original_folder), out, "--set", "fusion_dim=64"], "--set fusion_dim: not a RefAvsConfig field", caplog
    )
    expect_convert_error([str(original_folder), out, "--audio-encoder-config", "x.json"], "an OISA option", caplog)
    # an OISA folder named as EEMC, and EEMC options for an OISA conversion
    oisa = tmp_path / "oisa"
    oisa.mkdir()
    (oisa / "config.json").write_text(json.dumps({"model_type": "oisa"}))
    expect_convert_error([str(oisa), out, "--family", "refavs"], "not an original EEMC checkpoint", caplog)
    expect_convert_error([str(oisa), out, "--text-encoder", "x"], "--text-encoder: EEMC options", caplog)
    assert not Path(out).exists()


def test_convert_command_writes_a_folder_automodel_loads(tmp_path, caplog):
    tokenizer = build_tiny_refavs_tokenizer()
    model = make_model(tiny_refavs_config(with_vggish=False, text_config={**TINY_TEXT, "vocab_size": len(tokenizer)}))
    source = write_original(model, tmp_path / "original")
    # the original's text encoder folder holds the tokenizer the processor needs
    text_encoder = tmp_path / "distilroberta"
    shutil.copytree(source / "text_encoder", text_encoder)
    tokenizer.save_pretrained(text_encoder)
    out = tmp_path / "converted"
    settings = ["--set", "fusion_num_heads=4", "--set", "mask_size=32", "--set", "profile=fixed"]
    assert oisa_main(["convert", str(source), str(out), "--text-encoder", str(text_encoder), *settings]) == 0
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.pth"))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "refavs_eemc" and config["profile"] == "fixed"
    assert str(tmp_path) not in (out / "config.json").read_text()  # no local paths in what may be published
    reloaded = AutoModel.from_pretrained(out)
    assert isinstance(reloaded, RefAvsForReferringSegmentation)
    assert_same_weights(reloaded, model)
    assert reloaded.config.integration_attention_over == "tokens"
    processor = AutoProcessor.from_pretrained(out)
    assert isinstance(processor, RefAvsProcessor) and processor.mask_size == 32
    assert processor.tokenizer("the dog")["input_ids"] == tokenizer("the dog")["input_ids"]

    # a text encoder folder without a tokenizer: the model only, said so (transformers would build an empty one)
    caplog.clear()
    assert oisa_main(["convert", str(source), str(tmp_path / "model_only"), *settings]) == 0
    assert "text_encoder has no tokenizer (tokenizer.json or vocab.json): writing the model only" in caplog.text
    assert not (tmp_path / "model_only" / "processor_config.json").exists()
    # a tokenizer larger than the text encoder's vocabulary is another model's
    small = make_model(variant_config("release"))
    small_source = write_original(small, tmp_path / "small")
    tokenizer.save_pretrained(small_source / "text_encoder")
    expect_convert_error(
        [str(small_source), str(tmp_path / "mismatch"), *settings], f"has {len(tokenizer)} tokens, more than", caplog
    )
    assert not (tmp_path / "mismatch").exists()


def test_a_folder_with_an_original_and_a_foreign_config_is_refused(original_folder, tmp_path):
    folder = tmp_path / "both"
    folder.mkdir()
    (folder / "ckpt_best_miou.pth").symlink_to(original_folder / "ckpt_best_miou.pth")
    (folder / "config.json").write_text(json.dumps({"model_type": "mask2former"}))
    with pytest.raises(OisaCheckpointError, match="name the original's Mask2Former config mask2former_config.json"):
        RefAvsForReferringSegmentation.from_pretrained(folder)
    with pytest.raises(OisaCheckpointError, match="config is rebuilt from its weights"):
        RefAvsForReferringSegmentation.from_pretrained(original_folder, config=variant_config("release"))
