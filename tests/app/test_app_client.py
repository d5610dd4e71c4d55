"""
The web demo driven through its API with gradio_client, as a remote user would: answers, masks and plots equal the
segmenter's own, bad input gets the command line's one-line message, uploads are gone once a request ends and a
second request waits for the first.
"""

import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

from modeling_oisa import tiny_synthetic_path
from oisa_cli.demo_segmentation import ABSENT_NAME, SPOKEN_TEXT
from processing_oisa.data.synthetic import SPEECH_PROGRAM, synthesize_speech
from processing_oisa.media import VideoReader
from processing_oisa.processing_oisa import OisaExpression
from processing_oisa.segmenter import OisaVideoSegmenter


gradio_client = pytest.importorskip("gradio_client", reason="the web demo needs the demo extra: pip install -e .[demo]")
Status = gradio_client.utils.Status

pytestmark = pytest.mark.slow  # the server takes about 15 s to start
NULL_ANSWER = "No target matches this expression."
UPLOADED_HASHES: set[str] = set()


@pytest.fixture(scope="module")
def client(app_server, tmp_path_factory):
    return gradio_client.Client(
        app_server.url, verbose=False, analytics_enabled=False, download_files=tmp_path_factory.mktemp("downloads")
    )


@pytest.fixture(scope="module")
def segmenter():
    checkpoint = tiny_synthetic_path()
    model = AutoModel.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return OisaVideoSegmenter(model, AutoProcessor.from_pretrained(checkpoint))


def upload(path: Path):
    UPLOADED_HASHES.add(hashlib.sha256(path.read_bytes()).hexdigest())
    return gradio_client.handle_file(str(path))


def segment(client, video: Path, text: str = "", speech: Path | None = None) -> dict:
    answer, explanation, overlay, plot, masks_zip, result_json = client.predict(
        upload(video), text, speech and upload(speech), None, None, False, api_name="/segment"
    )
    with zipfile.ZipFile(masks_zip) as archive:
        names = sorted(archive.namelist())
        masks = np.stack([np.asarray(Image.open(io.BytesIO(archive.read(name)))) > 0 for name in names])
    return {
        "answer": answer,
        "explanation": explanation,
        "overlay_frames": VideoReader(overlay).info.num_frames,
        "presence": [row[1] for row in plot["data"]],
        "mask_names": names,
        "masks": masks,
        "result": json.loads(Path(result_json).read_text()),
    }


def assert_same_as_the_segmenter(output: dict, expected) -> None:
    assert output["answer"] == expected.answer
    assert output["mask_names"] == [f"masks/{index:05d}.png" for index in range(8)]
    assert output["masks"].shape == expected.masks.shape == (8, 96, 128)
    assert (output["masks"] != expected.masks).mean() < 1e-3
    assert output["overlay_frames"] == 8
    np.testing.assert_allclose(output["presence"], expected.presence_scores, atol=1e-4)
    result = output["result"]
    assert (result["answer"], result["video"], result["model"]) == (
        expected.answer,
        "demo-clip.mp4",
        "oisa-tiny-synthetic",
    )
    assert [frame["mask_area"] for frame in result["frames"]] == output["masks"].sum(axis=(1, 2)).tolist()


def test_a_text_expression(client, segmenter, demo_clip_path):
    expected = segmenter(demo_clip_path, OisaExpression(text="the red circle"))
    output = segment(client, demo_clip_path, "the red circle")
    assert output["answer"] == "Sure, it is ." and expected.masks.any()
    assert_same_as_the_segmenter(output, expected)


def test_a_null_expression_has_empty_masks(client, segmenter, demo_clip_path):
    expected = segmenter(demo_clip_path, OisaExpression(text=ABSENT_NAME))
    output = segment(client, demo_clip_path, ABSENT_NAME)
    assert output["answer"] == NULL_ANSWER and not output["masks"].any()
    assert_same_as_the_segmenter(output, expected)


@pytest.mark.skipif(shutil.which(SPEECH_PROGRAM) is None, reason=f"{SPEECH_PROGRAM} is not installed")
def test_a_spoken_expression(client, segmenter, demo_clip_path, tmp_path):
    speech = tmp_path / "speech.wav"
    synthesize_speech(shutil.which(SPEECH_PROGRAM), SPOKEN_TEXT, speech)
    expected = segmenter(demo_clip_path, OisaExpression(speech=speech))
    output = segment(client, demo_clip_path, speech=speech)
    assert output["result"]["expression_type"] == "speech"
    assert_same_as_the_segmenter(output, expected)


def test_bad_input_gets_the_command_lines_message(client, app_server, demo_clip_path, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"this is not a video" * 100)
    silent = tmp_path / "silent.wav"
    soundfile.write(silent, np.zeros(16000, dtype=np.float32), 16000)
    cases = [
        ((broken, "the red circle", None), r"^Video broken\.mp4 is not a readable media file \("),
        ((demo_clip_path, "   ", None), r"^The text expression is empty: give its words, or speech instead of text\.$"),
        ((demo_clip_path, "", None), r"^The text expression is empty"),
        ((demo_clip_path, "", silent), r"^Speech silent\.wav is silent\.$"),
        ((demo_clip_path, "the red circle", silent), r"^An expression needs exactly one of text and speech"),
    ]
    for (video, text, speech), message in cases:
        with pytest.raises(gradio_client.exceptions.AppError, match=message) as raised:
            client.predict(upload(video), text, speech and upload(speech), None, None, False, api_name="/segment")
        assert "\n" not in str(raised.value) and str(app_server.workspace) not in str(raised.value)


def test_a_second_request_waits_for_the_first(client, app_server, demo_clip_path):
    log_start = len(app_server.log.read_text())
    jobs = [
        client.submit(upload(demo_clip_path), text, None, None, None, False, api_name="/segment")
        for text in ("the red circle", "the green square")
    ]
    for job in jobs:
        job.result(timeout=120)
        queue = job.communicator.updates
        statuses = [update for update in (queue.get_nowait() for _ in range(queue.qsize())) if hasattr(update, "code")]
        # the page shows this place in the queue while the request waits
        assert any(update.code == Status.IN_QUEUE and update.rank is not None for update in statuses)
    # the server ran them one after the other: each request ended before the next started
    events = [
        line.split(": ", 1)[1].split(" after ")[0]
        for line in app_server.log.read_text()[log_start:].splitlines()
        if line.startswith("oisa app: ")
    ]
    assert events == ["a request started", "the request ended"] * 2


def test_no_upload_is_left_on_the_server(client, app_server):
    # runs after the requests above: none of the files they uploaded, good or bad, is in the app's folder (but for
    # the examples the app made itself, the demo clip and its speech, which the tests uploaded copies of)
    assert len(UPLOADED_HASHES) >= 2
    left = [
        path
        for path in app_server.workspace.rglob("*")
        if path.is_file()
        and not path.is_relative_to(app_server.workspace / "examples")
        and hashlib.sha256(path.read_bytes()).hexdigest() in UPLOADED_HASHES
    ]
    assert left == []
