"""
train.py on EEMC (configs/refavs_eemc*.json): a tiny EEMC (`oisa tiny-random --family refavs`) trained on a synthetic
Ref-AVS (`oisa make-synthetic --format refavs`) lowers its loss, and a run resumed from a checkpoint ends on the
uninterrupted run's weights.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor

import processing_oisa  # noqa: F401  (registers the processors)
from modeling_oisa import OisaCheckpointError
from oisa_cli.main import main as oisa_main
from oisa_training.loop import training_family
from oisa_training.refavs_eemc_family import build_eemc_sample
from oisa_training.stage_config import StageConfig
from processing_oisa.data.refavs import RefAVSReader


REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("eemc-train")
    assert oisa_main(["tiny-random", "--family", "refavs", str(root / "tiny")]) == 0
    synthetic = ["make-synthetic", "--format", "refavs", "--videos", "2", "--split", "train", str(root / "refavs")]
    assert oisa_main(synthetic) == 0
    for name in ("refavs_eemc", "refavs_eemc_fixed"):
        config = json.loads((REPO / "configs" / f"{name}.json").read_text())
        # the recipe but for the size of the run: a higher rate, a checkpoint every 2 steps, no workers
        config.update(learning_rate=1e-2, save_steps=2, logging_steps=1, num_workers=0, shuffle_buffer=8)
        (root / f"{name}.json").write_text(json.dumps(config))
    return root


def run_train(workspace: Path, output: Path, *extra: str, config: str = "refavs_eemc") -> dict:
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "train.py"), "--config",
        str(workspace / f"{config}.json"), "--model", str(workspace / "tiny"), "--output-dir", str(output), "--data",
        f"refavs={workspace / 'refavs'}", "--cpu", *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((output / "final" / "trainer_state.json").read_text())


def final_weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(output / "final" / "model.safetensors")


def test_a_row_becomes_every_frame_its_text_audio_and_masks(workspace):
    processor = AutoProcessor.from_pretrained(workspace / "tiny")
    records = RefAVSReader(workspace / "refavs", split="train")
    positive = next(record for record in records if not record.is_null)
    null = next(record for record in records if record.is_null)
    sample = build_eemc_sample(positive, processor)
    frames = len(positive.frame_paths())
    assert sample["pixel_values"].shape == (frames, 3, 64, 64)
    assert sample["input_ids"].shape == sample["attention_mask"].shape == (25,)
    assert sample["audio_input_features"].shape[1:] == (96, 64)
    assert sample["labels"].shape == (frames, 32, 32) and 0 < sample["labels"].sum() < sample["labels"].numel()
    assert build_eemc_sample(null, processor)["labels"].sum() == 0  # a null row trains to empty masks


def test_a_config_of_the_other_family_is_refused(workspace):
    eemc = StageConfig.from_file(workspace / "refavs_eemc.json")
    assert training_family(eemc, str(workspace / "tiny")).name == "refavs_eemc"
    oisa = StageConfig.from_file(REPO / "configs" / "stage4_omniavs.json")
    with pytest.raises(OisaCheckpointError, match="a refavs_eemc checkpoint, but the run config trains oisa models"):
        training_family(oisa, str(workspace / "tiny"))


@pytest.mark.slow
def test_training_lowers_the_loss_and_resumes_to_the_same_weights(workspace, tmp_path):
    whole = run_train(workspace, tmp_path / "whole", "--max-steps", "8")
    losses = [entry["loss/loss"] for entry in whole["log_history"]]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2])
    trained, start = final_weights(tmp_path / "whole"), load_file(workspace / "tiny" / "model.safetensors")
    changed = {name.split(".")[0] for name in trained if not torch.equal(trained[name], start[name])}
    assert changed == {"audio_projection", "text_projection", "prompt_projection", "query_prompter",
                       "pixel_level_module"}

    # the state an interruption after step 2 leaves, then --resume
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "cut" / "checkpoint-2")
    resumed = run_train(workspace, tmp_path / "cut", "--max-steps", "8", "--resume")
    assert [entry["step"] for entry in resumed["log_history"]] == [3, 4, 5, 6, 7, 8]
    for after, before in zip(resumed["log_history"], whole["log_history"][2:]):
        assert after["samples_per_process"] == before["samples_per_process"]
        assert after["loss/loss"] == pytest.approx(before["loss/loss"], rel=1e-6)
    resumed_weights = final_weights(tmp_path / "cut")
    assert resumed_weights.keys() == trained.keys()
    for name in trained:
        torch.testing.assert_close(resumed_weights[name], trained[name], atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_the_fixed_recipe_trains_the_fusion_under_the_fixed_profile(workspace, tmp_path):
    run_train(workspace, tmp_path / "fixed", "--max-steps", "2", config="refavs_eemc_fixed")
    saved = json.loads((tmp_path / "fixed" / "final" / "config.json").read_text())
    assert (saved["profile"], saved["integration_attention_over"], saved["adapter_placement"]) == (
        "fixed", "tokens", "residual")
    trained, start = final_weights(tmp_path / "fixed"), load_file(workspace / "tiny" / "model.safetensors")
    changed = {name.split(".")[0] for name in trained if not torch.equal(trained[name], start[name])}
    assert {"audio_text_attention", "visual_text_attention", "integration_attention"} <= changed
    assert not changed & {"text_model", "audio_encoder", "transformer_module", "class_predictor"}
