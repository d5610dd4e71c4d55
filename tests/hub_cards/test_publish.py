"""
Model cards and publishing: every template renders into a card that parses, eval.py's metrics.json round-trips into
model-index, the upload folder loads with trust_remote_code=True where the package cannot be imported, and `oisa push`
calls the Hub API with the right arguments (mocked: nothing here reaches the network).
"""

import importlib.util
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import yaml
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

from modeling_oisa import tiny_synthetic_path
from modeling_oisa.configuration_oisa import PROFILE_SWITCHES
from oisa_cli.main import main as oisa_main
from oisa_evaluation.report import compute_metrics
from oisa_evaluation.runner import EvalTask, EvalTasks
from oisa_hub_cards.model_card import (
    TEMPLATES,
    ModelCardError,
    check_model_card,
    load_metrics,
    parse_card_fields,
    render_model_card,
)
from oisa_hub_cards.publish import PublishError, checkpoint_card_fields, prepare_upload_folder, verify_remote_code
from processing_oisa.metrics.refavs import expression_stats
from processing_oisa.prompts import EXPRESSION_TYPES


REPO = Path(__file__).resolve().parents[2]
# the fields each OISA template needs beyond config and repo_id (EEMC's template: test_publish_refavs.py)
TEMPLATE_FIELDS = {"oisa-1b": {"license": "mit"}, "oisa-tiny-synthetic": {}, "fine-tune": {}}
RUN = {"model": "m", "data_root": "/data", "max_new_tokens": 100,
       "behaviour": {switch: values["release"] for switch, values in PROFILE_SWITCHES.items()}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-oisa")
    assert oisa_main(["tiny-random", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def config(checkpoint) -> dict:
    return json.loads((checkpoint / "config.json").read_text())


@pytest.fixture(scope="module")
def omniavs_metrics() -> dict:
    """compute_metrics over two expressions per type, J of type t being 0.1 (t+1) and 0.1 (t+1) + 0.05."""
    tasks, lines = [], {}
    for index, expr_type in enumerate(EXPRESSION_TYPES * 2):
        key = f"test/video{index:04d}_0"
        t = EXPRESSION_TYPES.index(expr_type)
        j = 0.1 * (t + 1) + (0.05 if index >= len(EXPRESSION_TYPES) else 0.0)
        tasks.append(EvalTask(index, key, "test", f"video{index:04d}", None))
        lines[key] = {"key": key, "status": "ok", "expr_type": expr_type, "j": j, "f": j / 2,
                      "reference_explanation": "", "predicted_explanation": ""}
    return compute_metrics(EvalTasks("omniavs", tuple(tasks), ()), lines, {**RUN, "dataset": "omniavs"})


@pytest.fixture(scope="module")
def refavs_metrics() -> dict:
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
    return compute_metrics(EvalTasks("refavs", tuple(tasks), ()), lines, {**RUN, "dataset": "refavs"})


def front_matter(card: ModelCard | str) -> dict:
    return yaml.safe_load(re.match(r"---\n(.*?)\n---\n", str(card), re.DOTALL).group(1))


def measured(card: ModelCard) -> dict[tuple[str, str, str], float]:
    """(config, split, metric type) -> value, read back from the card's text with huggingface_hub's parser."""
    _, results = model_index_to_eval_results(front_matter(card)["model-index"])
    return {(r.dataset_config, r.dataset_split, r.metric_type): r.metric_value for r in results}


@pytest.mark.parametrize("template", sorted(TEMPLATE_FIELDS))
def test_every_template_renders_a_card_that_parses(template, config):
    card = render_model_card(template, None, repo_id="someone/oisa-model", config=config, **TEMPLATE_FIELDS[template])
    metadata = check_model_card(card)
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"]
    assert {"oisa", "custom_code"} <= set(metadata["tags"])
    assert "model-index" not in metadata and "Not measured yet" in card.text
    assert 'AutoModel.from_pretrained("someone/oisa-model", trust_remote_code=True' in card.text
    assert ModelCard(str(card)).data.to_dict() == card.data.to_dict()
    if template == "oisa-1b":
        assert metadata["license"] == "mit" and metadata["datasets"] == ["FudanCVL/OmniAVS"]
        assert {"FudanCVL/OISA-1B-OmniAVS", "OpenGVLab/InternVL2-1B"} <= set(metadata["base_model"])


def test_fine_tune_names_only_a_hub_base_model_in_its_metadata(config, checkpoint):
    on_hub = render_model_card("fine-tune", None, repo_id="a/b", config=config, base_model="FudanCVL/OISA-1B-OmniAVS",
                               datasets="FudanCVL/OmniAVS", license="apache-2.0")
    metadata = check_model_card(on_hub)
    assert metadata["base_model"] == ["FudanCVL/OISA-1B-OmniAVS"] and metadata["base_model_relation"] == "finetune"
    assert metadata["datasets"] == ["FudanCVL/OmniAVS"] and metadata["license"] == "apache-2.0"
    local = render_model_card("fine-tune", None, repo_id="a/b", config=config, base_model=str(checkpoint))
    assert "base_model" not in check_model_card(local) and f"a local checkpoint, `{checkpoint.name}`" in local.text
    assert str(checkpoint.parent) not in local.text  # no local paths on the Hub
    assert check_model_card(local)["license"] == "other" and "License not set" in local.text


def test_omniavs_metrics_round_trip_into_model_index(tmp_path, config, omniavs_metrics):
    metrics_path = tmp_path / "metrics.json"
    metrics_path.write_text(json.dumps(omniavs_metrics))
    card = render_model_card("fine-tune", load_metrics(metrics_path), repo_id="someone/oisa-ft", config=config)
    check_model_card(card)
    splits = omniavs_metrics["segmentation"]["splits"]
    expected = {("all", "test", "j_and_f"): round(100 * omniavs_metrics["segmentation"]["J&F"], 2),
                ("all", "test", "j"): round(100 * np.mean([s["J"] for s in splits.values()]), 2),
                ("all", "test", "f"): round(100 * np.mean([s["F"] for s in splits.values()]), 2)}
    for name in EXPRESSION_TYPES:
        for key, metric_type in (("J&F", "j_and_f"), ("J", "j"), ("F", "f")):
            expected[(name, "test", metric_type)] = round(100 * splits[name][key], 2)
    assert measured(card) == expected
    assert expected[("text", "test", "j")] == 12.5 and expected[("speech_sound_image", "test", "f")] == 41.25
    name, results = model_index_to_eval_results(front_matter(card)["model-index"])
    assert name == "oisa-ft"
    assert {(r.dataset_type, r.dataset_name, r.task_type) for r in results} == {
        ("FudanCVL/OmniAVS", "OmniAVS", "image-segmentation")
    }
    assert ModelCard(str(card)).data.eval_results == card.data.eval_results
    assert "| someone/oisa-ft | " not in card.text and "| oisa-ft | 35.6 |" in card.text  # the eval.py table


def test_refavs_metrics_round_trip_into_model_index(config, refavs_metrics):
    card = render_model_card("fine-tune", refavs_metrics, repo_id="someone/oisa-ft", config=config)
    check_model_card(card)
    official = refavs_metrics["official"]
    expected = {("null", "test_n", "s"): round(100 * official["Null"]["S"], 2)}
    for group, config_name, split in (("Seen", "seen", "test_s"), ("Unseen", "unseen", "test_u"),
                                      ("Mix", "mix", "test_s+test_u")):
        expected[(config_name, split, "j")] = round(100 * official[group]["J"], 2)
        expected[(config_name, split, "f")] = round(100 * official[group]["F"], 2)
    assert measured(card) == expected
    assert "split `test_n, test_s, test_u`" in card.text


def test_oisa_1b_card_keeps_the_papers_numbers_apart_from_measured_ones(config, omniavs_metrics):
    card = render_model_card("oisa-1b", omniavs_metrics, repo_id="someone/OISA-1B-hf", config=config, license="mit")
    check_model_card(card)
    paper, ours = card.text.split("### Measured on this checkpoint")
    paper = paper.split("### Reported by the paper")[1]
    assert "| 41.1 | 40.1 | 38.5 | 34.9 | 38.5 | 35.9 | 35.2 | 52.6 | 53.0 | 21.7 |" in paper
    assert "| 51.7 | 58.7 | 58.3 | 65.1 | 54.5 | 61.4 | 9.8 |" in paper
    assert "41.1" not in ours and "| OISA-1B-hf | 35.6 |" in ours
    # model-index holds only what was measured on this checkpoint
    assert measured(card)[("all", "test", "j_and_f")] == round(100 * omniavs_metrics["segmentation"]["J&F"], 2)
    assert 41.1 not in measured(card).values()


def test_tiny_synthetic_results_name_the_synthetic_data(config, omniavs_metrics):
    card = render_model_card("oisa-tiny-synthetic", omniavs_metrics, repo_id="someone/oisa-tiny", config=config)
    _, results = model_index_to_eval_results(check_model_card(card)["model-index"])
    assert {r.dataset_type for r in results} == {"oisa-synthetic-omniavs"}
    assert "Synthetic shapes, OmniAVS format" in card.text


def test_bad_input_gets_one_clear_error(tmp_path, checkpoint, config):
    with pytest.raises(ModelCardError, match="oisa-2b: unknown card template"):
        render_model_card("oisa-2b", None, repo_id="a/b", config=config)
    with pytest.raises(ModelCardError, match=r"oisa-1b\.md: 'license' is undefined"):
        render_model_card("oisa-1b", None, repo_id="a/b", config=config)
    with pytest.raises(ModelCardError, match="missing.json: no such metrics file"):
        load_metrics(tmp_path / "missing.json")
    (tmp_path / "other.json").write_text('{"accuracy": 1}')
    with pytest.raises(ModelCardError, match="other.json: not an eval.py metrics.json"):
        load_metrics(tmp_path / "other.json")
    with pytest.raises(ModelCardError, match="'license' is not NAME=VALUE"):
        parse_card_fields(["license"])
    assert parse_card_fields(["license=mit", "lora_merged=true", "datasets=[a/b, c/d]"]) == {
        "license": "mit", "lora_merged": True, "datasets": ["a/b", "c/d"]}

    card = render_model_card("fine-tune", None, repo_id="a/b", config=config)
    with pytest.raises(PublishError, match="nowhere: no such model folder"):
        prepare_upload_folder(tmp_path / "nowhere", tmp_path / "out", card)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(PublishError, match=r"adapter: holds a LoRA adapter .*train.py --merge"):
        prepare_upload_folder(adapter, tmp_path / "out", card)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("")
    with pytest.raises(PublishError, match="full: the upload folder must be new or empty"):
        prepare_upload_folder(checkpoint, tmp_path / "full", card)
    # an auto_map naming code this package does not have
    foreign = tmp_path / "foreign"
    shutil.copytree(checkpoint, foreign)
    foreign_config = {**config, "auto_map": {**config["auto_map"], "AutoModel": "modeling_other.OtherModel"}}
    (foreign / "config.json").write_text(json.dumps(foreign_config))
    with pytest.raises(PublishError, match=r"auto_map names modeling_other\.OtherModel, which is not a class of"):
        prepare_upload_folder(foreign, tmp_path / "foreign-upload", card)


def test_upload_folder_is_complete_and_loads_without_the_package(tmp_path, checkpoint, caplog):
    # a checkpoint without its processor (as `oisa convert` writes), missing code files and with a stale one, with
    # training leftovers
    model_dir = tmp_path / "model"
    shutil.copytree(checkpoint, model_dir)
    for name in ("processor_config.json", "processing_oisa.py", "media.py", "prompts.py", "chat_template.jinja",
                 "mask_head.py"):
        (model_dir / name).unlink()
    for name in ("losses.py", "configuration_oisa.py"):  # the second is imported by two auto_map modules
        (model_dir / name).write_text("raise ImportError('a stale copy')\n")
    (model_dir / "trainer_state.json").write_text("{}")
    (model_dir / "optimizer.pt").write_bytes(b"state")
    card = render_model_card("oisa-tiny-synthetic", None, **checkpoint_card_fields(model_dir, "someone/oisa-tiny"))
    names = prepare_upload_folder(model_dir, tmp_path / "upload", card)
    code = {path.name for path in checkpoint.glob("*.py")}
    assert set(names) == code | {"README.md", "config.json", "generation_config.json", "model.safetensors",
                                 "processor_config.json", "tokenizer.json", "tokenizer_config.json",
                                 "chat_template.jinja"}
    # the upload carries the package's code, as save_pretrained writes it, and says so where the checkpoint's differs
    for name in ("losses.py", "configuration_oisa.py"):
        assert (tmp_path / "upload" / name).read_text() == (checkpoint / name).read_text()
    differ = [record.getMessage() for record in caplog.records if "differs" in record.getMessage()]
    assert differ == [f"{model_dir / name} differs from the oisa package's copy, which the upload carries"
                      for name in ("configuration_oisa.py", "losses.py")]
    assert "3,093,234 parameters" in (tmp_path / "upload" / "README.md").read_text()

    script = textwrap.dedent(
        """
        import importlib.abc, sys

        class BlockOisa(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("modeling_oisa", "processing_oisa", "oisa_kernels"):
                    raise ImportError(f"{name} is not installed here")

        sys.meta_path.insert(0, BlockOisa())
        import torch
        from transformers import AutoModel, AutoProcessor

        folder = sys.argv[1]
        model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
        assert not {"modeling_oisa", "processing_oisa", "oisa_kernels"} & set(sys.modules)
        ids = torch.tensor([[10, 11, processor.seg_token_id]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        print(type(model).__name__, type(processor).__name__, tuple(logits.shape))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "upload")], check=False,
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OisaForReferringSegmentation OisaProcessor (1, 3, 400)" in result.stdout


def test_a_checkpoint_without_code_files_gets_the_packages(tmp_path):
    # the shipped checkpoint holds no code: the upload gets the package's modelling and processing modules
    model_dir = tiny_synthetic_path()
    assert not list(model_dir.glob("*.py"))
    card = render_model_card("oisa-tiny-synthetic", None, **checkpoint_card_fields(model_dir, "someone/oisa-tiny"))
    names = prepare_upload_folder(model_dir, tmp_path / "upload", card)
    assert {"configuration_oisa.py", "modeling_oisa.py", "mask_head.py", "processing_oisa.py", "media.py"} <= set(names)
    verify_remote_code(tmp_path / "upload")


def test_oisa_push_creates_the_repo_and_uploads_the_folder(tmp_path, checkpoint, omniavs_metrics):
    metrics_path = tmp_path / "metrics.json"
    metrics_path.write_text(json.dumps(omniavs_metrics))
    uploaded = {}

    def upload_folder(self, **kwargs):
        # the folder is temporary: look at it while the call is in progress
        folder = Path(kwargs["folder_path"])
        uploaded.update(kwargs, files={path.name for path in folder.iterdir()}, card=(folder / "README.md").read_text())
        return mock.Mock(commit_url="https://huggingface.co/someone/oisa-tiny/commit/0")

    with mock.patch.object(HfApi, "create_repo") as create_repo, \
            mock.patch.object(HfApi, "upload_folder", autospec=True, side_effect=upload_folder):
        status = oisa_main(["push", str(checkpoint), "someone/oisa-tiny", "--private", "--card-template",
                            "oisa-tiny-synthetic", "--metrics", str(metrics_path), "--card-field",
                            "eval_hardware=1 process on a test CPU"])
    assert status == 0
    create_repo.assert_called_once_with("someone/oisa-tiny", repo_type="model", private=True, exist_ok=True)
    assert uploaded["repo_id"] == "someone/oisa-tiny" and uploaded["repo_type"] == "model"
    assert set(uploaded["delete_patterns"]) == {"*.safetensors", "*.safetensors.index.json", "*.py"}
    expected_files = {"README.md", "model.safetensors", "config.json", "modeling_oisa.py", "processing_oisa.py"}
    assert expected_files <= uploaded["files"]
    card = ModelCard(uploaded["card"])
    assert measured(card)[("all", "test", "j_and_f")] == round(100 * omniavs_metrics["segmentation"]["J&F"], 2)
    assert "Hardware: 1 process on a test CPU" in card.text


def test_oisa_push_stops_before_the_hub_on_bad_input(tmp_path, checkpoint, caplog):
    with mock.patch.object(HfApi, "create_repo") as create_repo, mock.patch.object(HfApi, "upload_folder") as upload:
        assert oisa_main(["push", str(tmp_path / "nowhere"), "someone/x"]) == 2
        assert oisa_main(["push", str(checkpoint), "someone/x", "--metrics", str(tmp_path / "none.json")]) == 2
        assert oisa_main(["push", str(checkpoint), "someone/x", "--card-template", "oisa-1b"]) == 2
    create_repo.assert_not_called()
    upload.assert_not_called()
    errors = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 3
    assert "nowhere: no such model folder" in errors[0]
    assert "none.json: no such metrics file" in errors[1]
    assert "'license' is undefined" in errors[2]


def _load_eval_script():
    spec = importlib.util.spec_from_file_location("oisa_eval_script_for_cards", REPO / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_writes_a_card_with_its_results(tmp_path, checkpoint):
    from processing_oisa.data.synthetic import make_synthetic_dataset

    data = tmp_path / "data"
    make_synthetic_dataset(data, "refavs", num_videos=1, seed=0, num_frames=2, height=32, width=48)
    eval_script = _load_eval_script()
    eval_script.main(["--model", str(checkpoint), "--dataset", "refavs", "--data-root", str(data), "--out",
                      str(tmp_path / "out"), "--max-new-tokens", "2", "--card", str(tmp_path / "card"),
                      "--card-template", "oisa-tiny-synthetic", "--card-field", "repo_id=someone/oisa-tiny"])
    card = ModelCard((tmp_path / "card" / "README.md").read_text())
    check_model_card(card)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    expected = round(100 * metrics["official"]["Null"]["S"], 2)
    assert measured(card)[("null", "test_n", "s")] == expected
    assert "Hardware: 1 process(es), each on CPU" in card.text and "Date: 2" in card.text


@pytest.mark.slow
def test_train_push_to_hub_publishes_the_merged_model(tmp_path, checkpoint):
    train_script = runpy.run_path(str(REPO / "train.py"))

    from ..data.test_readers import _line, build_omniavs

    data = tmp_path / "omniavs"
    build_omniavs(data, [_line("v1", index, expr_type, ["1"]) for index, expr_type in enumerate(EXPRESSION_TYPES[:2])])
    (data / "meta_expressions_test.jsonl").rename(data / "meta_expressions_train.jsonl")
    values = json.loads((REPO / "configs" / "stage4_omniavs.json").read_text())
    values.update(per_device_batch_size=2, num_frames=2, num_dense_frames=1, llm_lora_rank=4, warmup_ratio=0.0,
                  gradient_checkpointing=False, num_workers=0, shuffle_buffer=2)
    (tmp_path / "stage.json").write_text(json.dumps(values))
    arguments = ["--config", str(tmp_path / "stage.json"), "--model", str(checkpoint), "--data", f"omniavs={data}",
                 "--max-steps", "1", "--push-to-hub", "someone/oisa-ft", "--cpu"]
    with mock.patch.object(HfApi, "create_repo") as create_repo, mock.patch.object(HfApi, "upload_folder") as upload:
        upload.return_value.commit_url = "https://huggingface.co/someone/oisa-ft/commit/0"
        # unmerged, a LoRA stage would publish an adapter: refused before any training
        with pytest.raises(ValueError, match="add --merge"):
            train_script["main"]([*arguments, "--output-dir", str(tmp_path / "unmerged")])
        create_repo.assert_not_called()
        train_script["main"]([*arguments, "--output-dir", str(tmp_path / "run"), "--merge"])
    create_repo.assert_called_once_with("someone/oisa-ft", repo_type="model", private=False, exist_ok=True)
    assert upload.call_args.kwargs["repo_id"] == "someone/oisa-ft"


def test_the_wheel_carries_the_card_templates_and_the_shipped_checkpoint(tmp_path):
    # building offline needs setuptools, which the dev extra installs: without it the build fails here, not a skip
    # outside a source checkout, `oisa push` renders its cards from the installed templates
    command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
    built = subprocess.run([*command, "-w", str(tmp_path), str(REPO)], timeout=300, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("oisa-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = {f"oisa_hub_cards/{name}.md" for name in TEMPLATES} | {"oisa_hub_cards/_usage.md"}
    assert templates <= names
    checkpoint = "modeling_oisa/checkpoints/oisa-tiny-synthetic"
    assert {f"{checkpoint}/model.safetensors", f"{checkpoint}/config.json", f"{checkpoint}/README.md"} <= names
