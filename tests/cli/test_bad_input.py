"""
Bad input at the entry points (issue 35's corpus, loading and command-line part): one error of the project's types
naming the file and the problem, exit code 2 from `oisa` with a one-line message and no traceback (`--debug` shows
it), checked before any model work; never exit 0 on garbage.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from transformers import AutoModel

from modeling_oisa import OisaCheckpointError, OisaForReferringSegmentation, resolve_model_name
from oisa_cli.main import main as oisa_main
from processing_oisa.media import write_video


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "tiny"
    assert oisa_main(["tiny-random", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(path, np.zeros((3, 32, 32, 3), dtype=np.uint8), 5.0)
    return path


def broken_copy(model_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    return copy


# --- loading: resolve_model_name (every entry point) and from_pretrained (the API) ------------------------------------


def test_a_truncated_safetensors_file_is_named(model_dir, tmp_path):
    folder = broken_copy(model_dir, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    for load in (resolve_model_name, OisaForReferringSegmentation.from_pretrained, AutoModel.from_pretrained):
        with pytest.raises(OisaCheckpointError, match=r"model\.safetensors: truncated or corrupt"):
            load(str(folder))


def test_a_safetensors_file_with_a_garbage_header_is_named(model_dir, tmp_path):
    folder = broken_copy(model_dir, tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(OisaCheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        resolve_model_name(str(folder))


def test_an_empty_folder_is_not_a_model(tmp_path):
    with pytest.raises(OisaCheckpointError, match=r"not a model folder \(empty\)"):
        resolve_model_name(str(tmp_path))
    with pytest.raises(OisaCheckpointError, match=r"not a model folder \(empty\)"):
        OisaForReferringSegmentation.from_pretrained(tmp_path)


def test_pickle_only_weights_are_refused_without_unpickling(model_dir, tmp_path):
    folder = broken_copy(model_dir, tmp_path)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    # a pickle that would create a file if it were ever loaded
    (folder / "pytorch_model.bin").write_bytes(
        b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    )
    with pytest.raises(OisaCheckpointError, match=r"only pickle weights \(pytorch_model\.bin\)"):
        OisaForReferringSegmentation.from_pretrained(folder)
    assert not marker.exists()


def test_another_model_type_is_refused(model_dir, tmp_path):
    folder = broken_copy(model_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(OisaCheckpointError, match=r"config\.json: model_type 'bert' is not OISA"):
        resolve_model_name(str(folder))


def test_a_malformed_config_is_named(model_dir, tmp_path):
    folder = broken_copy(model_dir, tmp_path)
    (folder / "config.json").write_text('{"model_type": "oisa",')
    with pytest.raises(OisaCheckpointError, match=r"config\.json: not a readable JSON config"):
        OisaForReferringSegmentation.from_pretrained(folder)


def test_a_missing_shard_is_named(model_dir, tmp_path):
    folder = broken_copy(model_dir, tmp_path)
    model = OisaForReferringSegmentation.from_pretrained(folder)
    shutil.rmtree(folder)
    model.save_pretrained(folder, max_shard_size="1MB")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(OisaCheckpointError, match=f"names shards that are not in the folder: {shard.name}"):
        resolve_model_name(str(folder))


def test_a_misspelt_model_fails_at_once_offline(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(OisaCheckpointError, match="no such local folder, and the Hub repo is not in the cache"):
        resolve_model_name("nobody/oisa-tiny-synthetc")
    with pytest.raises(OisaCheckpointError, match="no such model folder, nor a Hub repo id"):
        resolve_model_name(str(tmp_path / "no" / "such" / "folder"))
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(OisaCheckpointError, match="a file, not a model folder"):
        resolve_model_name(str(tmp_path / "weights.txt"))


def test_a_sound_checkpoint_still_loads_through_every_path(model_dir):
    assert resolve_model_name(str(model_dir)) == str(model_dir)
    assert isinstance(AutoModel.from_pretrained(model_dir), OisaForReferringSegmentation)


# --- the command line -------------------------------------------------------------------------------------------------


def run_segment(video: Path, out: Path, *extra: str, model: Path | None = None) -> int:
    arguments = ["segment", str(video), "--out", str(out), *extra]
    if model is not None:
        arguments += ["--model", str(model)]
    # any model work at all fails the test: these arguments must be refused before it
    with mock.patch("transformers.AutoModel.from_pretrained", side_effect=AssertionError("loaded a model")):
        return oisa_main(arguments)


def test_segment_refuses_bad_arguments_before_any_model_work(video, model_dir, tmp_path, caplog):
    out_file = tmp_path / "out.txt"
    out_file.write_text("x")
    cases = [
        ((video, out_file, "--text", "the dog"), "--out .*out.txt: a file, not a folder"),
        ((video, tmp_path / "o1", "--text", ""), "--text is empty"),
        ((video, tmp_path / "o2", "--text", "  \t"), "--text is empty"),
        ((video, tmp_path / "o3", "--text", "a", "--max-new-tokens", "0"), "--max-new-tokens must be at least 1"),
        ((video, tmp_path / "o4", "--text", "a", "--chunk-size", "-1"), "--chunk-size must be at least 1"),
    ]
    for arguments, message in cases:
        caplog.clear()
        assert run_segment(*arguments, model=model_dir) == 2
        (line,) = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
        assert line.startswith("oisa segment: ")
        assert re.search(message, line), line


def test_segment_refuses_cuda_on_a_machine_without_it(video, model_dir, tmp_path, caplog):
    with mock.patch.object(torch.cuda, "is_available", return_value=False):
        assert run_segment(video, tmp_path / "o", "--text", "a", "--device", "cuda", model=model_dir) == 2
    assert "no CUDA device" in caplog.text


def test_segment_refuses_a_misspelt_model_before_decoding(video, tmp_path, caplog):
    assert run_segment(video, tmp_path / "o", "--text", "a", model=tmp_path / "no-such-model") == 2
    assert "no-such-model: no such model folder" in caplog.text


def test_make_synthetic_into_a_file_is_refused(tmp_path, caplog):
    target = tmp_path / "data"
    target.write_text("x")
    assert oisa_main(["make-synthetic", str(target), "--format", "refavs", "--videos", "1"]) == 2
    assert "is a file" in caplog.text


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    # a command that fails in an unforeseen way: exit code 1, one line, no traceback unless --debug
    probe = (
        "import sys\n"
        "from unittest import mock\n"
        "from oisa_cli.main import main\n"
        "with mock.patch('oisa_tiny.write_tiny_random', side_effect=KeyError('boom')):\n"
        "    sys.exit(main(sys.argv[1:]))\n"
    )
    command = [sys.executable, "-c", probe]
    quiet = subprocess.run([*command, "tiny-random", str(tmp_path / "t")], capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 1
    assert "Traceback" not in quiet.stderr
    assert "oisa tiny-random failed: KeyError: 'boom' (--debug shows the traceback)" in quiet.stderr
    loud = subprocess.run(
        [*command, "--debug", "tiny-random", str(tmp_path / "t")], capture_output=True, text=True, timeout=300
    )
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "KeyError: 'boom'" in loud.stderr



def test_convert_names_a_missing_folder_and_a_malformed_config(tmp_path, caplog):
    assert oisa_main(["convert", str(tmp_path / "no-such-checkpoint"), str(tmp_path / "out")]) == 2
    assert "no-such-checkpoint: no such model folder" in caplog.text
    original = tmp_path / "original"
    original.mkdir()
    (original / "config.json").write_text('{"model_type": "internvl_chat", ')
    caplog.clear()
    assert oisa_main(["convert", str(original), str(tmp_path / "out")]) == 2
    assert "config.json: not a readable JSON config" in caplog.text


def test_convert_says_an_oisa_folder_needs_no_conversion(model_dir, tmp_path, caplog):
    assert oisa_main(["convert", str(model_dir), str(tmp_path / "out")]) == 2
    assert "needs no conversion" in caplog.text


def test_segment_writes_a_one_pixel_video_and_keeps_a_variable_frame_rate(model_dir, tmp_path):
    from processing_oisa.media import VideoReader

    from ..processing.test_bad_media import write_variable_rate_video

    tiny = tmp_path / "tiny.mp4"
    write_video(tiny, np.full((3, 1, 1, 3), 200, dtype=np.uint8), 5.0)
    assert oisa_main(["segment", str(tiny), "--text", "a", "--model", str(model_dir), "--out", str(tmp_path / "o1"),
                      "--max-new-tokens", "2"]) == 0
    assert VideoReader(tmp_path / "o1" / "overlay.mp4").info.num_frames == 3

    times = [0.0, 0.1, 0.5, 0.6, 1.4, 1.5]
    write_variable_rate_video(tmp_path / "vfr.mp4", times)
    assert oisa_main(["segment", str(tmp_path / "vfr.mp4"), "--text", "a", "--model", str(model_dir),
                      "--out", str(tmp_path / "o2"), "--max-new-tokens", "2"]) == 0
    overlay = VideoReader(tmp_path / "o2" / "overlay.mp4").info
    assert overlay.timestamps == pytest.approx(VideoReader(tmp_path / "vfr.mp4").info.timestamps, abs=1e-3)


def test_segment_names_a_hub_repo_that_cannot_be_loaded(video, tmp_path, caplog, monkeypatch):
    # online, a misspelt Hub id passes the local checks and fails in from_pretrained: one line, exit code 2
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    with mock.patch("transformers.AutoModel.from_pretrained", side_effect=OSError("nobody/oisa is not a valid model")):
        assert oisa_main(["segment", str(video), "--text", "a", "--model", "nobody/oisa", "--out", str(tmp_path)]) == 2
    assert "nobody/oisa: no such local folder or Hub repo" in caplog.text


def test_segment_dtype_auto_follows_the_cpu(model_dir, video, tmp_path):
    # `--dtype auto` (the default) loads bfloat16 where the CPU has bfloat16 matrix units, float32 elsewhere
    for has_bf16, expected in ((True, torch.bfloat16), (False, torch.float32)):
        loaded = []
        real = AutoModel.from_pretrained

        def record(*args, **kwargs):
            loaded.append(kwargs["dtype"])
            return real(*args, **kwargs)

        with mock.patch("modeling_oisa.precision.cpu_has_bf16_matmul", return_value=has_bf16), mock.patch(
            "transformers.AutoModel.from_pretrained", side_effect=record
        ):
            assert oisa_main(["segment", str(video), "--text", "a", "--model", str(model_dir), "--out",
                              str(tmp_path / str(has_bf16)), "--max-new-tokens", "2"]) == 0
        assert loaded == [expected]
