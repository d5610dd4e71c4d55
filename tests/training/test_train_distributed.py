"""
The engines of configs/accelerate/ run on two CPU processes (gloo): FSDP2 (`fsdp.yaml`) and DeepSpeed ZeRO-1
(`deepspeed_zero1.yaml`) train the stage-4 tiny setup (LoRA on the LLM, the new-token rows, the adapter and the mask
head in full, `--merge`) to the losses and weights of DDP (`ddp.yaml`). Each test first proves that its engine ran
(sharded parameters, ZeRO's partitioned optimizer), not DDP under its config, which is what accelerate alone does with
`--cpu`. docs/training-distributed.md says what runs where.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from oisa_cli.main import main as oisa_main

from ..data.test_readers import _line, build_omniavs
from .test_train import REPO, TYPES


# every test launches two training processes
pytestmark = pytest.mark.slow

LOSS_NAMES = ("loss/loss", "loss/lm_loss", "loss/class_loss", "loss/dice_loss", "loss/bce_loss")
LEARNING_RATE = 2e-3


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """
    The tiny OmniAVS set of tests/training/test_train.py, one sample a process a step: the two processes of a step hold
    different inputs (a referring image on one, none on the other; a null sample), as real batches do.
    """
    root = tmp_path_factory.mktemp("distributed")
    lines = [
        _line("v1", index, expr_type, [] if index == 3 else ["1"], expl="it is the first one" if index == 2 else None)
        for index, expr_type in enumerate(TYPES)
    ]
    build_omniavs(root / "omniavs", lines)
    (root / "omniavs" / "meta_expressions_test.jsonl").rename(root / "omniavs" / "meta_expressions_train.jsonl")
    oisa_main(["tiny-random", str(root / "tiny")])
    config = json.loads((REPO / "configs" / "stage4_omniavs.json").read_text())
    config.update(per_device_batch_size=1, save_steps=2, num_frames=3, num_dense_frames=2, llm_lora_rank=4,
                  learning_rate=LEARNING_RATE, warmup_ratio=0.0, lr_scheduler="constant", gradient_checkpointing=False,
                  num_workers=0, shuffle_buffer=4)
    (root / "stage.json").write_text(json.dumps(config))
    return root


def launch(workspace, output, accelerate_config, *extra):
    """Two CPU processes under `configs/accelerate/<accelerate_config>`; returns the final state and the run's log."""
    command = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", str(REPO / "configs" / "accelerate" / accelerate_config),
               "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(REPO / "train.py"), "--config", str(workspace / "stage.json"), "--model", str(workspace / "tiny"),
               "--output-dir", str(output), "--data", f"omniavs={workspace / 'omniavs'}", "--cpu",
               "--max-steps", "3", "--merge", *extra]
    # faulthandler: a rank that crashes in native code prints where, in Python, it was
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1",
           "PYTHONFAULTHANDLER": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, failure_report(result.stderr)
    state = json.loads((output / "final-merged" / "trainer_state.json").read_text())
    return state, result.stderr


def failure_report(log: str) -> str:
    """A failed run's log: a native crash's report first (the other rank's wait for it fills the tail), then the tail."""
    crash = log.find("Fatal Python error")
    head = log[crash : crash + 4000] + "\n...\n" if crash >= 0 else ""
    return head + log[-6000:]


def engine_line(log: str) -> tuple[str, str, int, int]:
    """The training loop's `distributed:` line: engine, model type, sharded and all parameters (every rank agrees)."""
    lines = set(re.findall(r"distributed: (\w+), 2 processes; model (\w+), (\d+) of (\d+) parameters sharded", log))
    assert len(lines) == 1, lines
    engine, model_type, sharded, total = lines.pop()
    return engine, model_type, int(sharded), int(total)


def merged_weights(output):
    return load_file(output / "final-merged" / "model.safetensors")


def assert_same_training(state, reference, reference_weights, weights, base):
    """Same samples and losses at every step, and final weights within float noise of the reference's."""
    assert [entry["step"] for entry in state["log_history"]] == [entry["step"] for entry in reference["log_history"]]
    for entry, expected in zip(state["log_history"], reference["log_history"]):
        assert entry["samples_per_process"] == expected["samples_per_process"]
        # measured: equal to 1e-7 in the uninterrupted runs of both engines; after a resume, from checkpoints 7e-6
        # apart, the point-sampled Dice loss 2.5e-5 apart (another sample at a step moves the losses by 1e-2 or more)
        for name in LOSS_NAMES:
            assert entry[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-6), (entry["step"], name)
    assert weights.keys() == reference_weights.keys() and not any("lora" in key for key in weights)
    differences = torch.cat([(weights[key] - reference_weights[key]).abs().flatten() for key in weights])
    moved = torch.cat([(reference_weights[key] - base[key]).abs().flatten() for key in base])
    # three steps moved 76% of the weights by more than 1e-4, the most by 6e-3; the engines then differ by float
    # noise: measured 99.99% of the weights within 1e-6 of DDP's, the largest difference 1.2e-5 (gradient-norm and
    # gradient sums in another order, which Adam amplifies on near-zero gradients)
    assert moved.max() > 1e-3
    assert (differences <= 1e-6).float().mean() >= 0.999
    assert differences.max() <= 1e-4


@pytest.fixture(scope="module")
def ddp(workspace):
    return launch(workspace, workspace / "ddp", "ddp.yaml")


@pytest.fixture(scope="module")
def fsdp(workspace):
    return launch(workspace, workspace / "fsdp", "fsdp.yaml")


def test_fsdp_shards_the_model_and_trains_as_ddp(workspace, ddp, fsdp):
    (ddp_state, ddp_log), (fsdp_state, fsdp_log) = ddp, fsdp
    assert ddp_state["distributed_type"] == "MULTI_CPU" and fsdp_state["distributed_type"] == "FSDP"
    # FSDP2 swapped every parameter for a DTensor shard and the model's class for its FSDP subclass
    engine, model_type, sharded, total = engine_line(fsdp_log)
    assert (engine, model_type) == ("FSDP", "FSDPPeftModel") and sharded == total > 600
    assert engine_line(ddp_log)[:3] == ("MULTI_CPU", "DistributedDataParallel", 0)
    assert "DDP constructor" not in fsdp_log  # none of DDP's warnings
    # a step where one process held a referring image and the other none: per-layer ViT units desynchronised there
    with_image = {f"omniavs:{index}" for index, expr_type in enumerate(TYPES) if expr_type.endswith("_image")}
    steps = [[keys[0] in with_image for keys in entry["samples_per_process"]] for entry in fsdp_state["log_history"]]
    assert [True, False] in steps or [False, True] in steps
    base = load_file(workspace / "tiny" / "model.safetensors")
    assert_same_training(fsdp_state, ddp_state, merged_weights(workspace / "ddp"), merged_weights(workspace / "fsdp"), base)


def test_fsdp_checkpoint_holds_the_full_state_dict(workspace, ddp, fsdp):
    """`fsdp_state_dict_type: FULL_STATE_DICT`: the checkpoint gathers every shard, as DDP's holds the whole model."""
    full = torch.load(workspace / "fsdp" / "checkpoint-2" / "pytorch_model_fsdp.bin", map_location="cpu",
                      weights_only=True)
    reference = load_file(workspace / "ddp" / "checkpoint-2" / "model.safetensors")
    assert full.keys() == reference.keys()
    assert any(".lora_A." in key for key in full) and any("trainable_tokens_delta" in key for key in full)
    for key, value in reference.items():
        assert type(full[key]) is torch.Tensor and full[key].shape == value.shape, key
        # measured: 7e-6 at most after two steps
        torch.testing.assert_close(full[key], value, atol=1e-4, rtol=0, msg=key)


def test_fsdp_resumes_to_the_uninterrupted_run(workspace, fsdp, tmp_path):
    """
    From its step-2 checkpoint (model, optimizer, RNG through FSDP's own loader), FSDP trains step 3 on the samples
    the uninterrupted run drew there, to its losses and weights.
    """
    shutil.copytree(workspace / "fsdp" / "checkpoint-2", tmp_path / "fsdp" / "checkpoint-2")
    resumed, log = launch(workspace, tmp_path / "fsdp", "fsdp.yaml", "--resume")
    whole, _ = fsdp
    assert resumed["distributed_type"] == "FSDP" and "Loading FSDP model" in log
    assert [entry["step"] for entry in resumed["log_history"]] == [3]
    base = load_file(workspace / "tiny" / "model.safetensors")
    remaining = {**whole, "log_history": whole["log_history"][2:]}
    assert_same_training(resumed, remaining, merged_weights(workspace / "fsdp"), merged_weights(tmp_path / "fsdp"), base)


@pytest.fixture(scope="module")
def zero1(workspace):
    if importlib.util.find_spec("deepspeed") is None:
        reason = "deepspeed is not installed (the `deepspeed` extra): the ZeRO-1 config is untested here"
        # CI installs the extra (.ci/run): there a missing deepspeed fails
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return launch(workspace, workspace / "zero1", "deepspeed_zero1.yaml")


def test_deepspeed_zero1_partitions_the_optimizer_and_trains_as_ddp(workspace, ddp, zero1):
    state, log = zero1
    ddp_state, _ = ddp
    assert state["distributed_type"] == "DEEPSPEED"
    assert engine_line(log)[:2] == ("DEEPSPEED", "DeepSpeedEngine")
    # ZeRO stage 1: one model copy, the optimizer states split between the two processes
    saved = sorted(path.name for path in (workspace / "zero1" / "checkpoint-2" / "pytorch_model").iterdir())
    assert saved == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                     "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    base = load_file(workspace / "tiny" / "model.safetensors")
    assert_same_training(state, ddp_state, merged_weights(workspace / "ddp"), merged_weights(workspace / "zero1"), base)


def test_deepspeed_zero1_resumes_to_the_uninterrupted_run(workspace, zero1, tmp_path):
    """
    From its step-2 checkpoint (model and optimizer partitions through DeepSpeed's loader, RNG and the training
    progress through Accelerate's), ZeRO-1 trains step 3 on the uninterrupted run's samples, to its losses and weights.
    """
    shutil.copytree(workspace / "zero1" / "checkpoint-2", tmp_path / "zero1" / "checkpoint-2")
    resumed, log = launch(workspace, tmp_path / "zero1", "deepspeed_zero1.yaml", "--resume")
    whole, _ = zero1
    assert resumed["distributed_type"] == "DEEPSPEED" and "Loading DeepSpeed Model and Optimizer" in log
    assert [entry["step"] for entry in resumed["log_history"]] == [3]
    base = load_file(workspace / "tiny" / "model.safetensors")
    remaining = {**whole, "log_history": whole["log_history"][2:]}
    assert_same_training(resumed, remaining, merged_weights(workspace / "zero1"), merged_weights(tmp_path / "zero1"), base)
