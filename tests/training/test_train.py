import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor

import processing_oisa  # noqa: F401
from modeling_oisa import OisaForReferringSegmentation
from oisa_cli.main import main as oisa_main
from oisa_training.setup import TrainingSetup, apply_training_setup, merge_training_setup
from processing_oisa.data.mixture import OisaTrainingCollator, build_omniavs_sample
from processing_oisa.data.omniavs import OmniAVSReader

from ..data.test_readers import _line, build_omniavs


REPO = Path(__file__).resolve().parents[2]
LOSS_NAMES = ("loss/loss", "loss/lm_loss", "loss/class_loss", "loss/dice_loss", "loss/bce_loss")
TYPES = ["text", "speech", "text_sound", "speech_image", "text_sound_image", "speech_sound", "text_image", "speech_sound_image"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = root / "omniavs"
    lines = [
        _line("v1", index, expr_type, [] if index == 3 else ["1"], expl="it is the first one" if index == 2 else None)
        for index, expr_type in enumerate(TYPES)
    ]
    build_omniavs(data, lines)
    (data / "meta_expressions_test.jsonl").rename(data / "meta_expressions_train.jsonl")
    checkpoint = root / "tiny"
    oisa_main(["tiny-random", str(checkpoint)])
    config = json.loads((REPO / "configs" / "stage4_omniavs.json").read_text())
    config.update(per_device_batch_size=2, save_steps=2, num_frames=3, num_dense_frames=2, llm_lora_rank=4,
                  learning_rate=2e-3, warmup_ratio=0.0, lr_scheduler="constant", gradient_checkpointing=False,
                  num_workers=0, shuffle_buffer=4)
    (root / "stage.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def four_steps(workspace):
    """One uninterrupted 4-step run, shared by the tests that only read what it logged and saved."""
    output = workspace / "four-steps"
    return run_train(workspace, output, "--max-steps", "4"), output


def run_train(workspace, output, *extra, processes=1, batch=None, background=False, **settings):
    config = workspace / "stage.json"
    if batch is not None:
        settings["per_device_batch_size"] = batch
    if settings:
        values = {**json.loads(config.read_text()), **settings}
        config = output.parent / f"{output.name}-stage.json"
        config.write_text(json.dumps(values))
    # accelerate's `--cpu` launcher starts a single process: several CPU processes need `--multi_gpu` (torchrun, gloo)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu" if processes > 1 else "--cpu",
                "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no"]
    command = launcher + [str(REPO / "train.py"), "--config", str(config), "--model", str(workspace / "tiny"),
                          "--output-dir", str(output), "--data", f"omniavs={workspace / 'omniavs'}", "--cpu", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    if background:
        # its own process group: killing the launcher alone would leave its training process running
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((output / ("final-merged" if "--merge" in extra else "final") / "trainer_state.json").read_text())


def test_training_sample_and_collation(workspace):
    processor = AutoProcessor.from_pretrained(workspace / "tiny")
    records = OmniAVSReader(workspace / "omniavs", split="train")
    samples = [build_omniavs_sample(record, processor, num_frames=3, num_dense_frames=2) for record in records]
    positive, null = samples[0], samples[3]
    assert positive["gt_masks"].shape == (3, 224, 224) and positive["gt_masks"].sum() > 0
    assert null["gt_masks"].shape == (0, 224, 224)
    decode = processor.tokenizer.decode
    assert decode(positive["input_ids"][positive["labels"] != -100]) == "Sure, it is [SEG].<|im_end|>"
    assert decode(null["input_ids"][null["labels"] != -100]) == "No target matches this expression.<|im_end|>"
    # B10 fixed: a text expression with an explanation asks for one in training too
    explained = samples[2]
    assert "</ref>, and explain why.<|im_end|>" in decode(explained["input_ids"])
    assert decode(explained["input_ids"][explained["labels"] != -100]).startswith("Sure, it is [SEG]. Explanation: ")
    batch = OisaTrainingCollator(processor.tokenizer.pad_token_id)(samples[:4])
    assert batch["images_per_sample"].tolist() == [3, 3, 3, 4]
    assert batch["gt_masks"].shape[0] == 9  # three positive samples x 3 frames, none for the null one
    model = AutoModel.from_pretrained(workspace / "tiny", dtype=torch.float32)
    output = model(**batch)
    assert torch.isfinite(output.loss) and len(output.mask_logits) == 3


def test_lora_touches_only_the_language_model(workspace):
    model = OisaForReferringSegmentation.from_pretrained(workspace / "tiny", dtype=torch.float32)
    wrapped = apply_training_setup(model, TrainingSetup(train_modules=["vision_adapter", "mask_head"], llm_lora_rank=4,
                                                        new_token_ids=[384, 396]))
    lora = [name for name, _ in wrapped.named_parameters() if "lora_" in name]
    assert lora and all(".language_model.layers." in name for name in lora)
    trainable_towers = {name.split(".")[2] for name, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable_towers == {"language_model", "lm_head", "vision_adapter", "mask_head"}
    frozen = [name for name, p in wrapped.named_parameters() if ("vision_tower" in name or "audio_tower" in name) and p.requires_grad]
    assert not frozen


@pytest.mark.slow
def test_a_stage_sets_the_loss_weights_it_trains_with_and_merges(workspace, tmp_path):
    state = run_train(workspace, tmp_path / "run", "--max-steps", "1", "--merge", loss_weights={"lm_loss_weight": 0.25})
    assert len(state["log_history"]) == 1
    saved = json.loads((tmp_path / "run" / "final-merged" / "config.json").read_text())
    assert saved["lm_loss_weight"] == 0.25 and saved["dice_loss_weight"] == 2.0
    # --merge saves a plain OISA, the LoRA folded in
    merged = AutoModel.from_pretrained(tmp_path / "run" / "final-merged", dtype=torch.float32)
    assert isinstance(merged, OisaForReferringSegmentation)
    assert not any("lora" in name for name in merged.state_dict())
    with pytest.raises(AssertionError, match="is not one of"):
        run_train(workspace, tmp_path / "bad", "--max-steps", "1", loss_weights={"mask_loss_weight": 1.0})


def test_merge_gives_the_unmerged_outputs(workspace):
    torch.manual_seed(0)
    model = OisaForReferringSegmentation.from_pretrained(workspace / "tiny", dtype=torch.float32)
    wrapped = apply_training_setup(model, TrainingSetup(train_modules=["mask_head"], llm_lora_rank=4, new_token_ids=[396]))
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                parameter.normal_(std=0.05)
    wrapped.eval()
    ids = torch.tensor([[380, 30, 31, 396, 13, 381]])
    with torch.no_grad():
        before = wrapped(input_ids=ids).logits
        merged = merge_training_setup(wrapped)
        after = merged(input_ids=ids).logits
    assert isinstance(merged, OisaForReferringSegmentation)
    torch.testing.assert_close(before, after, atol=1e-5, rtol=1e-5)
    untouched = OisaForReferringSegmentation.from_pretrained(workspace / "tiny", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (untouched(input_ids=ids).logits - after).abs().max() > 1e-3  # the LoRA did change the model


@pytest.mark.slow
def test_training_lowers_the_loss(four_steps):
    state, _ = four_steps
    losses = [entry["loss/loss"] for entry in state["log_history"]]
    assert len(losses) == 4 and losses[-1] < losses[0]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(workspace, four_steps, tmp_path):
    whole, whole_output = four_steps
    interrupted = run_train(workspace, tmp_path / "cut", "--max-steps", "4", background=True)
    deadline = time.time() + 500
    while not (tmp_path / "cut" / "checkpoint-2").exists():
        assert interrupted.poll() is None, interrupted.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.5)
    os.killpg(interrupted.pid, signal.SIGKILL)  # the launcher and the training process it started
    interrupted.wait()
    assert not (tmp_path / "cut" / "final").exists()
    resumed = run_train(workspace, tmp_path / "cut", "--max-steps", "4", "--resume")
    # the resumed run trained exactly the steps after the checkpoint, on the same samples, to the same losses
    assert [entry["step"] for entry in resumed["log_history"]] == [3, 4]
    for after, before in zip(resumed["log_history"], whole["log_history"][2:]):
        assert after["samples_per_process"] == before["samples_per_process"]
        for name in LOSS_NAMES:
            assert after[name] == pytest.approx(before[name], rel=1e-6, abs=1e-7), name
    whole_state = _final_state(whole_output)
    resumed_state = _final_state(tmp_path / "cut")
    assert whole_state.keys() == resumed_state.keys()
    for key in whole_state:
        torch.testing.assert_close(resumed_state[key], whole_state[key], atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_a_two_process_run_resumes_on_the_samples_it_would_have_drawn(workspace, tmp_path):
    whole = run_train(workspace, tmp_path / "whole", "--max-steps", "4", processes=2, batch=1)
    # the state an interruption after step 2 leaves
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "cut" / "checkpoint-2")
    resumed = run_train(workspace, tmp_path / "cut", "--max-steps", "4", "--resume", processes=2, batch=1)
    assert [entry["step"] for entry in resumed["log_history"]] == [3, 4]
    for after, before in zip(resumed["log_history"], whole["log_history"][2:]):
        assert after["samples_per_process"] == before["samples_per_process"]
        for name in LOSS_NAMES:
            assert after[name] == pytest.approx(before[name], rel=1e-5, abs=1e-7), name
    whole_state, resumed_state = _final_state(tmp_path / "whole"), _final_state(tmp_path / "cut")
    for key in whole_state:
        torch.testing.assert_close(resumed_state[key], whole_state[key], atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_a_checkpoint_is_accelerates_state_with_the_training_progress(four_steps):
    """`Accelerator.save_state` wrote every checkpoint file, the `TrainingProgress` registered for checkpointing too."""
    _, output = four_steps
    checkpoint = output / "checkpoint-2"
    assert sorted(path.name for path in checkpoint.iterdir()) == [
        "custom_checkpoint_0.pkl", "model.safetensors", "optimizer.bin", "random_states_0.pkl", "scheduler.bin"]
    progress = torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=True)
    assert progress == {"step": 2, "samples_seen_per_process": 4}  # two steps of two samples
    # written to a temporary folder and renamed; step 4 is the last, saved as the final model only
    assert [path.name for path in output.iterdir() if "checkpoint-" in path.name] == ["checkpoint-2"]


@pytest.mark.slow
def test_resume_goes_on_where_the_restored_progress_says(workspace, four_steps, tmp_path):
    """The step and data position come from the progress `load_state` restores, not from the folder's name."""
    whole, output = four_steps
    checkpoint = tmp_path / "ahead" / "checkpoint-2"
    shutil.copytree(output / "checkpoint-2", checkpoint)
    torch.save({"step": 3, "samples_seen_per_process": 6}, checkpoint / "custom_checkpoint_0.pkl")
    resumed = run_train(workspace, tmp_path / "ahead", "--max-steps", "4", "--resume")
    assert [entry["step"] for entry in resumed["log_history"]] == [4]
    assert resumed["log_history"][0]["samples_per_process"] == whole["log_history"][3]["samples_per_process"]


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_of_the_old_format(workspace, tmp_path):
    """A checkpoint that kept its position in trainer_state.json, not in Accelerate's registered state, cannot resume."""
    old = tmp_path / "old" / "checkpoint-2"
    old.mkdir(parents=True)
    (old / "model.safetensors").write_bytes(b"")
    (old / "trainer_state.json").write_text(json.dumps({"step": 2, "samples_seen_per_process": 4}))
    launched = run_train(workspace, tmp_path / "old", "--max-steps", "4", "--resume", background=True)
    _, stderr = launched.communicate(timeout=600)
    assert launched.returncode != 0
    assert f"train.py: {old} holds no training progress (custom_checkpoint_0.pkl" in stderr, stderr[-3000:]
    assert "train the stage again without --resume" in stderr
    assert not (tmp_path / "old" / "final").exists()


def _final_state(output):
    files = sorted((output / "final").glob("*.safetensors"))
    state = {}
    for file in files:
        state.update(load_file(file))
    return state


@pytest.mark.slow
def test_two_processes_match_one_with_the_doubled_batch(workspace, tmp_path):
    # every sample positive with the same answer: each process's mean loss then weighs its sample as the single
    # process weighs it (with a null sample on one process and none on the other, DDP, like the original's DeepSpeed,
    # averages a zero mask loss into the step's)
    uniform = tmp_path / "uniform"
    build_omniavs(uniform / "omniavs", [_line("v1", index, expr_type, ["1"]) for index, expr_type in enumerate(TYPES)])
    (uniform / "omniavs" / "meta_expressions_test.jsonl").rename(uniform / "omniavs" / "meta_expressions_train.jsonl")
    (uniform / "stage.json").write_text((workspace / "stage.json").read_text())
    (uniform / "tiny").symlink_to(workspace / "tiny")
    # the point-sampled Dice and BCE draw random points, from each process's own RNG: they are logged but weigh
    # nothing here, so that the weights of both runs follow the same, deterministic, gradients
    deterministic = {"dice_loss_weight": 0.0, "bce_loss_weight": 0.0}
    one = run_train(uniform, tmp_path / "one", "--max-steps", "3", batch=2, loss_weights=deterministic)
    two = run_train(uniform, tmp_path / "two", "--max-steps", "3", processes=2, batch=1, loss_weights=deterministic)
    assert one["num_processes"] == 1 and two["num_processes"] == 2
    assert len(one["log_history"]) == len(two["log_history"]) == 3
    for single, split in zip(one["log_history"], two["log_history"]):
        # each process drew its own sample, and together they drew the single process's two, in its order
        (both,) = single["samples_per_process"]
        first, second = split["samples_per_process"]
        assert len(both) == 2 and [*first, *second] == both
        # measured: 1e-7 at the first step, then up to 2e-4 (a class loss of 0.0024 off by 3e-6)
        for name in ("loss/loss", "loss/lm_loss", "loss/class_loss"):
            assert split[name] == pytest.approx(single[name], rel=1e-3, abs=1e-5), (split["step"], name)
        # other random points: 0.3% apart at the first step (two different samples' losses differ by 10% or more)
        for name in ("loss/dice_loss", "loss/bce_loss"):
            assert split[name] == pytest.approx(single[name], rel=2e-2), (split["step"], name)
    one_state, two_state = _final_state(tmp_path / "one"), _final_state(tmp_path / "two")
    assert one_state.keys() == two_state.keys()
    differences = torch.cat([(two_state[key] - one_state[key]).abs().flatten() for key in one_state])
    # Adam's first steps move a weight by about the learning rate whatever its gradient's size, so float noise in the
    # near-zero gradients of some weights moves them apart by up to the learning rate a step (measured: 97% of the
    # weights within 1e-5, the largest difference 0.011 after 3 steps at 2e-3); other samples would move most weights
    # apart
    assert (differences <= 1e-5).float().mean() >= 0.95
    assert differences.max() <= 3 * 2 * 2e-3


@pytest.mark.slow
def test_a_malformed_sample_is_reported_not_fatal(workspace, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(workspace / "omniavs", broken)
    (broken / "referrings" / "referring_speeches" / "s.wav").write_bytes(b"not audio at all")
    (tmp_path / "stage.json").write_text((workspace / "stage.json").read_text())
    (tmp_path / "tiny").symlink_to(workspace / "tiny")
    (tmp_path / "omniavs").symlink_to(broken)
    state = run_train(tmp_path, tmp_path / "out", "--max-steps", "4")
    assert state["bad_samples"] > 0 and state["step"] == 4


def test_refavs_training_samples(workspace, tmp_path):
    from processing_oisa.data.mixture import build_refavs_sample
    from processing_oisa.data.refavs import RefAVSReader
    from processing_oisa.data.synthetic import make_synthetic_dataset

    make_synthetic_dataset(tmp_path / "refavs", "refavs", num_videos=3, seed=1)
    processor = AutoProcessor.from_pretrained(workspace / "tiny")
    records = RefAVSReader(tmp_path / "refavs", split="train")
    positive = next(record for record in records if not record.is_null)
    sample = build_refavs_sample(positive, processor, num_frames=4, num_dense_frames=2)
    assert sample["pixel_values"].shape[0] == 4 and sample["gt_masks"].shape == (4, 224, 224)
    assert processor.tokenizer.decode(sample["input_ids"][sample["labels"] != -100]) == "Sure, it is [SEG].<|im_end|>"
    assert positive.text in processor.tokenizer.decode(sample["input_ids"])
    null_records = [record for split in ("train", "test_n") for record in RefAVSReader(tmp_path / "refavs", split=split)
                    if record.is_null]
    null = build_refavs_sample(null_records[0], processor, num_frames=4, num_dense_frames=2)
    assert null["gt_masks"].shape[0] == 0
    assert processor.tokenizer.decode(null["input_ids"][null["labels"] != -100]) == (
        "No target matches this expression.<|im_end|>")
