"""The `oisa-tiny-synthetic` name, the synthetic preset it is trained from, its recipe script, and `oisa demo`."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor

import modeling_oisa.pretrained as pretrained
from modeling_oisa import MissingCheckpointError, OisaConfig, resolve_model_name, tiny_synthetic_path
from oisa_cli.main import main as oisa_main
from processing_oisa.prompts import NULL_ANSWER


EXAMPLE_VIDEO = Path(__file__).resolve().parents[2] / "examples" / "shapes.mp4"


@pytest.fixture(scope="module")
def synthetic_preset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("preset") / "init"
    assert oisa_main(["tiny-random", str(path), "--preset", "synthetic", "--seed", "0"]) == 0
    return path


@pytest.fixture
def shipped(monkeypatch, tmp_path, synthetic_preset) -> Path:
    """The shipped checkpoint's place, holding the untrained synthetic preset."""
    folder = tmp_path / "oisa-tiny-synthetic"
    shutil.copytree(synthetic_preset, folder)
    monkeypatch.setitem(pretrained.SHIPPED_CHECKPOINTS, "oisa-tiny-synthetic", folder)
    return folder


def test_a_missing_shipped_checkpoint_is_one_clear_error(monkeypatch, tmp_path, caplog):
    monkeypatch.setitem(pretrained.SHIPPED_CHECKPOINTS, "oisa-tiny-synthetic", tmp_path / "absent")
    with pytest.raises(MissingCheckpointError, match="OISA-tiny-synthetic is not in this installation"):
        tiny_synthetic_path()
    # a Hub id passes through online; offline, one not in the cache fails at once
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    assert resolve_model_name("owner/repo") == "owner/repo"
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with caplog.at_level("INFO"):
        assert oisa_main(["segment", str(EXAMPLE_VIDEO), "--text", "the red circle", "--out", str(tmp_path / "o")]) == 2
    assert "no --model given: using oisa-tiny-synthetic" in caplog.text
    assert str(tmp_path / "absent" / "model.safetensors") in caplog.text
    assert not (tmp_path / "o").exists()


def test_the_name_stands_for_the_shipped_folder(shipped, tmp_path, caplog):
    assert tiny_synthetic_path() == shipped
    assert resolve_model_name("oisa-tiny-synthetic") == str(shipped)
    with caplog.at_level("INFO"):
        assert oisa_main(["segment", str(EXAMPLE_VIDEO), "--text", "the red circle", "--out", str(tmp_path / "o")]) == 0
    assert "no --model given: using oisa-tiny-synthetic" in caplog.text
    assert json.loads((tmp_path / "o" / "result.json").read_text())["model"] == "oisa-tiny-synthetic"


def test_synthetic_preset(synthetic_preset):
    config = OisaConfig.from_pretrained(synthetic_preset)
    assert config.profile == "fixed" and config.seg_hidden_state_source == "seg"
    assert config.vision_config.image_size == [128, 128] and config.num_image_tokens == 16
    assert config.adapter_conv_inplane == 64
    processor = AutoProcessor.from_pretrained(synthetic_preset)
    # the LLM sees the 4 frames it is trained on (configs/tiny_synthetic/oisa_tiny_synthetic*.json)
    assert (processor.video_processor.max_visible_frames, processor.video_processor.num_dense_frames) == (4, 2)
    tokens = processor.tokenizer.tokenize("the purple diamond and the yellow triangle")
    assert tokens == ["the", "Ġpurple", "Ġdiamond", "Ġand", "Ġthe", "Ġyellow", "Ġtriangle"]
    from safetensors.torch import load_file

    weights = load_file(synthetic_preset / "model.safetensors")
    assert 0.08 < weights["language_model.layers.0.self_attn.q_proj.weight"].std() < 0.12
    assert weights["language_model.layers.0.mlp.up_proj.weight"].std() < 0.03
    projection = weights["mask_head.query_decoder.seg_token_projection.1.0.weight"]
    # 16 times the default init, whose bound is 1/sqrt(fan_in)
    assert projection.abs().max() > 8 / projection.shape[1] ** 0.5


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng speaks the demo's spoken expression")
def test_demo_writes_its_pictures_videos_and_scores(shipped, tmp_path):
    out = tmp_path / "demo"
    assert oisa_main(["demo", "--out", str(out)]) == 0
    summary = json.loads((out / "result.json").read_text())
    assert summary["model"] == "oisa-tiny-synthetic" and summary["frames"] == 8
    entries = summary["expressions"]
    assert [entry["type"] for entry in entries] == ["text", "speech", "text", "text_sound", "text_image", "text"]
    targets = [entry["targets"] for entry in entries]
    assert targets == [["circle"], ["triangle"], ["square"], ["square"], ["triangle"], []]
    for entry in entries:
        assert 0.0 <= entry["J&F"] <= 1.0 and (out / f"{entry['name']}.mp4").stat().st_size > 0
        # an untrained model: a null expression scores 1 exactly when nothing is segmented
        if not entry["targets"]:
            assert (entry["J&F"] == 1.0) == (entry["answer"].startswith(NULL_ANSWER) or "[SEG]" not in entry["answer"])
    assert (out / "clip.mp4").stat().st_size > 0
    from PIL import Image

    picture = Image.open(out / "demo.png")
    assert picture.size == (4 * 256, 6 * (192 + 30))
    assert torch.tensor(list(picture.getdata())).float().std() > 10


def test_the_recipe_refuses_data_and_parts_of_another_recipe(tmp_path):
    script = Path(__file__).resolve().parents[2] / "examples" / "train_oisa_tiny_synthetic.sh"
    # what WORK_DIR holds (a part, or data), and its stamp
    cases = {
        "unstamped-part": ("images", None),
        "part-of-another-config": ("images", "train.py --config configs/other.json --model init\n"),
        "data-of-other-arguments": ("data/images", "oisa make-synthetic --format grefcoco --seed 1\n"),
    }
    for case, (name, stamp) in cases.items():
        work = tmp_path / case
        (work / name / "final").mkdir(parents=True)
        if stamp is not None:
            (work / f"{name}.recipe").write_text(stamp)
        before = sorted(path.relative_to(work) for path in work.rglob("*"))
        done = subprocess.run(["bash", str(script), str(work)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, case
        assert f"{work / name} was made by another recipe" in done.stderr, case
        # every stamp is checked before anything is made: nothing was made or overwritten
        assert sorted(path.relative_to(work) for path in work.rglob("*")) == before, case
        assert stamp is None or (work / f"{name}.recipe").read_text() == stamp, case


FAKE_TOOLS = {
    # each call is logged; make-synthetic and tiny-random make their folder, train.py a finished part, eval.py the
    # metrics of a model below the targets (so that nothing is installed)
    "oisa": """#!/usr/bin/env bash
echo "oisa $*" >> "$CALLS"
mkdir -p "$2"
""",
    "accelerate": """#!/usr/bin/env bash
echo "accelerate $*" >> "$CALLS"
while [ $# -gt 0 ]; do
    case $1 in
        --output-dir) mkdir -p "$2/final"; touch "$2/final/trainer_state.json";;
        --out) mkdir -p "$2"; echo '{"segmentation": {"J&F": 0.5, "splits": {"text": {"J&F": 0.5}}}}' > "$2/metrics.json";;
    esac
    shift
done
""",
}


def run_recipe_with_fake_tools(tmp_path: Path, work: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """The recipe script on WORK_DIR `work`, with `oisa` and `accelerate` replaced by fakes; its calls, in order."""
    script = Path(__file__).resolve().parents[2] / "examples" / "train_oisa_tiny_synthetic.sh"
    tools = tmp_path / "fake-tools"
    tools.mkdir(exist_ok=True)
    for name, text in FAKE_TOOLS.items():
        (tools / name).write_text(text)
        (tools / name).chmod(0o755)
    calls = tmp_path / f"calls-{work.name}"
    path = f"{tools}:{Path(sys.executable).parent}:/usr/bin:/bin"
    environment = {"PATH": path, "CALLS": str(calls), "HOME": str(tmp_path)}
    done = subprocess.run(["bash", str(script), str(work)], capture_output=True, text=True, timeout=60, env=environment)
    return done, calls.read_text().splitlines()


def trained_parts(calls: list[str]) -> list[tuple[str, str]]:
    """The (part, model it starts from) of each train.py call."""
    parts = []
    for call in calls:
        words = call.split()
        if any(word.endswith("/train.py") for word in words):
            parts.append((Path(words[words.index("--output-dir") + 1]).name, words[words.index("--model") + 1]))
    return parts


def test_the_recipe_goes_on_from_the_latest_finished_part_alone(tmp_path):
    whole, calls = run_recipe_with_fake_tools(tmp_path, tmp_path / "whole")
    assert whole.returncode == 1 and "below the targets: not installed" in whole.stderr
    parts = ["images", "reading", "questions", "clips", "colours", "nulls", "train", "shapes", "final", "polish"]
    parts += ["polished", "heard", "spoken", "paired"]
    assert [part for part, _ in trained_parts(calls)] == parts
    assert sum(call.startswith("oisa make-synthetic") for call in calls) == 9

    # a WORK_DIR that holds only the finished `clips` part and its stamp: the data is made again, the parts before
    # `clips` are not trained again, and `colours` starts from the `clips` model
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "whole" / "clips", resumed / "clips")
    shutil.copy(tmp_path / "whole" / "clips.recipe", resumed / "clips.recipe")
    again, calls = run_recipe_with_fake_tools(tmp_path, resumed)
    assert again.returncode == 1 and "below the targets: not installed" in again.stderr
    assert trained_parts(calls) == [
        ("colours", str(resumed / "clips" / "final")),
        ("nulls", str(resumed / "colours" / "final")),
        ("train", str(resumed / "nulls" / "final")),
        ("shapes", str(resumed / "train" / "final")),
        ("final", str(resumed / "shapes" / "final")),
        ("polish", str(resumed / "final" / "final")),
        ("polished", str(resumed / "polish" / "final")),
        ("heard", str(resumed / "polished" / "final")),
        ("spoken", str(resumed / "heard" / "final")),
        ("paired", str(resumed / "spoken" / "final")),
    ]
    assert sum(call.startswith("oisa make-synthetic") for call in calls) == 9
