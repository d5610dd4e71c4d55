"""
Bad input through the Python API (issue 35's corpus, API part): the types the docstrings promise work, the rest are
refused with one `OisaInputError` (or `OisaCheckpointError` for a model) naming the problem; never garbage.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, BertConfig, BertModel

import processing_oisa  # noqa: F401  (registers the processor)
from modeling_oisa import OisaCheckpointError
from oisa_cli.main import main as oisa_main
from processing_oisa import OisaExpression, OisaInputError, OisaVideoSegmenter, write_video
from processing_oisa.data.synthetic_clips import make_shapes_clip, tone


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    assert oisa_main(["tiny-random", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def segmenter(checkpoint):
    """The tiny random model with its head pushed to answer `[SEG]`, so that masks are produced."""
    model = AutoModel.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        model.lm_head.weight[model.config.seg_token_id] += 50.0
    return OisaVideoSegmenter(model, AutoProcessor.from_pretrained(checkpoint), chunk_size=3, max_new_tokens=4)


@pytest.fixture(scope="module")
def clip():
    return make_shapes_clip(num_frames=7, height=40, width=56, fps=5.0, seed=4)


def test_an_empty_text_expression_is_refused():
    for text in ("", "   ", "\n\t"):
        with pytest.raises(OisaInputError, match="The text expression is empty"):
            OisaExpression(text=text)


def test_bad_waveforms_and_images_are_named(segmenter, clip):
    processor = segmenter.processor
    speech = (tone(440.0, 1.0) * 32767).astype(np.int16)
    with pytest.raises(OisaInputError, match="integer samples .*divide by 32768"):
        processor.load_audio(speech, "Speech")
    noisy = tone(440.0, 1.0).copy()
    noisy[100] = np.nan
    with pytest.raises(OisaInputError, match="non-finite samples"):
        processor.load_audio(noisy, "Speech")
    with pytest.raises(OisaInputError, match=r"float32 \(8, 8, 3\); give uint8"):
        processor.load_image(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(OisaInputError, match="0x5 pixels"):
        processor.load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(OisaInputError, match="is a int"):
        processor.load_image(3)
    with pytest.raises(OisaInputError, match="integer samples"):
        segmenter(clip.frames, OisaExpression(text="the red circle"), soundtrack=(clip.soundtrack * 1000).astype(int))


def test_frames_in_memory_are_a_video(segmenter, clip, tmp_path):
    expression = OisaExpression(text="the red circle")
    from_array = segmenter(clip.frames, expression)
    from_images = segmenter([Image.fromarray(frame) for frame in clip.frames], expression)
    assert from_array.masks.shape == (7, 40, 56) and from_array.has_seg
    np.testing.assert_array_equal(from_array.masks, from_images.masks)
    # the same frames from a lossless folder give the same masks
    folder = tmp_path / "frames"
    folder.mkdir()
    for index, frame in enumerate(clip.frames):
        Image.fromarray(frame).save(folder / f"{index:03d}.png")
    np.testing.assert_array_equal(from_array.masks, segmenter(folder, expression).masks)


def test_what_is_not_a_video_is_refused(segmenter, clip):
    expression = OisaExpression(text="the red circle")
    for video, message in [
        (None, "The video is a NoneType"),
        (3, "The video is a int"),
        (clip.frames.astype(np.float32), r"Frame 0 of the video is float32 \(40, 56, 3\)"),
        ([], "The video has no frames"),
        ([clip.frames[0], clip.frames[1][:20]], "Frame 1 of the video is 56x20 but frame 0 is 56x40"),
    ]:
        with pytest.raises(OisaInputError, match=message):
            segmenter(video, expression)


def test_a_model_that_is_not_oisa_is_refused(segmenter):
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37))
    with pytest.raises(OisaCheckpointError, match="a bert model, not OISA"):
        OisaVideoSegmenter(bert, segmenter.processor)


def test_a_text_longer_than_the_model_takes_is_refused(segmenter, clip):
    positions = segmenter.model.config.text_config.max_position_embeddings
    with pytest.raises(OisaInputError, match=f"passes the {positions} positions the model takes"):
        segmenter(clip.frames, OisaExpression(text="circle " * positions))


def test_masks_taken_chunk_by_chunk_equal_the_kept_ones(segmenter, clip, tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, clip.frames, clip.fps, clip.soundtrack)
    expressions = [OisaExpression(text="the red circle"), OisaExpression(text="the blue square")]
    kept = segmenter(path, expressions)
    chunks = []
    streamed = segmenter(
        path, expressions, keep_masks=False, on_masks=lambda start, frames, masks: chunks.append((start, frames, masks))
    )
    assert [start for start, _, _ in chunks] == [0, 3, 6]
    assert all(len(frames) == masks.shape[1] for _, frames, masks in chunks)
    for index, (expected, actual) in enumerate(zip(kept, streamed)):
        assert actual.masks is None
        np.testing.assert_array_equal(np.concatenate([masks[index] for _, _, masks in chunks]), expected.masks)
        assert actual.mask_areas == [int(mask.sum()) for mask in expected.masks]
        np.testing.assert_array_equal(actual.presence_scores, expected.presence_scores)
