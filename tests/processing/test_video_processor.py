import numpy as np
import pytest
import torch
from PIL import Image

from processing_oisa import OisaVideoProcessor, VideoReader, write_video
from processing_oisa.data.synthetic_clips import make_shapes_clip
from processing_oisa.processing_oisa import make_image_processor, make_video_processor
from processing_oisa.prompts import frame_token_modes


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)[:, None, None]
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)[:, None, None]


@pytest.fixture(scope="module")
def frames():
    return np.random.default_rng(0).integers(0, 256, (5, 40, 56, 3), dtype=np.uint8)


def test_frame_transform_is_the_release_one(frames):
    """Every frame: PIL bicubic to a square, / 255, ImageNet-normalised, bit for bit the image processor's."""
    pixels = make_video_processor(224)(frames, return_tensors="pt")["pixel_values_videos"]
    assert pixels.shape == (1, 5, 3, 224, 224) and pixels.dtype == torch.float32
    before = make_image_processor(224)(images=[Image.fromarray(frame) for frame in frames], return_tensors="pt")
    assert torch.equal(pixels[0], before["pixel_values"])
    by_hand = [
        (np.asarray(Image.fromarray(frame).resize((224, 224), Image.Resampling.BICUBIC), dtype=np.float32)
         .transpose(2, 0, 1) / 255 - IMAGENET_MEAN) / IMAGENET_STD
        for frame in frames
    ]
    np.testing.assert_allclose(pixels[0].numpy(), np.stack(by_hand), rtol=0, atol=1e-5)


def test_samplers_by_hand():
    release = make_video_processor(224, "release")
    linspace = make_video_processor(224, "linspace")
    # 10 frames, 4 shown, 2 dense. release: first, last and 1 + i * ((10 - 2) // 2) -> frames 0, 1, 5, 9, dense the
    # first and last of those; linspace: round(i * 9 / 3) -> frames 0, 3, 6, 9, dense 0 and 9
    assert release.frame_token_modes(10, 4, 2) == [2, 1, 0, 0, 0, 1, 0, 0, 0, 2]
    assert linspace.frame_token_modes(10, 4, 2) == [2, 0, 0, 1, 0, 0, 1, 0, 0, 2]
    # the release defaults, 32 shown and 4 dense: of 100 frames 0, 99 and 1 + 3 * i are shown, and of those 32 the
    # ones at 0, 1, 16 and 31 are dense: frames 0, 1, 46 and 99
    modes = release.frame_token_modes(100)
    assert sum(mode > 0 for mode in modes) == 32 and [i for i, mode in enumerate(modes) if mode == 2] == [0, 1, 46, 99]
    assert release.frame_token_modes(3) == [2, 2, 2]
    for num_frames in (1, 2, 7, 33, 64):
        for sampler, processor in (("release", release), ("linspace", linspace)):
            assert processor.frame_token_modes(num_frames, 8, 3) == frame_token_modes(num_frames, 8, 3, sampler)
    with pytest.raises(ValueError, match="frame_sampler"):
        make_video_processor(224, "uniform")
    with pytest.raises(ValueError, match="frame_sampler"):
        release.frame_token_modes(10, frame_sampler="uniform")


def test_call_samples_frames_unless_told_not_to(frames):
    processor = make_video_processor(64, "linspace")
    assert processor(frames)["frame_token_modes"] == [frame_token_modes(5, 32, 4, "linspace")]
    assert processor(frames, max_visible_frames=3, num_dense_frames=1, frame_sampler="release")[
        "frame_token_modes"] == [[2, 1, 0, 0, 1]]
    assert "frame_token_modes" not in processor(frames, do_sample_frames=False)


def test_video_inputs(frames, tmp_path):
    """A frame folder, an array, a list of PIL images and a list of arrays are one video; a list of videos a batch."""
    processor = make_video_processor(64)
    for index, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / f"{index}.png")
    expected = processor(frames, return_tensors="pt")["pixel_values_videos"]
    for video in (str(tmp_path), tmp_path, [Image.fromarray(frame) for frame in frames], list(frames)):
        assert torch.equal(processor(video, return_tensors="pt")["pixel_values_videos"], expected)
    clip = make_shapes_clip(num_frames=4, height=32, width=48, seed=1)
    write_video(tmp_path / "clip.mp4", clip.frames, clip.fps)
    decoded = VideoReader(tmp_path / "clip.mp4").read(range(4))
    from_file = processor(tmp_path / "clip.mp4", return_tensors="pt")["pixel_values_videos"]
    assert torch.equal(from_file, processor(decoded, return_tensors="pt")["pixel_values_videos"])
    batch = processor([frames, frames[:2], tmp_path])
    assert [video.shape for video in batch["pixel_values_videos"]] == [(5, 3, 64, 64), (2, 3, 64, 64), (5, 3, 64, 64)]
    assert np.array_equal(batch["pixel_values_videos"][2], expected[0].numpy())
    with pytest.raises(ValueError, match="frames, height, width, 3"):
        processor(frames[0, :, :, 0])
    with pytest.raises(TypeError, match="A video is"):
        processor([[1, 2, 3]])


def test_save_and_load(frames, tmp_path):
    processor = OisaVideoProcessor(size={"height": 96, "width": 96}, frame_sampler="linspace", max_visible_frames=4,
                                   num_dense_frames=2)
    processor.save_pretrained(tmp_path)
    loaded = OisaVideoProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    assert (loaded.frame_sampler, loaded.max_visible_frames, loaded.num_dense_frames) == ("linspace", 4, 2)
    first, second = processor(frames, return_tensors="pt"), loaded(frames, return_tensors="pt")
    assert torch.equal(first["pixel_values_videos"], second["pixel_values_videos"])
    assert torch.equal(first["frame_token_modes"], second["frame_token_modes"])
