"""Frames per second of decoding and transforming a 720p clip for 448x448, the audio resampler's cost, and the tiny
model's end-to-end time.

The baseline of the frame ratios is plain decoding (PyAV to RGB PIL images) in the same run; the baseline of the
resampler's is the polyphase resampler it replaced (scipy's resample_poly), on the same 10 s 48 kHz clip.

    python benchmarks/preprocess.py
"""

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.signal import resample_poly
from transformers import AutoModel, AutoProcessor

from oisa_cli.main import main as oisa_main
from processing_oisa import OisaExpression, OisaVideoSegmenter, VideoReader, write_video
from processing_oisa.data.synthetic_clips import make_shapes_clip
from processing_oisa.media import resample_audio
from processing_oisa.processing_oisa import make_image_processor


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


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
    workdir = Path(tempfile.mkdtemp())
    clip = make_shapes_clip(num_frames=90, height=720, width=1280, fps=30.0, seed=0)
    video = workdir / "clip720p.mp4"
    write_video(video, clip.frames, clip.fps, clip.soundtrack)
    reader = VideoReader(video)
    frames = reader.info.num_frames
    transform = make_image_processor(448)

    decode = timed(lambda: [frame for _, frame in reader.iter_frames()])
    decode_transform = timed(
        lambda: [transform(images=[frame], return_tensors="pt")["pixel_values"] for _, frame in reader.iter_frames()]
    )
    batched = timed(lambda: transform(images=[frame for _, frame in reader.iter_frames()], return_tensors="pt"))
    print(f"720p clip, {frames} frames, target 448x448, {torch.get_num_threads()} threads")
    print(f"{'stage':34s} {'frames/s':>9s} {'vs decode':>10s}")
    for name, seconds in [
        ("decode (PyAV -> RGB)", decode),
        ("decode + transform, per frame", decode_transform),
        ("decode + transform, one batch", batched),
    ]:
        print(f"{name:34s} {frames / seconds:9.1f} {decode / seconds:10.2f}")

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
    print(f"tiny OISA end to end on examples/shapes.mp4 ({VideoReader(example).info.num_frames} frames): "
          f"{seconds:.2f} s for one expression, {two:.2f} s for two ({two / seconds:.2f}x)")


if __name__ == "__main__":
    main()
