"""
`modeling_oisa.allocator.reuse_freed_memory` against glibc's default: OISA-1B (random weights) encodes `--frames`
frames at 448x448 (`get_image_features`: InternViT-300M and the ViT-Adapter) and decodes their maps with the pixel
decoder, in float32 and in bfloat16, each in a fresh process of its own with and without the setting, alternating.
Prints per dtype and part the median seconds of `--repeats` timed calls (after one warm-up call), their ratio, the
minor page faults of the timed calls and the peak resident size.

    python benchmarks/allocator.py                   # 4 frames, 2 timed calls, 1 round
    python benchmarks/allocator.py --rounds 2        # default, reuse, default, reuse: medians over rounds
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from oisa_1b import build_random_oisa_1b, processor_name

from modeling_oisa.allocator import reuse_freed_memory
from modeling_oisa.precision import cpu_has_bf16_matmul


MODES = ("default", "reuse")
PARTS = ("vision (InternViT + adapter)", "pixel decoder")


def run_child(dtype: str, mode: str, frames: int, repeats: int) -> dict:
    """One process: the setting as `mode` says, the model built in `dtype`, each part timed `repeats` times."""
    applied = reuse_freed_memory() if mode == "reuse" else False
    model = build_random_oisa_1b().to(getattr(torch, dtype))
    pixel_values = torch.randn(frames, 3, 448, 448, dtype=model.dtype)
    seconds = {part: [] for part in PARTS}
    with torch.no_grad():
        model.mask_head.decode_pixels(model.get_image_features(pixel_values[:1]).image_maps)  # warm-up
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(repeats):
            started = time.perf_counter()
            maps = model.get_image_features(pixel_values).image_maps
            encoded = time.perf_counter()
            model.mask_head.decode_pixels(maps)
            seconds[PARTS[0]].append(encoded - started)
            seconds[PARTS[1]].append(time.perf_counter() - encoded)
            del maps
        usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "applied": applied,
        "seconds": {part: statistics.median(values) for part, values in seconds.items()},
        "page_faults": usage.ru_minflt - faults,
        "peak_gib": usage.ru_maxrss / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per process (median)")
    parser.add_argument("--rounds", type=int, default=1, help="processes per dtype and mode (median)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--child", nargs=2, metavar=("DTYPE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(*args.child, args.frames, args.repeats)))
        return

    print(
        f"{processor_name(torch.device('cpu'))}; bfloat16 matrix units: {'yes' if cpu_has_bf16_matmul() else 'no'}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.frames} frames, median of "
        f"{args.repeats} calls a process, {args.rounds} process(es) per dtype and mode; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    results = {(dtype, mode): [] for dtype in args.dtypes for mode in MODES}
    for _ in range(args.rounds):
        for dtype, mode in results:
            command = [sys.executable, __file__, "--child", dtype, mode, "--frames", str(args.frames),
                       "--repeats", str(args.repeats)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[dtype, mode].append(json.loads(output.strip().splitlines()[-1]))
    if not all(run["applied"] for mode_runs in (results[d, "reuse"] for d in args.dtypes) for run in mode_runs):
        print("warning: reuse_freed_memory did not apply (not Linux with glibc): both columns are the default")

    print(f"\n{'dtype':9s} {'part':30s} {'default s':>10s} {'reuse s':>10s} {'ratio':>7s}")
    for dtype in args.dtypes:
        for part in PARTS:
            default, reuse = (
                statistics.median(run["seconds"][part] for run in results[dtype, mode]) for mode in MODES
            )
            print(f"{dtype:9s} {part:30s} {default:10.2f} {reuse:10.2f} {reuse / default:7.2f}")
        faults, peaks = (
            [statistics.median(run[key] for run in results[dtype, mode]) for mode in MODES]
            for key in ("page_faults", "peak_gib")
        )
        print(f"{dtype:9s} {'minor page faults (timed calls)':30s} {faults[0]:10.0f} {faults[1]:10.0f}")
        print(f"{dtype:9s} {'peak resident GiB':30s} {peaks[0]:10.2f} {peaks[1]:10.2f} {peaks[1] / peaks[0]:7.2f}")
    print(f"load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
