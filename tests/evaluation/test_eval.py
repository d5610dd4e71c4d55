"""eval.py end to end on the tiny model and tiny synthetic sets: sharding, resuming, failures, both datasets."""

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from transformers import AutoModel, AutoProcessor

from oisa_cli.main import main as oisa_main
from oisa_evaluation.runner import apply_profile
from processing_oisa import OisaExpression, OisaVideoSegmenter, VideoReader
from processing_oisa.data.errors import OisaDataError
from processing_oisa.data.synthetic import make_synthetic_dataset


EVAL_SCRIPT = Path(__file__).resolve().parents[2] / "eval.py"
SMALL = {"num_frames": 4, "height": 48, "width": 64}
# float32 whatever the CPU: runs are compared number for number
FAST = ["--max-new-tokens", "4", "--dtype", "float32"]


def _load_script():
    spec = importlib.util.spec_from_file_location("oisa_eval_script", EVAL_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


eval_script = _load_script()


def run_eval(*args: str, status: int = 0) -> None:
    """
    One process, in this interpreter (saves the start-up of a new one), on one thread like each process that torchrun
    starts: sums over a different number of threads may differ in the last bits, which can move a probability across
    a threshold, so only runs with the same threads per process are compared. `status`: the exit code it must return.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert eval_script.main([*map(str, args), *FAST]) == status
    finally:
        torch.set_num_threads(threads)


def two_process_command(*args: str) -> tuple[list[str], dict]:
    """The command and environment of two processes through `accelerate launch` on CPU (torchrun + gloo)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
        str(EVAL_SCRIPT), *map(str, args), *FAST,
    ]
    return command, {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run_eval_two_processes(*args: str) -> None:
    """Two processes through `accelerate launch` on CPU (see eval.py's docstring)."""
    command, env = two_process_command(*args)
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def result_lines(out: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(out.glob("results-*.jsonl")) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The tiny random model with its head pushed to answer `[SEG]`, so that masks are produced."""
    folder = tmp_path_factory.mktemp("model")
    oisa_main(["tiny-random", str(folder / "random")])
    model = AutoModel.from_pretrained(folder / "random", dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight[model.config.seg_token_id] += 50.0
    model.save_pretrained(folder / "seg")
    AutoProcessor.from_pretrained(folder / "random").save_pretrained(folder / "seg")
    return folder / "seg"


@pytest.fixture(scope="module")
def omniavs_root(tmp_path_factory) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    root = tmp_path_factory.mktemp("omniavs") / "data"
    make_synthetic_dataset(root, "omniavs", num_videos=2, seed=0, **SMALL)
    return root


@pytest.fixture(scope="module")
def omniavs_run(tmp_path_factory, model_dir, omniavs_root) -> Path:
    out = tmp_path_factory.mktemp("omniavs-run")
    run_eval("--model", model_dir, "--dataset", "omniavs", "--data-root", omniavs_root, "--out", out)
    return out


@pytest.mark.slow
def test_omniavs_one_and_two_processes_agree(tmp_path, model_dir, omniavs_root, omniavs_run):
    single = metrics(omniavs_run)
    assert single["num_expressions"] == 20 and single["num_scored"] == 20 and single["num_errors"] == 0
    assert list(single["segmentation"]["splits"]) == [
        "text", "speech", "text_sound", "speech_sound", "text_image", "speech_image", "text_sound_image",
        "speech_sound_image",
    ]
    table = (omniavs_run / "results.md").read_text()
    assert table.startswith("| Model | All | I | II | III | IV | V | VI | VII | VIII | METEOR |")
    for line in result_lines(omniavs_run):
        # scalars only: the masks stay out of the results
        assert all(not isinstance(value, (list, dict)) for value in line.values())

    run_eval_two_processes("--model", model_dir, "--dataset", "omniavs", "--data-root", omniavs_root, "--out", tmp_path)
    assert sorted(path.name for path in tmp_path.glob("results-*.jsonl")) == ["results-000.jsonl", "results-001.jsonl"]
    keys = [line["key"] for line in result_lines(tmp_path)]
    assert len(keys) == len(set(keys)) == 20
    assert metrics(tmp_path) == single
    assert (tmp_path / "results.md").read_text() == table


def test_interrupted_run_resumes_to_the_same_numbers(tmp_path, model_dir, omniavs_root, omniavs_run):
    common = ["--model", model_dir, "--dataset", "omniavs", "--data-root", omniavs_root, "--out", tmp_path]
    run_eval(*common, "--limit", "7")
    assert metrics(tmp_path)["num_expressions"] == 7
    results = tmp_path / "results-000.jsonl"
    done = results.read_bytes()
    # an interruption in the middle of a write leaves a line without its newline
    results.write_bytes(done + b'{"key": "test/video0001_3", "index": 13, "sta')
    run_eval(*common)
    assert results.read_bytes().startswith(done)  # the 7 done expressions were not evaluated again
    keys = [line["key"] for line in result_lines(tmp_path)]
    assert len(keys) == len(set(keys)) == 20
    assert metrics(tmp_path) == metrics(omniavs_run)


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_to_the_same_numbers(tmp_path, model_dir, omniavs_root, omniavs_run):
    common = ["--model", model_dir, "--dataset", "omniavs", "--data-root", omniavs_root, "--out", tmp_path]
    command, env = two_process_command(*common)
    # its own session, so that SIGKILL reaches the launcher and both workers at once, as a killed job's would
    launched = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    deadline = time.monotonic() + 240

    def finished_lines() -> int:
        return sum(path.read_bytes().count(b"\n") for path in tmp_path.glob("results-*.jsonl"))

    try:
        while finished_lines() < 3:
            assert launched.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(launched.pid, signal.SIGKILL)
        launched.wait()
    assert not (tmp_path / "metrics.json").exists()
    done = {path.name: path.read_bytes() for path in tmp_path.glob("results-*.jsonl")}
    assert 3 <= finished_lines() < 20

    run_eval_two_processes(*common)
    for name, data in done.items():
        # what was written before the kill was kept, not evaluated again (a cut last line is dropped)
        kept = data[: data.rfind(b"\n") + 1]
        assert (tmp_path / name).read_bytes().startswith(kept)
    keys = [line["key"] for line in result_lines(tmp_path)]
    assert len(keys) == len(set(keys)) == 20
    assert metrics(tmp_path) == metrics(omniavs_run)


def test_a_run_with_other_behaviour_does_not_mix_into_old_results(model_dir, omniavs_root, omniavs_run):
    with pytest.raises(ValueError, match="come from another run"):
        run_eval("--model", model_dir, "--dataset", "omniavs", "--data-root", omniavs_root, "--out", omniavs_run,
                 "--profile", "fixed")


def test_a_run_where_every_expression_failed_is_no_result(tmp_path, model_dir, omniavs_root, caplog):
    data = tmp_path / "data"
    shutil.copytree(omniavs_root, data)
    # every video's soundtrack corrupt: every expression fails, and the run says so with a non-zero exit code
    for soundtrack in (data / "audios").glob("*.mp3"):
        soundtrack.write_bytes(b"not an mp3")
    run_eval("--model", model_dir, "--dataset", "omniavs", "--data-root", data, "--out", tmp_path / "out", status=3)
    assert metrics(tmp_path / "out")["num_scored"] == 0
    assert "eval.py: no expression could be scored" in caplog.text


def test_failures_are_recorded_and_counted(tmp_path, model_dir, omniavs_root, caplog):
    data = tmp_path / "data"
    shutil.copytree(omniavs_root, data)
    # a corrupt speech file fails at inference; a missing image makes the reader reject its record
    (data / "referrings" / "referring_speeches" / "video0000_1.wav").write_bytes(b"not a wav file")
    (data / "referrings" / "referring_images" / "video0001_4.png").unlink()
    common = ["--model", model_dir, "--dataset", "omniavs", "--data-root", data]
    # without --skip-bad the reader's error is the run's one line, exit code 2
    run_eval(*common, "--out", tmp_path / "strict", status=2)
    (message,) = [record.getMessage() for record in caplog.records if record.name == "eval"]
    assert message.startswith("eval.py: ") and "video0001_4.png" in message
    with pytest.raises(OisaDataError, match="video0001_4.png"):
        run_eval(*common, "--out", tmp_path / "strict", "--debug")

    run_eval(*common, "--out", tmp_path / "out", "--skip-bad")
    result = metrics(tmp_path / "out")
    assert (result["num_expressions"], result["num_scored"], result["num_errors"]) == (19, 18, 1)
    assert result["errors"][0]["key"] == "test/video0000_1" and "video0000_1.wav" in result["errors"][0]["error"]
    assert result["errors_by_type"] == {"speech": 1}
    assert result["segmentation"]["splits"]["speech"]["num_expressions"] == 3  # of 4
    assert [entry["record"] for entry in result["skipped_by_reader"]] == ["video0001_4"]
    lines = {line["key"]: line for line in result_lines(tmp_path / "out")}
    assert lines["test/video0000_1"]["status"] == "error"
    # the other expressions of the failing video were still scored
    assert all(lines[f"test/video0000_{k}"]["status"] == "ok" for k in (0, 2, 3, 4, 5, 6, 7, 8, 9))
    assert "1 failed" in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.slow
def test_refavs_one_and_two_processes_agree(tmp_path, model_dir):
    data = tmp_path / "data"
    make_synthetic_dataset(data, "refavs", num_videos=2, seed=0, **SMALL)
    common = ["--model", model_dir, "--dataset", "refavs", "--data-root", data]
    run_eval(*common, "--out", tmp_path / "one")
    single = metrics(tmp_path / "one")
    assert single["num_expressions"] == 14 and single["num_errors"] == 0
    for mode in ("official", "per_expression"):
        assert set(single[mode]) >= {"Seen", "Unseen", "Mix", "Null"}
        assert 0 <= single[mode]["Null"]["S"] <= 1
    assert (tmp_path / "one" / "results.md").read_text().startswith(
        "| Model | Mode | Seen J | Seen F | Unseen J | Unseen F | Mix J | Mix F | Null S |"
    )
    run_eval_two_processes(*common, "--out", tmp_path / "two")
    assert metrics(tmp_path / "two") == single


def test_segmenter_probabilities_match_its_masks(model_dir, omniavs_root):
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    apply_profile(model, processor, "fixed")  # masks from upsampled logits, as the probabilities
    assert (processor.video_processor.frame_sampler, processor.sub_audio_layout) == ("linspace", "per_frame")
    segmenter = OisaVideoSegmenter(model, processor, max_new_tokens=4)
    video = VideoReader(omniavs_root / "images" / "video0000")
    soundtrack = omniavs_root / "audios" / "video0000.mp3"
    expression = OisaExpression(text="the red circle")
    result = segmenter(video, expression, soundtrack=soundtrack, return_probabilities=True)
    assert result.probabilities.shape == result.masks.shape and result.probabilities.dtype == "float32"
    assert ((result.probabilities > 0.5) == result.masks).mean() > 0.999
    assert segmenter(video, expression, soundtrack=soundtrack).probabilities is None


def test_auto_dtype_follows_the_cpu(model_dir):
    from oisa_evaluation.runner import load_segmenter

    for has_bf16, expected in ((True, torch.bfloat16), (False, torch.float32)):
        with mock.patch("modeling_oisa.precision.cpu_has_bf16_matmul", return_value=has_bf16):
            segmenter = load_segmenter(str(model_dir), torch.device("cpu"), dtype="auto")
        assert segmenter.model.dtype == expected
    assert load_segmenter(str(model_dir), torch.device("cpu"), dtype="float32").model.dtype == torch.float32
