"""
Two processes launched where Accelerate would see one each (`accelerate launch --multi_gpu` on a machine without GPUs
and without `ACCELERATE_USE_CPU=1`) would each take itself for the only process and train or evaluate everything.
`eval.py` must stop at once, every process with the one clear error, and write nothing; `train.py`, which trains on the
CPU whenever there is no GPU, must train as the two processes it was launched as. The data and settings are valid, so
without the guard the evaluation would run to the end.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from processing_oisa.data.synthetic import make_synthetic_dataset


# every test here launches training or evaluation processes
pytestmark = pytest.mark.slow


REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("guard")
    make_synthetic_dataset(root / "omniavs", "omniavs", num_videos=1, seed=3, num_frames=4, height=48, width=64,
                           split="train")
    make_synthetic_dataset(root / "omniavs_test", "omniavs", num_videos=1, seed=3, num_frames=4, height=48, width=64,
                           split="test")
    config = json.loads((REPO / "configs" / "stage4_omniavs.json").read_text())
    config.update(per_device_batch_size=1, num_frames=2, num_dense_frames=1, llm_lora_rank=0,
                  train_new_token_rows=False, train_modules=["mask_head"], mixed_precision="no",
                  gradient_checkpointing=False, num_workers=0, shuffle_buffer=2, warmup_ratio=0.0)
    (root / "stage.json").write_text(json.dumps(config))
    return root


def launch_two_processes_seeing_one(script: str, *args: str) -> subprocess.CompletedProcess:
    """Two processes through torchrun (`accelerate launch --multi_gpu`), no GPU visible and no ACCELERATE_USE_CPU."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
        str(REPO / script), *args,
    ]
    env = {key: value for key, value in os.environ.items() if key != "ACCELERATE_USE_CPU"}
    env.update(CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_train_without_a_gpu_trains_as_the_processes_it_was_launched_as(data, tmp_path):
    output = tmp_path / "run"
    completed = launch_two_processes_seeing_one(
        "train.py", "--config", str(data / "stage.json"), "--model", "oisa-tiny-synthetic", "--output-dir",
        str(output), "--data", f"omniavs={data / 'omniavs'}", "--max-steps", "1",
    )
    log = completed.stdout + completed.stderr
    assert completed.returncode == 0, log[-3000:]
    assert log.count("no GPU here: training on the CPU in float32, as with --cpu") == 2
    assert json.loads((output / "final" / "trainer_state.json").read_text())["num_processes"] == 2


def test_eval_stops_when_accelerate_sees_fewer_processes_than_launched(data, tmp_path):
    out = tmp_path / "eval"
    completed = launch_two_processes_seeing_one(
        "eval.py", "--model", "oisa-tiny-synthetic", "--dataset", "omniavs", "--data-root", str(data / "omniavs_test"),
        "--out", str(out), "--limit", "2", "--max-new-tokens", "4",
    )
    assert completed.returncode != 0
    log = completed.stdout + completed.stderr
    message = (
        "eval.py was launched as 2 processes but Accelerate sees 1; on a machine without GPUs, set ACCELERATE_USE_CPU=1"
    )
    assert log.count(message) == 2, log[-3000:]
    assert not out.exists() or not any(out.iterdir())
