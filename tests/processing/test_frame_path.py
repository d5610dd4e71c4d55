"""
The frame path from a video to pixel values (decoder threads, RGB conversion of the frames used only, frames resized
in parallel, rescaling and normalisation by table) against the release recipe written out plainly here: every frame
decoded on one thread and converted by PyAV's `to_image()`, then frame by frame PIL bicubic to the square size, scaled
by 1/255 in float64 and cast to float32, ImageNet-normalised in float32. Pixel values must be equal bit for bit.
"""

from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

from oisa_cli.main import main as oisa_main
from processing_oisa import OisaExpression, OisaVideoSegmenter, VideoReader
from processing_oisa.processing_oisa import make_video_processor

from .test_bad_media import faststart_copy


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
SAMPLERS = {"release": "release", "fixed": "linspace"}  # the profiles' frame samplers; their transform is one

# name: (height, width, frames, frames per second, codec, pixel format, container suffix)
CLIPS = {
    "odd": (37, 53, 7, 24, "libx264", "yuv444p", ".mkv"),
    "portrait": (160, 90, 12, Fraction(30000, 1001), "libx264", "yuv420p", ".mp4"),
    "720p": (720, 1280, 4, 25, "libx264", "yuv420p", ".mp4"),
    "1080p": (1080, 1920, 3, 50, "libx264", "yuv420p", ".mp4"),
    "mpeg4": (64, 96, 20, 10, "mpeg4", "yuv420p", ".avi"),
    "vp9": (48, 64, 9, 5, "libvpx-vp9", "yuv420p", ".webm"),
}


def textured_frames(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients moving over noise: every bicubic tap and every value of the table matter."""
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:height, 0:width]
    frames = []
    for index in range(num_frames):
        phase = 2 * np.pi * index / max(num_frames, 2)
        smooth = np.stack(
            [np.sin(rows / 7 + phase + channel) + np.cos(columns / 11 - phase * channel) for channel in range(3)], -1
        )
        frames.append(np.clip(127.5 + 60 * smooth + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8))
    return np.stack(frames)


def encode(path, frames: np.ndarray, fps, codec: str, pixel_format: str) -> None:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pixel_format
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def reference_frames(path) -> list[Image.Image]:
    """Every frame, one decoder thread, through `to_image()`, up to the first decoding error (where a file breaks off)."""
    frames = []
    with av.open(str(path)) as container:
        try:
            for frame in container.decode(container.streams.video[0]):
                frames.append(frame.to_image())
        except av.error.FFmpegError:
            pass
    return frames


def reference_rgb(frame: Image.Image) -> Image.Image:
    """The transformers PIL backend's RGB conversion: a frame with transparency is composited onto white."""
    if "A" in frame.getbands() or "transparency" in frame.info:
        white = Image.new("RGBA", frame.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, frame.convert("RGBA")).convert("RGB")
    return frame.convert("RGB")


def reference_pixels(frames: list[Image.Image], size: int) -> torch.Tensor:
    """The release transform, one frame at a time: (T, 3, size, size) float32."""
    transformed = []
    for frame in frames:
        resized = np.asarray(reference_rgb(frame).resize((size, size), Image.Resampling.BICUBIC))
        scaled = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
        transformed.append(((scaled - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(transformed))


def same_images(first: list[Image.Image], second: list[Image.Image]) -> bool:
    return len(first) == len(second) and all(
        a.mode == b.mode and np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, second)
    )


@pytest.fixture
def torch_threads():
    """Sets torch's thread count (the transform's threads) for one test."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("clips")
    paths = {}
    for seed, (name, (height, width, count, fps, codec, pixel_format, suffix)) in enumerate(CLIPS.items()):
        paths[name] = folder / f"{name}{suffix}"
        encode(paths[name], textured_frames(count, height, width, seed), fps, codec, pixel_format)
    return paths


@pytest.mark.parametrize("name", list(CLIPS))
def test_decoded_frames_are_those_of_one_thread_and_to_image(clips, name):
    path = clips[name]
    expected = reference_frames(path)
    height, width, count = CLIPS[name][:3]
    reader = VideoReader(path)
    assert (reader.info.num_frames, reader.info.height, reader.info.width) == (count, height, width)
    assert [index for index, _ in reader.iter_frames()] == list(range(count))
    assert same_images([frame for _, frame in reader.iter_frames()], expected)
    indices = [count - 1, 0, count // 2, count - 1]
    assert same_images(reader.read(indices), [expected[index] for index in indices])


@pytest.mark.parametrize("profile", list(SAMPLERS))
@pytest.mark.parametrize("name", list(CLIPS))
def test_pixel_values_of_video_files_are_the_release_recipe(clips, name, profile, torch_threads):
    size = 448 if CLIPS[name][0] >= 720 else 96
    processor = make_video_processor(size, SAMPLERS[profile])
    expected = reference_pixels(reference_frames(clips[name]), size)
    for threads in (1, 3):
        torch_threads(threads)
        pixels = processor(clips[name], return_tensors="pt")["pixel_values_videos"]
        assert pixels.shape == (1, *expected.shape) and torch.equal(pixels[0], expected)


def test_in_memory_videos_are_the_release_recipe(torch_threads):
    frames = textured_frames(6, 41, 67, seed=7)
    processor = make_video_processor(64)
    expected = reference_pixels([Image.fromarray(frame) for frame in frames], 64)
    for threads in (1, 2):
        torch_threads(threads)
        for video in (frames, list(frames), [Image.fromarray(frame) for frame in frames]):
            assert torch.equal(processor(video, return_tensors="pt")["pixel_values_videos"][0], expected)
        # a batch of two videos, and no tensors asked for: one float32 array per video
        batch = processor([frames, frames[:2]])["pixel_values_videos"]
        assert [video.dtype for video in batch] == [np.float32, np.float32]
        assert np.array_equal(batch[0], expected.numpy()) and np.array_equal(batch[1], expected[:2].numpy())
    # frames with transparency, grey and palette frames, as PIL images
    rgba = Image.fromarray(np.dstack([frames[0], np.linspace(0, 255, 41 * 67).reshape(41, 67).astype(np.uint8)]))
    keyed = Image.fromarray(frames[1])
    keyed.info["transparency"] = tuple(int(value) for value in frames[1][0, 0])
    grey, palette = Image.fromarray(frames[2]).convert("L"), Image.fromarray(frames[3]).convert("P")
    mixed = [rgba, keyed, grey, palette]
    expected = reference_pixels(mixed, 64)
    assert not torch.equal(expected[0], reference_pixels([Image.fromarray(frames[0])], 64)[0])
    assert torch.equal(processor(mixed, return_tensors="pt")["pixel_values_videos"][0], expected)


def test_other_transform_settings_are_the_image_processors(torch_threads):
    """The table and the PIL resize follow the processor's settings as the transformers PIL backend does."""
    frames = [Image.fromarray(frame) for frame in textured_frames(3, 30, 50, seed=3)]
    processor = make_video_processor(32)
    torch_threads(2)
    for settings in (
        {"size": {"height": 24, "width": 40}},
        {"do_rescale": False},
        {"rescale_factor": 0.5, "image_mean": [0.1, 0.2, 0.3], "image_std": 0.7},
        {"do_normalize": False},
        {"resample": Image.Resampling.NEAREST},
        {"do_center_crop": True, "crop_size": {"height": 40, "width": 20}},
        {"do_resize": False},
    ):
        settings = {"do_sample_frames": False, **settings}
        pixels = processor(frames, return_tensors="np", **settings)["pixel_values_videos"][0]
        kwargs = processor._merge_and_standardize_kwargs(**settings)
        by_image = np.stack(
            processor._preprocess(
                [processor.process_image(frame, do_convert_rgb=True) for frame in frames],
                **{**kwargs, "return_tensors": None},
            )["pixel_values"]
        )
        assert pixels.dtype == by_image.dtype and np.array_equal(pixels, by_image), settings
    untouched = processor(frames, return_tensors="np", do_rescale=False, do_normalize=False)["pixel_values_videos"][0]
    assert untouched.dtype == np.uint8
    assert np.array_equal(
        untouched[1], np.asarray(frames[1].resize((32, 32), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    )
    with pytest.raises(ValueError, match="height and a width"):
        processor(frames, size={"shortest_edge": 20})


def test_a_file_that_breaks_off_gives_the_frames_before_the_break(tmp_path):
    encode(tmp_path / "clip.mp4", textured_frames(30, 64, 96, seed=5), 10, "libx264", "yuv420p")
    faststart_copy(tmp_path / "clip.mp4", tmp_path / "indexed.mp4")
    data = (tmp_path / "indexed.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: int(len(data) * 0.6)])
    expected = reference_frames(tmp_path / "cut.mp4")
    reader = VideoReader(tmp_path / "cut.mp4")
    assert 0 < reader.info.num_frames == len(expected) < 30
    assert same_images([frame for _, frame in reader.iter_frames()], expected)
    processor = make_video_processor(96)
    pixels = processor(tmp_path / "cut.mp4", return_tensors="pt")["pixel_values_videos"][0]
    assert torch.equal(pixels, reference_pixels(expected, 96))


@pytest.fixture(scope="module")
def seg_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    oisa_main(["tiny-random", str(folder)])
    return folder


@pytest.mark.parametrize("profile", list(SAMPLERS))
def test_the_segmenter_encodes_the_release_recipe_of_every_frame(seg_checkpoint, clips, profile, monkeypatch):
    """What the model is given, cached (one pass) and streamed (the visible frames, then every frame by chunks)."""
    model = AutoModel.from_pretrained(seg_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        model.lm_head.weight[model.config.seg_token_id] += 50.0  # answers [SEG], so the mask pass runs
    processor = AutoProcessor.from_pretrained(seg_checkpoint)
    processor.video_processor.frame_sampler = SAMPLERS[profile]
    processor.video_processor.max_visible_frames = 4
    path = clips["vp9"]
    frames = reference_frames(path)
    expected = reference_pixels(frames, model.config.image_size)
    modes = processor.frame_token_modes(len(frames))
    visible = [index for index, mode in enumerate(modes) if mode > 0]
    assert len(visible) < len(frames)  # the streamed pass decodes the visible frames on their own
    given = []
    for method in ("get_image_features", "get_vision_embeddings"):
        original = getattr(model, method)
        monkeypatch.setattr(
            model,
            method,
            lambda pixels, *args, _original=original, **kwargs: (
                given.append(pixels) or _original(pixels, *args, **kwargs)
            ),
        )
    expression = OisaExpression(text="the red circle")
    result = OisaVideoSegmenter(model, processor, chunk_size=4, max_new_tokens=2, max_cached_frames=16)(
        path, expression
    )
    assert result.has_seg and len(given) == 1 and torch.equal(given[0], expected)
    given.clear()
    result = OisaVideoSegmenter(model, processor, chunk_size=4, max_new_tokens=2, max_cached_frames=4)(path, expression)
    assert result.has_seg and [len(pixels) for pixels in given] == [len(visible), 4, 4, 1]
    assert torch.equal(given[0], expected[visible]) and torch.equal(torch.cat(given[1:]), expected)
