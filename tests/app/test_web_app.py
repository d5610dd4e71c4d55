"""
The web demo's request handler in process, without a server: uploads only, deleted when the request ends; a second
expression about a video reuses its features even though its upload is gone; the overlay's codec where H.264 is
missing; `oisa app` refusing bad arguments before loading a model.
"""

import hashlib
import re
import shutil
from pathlib import Path
from unittest import mock

import av
import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoProcessor

from modeling_oisa import tiny_synthetic_path
from oisa_cli.demo_segmentation import ABSENT_NAME
from oisa_cli.main import main as oisa_main
from processing_oisa.media import VideoReader, write_video
from processing_oisa.processing_oisa import OisaExpression
from processing_oisa.segmenter import OisaVideoSegmenter


gr = pytest.importorskip("gradio", reason="the web demo needs the demo extra: pip install -e '.[demo]'")


def no_progress(*args, **kwargs) -> None:
    pass


@pytest.fixture(scope="module")
def segmenter():
    checkpoint = tiny_synthetic_path()
    model = AutoModel.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return OisaVideoSegmenter(model, AutoProcessor.from_pretrained(checkpoint))


@pytest.fixture
def web_app(segmenter, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "files"))
    from oisa_cli.web_app import OisaWebApp

    return OisaWebApp(segmenter, "oisa-tiny-synthetic", tmp_path / "workspace", max_frames=10)


def upload(web_app, path: Path) -> dict:
    """The payload gradio hands the handler for an upload: the file in a folder named by its content's hash."""
    folder = web_app.files_dir / hashlib.sha256(path.read_bytes()).hexdigest()
    folder.mkdir(parents=True, exist_ok=True)
    return {"path": str(shutil.copy(path, folder / path.name)), "orig_name": path.name}


def segment(web_app, video: dict | None, text: str, speech: dict | None = None, sound: dict | None = None) -> tuple:
    return web_app.segment(video, text, speech, sound, None, False, progress=no_progress)


@pytest.mark.parametrize("max_cached_frames", [16, 2])
def test_an_encoded_video_gives_the_files_results_again_and_again(segmenter, demo_clip_path, max_cached_frames):
    # the segmenter's reuse API the app stands on, with the frames and maps kept (16) or decoded again (2)
    video_segmenter = OisaVideoSegmenter(
        segmenter.model, segmenter.processor, chunk_size=3, max_cached_frames=max_cached_frames
    )
    expressions = [OisaExpression(text="the red circle"), OisaExpression(text=ABSENT_NAME)]
    expected = video_segmenter(demo_clip_path, expressions)
    encoded = video_segmenter.encode_video(demo_clip_path)
    assert (encoded.image_maps is not None) == (max_cached_frames == 16)
    for _ in range(2):
        for result, reference in zip(video_segmenter(encoded, expressions), expected):
            assert result.answer == reference.answer and result.timestamps == reference.timestamps
            np.testing.assert_array_equal(result.masks, reference.masks)
            np.testing.assert_allclose(result.presence_scores, reference.presence_scores, atol=1e-6)
    assert expected[0].masks.any() and not expected[1].masks.any()


def test_a_second_expression_reuses_the_video_after_its_upload_is_deleted(web_app, segmenter, demo_clip_path):
    payload = upload(web_app, demo_clip_path)
    with mock.patch.object(segmenter, "encode_video", wraps=segmenter.encode_video) as encode_video:
        first = segment(web_app, payload, "the red circle")
        assert not Path(payload["path"]).exists() and not Path(payload["path"]).parent.exists()
        # the page sends the same upload again for the next expression: its frames and features are still there
        second = segment(web_app, payload, "the purple diamond")
    assert encode_video.call_count == 1
    assert first[0] == "Sure, it is ." and second[0] == "No target matches this expression."
    assert VideoReader(second[2]).info.num_frames == 8 and list(second[3]["presence"]) == [0.0] * 8


def test_only_uploads_are_read_and_every_upload_is_deleted(web_app, demo_clip_path, tmp_path):
    outside = tmp_path / "secret.mp4"
    shutil.copy(demo_clip_path, outside)
    output = Path(segment(web_app, upload(web_app, demo_clip_path), "the red circle")[2])
    long_clip = tmp_path / "long.mp4"
    write_video(long_clip, [VideoReader(demo_clip_path).read([0])[0]] * 11, 4.0)
    long_upload = upload(web_app, long_clip)
    video_upload, sound_upload = upload(web_app, demo_clip_path), upload(web_app, long_clip)
    cases = [
        (({"path": str(outside)},), "Video secret.mp4: not a file uploaded to this app."),
        # another request's output is in gradio's folder too, but no upload
        (({"path": str(output)},), f"Video {output.name}: not a file uploaded to this app."),
        ((None,), "No video: upload one or pick an example."),
        ((long_upload,), "Video long.mp4 has 11 frames; this app takes at most 10 (--max-frames)."),
        # a refused input does not keep the request's other uploads
        ((video_upload, {"path": str(outside)}, sound_upload), "Speech secret.mp4: not a file uploaded to this app."),
    ]
    for payloads, message in cases:
        with pytest.raises(gr.Error) as raised:
            segment(web_app, payloads[0], "the red circle", *payloads[1:])
        assert raised.value.message == message
    assert outside.exists() and output.exists()
    assert [path for path in web_app.files_dir.rglob("*") if path.is_file() and "outputs" not in path.parts] == []


def test_outputs_are_deleted_once_their_time_is_up(web_app, demo_clip_path, monkeypatch):
    from oisa_cli import web_app as web_app_module

    first = Path(segment(web_app, upload(web_app, demo_clip_path), "the red circle")[2]).parent
    second = Path(segment(web_app, upload(web_app, demo_clip_path), "the red circle")[2]).parent
    assert first.is_dir() and second.is_dir()
    monkeypatch.setattr(web_app_module, "OUTPUT_LIFETIME_SECONDS", -1)
    third = Path(segment(web_app, upload(web_app, demo_clip_path), "the red circle")[2]).parent
    assert [folder for folder in web_app.outputs_dir.iterdir()] == [third]


def test_the_overlay_is_vp9_webm_where_h264_cannot_be_encoded(web_app, demo_clip_path, monkeypatch):
    from oisa_cli import web_app as web_app_module

    assert web_app_module.browser_video_format() == ("overlay.mp4", "libx264")

    def no_h264(name: str, mode: str = "r"):
        if name == "libx264":
            raise av.codec.codec.UnknownCodecError(name)
        return av.codec.Codec(name, mode)

    monkeypatch.setattr(web_app_module.av.codec, "Codec", no_h264)
    assert web_app_module.browser_video_format() == ("overlay.webm", "libvpx-vp9")
    web_app.overlay_name, web_app.overlay_codec = web_app_module.browser_video_format()
    overlay = segment(web_app, upload(web_app, demo_clip_path), "the red circle")[2]
    assert overlay.endswith("overlay.webm")
    with av.open(overlay) as container:
        assert container.streams.video[0].codec_context.name == "vp9"
    assert VideoReader(overlay).info.num_frames == 8


def test_oisa_app_refuses_bad_arguments_before_loading_a_model(caplog):
    cases = [
        (["--port", "70000"], "--port must be between 1 and 65535, got 70000"),
        (["--max-frames", "0"], "--max-frames must be at least 1, got 0"),
        (["--device", "tpu:x"], "--device tpu:x: "),
    ]
    for arguments, message in cases:
        caplog.clear()
        with mock.patch("transformers.AutoModel.from_pretrained", side_effect=AssertionError("loaded a model")):
            assert oisa_main(["app", *arguments]) == 2
        (line,) = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
        assert re.fullmatch(f"oisa app: {re.escape(message)}.*", line), line
