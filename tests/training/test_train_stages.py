"""One short `train.py` run per stage config, each on a tiny dataset of its own formats: the loss goes down."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from oisa_cli.main import main as oisa_main
from processing_oisa.data.audio_text import expected_audio_length

from ..data.test_training_image import build_refer
from ..data.test_training_video import _write_meta_set


# every test here launches training or evaluation processes
pytestmark = pytest.mark.slow


REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    oisa_main(["tiny-random", str(folder)])
    return folder


def write_stage_config(stage_file: str, out: Path, **overrides) -> Path:
    config = json.loads((REPO / "configs" / stage_file).read_text())
    config.update(per_device_batch_size=1, gradient_accumulation_steps=1, learning_rate=2e-3, warmup_ratio=0.0,
                  lr_scheduler="constant", gradient_checkpointing=False, num_workers=0, shuffle_buffer=2,
                  save_steps=100, num_frames=3, num_dense_frames=1, **overrides)
    out.write_text(json.dumps(config))
    return out


def run_stage(config: Path, tiny: Path, output: Path, data: dict[str, Path], steps: int = 8) -> list[float]:
    command = [sys.executable, str(REPO / "train.py"), "--config", str(config), "--model", str(tiny),
               "--output-dir", str(output), "--max-steps", str(steps), "--cpu"]
    for name, root in data.items():
        command += ["--data", f"{name}={root}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    state = json.loads((output / "final" / "trainer_state.json").read_text())
    return [entry["loss/loss"] for entry in state["log_history"]]


def lowered(losses: list[float]) -> bool:
    half = len(losses) // 2
    return np.mean(losses[half:]) < np.mean(losses[:half])


def test_stage1_audio_text(tiny, tmp_path):
    data = tmp_path / "audio_text"
    (data / "clips").mkdir(parents=True)
    clip = np.random.default_rng(0).uniform(-0.5, 0.5, 24000).astype(np.float32)
    soundfile.write(data / "clips" / "a.wav", clip, 16000)
    line = {"id": "a", "audio": "clips/a.wav", "audio_length": list(expected_audio_length(24000)),
            "conversations": [{"from": "human", "value": "<audio>\nWhat is it?"}, {"from": "gpt", "value": "Noise."}]}
    (data / "train.jsonl").write_text(json.dumps(line) + "\n")
    config = write_stage_config("stage1_audio_text.json", tmp_path / "stage1.json")
    losses = run_stage(config, tiny, tmp_path / "run", {"audio_text": data})
    assert lowered(losses), losses


def test_stage2_image_segmentation(tiny, tmp_path):
    data = tmp_path / "refer"
    build_refer(data)
    config = write_stage_config("stage2_image.json", tmp_path / "stage2.json", llm_lora_rank=4,
                                mixture=[{"name": "refcoco", "format": "refcoco", "split": "train"}])
    losses = run_stage(config, tiny, tmp_path / "run", {"refcoco": data})
    assert lowered(losses), losses


def test_stage3_video(tiny, tmp_path):
    data = tmp_path / "mevis"
    _write_meta_set(data / "train", data / "train" / "meta_expressions.json", anno_list=True)
    config = write_stage_config("stage3_video_audio.json", tmp_path / "stage3.json", llm_lora_rank=4,
                                mixture=[{"name": "mevis", "format": "mevis", "split": "train"}])
    losses = run_stage(config, tiny, tmp_path / "run", {"mevis": data})
    assert lowered(losses), losses


def test_tiny_synthetic_reading_part_trains_on_still_images_and_conversations(tiny, tmp_path):
    from processing_oisa.data.synthetic import make_synthetic_dataset

    small = {"num_frames": 1, "height": 48, "width": 64}
    make_synthetic_dataset(tmp_path / "images", "grefcoco", num_videos=2, seed=1, split="train", **small)
    make_synthetic_dataset(tmp_path / "text", "image_text", num_videos=2, seed=2, split="train", **small)
    config = write_stage_config("tiny_synthetic/oisa_tiny_synthetic_reading.json", tmp_path / "reading.json", logging_steps=1)
    data = {"grefcoco": tmp_path / "images", "image_text": tmp_path / "text"}
    losses = run_stage(config, tiny, tmp_path / "run", data)
    assert lowered(losses), losses
