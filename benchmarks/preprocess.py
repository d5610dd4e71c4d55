"""Frames per second of decoding and transforming a 720p clip for 448x448 against the implementation before issue 39,
the audio resampler's cost, and the tiny model's end-to-end time.

Frames: a 10 s 1280x720 25 fps H.264 clip (a textured, panning background with film grain, about 5 Mbit/s) is
generated with PyAV, then two paths from the file to pixel values are timed, each by the `baseline_*` functions below
(copies of the code before issue 39: `to_image()` per decoded frame, one decoder thread, every frame converted, the
transformers PIL backend per frame) and by the package, alternating, in the same process; their pixel values are
checked equal bit for bit:

- processor: `OisaVideoProcessor(path)`: the probe, then every frame decoded, resized and normalised;
- segmenter: what `OisaVideoSegmenter` does with a video longer than `max_cached_frames`: the probe, the LLM's visible
  frames (release sampler, 32 of them) decoded and transformed, then every frame again in chunks of 8.

The baseline of the resampler's ratio is the polyphase resampler it replaced (scipy's resample_poly), on the same 10 s
48 kHz clip.

    python benchmarks/preprocess.py [--repeats 3] [--frames-only] [--video FILE]
"""

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image
from scipy.signal import resample_poly
from transformers import AutoModel, AutoProcessor, BatchFeature, PilBackend

from oisa_cli.main import main as oisa_main
from processing_oisa import OisaExpression, OisaVideoProcessor, OisaVideoSegmenter, VideoReader
from processing_oisa.media import resample_audio
from processing_oisa.processing_oisa import make_video_processor


CHUNK_SIZE = 8  # OisaVideoSegmenter's default


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def timed_with_cpu(function) -> tuple[float, float]:
    """Wall seconds and CPU seconds of this process (all its threads) of one call."""
    start, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - start, time.process_time() - cpu


def write_clip(path: Path, seconds: float = 10.0, fps: int = 25, height: int = 720, width: int = 1280) -> None:
    """A textured background panning 4 pixels a frame, with grain and a red square, as H.264 at CRF 18."""
    rng = np.random.default_rng(0)
    num_frames = int(seconds * fps)
    coarse = rng.integers(0, 256, (height // 8 + 1, (width + 4 * num_frames) // 8 + 1, 3), dtype=np.uint8)
    texture = np.asarray(
        Image.fromarray(coarse).resize((coarse.shape[1] * 8, coarse.shape[0] * 8), Image.Resampling.BICUBIC)
    ).astype(np.int16)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
        stream.options = {"crf": "18"}
        for index in range(num_frames):
            frame = texture[:height, 4 * index : 4 * index + width] + rng.integers(-4, 5, (height, width, 1))
            top, left = (
                height // 3 + int(height / 4 * np.sin(index / 10)),
                width // 3 + int(width / 4 * np.cos(index / 13)),
            )
            frame[top : top + height // 6, left : left + width // 8] = (230, 40, 40)
            picture = av.VideoFrame.from_ndarray(np.clip(frame, 0, 255).astype(np.uint8), format="rgb24")
            container.mux(stream.encode(picture))
        container.mux(stream.encode())


# --- the frame path before issue 39 (processing/media.py and processing/video_processing_oisa.py at 7d0ede3) ---


def baseline_probe(path: Path) -> int:
    """`VideoReader._probe` of a file: every frame decoded (one thread) for the frame count and times."""
    with av.open(str(path)) as container:
        timestamps = []
        for frame in container.decode(container.streams.video[0]):
            timestamps.append(float(frame.time) if frame.time is not None else len(timestamps))
    return len(timestamps)


def baseline_iter_frames(path: Path, num_frames: int) -> Iterator[tuple[int, Image.Image]]:
    """`VideoReader.iter_frames` of a file: every frame through `to_image()`."""
    with av.open(str(path)) as container:
        frames = container.decode(container.streams.video[0])
        for index in range(num_frames):
            yield index, next(frames).to_image()


def baseline_read(path: Path, num_frames: int, indices: Sequence[int]) -> list[Image.Image]:
    """`VideoReader.read` of a file: every frame up to the last asked for converted to RGB."""
    wanted, found = set(indices), {}
    last = max(wanted, default=-1)
    for index, frame in baseline_iter_frames(path, num_frames):
        if index in wanted:
            found[index] = frame
        if index >= last:
            break
    return [found[index] for index in indices]


def baseline_transform(processor: OisaVideoProcessor, frames: list[Image.Image], **kwargs) -> np.ndarray:
    """`OisaVideoProcessor._transform`: each frame through the transformers PIL backend on its own."""
    images = [
        processor.process_image(
            frame, do_convert_rgb=kwargs["do_convert_rgb"], input_data_format=kwargs["input_data_format"]
        )
        for frame in frames
    ]
    size = kwargs["size"]
    if not images:
        return np.zeros((0, 3, size.height, size.width), dtype=np.float32)
    return np.stack(PilBackend._preprocess(processor, images, **{**kwargs, "return_tensors": None})["pixel_values"])


def baseline_pixel_values(processor: OisaVideoProcessor, frames: list[Image.Image]) -> torch.Tensor:
    """`processor(frames, do_sample_frames=False, return_tensors="pt")["pixel_values_videos"][0]` as it was."""
    kwargs = processor._merge_and_standardize_kwargs(do_sample_frames=False, return_tensors="pt")
    data = {"pixel_values_videos": [baseline_transform(processor, frames, **kwargs)]}
    return BatchFeature(data, tensor_type="pt")["pixel_values_videos"][0]


def baseline_processor_path(processor: OisaVideoProcessor, path: Path) -> torch.Tensor:
    frames = [frame for _, frame in baseline_iter_frames(path, baseline_probe(path))]
    return baseline_pixel_values(processor, frames)


def baseline_segmenter_path(processor: OisaVideoProcessor, path: Path) -> list[torch.Tensor]:
    num_frames = baseline_probe(path)
    return segmenter_pixel_values(
        processor,
        num_frames,
        lambda indices: baseline_read(path, num_frames, indices),
        baseline_iter_frames(path, num_frames),
        lambda frames: baseline_pixel_values(processor, frames),
    )


# --- the package's frame path ---


def pixel_values(processor: OisaVideoProcessor, frames: list[Image.Image]) -> torch.Tensor:
    """`OisaVideoSegmenter._pixel_values` without the device move."""
    return processor(frames, do_sample_frames=False, return_tensors="pt")["pixel_values_videos"][0]


def processor_path(processor: OisaVideoProcessor, path: Path) -> torch.Tensor:
    return processor(path, do_sample_frames=False, return_tensors="pt")["pixel_values_videos"][0]


def segmenter_path(processor: OisaVideoProcessor, path: Path) -> list[torch.Tensor]:
    reader = VideoReader(path)
    return segmenter_pixel_values(
        processor,
        reader.info.num_frames,
        reader.read,
        reader.iter_frames(),
        lambda frames: pixel_values(processor, frames),
    )


def segmenter_pixel_values(
    processor: OisaVideoProcessor,
    num_frames: int,
    read: Callable[[Sequence[int]], list[Image.Image]],
    frames: Iterator[tuple[int, Image.Image]],
    transform: Callable[[list[Image.Image]], torch.Tensor],
) -> list[torch.Tensor]:
    """The pixel values the segmenter computes for a long video: the visible frames', then each chunk's."""
    visible = [index for index, mode in enumerate(processor.frame_token_modes(num_frames)) if mode > 0]
    outputs, chunk = [transform(read(visible))], []
    for index, frame in frames:
        chunk.append(frame)
        if len(chunk) == CHUNK_SIZE or index == num_frames - 1:
            outputs.append(transform(chunk))
            chunk = []
    return outputs


def frame_paths(video: Path, repeats: int) -> None:
    processor = make_video_processor(448, "release")
    info = VideoReader(video).info
    num_frames = info.num_frames
    print(
        f"{video.name}: {num_frames} frames of {info.width}x{info.height} in {info.duration:.1f} s, "
        f"{video.stat().st_size / 2**20:.1f} MiB, to 448x448; {torch.get_num_threads()} torch threads; "
        f"median (min-max) of {repeats} runs"
    )
    print(
        f"{'path':10s} {'before frames/s':>18s} {'now frames/s':>18s} {'speed-up':>15s} {'CPU ms/frame before, now':>26s}"
    )
    paths = [
        ("processor", baseline_processor_path, processor_path),
        ("segmenter", baseline_segmenter_path, segmenter_path),
    ]
    for name, before, now in paths:
        expected, result = before(processor, video), now(processor, video)
        pairs = zip(expected, result) if isinstance(expected, list) else [(expected, result)]
        if not all(torch.equal(first, second) for first, second in pairs):
            raise AssertionError(f"{name}: the pixel values differ from the baseline's")
        del expected, result
        before_times, now_times = [], []
        for _ in range(repeats):  # alternating, so that a busy moment weighs on both
            before_times.append(timed_with_cpu(lambda: before(processor, video)))
            now_times.append(timed_with_cpu(lambda: now(processor, video)))
        rates = [[num_frames / wall for wall, _ in times] for times in (before_times, now_times)]
        ratios = [now_rate / before_rate for before_rate, now_rate in zip(*rates)]
        cpu = [statistics.median(1000 * cpu / num_frames for _, cpu in times) for times in (before_times, now_times)]
        print(
            f"{name:10s} {spread(rates[0]):>18s} {spread(rates[1]):>18s} {spread(ratios):>15s} "
            f"{cpu[0]:12.1f}, {cpu[1]:.1f}"
        )


def spread(values: list[float]) -> str:
    """Median (min-max)."""
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def resampler_seconds(repeats: int = 7) -> tuple[float, float]:
    """Median seconds of soxr HQ (ours, as librosa.load) and of resample_poly (before) on 10 s of 48 kHz audio."""
    rate, seconds = 48000, 10.0
    t = np.arange(int(seconds * rate)) / rate
    chirp = 0.4 * np.sin(2 * np.pi * (100 * t + (rate / 2 - 100) / (2 * seconds) * t**2))
    waveform = (chirp + 0.05 * np.random.default_rng(0).standard_normal(t.size)).astype(np.float32)
    soxr_times, poly_times = [], []
    for _ in range(repeats):  # alternating, so that a busy moment weighs on both
        soxr_times.append(timed(lambda: resample_audio(waveform, rate, 16000)))
        poly_times.append(timed(lambda: resample_poly(waveform, 1, 3).astype(np.float32)))
    return statistics.median(soxr_times), statistics.median(poly_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each frame path")
    parser.add_argument("--frames-only", action="store_true", help="time the frame paths only")
    parser.add_argument("--video", type=Path, help="time the frame paths on this video instead of the generated clip")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp())
    video = args.video
    if video is None:
        video = workdir / "clip720p.mp4"
        write_clip(video)
    frame_paths(video, args.repeats)
    if args.frames_only:
        return

    soxr_seconds, poly_seconds = resampler_seconds()
    print("10 s of 48 kHz audio to 16 kHz, median of 7")
    print(f"{'resampler':34s} {'ms':>9s} {'vs before':>10s}")
    resamplers = [("soxr HQ (ours, as librosa.load)", soxr_seconds), ("scipy resample_poly (before)", poly_seconds)]
    for name, seconds in resamplers:
        print(f"{name:34s} {1000 * seconds:9.2f} {seconds / poly_seconds:10.2f}")

    checkpoint = workdir / "tiny"
    oisa_main(["tiny-random", str(checkpoint)])
    model = AutoModel.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        model.lm_head.weight[model.config.seg_token_id] += 50.0  # make the random model answer [SEG]
    segmenter = OisaVideoSegmenter(model, AutoProcessor.from_pretrained(checkpoint), max_new_tokens=8)
    example = Path(__file__).resolve().parents[1] / "examples" / "shapes.mp4"
    expression = OisaExpression(text="the triangle that makes a sound")
    segmenter(example, expression)  # warm-up: the deformable-attention op builds on first use
    seconds = timed(lambda: segmenter(example, expression))
    two = timed(lambda: segmenter(example, [expression, OisaExpression(text="the circle")]))
    print(
        f"tiny OISA end to end on examples/shapes.mp4 ({VideoReader(example).info.num_frames} frames): "
        f"{seconds:.2f} s for one expression, {two:.2f} s for two ({two / seconds:.2f}x)"
    )


if __name__ == "__main__":
    main()
