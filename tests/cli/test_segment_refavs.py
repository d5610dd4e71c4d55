"""
`oisa segment --model <EEMC>`: a mask PNG per video frame, the overlay video, the contact sheet and result.json (with
the frames EEMC saw and how it was batched), the segmenter's numbers; the options that mean nothing for EEMC refused in
one line with exit code 2, before any model work.
"""

import json
import re
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

import processing_oisa  # noqa: F401  (registers the processors)
from oisa_cli.main import main as oisa_main
from processing_oisa import VideoReader, video_segmenter, write_video
from processing_oisa.data.synthetic_clips import make_shapes_clip, tone


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("refavs") / "tiny"
    assert oisa_main(["tiny-random", "--family", "refavs", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory) -> Path:
    """3 s at 4 fps (12 frames) with a soundtrack: EEMC sees frames 0, 4 and 8."""
    clip = make_shapes_clip(num_frames=12, height=36, width=52, fps=4.0, seed=5)
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(path, clip.frames, clip.fps, clip.soundtrack)
    return path


def test_segment_writes_a_mask_per_frame_and_says_what_eemc_saw(checkpoint, clip_path, tmp_path):
    out = tmp_path / "out"
    code = oisa_main(
        [
            "segment",
            str(clip_path),
            "--text",
            "the red circle",
            "--model",
            str(checkpoint),
            "--out",
            str(out),
            "--dtype",
            "float32",
            "--chunk-size",
            "5",
        ]
    )
    assert code == 0
    pngs = sorted((out / "masks").glob("*.png"))
    assert [png.name for png in pngs] == [f"{index:05d}.png" for index in range(12)]
    written = np.stack([np.asarray(Image.open(png)) > 0 for png in pngs])
    assert written.shape == (12, 36, 52)
    # the numbers of the segmenter on the same clip, the model in float32
    model = AutoModel.from_pretrained(checkpoint, dtype=torch.float32).eval()
    expected = video_segmenter(model, AutoProcessor.from_pretrained(checkpoint))(clip_path, "the red circle")
    np.testing.assert_array_equal(written, expected.masks)
    assert written.any() and not written.all()

    result = json.loads((out / "result.json").read_text())
    assert (result["expression_type"], result["answer"], result["explanation"], result["segmented"]) == (
        "text",
        "",
        "",
        True,
    )
    assert result["batch"] == expected.batch and "this one ran alone" in result["batch"]
    assert result["sampled_frames"] == [0, 4, 8]
    frames = result["frames"]
    assert [frame["mask_from"] for frame in frames] == [0] * 4 + [4] * 4 + [8] * 4
    assert [frame["mask_area"] for frame in frames] == written.sum(axis=(1, 2)).tolist()
    assert [frame["presence"] for frame in frames] == pytest.approx(expected.presence_scores.tolist())
    assert [frame["time"] for frame in frames] == pytest.approx([index / 4 for index in range(12)], abs=1e-3)
    assert VideoReader(out / "overlay.mp4").info.num_frames == 12
    assert Image.open(out / "contact_sheet.png").size[0] > 0
    assert not (out / "result.json.tmp").exists()


def test_segment_with_a_separate_soundtrack_and_dtype_auto(checkpoint, clip_path, tmp_path):
    import soundfile

    soundtrack = tmp_path / "soundtrack.wav"
    soundfile.write(soundtrack, tone(330, 3.0), 16000)
    for has_bf16, expected in ((True, torch.bfloat16), (False, torch.float32)):
        loaded = []
        real = AutoModel.from_pretrained

        def record(*args, **kwargs):
            loaded.append(kwargs["dtype"])
            return real(*args, **kwargs)

        with (
            mock.patch("modeling_oisa.precision.cpu_has_bf16_matmul", return_value=has_bf16),
            mock.patch("transformers.AutoModel.from_pretrained", side_effect=record),
        ):
            out = tmp_path / str(has_bf16)
            assert (
                oisa_main(
                    [
                        "segment",
                        str(clip_path),
                        "--text",
                        "the dog",
                        "--model",
                        str(checkpoint),
                        "--out",
                        str(out),
                        "--soundtrack",
                        str(soundtrack),
                    ]
                )
                == 0
            )
        assert loaded == [expected]
        assert len(list((out / "masks").glob("*.png"))) == 12


def test_options_that_mean_nothing_for_eemc_are_refused_before_any_model_work(checkpoint, clip_path, tmp_path, caplog):
    speech = tmp_path / "speech.wav"
    import soundfile

    soundfile.write(speech, tone(300, 1.0), 16000)
    cases = [
        (["--speech", str(speech)], "--speech: .* is an EEMC \\(refavs_eemc\\), which takes a text expression only"),
        (["--text", "a", "--sound", str(speech)], "--sound: .*give --text alone"),
        (["--text", "a", "--image", str(tmp_path / "image.png")], "--image: "),
        (["--text", "a", "--explain"], "--explain: .*generates no text"),
        (["--text", "a", "--max-new-tokens", "4"], "--max-new-tokens: "),
        (["--text", "a", "--explain", "--max-new-tokens", "4"], "--explain, --max-new-tokens: "),
    ]
    for extra, message in cases:
        caplog.clear()
        arguments = ["segment", str(clip_path), "--model", str(checkpoint), "--out", str(tmp_path / "out"), *extra]
        with mock.patch("transformers.AutoModel.from_pretrained", side_effect=AssertionError("loaded a model")):
            assert oisa_main(arguments) == 2, extra
        (line,) = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
        assert line.startswith("oisa segment: ") and re.search(message, line), line
    assert not (tmp_path / "out").exists()


def test_a_hub_eemc_is_checked_once_loaded(checkpoint, clip_path, tmp_path, caplog):
    # a Hub repo's family is known once loaded: the same refusal, after loading, and nothing written
    real = AutoModel.from_pretrained
    with (
        mock.patch("processing_oisa.auto_segmenter.RefAvsVideoSegmenter.__call__", side_effect=AssertionError),
        mock.patch("oisa_cli.segment.local_model_type", return_value=None),
        mock.patch("transformers.AutoModel.from_pretrained", side_effect=lambda *a, **k: real(checkpoint)),
    ):
        code = oisa_main(
            [
                "segment",
                str(clip_path),
                "--text",
                "a",
                "--explain",
                "--model",
                str(checkpoint),
                "--out",
                str(tmp_path / "out"),
            ]
        )
    assert code == 2 and "--explain: " in caplog.text
    assert not (tmp_path / "out").exists()
