"""
`oisa segment` end to end with OISA-1B (random weights): a 10 s 720p clip with a soundtrack, decoded, preprocessed,
through the model, its masks upsampled to the full 1280x720 and written with the overlay video and the contact sheet,
in float32 and in the dtype `--dtype` stands for (`auto`: bfloat16 on a CPU with bfloat16 matrix units, float32
elsewhere), each in a fresh process of its own, timed by this script.

Prints the CPU and whether it has bfloat16 matrix units, then per stage the seconds of each dtype and their ratio
(stages are timed in the child process by timers around the functions that do them, each second counted once, in the
outermost stage), and the whole process's wall time: Python start and imports, loading, segmenting and writing. Each
run's CPU seconds in user and kernel mode and its page faults come after: the float32 run touches twice the memory,
and where a first touch is dear (in a virtual machine) its kernel time varies from run to run and with it its wall time.

The model is written once (bfloat16 as released; its deformable-attention blocks float32) to `--model-dir`, or to a
temporary folder; its generation config adds a bias to `[SEG]` (`oisa_1b.SEG_LOGIT_BIAS`) so that the random model's
answer holds `[SEG]` and the mask head runs. The clip has one frame a second, as OmniAVS's: 10 frames, all shown to the
LLM (4 dense) and all segmented; `--max-new-tokens 8` is about the length of the release's "Sure, it is [SEG].".

    python benchmarks/segment_end_to_end.py                         # float32 against auto
    python benchmarks/segment_end_to_end.py --rounds 2              # float32, auto, float32, auto: medians
    python benchmarks/segment_end_to_end.py --model-dir /tmp/oisa-1b-random   # write once, reuse in later runs
"""

import argparse
import functools
import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from oisa_1b import processor_name, write_random_oisa_1b
from segment_memory import clip_frames

from modeling_oisa.precision import cpu_has_bf16_matmul, resolve_dtype
from processing_oisa.media import SAMPLING_RATE, write_video


STAGES = (
    "load model and processor",
    "decode video and soundtrack",
    "preprocess frames",
    "prompt and audio features",
    "vision (InternViT + adapter)",
    "audio encoder",
    "LLM generate (prefill + new tokens)",
    "LLM pass over prompt + answer",
    "mask head",
    "masks at full size",
    "write masks, overlay, contact sheet",
    "other",
)
STARTUP, WHOLE = "process start and imports", "whole process (wall)"


class StageClock:
    """Seconds per stage of the functions it wraps; a call inside another timed call counts for the outer one only."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._active = False

    def _timed(self, stage: str, call: Callable, *args, **kwargs):
        if self._active:
            return call(*args, **kwargs)
        self._active = True
        start = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            self.seconds[stage] += time.perf_counter() - start
            self._active = False

    def wrap(self, owner: object, name: str, stage: str) -> None:
        """Replaces `owner.name` (a function, method or generator function) by a timed one."""
        original = getattr(owner, name)
        if inspect.isgeneratorfunction(original):

            @functools.wraps(original)
            def timed(*args, **kwargs):
                items = original(*args, **kwargs)
                while True:
                    try:
                        item = self._timed(stage, next, items)
                    except StopIteration:
                        return
                    yield item

        else:

            @functools.wraps(original)
            def timed(*args, **kwargs):
                return self._timed(stage, original, *args, **kwargs)

        setattr(owner, name, timed)


def instrument(clock: StageClock) -> None:
    """Wraps the functions that do each stage of `oisa segment`."""
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    from modeling_oisa import OisaForReferringSegmentation
    from modeling_oisa.mask_head import OisaMaskHead, OisaQueryDecoder
    from processing_oisa import visualization
    from processing_oisa.media import VideoReader, VideoWriter
    from processing_oisa.processing_oisa import OisaProcessor
    from processing_oisa.segmenter import OisaVideoSegmenter

    wrapped = {
        STAGES[0]: [(AutoModel, "from_pretrained"), (AutoProcessor, "from_pretrained")],
        STAGES[1]: [(VideoReader, "__init__"), (VideoReader, "read"), (VideoReader, "iter_frames"),
                    (VideoReader, "soundtrack")],
        STAGES[2]: [(OisaVideoSegmenter, "_pixel_values")],
        STAGES[3]: [(OisaProcessor, "__call__")],
        STAGES[4]: [(OisaForReferringSegmentation, "get_image_features"),
                    (OisaForReferringSegmentation, "get_vision_embeddings")],
        STAGES[5]: [(OisaForReferringSegmentation, "get_audio_features")],
        STAGES[6]: [(OisaForReferringSegmentation, "generate")],
        STAGES[7]: [(OisaForReferringSegmentation, "forward")],
        STAGES[8]: [(OisaMaskHead, "decode_pixels"), (OisaQueryDecoder, "forward")],
        STAGES[9]: [(OisaProcessor, "post_process_masks")],
        STAGES[10]: [(Image.Image, "save"), (visualization, "overlay_mask"), (visualization, "contact_sheet"),
                     (VideoWriter, "write"), (VideoWriter, "close")],
    }
    for stage, targets in wrapped.items():
        for owner, name in targets:
            clock.wrap(owner, name, stage)


def run_child(args: argparse.Namespace) -> None:
    """One `oisa segment` in this process, its stages timed; writes them to `--report`."""
    started = time.perf_counter()
    from oisa_cli.main import main as oisa_main

    clock = StageClock()
    instrument(clock)
    imported = time.perf_counter()
    status = oisa_main(["segment", str(args.video), "--text", "the red square", "--model", str(args.model_dir),
                        "--out", str(args.out), "--device", "cpu", "--dtype", args.dtype,
                        "--max-new-tokens", str(args.max_new_tokens)])
    finished = time.perf_counter()
    if status != 0:
        raise SystemExit(f"oisa segment failed with exit code {status}")
    seconds = dict(clock.seconds)
    seconds["other"] = finished - imported - sum(seconds.values())
    report = {"dtype": str(resolve_dtype(args.dtype, "cpu")).removeprefix("torch."), "stages": seconds,
              "in_process": finished - started}
    Path(args.report).write_text(json.dumps(report))


def run_segment(
    script: Path, dtype: str, video: Path, model_dir: Path, work: Path, max_new_tokens: int, threads: int | None
) -> dict:
    """One child process segmenting `video` in `dtype` (on `threads` threads); its stage times and its wall time."""
    tag = f"{dtype}-{time.monotonic_ns()}"
    report, out = work / f"{tag}.json", work / f"out-{tag}"
    command = [sys.executable, str(script), "--child", "--dtype", dtype, "--video", str(video), "--model-dir",
               str(model_dir), "--out", str(out), "--report", str(report), "--max-new-tokens", str(max_new_tokens)]
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(report.read_text())
    result["wall"] = wall
    # the child's CPU seconds in user and kernel mode and its page faults: where first touches of memory are dear (a
    # virtual machine's), the kernel time of the larger float32 run moves its wall time from run to run
    result["user"] = after.ru_utime - before.ru_utime
    result["system"] = after.ru_stime - before.ru_stime
    result["page_faults"] = after.ru_minflt - before.ru_minflt
    summary = json.loads((out / "result.json").read_text())
    result["segmented"] = summary["segmented"]
    result["masks"] = len(list((out / "masks").glob("*.png")))
    result["overlay"] = (out / "overlay.mp4").is_file()
    return result


def median_row(runs: list[dict], stage: str) -> float:
    if stage == WHOLE:
        return statistics.median(run["wall"] for run in runs)
    if stage == STARTUP:
        return statistics.median(run["wall"] - run["in_process"] for run in runs)
    return statistics.median(run["stages"].get(stage, 0.0) for run in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"], help="compared to float32")
    parser.add_argument("--seconds", type=int, default=10, help="the clip's length")
    parser.add_argument("--fps", type=float, default=1.0, help="the clip's frame rate (OmniAVS: 1)")
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1, help="float32 and --dtype in turn, this many times (median)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the runs (default: torch's, all cores)")
    parser.add_argument("--model-dir", type=Path, help="where OISA-1B is written, or read when already there")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--video", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return

    device = torch.device("cpu")
    chosen = str(resolve_dtype(args.dtype, device)).removeprefix("torch.")
    threads = args.threads or torch.get_num_threads()
    print(
        f"{processor_name(device)}; bfloat16 matrix units: {'yes' if cpu_has_bf16_matmul() else 'no'}; "
        f"torch {torch.__version__}, {threads} threads; --dtype {args.dtype} -> {chosen}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    with tempfile.TemporaryDirectory(prefix="oisa-end-to-end-") as work:
        work = Path(work)
        model_dir = args.model_dir or work / "oisa-1b-random"
        if not (model_dir / "config.json").is_file():
            started = time.perf_counter()
            write_random_oisa_1b(model_dir, always_seg=True)
            print(f"OISA-1B (random weights, bfloat16) written to {model_dir} in {time.perf_counter() - started:.0f} s")
        num_frames = round(args.seconds * args.fps)
        video = work / "clip.mp4"
        samples = np.arange(args.seconds * SAMPLING_RATE) / SAMPLING_RATE
        soundtrack = (0.1 * np.sin(2 * np.pi * 440 * samples)).astype(np.float32)
        write_video(video, clip_frames(num_frames, args.height, args.width), args.fps, audio=soundtrack)
        print(f"clip: {args.seconds} s, {args.width}x{args.height}, {num_frames} frames, soundtrack; "
              f"--max-new-tokens {args.max_new_tokens}")

        runs = {"float32": [], args.dtype: []}
        script = Path(__file__).resolve()
        for _ in range(args.rounds):
            for dtype in runs:
                runs[dtype].append(
                    run_segment(script, dtype, video, model_dir, work, args.max_new_tokens, args.threads)
                )
        for dtype, results in runs.items():
            for result in results:
                if not (result["segmented"] and result["masks"] == num_frames and result["overlay"]):
                    print(f"warning: the {dtype} run wrote {result['masks']} masks (segmented: {result['segmented']})")

    names = {"float32": "float32", args.dtype: f"{args.dtype} ({chosen})"}
    print(f"\nseconds, median of {args.rounds} run(s) each, float32 and {args.dtype} in turn")
    print(f"{'stage':40s}" + "".join(f"{names[dtype]:>20s}" for dtype in runs) + f"{'ratio':>8s}")
    for stage in (STARTUP, *STAGES, WHOLE):
        values = [median_row(results, stage) for results in runs.values()]
        ratio = f"{values[1] / values[0]:8.2f}" if values[0] > 0 and len(values) == 2 else ""
        print(f"{stage:40s}" + "".join(f"{value:20.2f}" for value in values) + ratio)
    for dtype, results in runs.items():
        print(f"{names[dtype]} runs (wall s): " + ", ".join(f"{result['wall']:.1f}" for result in results))
        print("  CPU s in user / kernel mode, minor page faults: " + ", ".join(
            f"{result['user']:.1f} / {result['system']:.1f}, {result['page_faults'] / 1e6:.2f} M" for result in results
        ))
    if len(runs) == 2:
        whole = [median_row(results, WHOLE) for results in runs.values()]
        print(f"\nend to end: float32 {whole[0]:.1f} s, {names[args.dtype]} {whole[1]:.1f} s: float32 takes "
              f"{whole[0] / whole[1]:.2f}x as long; load average now {os.getloadavg()[0]:.1f}")
        user = [statistics.median(result["user"] for result in results) for results in runs.values()]
        print(f"CPU time in user mode (medians): float32 {user[0]:.1f} s, {names[args.dtype]} {user[1]:.1f} s: "
              f"{user[0] / user[1]:.2f}x")


if __name__ == "__main__":
    main()
