"""Frames per second of decoding and transforming a 720p clip for 448x448, and the tiny model's end-to-end time.

The baseline of the ratios is plain decoding (PyAV to RGB PIL images) in the same run.

    python benchmarks/preprocess.py
"""

import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoProcessor

from processing_oisa import OisaExpression, OisaVideoSegmenter, VideoReader, write_video
from processing_oisa.cli import main as oisa_main
from processing_oisa.processing_oisa import make_image_processor
from processing_oisa.synthetic import make_shapes_clip


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


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
