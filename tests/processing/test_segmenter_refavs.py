"""
EEMC's one-call segmenter (`RefAvsVideoSegmenter`, picked by `video_segmenter` and the pipeline): a mask for every frame
of the video, from the model run on one frame a second, with the numbers of the model called directly on the
processor's output, one video per forward, and bad input refused.

The tiny random EEMC barely reacts to its inputs (logits ~2e-3, the soundtrack changes nothing), so the checks compare
the model's inputs and its logits (through the probabilities), not whether the masks look right.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F
from transformers import AutoModel, AutoProcessor, pipeline

import processing_oisa  # noqa: F401  (registers the processors and the pipeline)
from modeling_oisa import OisaCheckpointError
from oisa_cli.main import main as oisa_main
from processing_oisa import (
    OisaExpression,
    OisaInputError,
    OisaVideoSegmenter,
    RefAvsVideoSegmenter,
    load_video_segmenter,
    video_segmenter,
    write_video,
)
from processing_oisa.data.synthetic_clips import make_shapes_clip, tone
from processing_oisa.segmenter import OisaEncodedVideo


TASK = "referring-audio-visual-segmentation"
HEIGHT, WIDTH = 48, 64


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("refavs")
    for profile in ("release", "fixed"):
        assert oisa_main(["tiny-random", "--family", "refavs", "--profile", profile, str(folder / profile)]) == 0
    return folder


@pytest.fixture(scope="module")
def model(checkpoints):
    return AutoModel.from_pretrained(checkpoints / "release", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def processor(checkpoints):
    return AutoProcessor.from_pretrained(checkpoints / "release")


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    """4 s at 5 fps (20 frames) with a soundtrack: EEMC sees frames 0, 5, 10 and 15."""
    clip = make_shapes_clip(num_frames=20, height=HEIGHT, width=WIDTH, fps=5.0, seed=2)
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(path, clip.frames, clip.fps, clip.soundtrack)
    return path


class ForwardInputs:
    """Records the keyword inputs of every forward of a model."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        self.calls.append({name: value.clone() for name, value in kwargs.items() if isinstance(value, torch.Tensor)})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def probabilities_at(logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Sigmoid of (T, h, w) logits resized bilinearly to `size`."""
    resized = F.interpolate(logits[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    return resized.sigmoid().numpy()


def test_one_mask_per_frame_held_from_the_frames_the_model_saw(model, processor, clip_path):
    segmenter = video_segmenter(model, processor)
    assert isinstance(segmenter, RefAvsVideoSegmenter)
    with ForwardInputs(model) as forwards:
        result = segmenter(clip_path, "the red circle", return_probabilities=True)
    # the model called directly on the processor's output for the same clip and expression
    inputs = processor(videos=clip_path, text="the red circle")
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    (seen,) = forwards.calls
    assert seen.keys() == inputs.keys()
    for name in inputs:
        assert torch.equal(seen[name], inputs[name]), name
    assert inputs["pixel_values"].shape[1] == 4 and inputs["audio_input_features"].shape[1] == 4

    assert result.masks.shape == (20, HEIGHT, WIDTH) and result.masks.dtype == bool
    assert result.frame_sources == [0] * 5 + [5] * 5 + [10] * 5 + [15] * 5
    sampled_masks = processor.post_process_masks(logits, (HEIGHT, WIDTH)).numpy()
    expected_probabilities = probabilities_at(logits, (HEIGHT, WIDTH))
    for frame, source in enumerate(result.frame_sources):
        np.testing.assert_array_equal(result.masks[frame], sampled_masks[source // 5])
        np.testing.assert_array_equal(result.probabilities[frame], expected_probabilities[source // 5])
    assert result.masks.any() and not result.masks.all()
    assert result.mask_areas == result.masks.sum(axis=(1, 2)).tolist()
    expected_presence = (logits > 0).float().mean((-2, -1)).numpy()
    np.testing.assert_array_equal(result.presence_scores, np.repeat(expected_presence, 5))
    # > 0.5 is the mask, where float32 tells the sigmoid from 0.5 (the tiny model's logits come within 1e-8 of 0)
    clear = np.abs(result.probabilities - 0.5) > 1e-6
    assert clear.mean() > 0.9 and np.array_equal((result.probabilities > 0.5)[clear], result.masks[clear])
    assert (result.expression_type, result.answer, result.explanation, result.has_seg) == ("text", "", "", True)
    assert result.timestamps == pytest.approx([index / 5 for index in range(20)], abs=1e-3)
    assert result.batch.startswith("one video (release profile: results depend on which videos share a batch")
    assert "this one ran alone" in result.batch


def test_the_release_batch_statement_is_true_and_fixed_says_otherwise(model, processor, checkpoints):
    rng = np.random.default_rng(0)
    video, other = (rng.integers(0, 256, (3, 40, 56, 3), dtype=np.uint8) for _ in range(2))
    alone = video_segmenter(model, processor)(
        video, "the red circle", soundtrack=tone(440, 3.0), return_probabilities=True
    )
    # the same video batched with another: under release its logits change, so running alone is a choice to state
    batch = processor(videos=[video, other], text=["the red circle", "blue"], audio=[tone(440, 3.0), tone(880, 3.0)])
    with torch.no_grad():
        batched = model(**batch).logits[0]
    assert not np.array_equal(probabilities_at(batched, (40, 56)), alone.probabilities)

    fixed = AutoModel.from_pretrained(checkpoints / "fixed", dtype=torch.float32).eval()
    result = video_segmenter(fixed, processor)(video, "the red circle", soundtrack=tone(440, 3.0))
    assert result.batch.startswith("one video (fixed profile") and "no result depends on the batch" in result.batch
    with torch.no_grad():
        batched = fixed(**batch).logits[0]
        single = fixed(**processor(videos=video, text="the red circle", audio=tone(440, 3.0))).logits[0]
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-6)


def test_a_long_video_runs_in_clips_of_ten_seconds(model, processor):
    """13 frames in memory (one a second) and 13 s of sound: two forwards, of 10 and 3 s, as two Ref-AVS clips."""
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (13, 32, 40, 3), dtype=np.uint8)
    soundtrack = np.concatenate([tone(200 + 50 * second, 1.0) for second in range(13)])
    with ForwardInputs(model) as forwards:
        result = video_segmenter(model, processor)(frames, "the dog", soundtrack=soundtrack, return_probabilities=True)
    assert [call["pixel_values"].shape[1] for call in forwards.calls] == [10, 3]
    assert [call["audio_input_features"].shape[1] for call in forwards.calls] == [10, 3]
    assert result.frame_sources == list(range(13)) and result.masks.shape == (13, 32, 40)
    with torch.no_grad():
        for first, last in ((0, 10), (10, 13)):
            inputs = processor(
                videos=frames[first:last], text="the dog", audio=soundtrack[first * 16000 : last * 16000]
            )
            logits = model(**inputs).logits[0]
            np.testing.assert_array_equal(result.probabilities[first:last], probabilities_at(logits, (32, 40)))

    with ForwardInputs(model) as forwards:
        whole = video_segmenter(model, processor, clip_seconds=None)(frames, "the dog", soundtrack=soundtrack)
    assert [call["pixel_values"].shape[1] for call in forwards.calls] == [13]
    assert "this one ran alone, one forward for all its sampled frames)" in whole.batch


def test_masks_are_handed_over_in_chunks_for_every_expression(model, processor, clip_path):
    segmenter = video_segmenter(model, processor, chunk_size=3)
    expressions = ["the red circle", OisaExpression(text="the blue square")]
    kept = segmenter(clip_path, expressions)
    chunks, progress = [], []
    streamed = segmenter(
        clip_path,
        expressions,
        on_masks=lambda start, frames, masks: chunks.append((start, frames, masks)),
        progress=lambda done, total: progress.append((done, total)),
        keep_masks=False,
    )
    assert [start for start, _, _ in chunks] == list(range(0, 20, 3))
    assert progress == [(min(start + 3, 20), 20) for start in range(0, 20, 3)]
    assert all(masks.shape == (2, len(frames), HEIGHT, WIDTH) for _, frames, masks in chunks)
    # the frames handed over are the video's own, every one of them, in order
    assert all(
        isinstance(frame, Image.Image) and frame.size == (WIDTH, HEIGHT) for _, frames, _ in chunks for frame in frames
    )
    assert sum(len(frames) for _, frames, _ in chunks) == 20
    for index, (first, second) in enumerate(zip(kept, streamed)):
        assert second.masks is None
        np.testing.assert_array_equal(np.concatenate([masks[index] for _, _, masks in chunks]), first.masks)
        assert first.mask_areas == second.mask_areas
        np.testing.assert_array_equal(first.presence_scores, second.presence_scores)
    assert kept[0].batch == kept[1].batch and len(kept) == 2


def test_frame_folder_without_sound_and_a_refavs_folder_with_its_audio(model, processor, tmp_path, caplog):
    frames = make_shapes_clip(num_frames=3, height=40, width=40, seed=3).frames
    folder = tmp_path / "clip" / "frames"
    folder.mkdir(parents=True)
    for index, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{index}.png")
    segmenter = video_segmenter(model, processor)
    with caplog.at_level("WARNING"), ForwardInputs(model) as forwards:
        result = segmenter(tmp_path / "clip" / "frames", "the green square")
    assert caplog.text.count("No soundtrack for the video") == 1
    assert result.masks.shape == (3, 40, 40) and result.frame_sources == [0, 1, 2]
    silent = forwards.calls[0]["audio_input_features"]

    import soundfile

    soundfile.write(tmp_path / "clip" / "audio.wav", tone(660, 3.0), 16000)
    with ForwardInputs(model) as forwards:
        segmenter(tmp_path / "clip" / "frames", "the green square")
    expected = processor(videos=tmp_path / "clip" / "frames", text="the green square")["audio_input_features"]
    assert torch.equal(forwards.calls[0]["audio_input_features"], expected)
    assert not torch.equal(expected, silent)


def test_a_soundtrack_shorter_than_the_video_is_filled_with_silence(model, processor, caplog):
    frames = np.zeros((3, 32, 32, 3), dtype=np.uint8)
    with caplog.at_level("WARNING"), ForwardInputs(model) as forwards:
        video_segmenter(model, processor)(frames, "the dog", soundtrack=tone(440, 1.5))
    assert "is 1.50 s, shorter than the 3 s EEMC sees; silence fills the rest" in caplog.text
    padded = np.concatenate([tone(440, 1.5), np.zeros(24000, dtype=np.float32)])
    expected = processor(videos=frames, text="the dog", audio=padded)["audio_input_features"]
    assert torch.equal(forwards.calls[0]["audio_input_features"], expected)


def test_pipeline_and_loading_by_name(checkpoints, model, processor, clip_path):
    expected = video_segmenter(model, processor)(clip_path, "the red circle")
    pipe = pipeline(TASK, model=str(checkpoints / "release"), dtype=torch.float32)
    output = pipe({"video": str(clip_path), "text": "the red circle"}, chunk_size=4)
    np.testing.assert_array_equal(output["masks"], expected.masks)
    np.testing.assert_array_equal(output["presence_scores"], expected.presence_scores)
    assert output["answer"] == "" and output["frame_sources"] == expected.frame_sources
    assert output["batch"] == expected.batch
    with pytest.raises(OisaInputError, match="max_new_tokens: not an option of EEMC's segmenter"):
        pipe({"video": str(clip_path), "text": "the red circle"}, max_new_tokens=3)
    with pytest.raises(OisaInputError, match="EEMC takes a text expression only; this one has speech"):
        pipe({"video": str(clip_path), "speech": tone(300, 1.0)})

    loaded = load_video_segmenter(checkpoints / "release", device="cpu", dtype="float32", clip_seconds=5)
    assert isinstance(loaded, RefAvsVideoSegmenter) and loaded.clip_seconds == 5
    np.testing.assert_array_equal(loaded(clip_path, "the red circle").masks, expected.masks)
    bfloat16 = RefAvsVideoSegmenter.from_pretrained(checkpoints / "release", device="cpu", dtype="bfloat16")
    assert bfloat16.model.dtype == torch.bfloat16
    result = bfloat16(clip_path, "the red circle")
    assert result.masks.shape == (20, HEIGHT, WIDTH) and np.isfinite(result.presence_scores).all()


def test_bad_input(model, processor, clip_path, checkpoints, tmp_path):
    segmenter = video_segmenter(model, processor)
    cases = [
        (OisaExpression(speech=tone(300, 1.0)), "EEMC takes a text expression only; this one has speech"),
        (OisaExpression(text="a", explain=True), "this one has explain"),
        (OisaExpression(text="a <audio>", sound=tone(300, 1.0)), "this one has a sound"),
        (OisaExpression(text="a", image=np.zeros((8, 8, 3), dtype=np.uint8)), "this one has an image"),
        (OisaExpression(), "this one has none"),
        (3, "An expression is a int; give strings or text-only OisaExpression objects"),
        ([], "No expression was given"),
        ("  ", "The text expression is empty"),
    ]
    for expression, message in cases:
        with pytest.raises(OisaInputError, match=message):
            segmenter(clip_path, expression)
    with pytest.raises(OisaInputError, match="missing.mp4 does not exist"):
        segmenter(tmp_path / "missing.mp4", "a")
    with pytest.raises(OisaInputError, match="OisaEncodedVideo, OISA's encoding; give EEMC the video itself"):
        segmenter(OisaEncodedVideo(None, [], [], torch.zeros(0)), "a")
    with pytest.raises(OisaInputError, match="frames are uint8"):
        segmenter(np.zeros((2, 8, 8, 3), dtype=np.float32), "a")
    with pytest.raises(OisaInputError, match="chunk_size must be at least 1, got 0"):
        video_segmenter(model, processor, chunk_size=0)
    with pytest.raises(OisaInputError, match="clip_seconds must be at least 1"):
        RefAvsVideoSegmenter(model, processor, clip_seconds=0)
    with pytest.raises(OisaInputError, match="max_new_tokens: not an option of EEMC's segmenter"):
        video_segmenter(model, processor, max_new_tokens=3)
    with pytest.raises(OisaInputError, match="The processor is a NoneType; EEMC takes a RefAvsProcessor"):
        RefAvsVideoSegmenter(model, None)
    with pytest.raises(OisaCheckpointError, match="a refavs_eemc model, not OISA .*video_segmenter"):
        OisaVideoSegmenter(model, processor)
    assert oisa_main(["tiny-random", str(tmp_path / "oisa")]) == 0
    oisa = AutoModel.from_pretrained(tmp_path / "oisa")
    with pytest.raises(OisaCheckpointError, match=r"a oisa model, not EEMC \(refavs_eemc\)"):
        RefAvsVideoSegmenter(oisa, processor)
    with pytest.raises(OisaCheckpointError, match="a Module model, neither OISA nor EEMC"):
        video_segmenter(torch.nn.Module(), processor)
