"""
Peak memory of `oisa segment` against the video's length: clips of 30, 120 and 480 frames at 1080x1920 with a 10-minute
soundtrack, each segmented in a fresh process; the peak RSS of each run and its ratio to the shortest.

    python benchmarks/segment_memory.py [--frames 30 120 480] [--height 1080 --width 1920] [--model M]

Without `--model` a tiny random OISA is written and used: the memory that grows with the length is the video's
(decoding, masks at full size, overlay), not the model's.
"""

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from processing_oisa.media import SAMPLING_RATE, write_video


def clip_frames(num_frames: int, height: int, width: int):
    """A grey background with a red square moving across it, one frame at a time."""
    side = height // 4
    for index in range(num_frames):
        frame = np.full((height, width, 3), 90, dtype=np.uint8)
        left = int((width - side) * index / max(num_frames - 1, 1))
        frame[height // 3 : height // 3 + side, left : left + side] = (220, 30, 30)
        yield frame


def peak_rss_of(command: list[str]) -> tuple[int, float]:
    """Peak RSS in bytes of `command` run in a process of its own, and its wall time."""
    probe = (
        "import resource, subprocess, sys\n"
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True, check=True)
    return int(completed.stdout.split()[-1]) * 1024, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[30, 120, 480])
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--soundtrack-minutes", type=float, default=10.0)
    parser.add_argument("--model", help="checkpoint to use (default: a tiny random OISA)")
    args = parser.parse_args()

    oisa = [sys.executable, "-c", "import sys; from oisa_cli.main import main; sys.exit(main())"]
    with tempfile.TemporaryDirectory(prefix="oisa-segment-memory-") as work:
        work = Path(work)
        model = args.model
        if model is None:
            model = str(work / "model")
            subprocess.run([*oisa, "tiny-random", model], check=True, capture_output=True)
        samples = int(args.soundtrack_minutes * 60 * SAMPLING_RATE)
        soundtrack = (0.1 * np.sin(np.arange(samples) * (2 * np.pi * 440 / SAMPLING_RATE))).astype(np.float32)
        cpu = platform.processor() or platform.machine()
        try:
            cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
        except (OSError, StopIteration):
            pass
        print(f"CPU: {cpu}; {args.height}x{args.width}, {args.soundtrack_minutes:g}-minute soundtrack; model {model}")
        print(f"{'frames':>7} {'peak RSS (MiB)':>15} {'vs first':>9} {'wall (s)':>9}")
        first = None
        for num_frames in args.frames:
            video = work / f"clip-{num_frames}.mp4"
            write_video(video, clip_frames(num_frames, args.height, args.width), 10.0, audio=soundtrack)
            out = work / f"out-{num_frames}"
            command = [*oisa, "segment", str(video), "--text", "the red square", "--model", model, "--out", str(out),
                       "--max-new-tokens", "8"]
            peak, seconds = peak_rss_of(command)
            first = first or peak
            print(f"{num_frames:>7} {peak / 2**20:>15.0f} {peak / first:>9.2f} {seconds:>9.1f}")
            video.unlink()


if __name__ == "__main__":
    main()
