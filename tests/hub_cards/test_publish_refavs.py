"""
EEMC (`modeling_refavs`) on the Hub: its card template renders into a card that parses, a Ref-AVS metrics.json fills
its model-index, the upload folder carries the model's and the processor's code (modeling_oisa's deformable attention
and processing_oisa's media module included, their imports made relative) and loads with trust_remote_code=True where
the package cannot be imported, and `oisa push` publishes it (the Hub API mocked: nothing here reaches the network).
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

from modeling_refavs import PROFILE_SWITCHES, RefAvsForReferringSegmentation
from oisa_cli.main import main as oisa_main
from oisa_evaluation.report import compute_metrics
from oisa_evaluation.runner import EvalTask, EvalTasks
from oisa_hub_cards.model_card import ModelCardError, check_model_card, render_model_card
from oisa_hub_cards.publish import checkpoint_card_fields, prepare_upload_folder
from oisa_tiny.refavs import TINY_TEXT, tiny_refavs_config
from oisa_tiny.refavs_tokenizer import build_tiny_refavs_tokenizer
from processing_oisa.metrics.refavs import expression_stats
from processing_oisa.refavs_eemc import RefAvsProcessor


BLOCKED = ("modeling_oisa", "modeling_refavs", "processing_oisa", "oisa_kernels")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny EEMC with VGGish and its processor, saved as save_pretrained writes them."""
    folder = tmp_path_factory.mktemp("tiny-eemc")
    tokenizer = build_tiny_refavs_tokenizer()
    config = tiny_refavs_config(text_config={**TINY_TEXT, "vocab_size": len(tokenizer)})
    torch.manual_seed(0)
    RefAvsForReferringSegmentation(config).save_pretrained(folder)
    RefAvsProcessor.from_model_config(config, tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def config(checkpoint) -> dict:
    return json.loads((checkpoint / "config.json").read_text())


@pytest.fixture(scope="module")
def metrics() -> dict:
    """An eval.py metrics.json of EEMC on Ref-AVS under `release`, in batches of 4."""
    rng = np.random.default_rng(0)
    tasks, lines = [], {}
    for row, split in enumerate(["test_s"] * 4 + ["test_u"] * 4 + ["test_n"] * 4):
        key = f"{split}/{row}"
        gt = np.zeros((2, 16, 16), dtype=bool)
        if split != "test_n":
            gt[:, 4:10, 3:12] = True
        stats = expression_stats(rng.random((2, 16, 16)), gt, row=row, split=split, input_kind="probabilities")
        tasks.append(EvalTask(row, key, split, f"clip{row}", None))
        lines[key] = {"key": key, "status": "ok", "split": split, "stats": stats.as_example()}
    run = {
        "model": "m",
        "data_root": "/data",
        "dataset": "refavs",
        "behaviour": {switch: values["release"] for switch, values in PROFILE_SWITCHES.items()},
        "batch_size": 4,
        "inference": "EEMC: batches of 4 expressions of one split",
    }
    return compute_metrics(EvalTasks("refavs", tuple(tasks), ()), lines, run)


def front_matter(card: ModelCard | str) -> dict:
    return yaml.safe_load(re.match(r"---\n(.*?)\n---\n", str(card), re.DOTALL).group(1))


def test_the_eemc_template_renders_a_card_that_parses(config):
    card = render_model_card("refavs-eemc", None, repo_id="someone/eemc", config=config)
    metadata = check_model_card(card)
    assert metadata["library_name"] == "transformers" and {"eemc", "refavs", "custom_code"} <= set(metadata["tags"])
    assert metadata["license"] == "other" and "License not set" in card.text
    assert "model-index" not in metadata and "Not measured yet" in card.text
    assert 'AutoModel.from_pretrained("someone/eemc", trust_remote_code=True)' in card.text
    # the profiles with the batch-composition caveat, the released recipe, the paper's numbers, both citations
    assert "| `integration_attention_over` | `batch` | `tokens` |" in card.text
    assert "depend on **which** other videos share its batch" in card.text
    assert "AdamW, learning rate 1e-4" in card.text
    assert "| 34.20 | 0.513 | 49.54 | 0.648 | 41.87 | 0.581 | 0.007 |" in card.text
    assert "@inproceedings{wang2024refavs," in card.text and "@inproceedings{wang2024prompting," in card.text
    assert "| audio encoder | VGGish in the model (12-wide embeddings, without post-processing" in card.text
    assert ModelCard(str(card)).data.to_dict() == card.data.to_dict()


def test_the_card_of_a_conversion_says_what_changed(config, checkpoint):
    card = render_model_card(
        "refavs-eemc",
        None,
        repo_id="a/b",
        config=config,
        license="mit",
        converted_from="the released `ckpt_best_miou.pth` of GeWu-Lab/Ref-AVS",
        base_model=["facebook/mask2former-swin-base-ade-semantic", str(checkpoint)],
    )
    metadata = check_model_card(card)
    assert metadata["license"] == "mit" and "License not set" not in card.text
    # only Hub repos go into the metadata: a local folder is no base model a card can link to
    assert metadata["base_model"] == ["facebook/mask2former-swin-base-ade-semantic"]
    assert "A format conversion of the released `ckpt_best_miou.pth` of GeWu-Lab/Ref-AVS" in card.text
    assert "`relative_position_index`" in card.text and "`criterion.empty_weight`" in card.text
    assert "torch.load(weights_only=True)" in card.text


def test_refavs_metrics_fill_the_model_index(config, metrics):
    card = render_model_card("refavs-eemc", metrics, repo_id="someone/eemc", config=config)
    _, results = model_index_to_eval_results(check_model_card(card)["model-index"])
    measured = {(r.dataset_config, r.dataset_split, r.metric_type): r.metric_value for r in results}
    official = metrics["official"]
    assert measured[("seen", "test_s", "j")] == round(100 * official["Seen"]["J"], 2)
    assert measured[("null", "test_n", "s")] == round(100 * official["Null"]["S"], 2)
    # the paper's numbers stay in the text, out of model-index
    assert 34.2 not in measured.values()
    assert "behaviour profile `release`,\n  batches of 4 expressions." in card.text


def test_a_template_of_another_model_is_refused(config, tmp_path):
    with pytest.raises(ModelCardError, match="describes oisa checkpoints, not 'refavs_eemc' ones"):
        render_model_card("fine-tune", None, repo_id="a/b", config=config)
    with pytest.raises(ModelCardError, match="describes refavs_eemc checkpoints, not 'oisa' ones"):
        render_model_card("refavs-eemc", None, repo_id="a/b", config={**config, "model_type": "oisa"})


REMOTE_CHECK = textwrap.dedent(
    """
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in {blocked!r}:
                raise ImportError(f"{{name}} is not installed here")

    sys.meta_path.insert(0, Block())
    import torch
    from transformers import AutoModel, AutoProcessor

    folder, expected_path = sys.argv[1], sys.argv[2]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
    assert not set({blocked!r}) & set(sys.modules)
    expected = torch.load(expected_path, weights_only=True)
    inputs = processor(videos=expected["frames"].numpy(), text=expected["text"], audio=expected["waveform"].numpy())
    for key in ("pixel_values", "input_ids", "attention_mask", "audio_input_features"):
        assert torch.equal(inputs[key], expected[key]), key
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)
    print(type(model).__name__, type(processor).__name__, tuple(logits.shape))
    """
).format(blocked=BLOCKED)


@pytest.mark.slow
def test_an_eemc_upload_loads_without_the_package(tmp_path, checkpoint):
    card = render_model_card("refavs-eemc", None, **checkpoint_card_fields(checkpoint, "someone/eemc"))
    upload = tmp_path / "upload"
    names = prepare_upload_folder(checkpoint, upload, card)
    code = {
        "configuration_refavs.py",
        "modeling_refavs.py",
        "modeling_vggish.py",
        "deformable_attention.py",
        "processing_refavs.py",
        "feature_extraction_vggish.py",
        "media.py",
    }
    assert set(names) == code | {
        "README.md",
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    # the auto_maps EEMC's checkpoints lack, and the imports across the package's folders made relative
    assert json.loads((upload / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_refavs.RefAvsConfig",
        "AutoModel": "modeling_refavs.RefAvsForReferringSegmentation",
    }
    assert json.loads((upload / "processor_config.json").read_text())["auto_map"] == {
        "AutoProcessor": "processing_refavs.RefAvsProcessor"
    }
    modeling = (upload / "modeling_refavs.py").read_text()
    assert "from .deformable_attention import OisaMultiscaleDeformableAttention\n" in modeling
    assert "\nfrom modeling_oisa" not in modeling
    assert "\nfrom .media import SAMPLING_RATE" in (upload / "processing_refavs.py").read_text()
    assert json.loads((checkpoint / "config.json").read_text()).get("auto_map") is None  # the checkpoint untouched

    # what the package computes, for the interpreter without it to match
    model = RefAvsForReferringSegmentation.from_pretrained(checkpoint).eval()
    processor = RefAvsProcessor.from_pretrained(checkpoint)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 48, 64, 3), dtype=np.uint8)
    waveform = rng.standard_normal(32000).astype(np.float32) * 0.1
    text = "the red circle that makes a sound"
    inputs = processor(videos=frames, text=text, audio=waveform)
    with torch.no_grad():
        logits = model(**inputs).logits
    expected = {
        "frames": torch.from_numpy(frames),
        "waveform": torch.from_numpy(waveform),
        "text": text,
        "logits": logits,
        **{key: inputs[key] for key in ("pixel_values", "input_ids", "attention_mask", "audio_input_features")},
    }
    torch.save(expected, tmp_path / "expected.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_CHECK, str(upload), str(tmp_path / "expected.pt")],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RefAvsForReferringSegmentation RefAvsProcessor (1, 2, 32, 32)" in result.stdout


@pytest.mark.slow
def test_oisa_push_publishes_an_eemc_checkpoint(tmp_path, checkpoint, metrics):
    metrics_path = tmp_path / "metrics.json"
    metrics_path.write_text(json.dumps(metrics))
    uploaded = {}

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        uploaded.update(kwargs, files={path.name for path in folder.iterdir()}, card=(folder / "README.md").read_text())
        return mock.Mock(commit_url="https://huggingface.co/someone/eemc/commit/0")

    with (
        mock.patch.object(HfApi, "create_repo") as create_repo,
        mock.patch.object(HfApi, "upload_folder", autospec=True, side_effect=upload_folder),
    ):
        status = oisa_main(
            ["push", str(checkpoint), "someone/eemc", "--metrics", str(metrics_path), "--card-field", "license=mit"]
        )
    assert status == 0
    create_repo.assert_called_once_with("someone/eemc", repo_type="model", private=False, exist_ok=True)
    assert uploaded["commit_message"] == "Upload EEMC checkpoint"
    assert {"modeling_refavs.py", "deformable_attention.py", "processing_refavs.py", "model.safetensors"} <= uploaded[
        "files"
    ]
    # the default template is EEMC's
    card = ModelCard(uploaded["card"])
    assert 'EEMC ("Expression Enhancing with Multimodal Cues")' in card.text and front_matter(card)["model-index"]


def test_oisa_push_refuses_an_original_eemc_checkpoint(tmp_path, caplog):
    original = tmp_path / "original"
    original.mkdir()
    torch.save({"model_v.class_predictor.bias": torch.zeros(2)}, original / "ckpt_best_miou.pth")
    with mock.patch.object(HfApi, "create_repo") as create_repo, mock.patch.object(HfApi, "upload_folder") as upload:
        assert oisa_main(["push", str(original), "someone/eemc"]) == 2
        assert oisa_main(["push", str(original), "someone/eemc", "--card-template", "refavs-eemc"]) == 2
    create_repo.assert_not_called()
    upload.assert_not_called()
    errors = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 2
    assert all(
        "holds an original EEMC checkpoint (ckpt_best_miou.pth); convert it with `oisa convert` first" in error
        for error in errors
    )


def test_an_eemc_folder_without_a_processor_uploads_the_model_only(tmp_path, checkpoint, caplog):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in ("config.json", "model.safetensors"):
        (model_dir / name).symlink_to(checkpoint / name)
    fields = checkpoint_card_fields(model_dir, "someone/eemc")
    assert fields["with_processor"] is False
    card = render_model_card("refavs-eemc", None, **fields)
    assert "AutoProcessor" not in card.text and "carries its modelling code" in card.text
    names = prepare_upload_folder(model_dir, tmp_path / "upload", card)
    assert set(names) == {
        "README.md",
        "config.json",
        "model.safetensors",
        "configuration_refavs.py",
        "modeling_refavs.py",
        "modeling_vggish.py",
        "deformable_attention.py",
    }
    assert "has no processor and no tokenizer: the upload holds the model only" in caplog.text
