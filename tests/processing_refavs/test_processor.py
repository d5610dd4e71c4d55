"""
RefAvsProcessor: EEMC's inputs as the original Ref-AVS dataset prepares them (frames, tokens, VGGish examples, masks),
its masks back at the frames' size, its save / load round trip and its answers to bad input.
"""

import json

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor

import processing_oisa  # noqa: F401  (registers the processor)
from oisa_tiny.refavs_tokenizer import build_tiny_refavs_tokenizer
from processing_oisa.media import OisaInputError, write_video
from processing_oisa.refavs_eemc import (
    RefAvsProcessor,
    VggishFeatureExtractor,
    make_refavs_image_processor,
    one_frame_per_second,
    resize_masks_like_original,
    resize_uint8_like_cv2,
)

from ..conftest import SHARED


GOLDEN = SHARED / "reference" / "refavs_eemc" / "golden.npz"
# log(0 + 0.01): VGGish's log-mel of silence
SILENCE_LOG_MEL = np.float32(np.log(0.01))


@pytest.fixture(scope="module")
def processor() -> RefAvsProcessor:
    """A small processor: 64x64 frames, 32x32 labels, the tiny RoBERTa tokenizer."""
    return RefAvsProcessor(
        make_refavs_image_processor(64), VggishFeatureExtractor(), build_tiny_refavs_tokenizer(), mask_size=32
    )


def frames(count: int = 3, height: int = 40, width: int = 56, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def tone(seconds: float, frequency: float = 440.0) -> np.ndarray:
    time = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * frequency * time)).astype(np.float32)


@pytest.mark.reference
def test_pixel_values_equal_the_originals_bit_for_bit():
    golden = np.load(GOLDEN)
    original = RefAvsProcessor(make_refavs_image_processor(), VggishFeatureExtractor(), build_tiny_refavs_tokenizer())
    for video in range(4):
        # native sizes 240x320, 360x640, 384x384 (the resize is an identity) and 288x352
        outputs = original(videos=golden[f"inputs/frames_u8/v{video}"], text="the object", audio=tone(1.0))
        assert outputs["pixel_values"].shape == (1, 10, 3, 384, 384)
        np.testing.assert_array_equal(outputs["pixel_values"][0].numpy(), golden["inputs/pixel_values"][video])


@pytest.mark.reference
def test_token_layout_follows_the_originals_padding_and_truncation(processor):
    # the golden ids are fixed numbers, but their layout is the tokenizer's: <s> words </s> then pads, 25 in all,
    # truncation keeping </s> last (lengths with <s> and </s>: 9, 14, 6 and 31)
    golden = np.load(GOLDEN)
    tokenizer = processor.tokenizer
    for length, ids, mask in zip((9, 14, 6, 31), golden["inputs/token_ids"], golden["inputs/attention_mask"]):
        assert mask.sum() == min(length, 25)
        text = "#" * (length - 2)  # "#" is one token (never merged)
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == length - 2
        ours = processor(videos=frames(1), text=text, audio=tone(1.0))
        np.testing.assert_array_equal(ours["attention_mask"][0].numpy(), mask)
        for special in (0, 1, 2):
            np.testing.assert_array_equal(ours["input_ids"][0].numpy() == special, ids == special)


def test_tokens_are_padded_and_truncated_to_25(processor):
    outputs = processor(videos=[frames(1), frames(1)], text=["The sounding object.", "dog " * 40], audio=[None, None])
    ids, mask = outputs["input_ids"], outputs["attention_mask"]
    assert ids.shape == mask.shape == (2, 25)
    short = int(mask[0].sum())
    assert ids[0, 0] == 0 and ids[0, short - 1] == 2 and (ids[0, short:] == 1).all() and not mask[0, short:].any()
    assert mask[1].all() and ids[1, 0] == 0 and ids[1, -1] == 2 and (ids[1, 1:-1] > 2).all()


def test_shapes_of_a_batch_with_masks(processor):
    masks = np.zeros((3, 40, 56), dtype=bool)
    masks[:, 10:30, 20:40] = True
    outputs = processor(
        videos=[frames(3, seed=0), frames(3, 20, 30, seed=1)],
        text=["the red circle", "the dog"],
        audio=[tone(3.0), tone(3.5)],
        masks=[masks, np.zeros((3, 20, 30))],
    )
    assert outputs["pixel_values"].shape == (2, 3, 3, 64, 64) and outputs["pixel_values"].dtype == torch.float32
    assert outputs["input_ids"].shape == outputs["attention_mask"].shape == (2, 25)
    # 3 s and 3.5 s give three whole 0.96 s examples each
    assert outputs["audio_input_features"].shape == (2, 3, 96, 64)
    assert outputs["labels"].shape == (2, 3, 32, 32) and outputs["labels"].dtype == torch.float32
    np.testing.assert_array_equal(
        outputs["labels"][0].numpy(), np.stack([resize_masks_like_original(mask, 32) for mask in masks])
    )
    assert not outputs["labels"][1].any()
    assert set(outputs) == {"pixel_values", "input_ids", "attention_mask", "audio_input_features", "labels"}


def test_frames_in_memory_and_in_a_folder_agree(processor, tmp_path):
    clip = frames(4)
    from_array = processor(videos=clip, text="the dog", audio=tone(1.0))
    from_images = processor(videos=[Image.fromarray(frame) for frame in clip], text="the dog", audio=tone(1.0))
    folder = tmp_path / "frames"
    folder.mkdir()
    for index, frame in enumerate(clip):
        Image.fromarray(frame).save(folder / f"{index}.png")
    from_folder = processor(videos=folder, text="the dog", audio=tone(1.0))
    for outputs in (from_images, from_folder):
        np.testing.assert_array_equal(outputs["pixel_values"].numpy(), from_array["pixel_values"].numpy())


def test_a_refavs_frames_folder_takes_the_audio_beside_it(processor, tmp_path):
    folder = tmp_path / "media" / "clip" / "frames"
    folder.mkdir(parents=True)
    for index, frame in enumerate(frames(3)):
        Image.fromarray(frame).save(folder / f"{index}.jpg")
    soundfile.write(folder.parent / "audio.wav", tone(2.5, 300.0), 16000)
    beside = processor(videos=folder, text="the dog")
    given = processor(videos=folder, text="the dog", audio=folder.parent / "audio.wav")
    assert beside["audio_input_features"].shape == (1, 2, 96, 64)
    np.testing.assert_array_equal(beside["audio_input_features"].numpy(), given["audio_input_features"].numpy())


def test_a_video_file_gives_one_frame_a_second_and_its_soundtrack(processor, tmp_path):
    # 14 frames at 4 fps (3.5 s), frame i a flat gray of 18 * i: frames 0, 4 and 8 start the three whole seconds
    levels = 18 * np.arange(14)
    clip = np.broadcast_to(levels[:, None, None, None], (14, 32, 32, 3)).astype(np.uint8)
    path = tmp_path / "clip.mp4"
    write_video(path, clip, 4.0, audio=tone(3.5))
    outputs = processor(videos=path, text="the dog")
    assert outputs["pixel_values"].shape == (1, 3, 3, 64, 64)
    gray = outputs["pixel_values"][0, :, 0].mean((1, 2)).numpy() * 0.229 + 0.485  # back to [0, 1]
    np.testing.assert_allclose(gray * 255, levels[[0, 4, 8]], atol=3)
    # its own soundtrack, not silence
    assert outputs["audio_input_features"].shape == (1, 3, 96, 64)
    assert (outputs["audio_input_features"] > SILENCE_LOG_MEL + 1).any()


def test_a_video_without_audio_gets_the_log_mel_of_silence(processor, tmp_path, caplog):
    path = tmp_path / "silent.mp4"
    write_video(path, frames(8, 32, 32), 4.0)
    outputs = processor(videos=path, text="the dog")
    # 2 s of silence: two examples of log(0.01) everywhere, what VGGish's front end gives for zeros
    assert outputs["pixel_values"].shape[1] == 2
    np.testing.assert_array_equal(outputs["audio_input_features"].numpy(), np.full((1, 2, 96, 64), SILENCE_LOG_MEL))
    assert "No soundtrack for the video" in caplog.text


def test_one_frame_per_second():
    assert one_frame_per_second([index / 25 for index in range(250)], 10.0) == [25 * k for k in range(10)]
    # NTSC: 29.97 fps, second k starts at frame ceil(29.97 k)
    ntsc = [index * 1001 / 30000 for index in range(300)]
    assert one_frame_per_second(ntsc, 300 * 1001 / 30000) == [0, 30, 60, 90, 120, 150, 180, 210, 240, 270]
    # a stream starting late counts from its first frame; a partial last second is left out
    assert one_frame_per_second([2.0 + index / 4 for index in range(14)], 2.0 + 3.5) == [0, 4, 8]
    assert one_frame_per_second([0.0, 0.3, 0.6], 0.9) == [0]


def test_masks_resize_as_the_originals_opencv_recipe_by_hand():
    # one pixel in a 3x3 mask to 6x6: OpenCV's taps sit at -0.25, 0.25, 0.75, 1.25, 1.75, 2.25 source pixels, so the
    # centre pixel weighs 0, 1/4, 3/4, 3/4, 1/4, 0 along each axis; 255 x (1/4)^2 = 15.9, x 3/16 = 47.8, x 9/16 = 143.4
    mask = np.zeros((3, 3), dtype=np.uint8)
    mask[1, 1] = 255
    ring = [0, 16, 48, 48, 16, 0]
    expected = [[0] * 6, ring, [0, 48, 143, 143, 48, 0], [0, 48, 143, 143, 48, 0], ring, [0] * 6]
    np.testing.assert_array_equal(resize_uint8_like_cv2(mask, 6), expected)
    # the binary recipe keeps every pixel that rounds above 0: the 4x4 block (nearest would keep 2x2)
    np.testing.assert_array_equal(resize_masks_like_original(mask > 0, 6), np.array(expected) > 0)
    # an exact halving is OpenCV's 2x2 mean, (255 + 2) >> 2 = 64
    big = np.zeros((512, 512), dtype=np.uint8)
    big[100, 201] = 255
    halved = resize_uint8_like_cv2(big, 256)
    assert halved[50, 100] == 64 and np.count_nonzero(halved) == 1
    # 257 rows to 256: output row 0 sits 1/512 of a row into the foreground edge; OpenCV's 11-bit weight (4/2048)
    # times 255 rounds to 0, where a float bilinear resize gives 0.5 > 0
    edge = np.zeros((257, 257), dtype=bool)
    edge[1:] = True
    resized = resize_masks_like_original(edge)
    assert resized.shape == (256, 256) and not resized[0].any() and resized[1:].all()


def test_resize_equals_opencv_on_random_images():
    # cv2.resize(image, (size, size)) of OpenCV 4.14 on these images (a downscale and an upscale)
    rng = np.random.default_rng(0)
    down = rng.integers(0, 256, (9, 13), dtype=np.uint8)
    up = rng.integers(0, 256, (3, 5), dtype=np.uint8)
    np.testing.assert_array_equal(
        resize_uint8_like_cv2(down, 4),
        [[66, 220, 94, 69], [68, 135, 204, 216], [213, 18, 208, 40], [126, 85, 122, 159]],
    )
    np.testing.assert_array_equal(
        resize_uint8_like_cv2(up, 7),
        [
            [166, 93, 81, 185, 207, 155, 73],
            [170, 112, 96, 165, 181, 141, 81],
            [183, 169, 142, 104, 102, 102, 104],
            [196, 225, 189, 44, 23, 62, 127],
            [206, 174, 122, 50, 43, 100, 179],
            [216, 123, 55, 56, 63, 137, 231],
            [219, 106, 32, 58, 70, 149, 249],
        ],
    )


def test_post_process_masks(processor):
    # logits outer([1, -1], [1, -1]) resized bilinearly to 4x4: outer(u, u) with u = [1, 0.5, -0.5, -1]
    logits = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).expand(2, 3, 2, 2)
    u = np.array([1.0, 0.5, -0.5, -1.0])
    masks = processor.post_process_masks(logits, (4, 4))
    assert masks.shape == (2, 3, 4, 4) and masks.dtype == torch.bool
    np.testing.assert_array_equal(masks[1, 2].numpy(), np.outer(u, u) > 0)
    np.testing.assert_array_equal(
        processor.post_process_masks(logits, (4, 4), threshold=0.4)[0, 0], np.outer(u, u) > 0.4
    )
    # one size per video, from the model's output
    output = type("Output", (), {"logits": logits})()
    per_video = processor.post_process_masks(output, torch.tensor([[4, 4], [2, 6]]))
    assert [tuple(masks.shape) for masks in per_video] == [(3, 4, 4), (3, 2, 6)]
    np.testing.assert_array_equal(per_video[0].numpy(), masks[0].numpy())
    with pytest.raises(ValueError, match="One frame size per video"):
        processor.post_process_masks(logits, [(4, 4), (4, 4), (4, 4)])


def test_save_and_load_round_trip(processor, tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "refavs_eemc"}))
    processor.save_pretrained(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("the Auto class would pick the torchvision backend where torchvision is installed")

    # the processor builds the PIL-backend image processor itself
    monkeypatch.setattr(AutoImageProcessor, "from_pretrained", refuse)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is RefAvsProcessor
    assert type(loaded.image_processor) is type(processor.image_processor)
    assert (loaded.max_text_length, loaded.mask_size) == (25, 32)
    masks = np.zeros((3, 40, 56), dtype=bool)
    masks[:, 5:25, 9:33] = True
    inputs = {"videos": frames(3), "text": "The first object to make a sound.", "audio": tone(2.0), "masks": masks}
    expected, actual = processor(**inputs), loaded(**inputs)
    assert set(actual) == set(expected)
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def test_bad_input_is_named(processor, tmp_path):
    clip = frames(3)
    for kwargs, message in [
        ({"text": ""}, "The text expression is empty"),
        ({"text": "  \n"}, "The text expression is empty"),
        ({"text": 3}, "The text is a int"),
        ({"text": ["the dog", ""], "videos": [clip, clip], "audio": None}, "The text expression is empty"),
        ({"text": ["the dog", "the cat"], "videos": [clip, clip]}, "2 texts but `audio` is not a list of 2"),
        ({"text": ["the dog", "the cat"]}, "2 texts but 3 videos"),
        ({"videos": None}, "The video is a NoneType"),
        ({"videos": 3}, "The video is a int"),
        ({"videos": clip.astype(np.float32)}, r"Frame 0 of the video is float32 \(40, 56, 3\)"),
        ({"videos": clip[0]}, r"The video array has shape \(40, 56, 3\)"),
        ({"videos": []}, "The video has no frames"),
        ({"videos": [clip[0], clip[1][:20]]}, "Frame 1 of the video is 56x20 but frame 0 is 56x40"),
        ({"videos": tmp_path / "missing.mp4"}, "missing.mp4 does not exist"),
        ({"audio": (tone(1.0) * 32767).astype(np.int16)}, "integer samples .*divide by 32768"),
        ({"audio": np.full(16000, np.nan, dtype=np.float32)}, "non-finite samples"),
        ({"audio": tone(0.5)}, "The soundtrack of the video: The waveform .*VGGish"),
        ({"audio": tmp_path / "missing.wav"}, "Soundtrack .*missing.wav does not exist"),
        ({"masks": np.zeros((2, 40, 56))}, "There are 2 masks for the 3 frames of the video"),
        ({"masks": np.zeros((40, 56))}, r"The masks of the video are float64 \(40, 56\)"),
        ({"masks": np.full((3, 4, 4), np.nan)}, "non-finite"),
        ({"masks": "mask.png"}, "The masks of the video are str"),
    ]:
        arguments = {"videos": clip, "text": "the dog", "audio": tone(1.0), **kwargs}
        with pytest.raises(OisaInputError, match=message):
            processor(**arguments)
    with pytest.raises(OisaInputError, match="The videos of the batch have 3, 2 frames"):
        processor(videos=[clip, clip[:2]], text=["the dog", "the cat"], audio=[tone(1.0), tone(1.0)])
    with pytest.raises(OisaInputError, match="The videos of the batch have 1, 2 0.96 s soundtrack examples"):
        processor(videos=[clip, clip], text=["the dog", "the cat"], audio=[tone(1.0), tone(2.0)])
    with pytest.raises(OisaInputError, match="Masks are given for some videos of the batch only"):
        processor(videos=[clip, clip], text=["the dog", "the cat"], masks=[np.zeros((3, 4, 4)), None])
