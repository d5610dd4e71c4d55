"""Multi-scale deformable attention: `oisa_kernels.ms_deform_attn` against transformers' PyTorch implementation.

Two shapes from OISA-1B on a 10-frame clip: the pixel decoder's encoder layers (8 heads, levels 14x14, 28x28 and 56x56,
32 channels per head) and the ViT-Adapter's extractor (16 heads, one 32x32 level, 16 channels per head), both with 4116
queries and 4 points. Prints, per shape, forward and forward+backward times (median of the repeats) of both
implementations, their ratio and each one's peak memory above the inputs (process RSS sampled every millisecond on
CPU, `torch.cuda.max_memory_allocated` on GPU).

With `--dtype bfloat16` (or float16) our op also runs on float32 copies of the same rounded inputs, alternating with
the others, and the last column is our time in that dtype over our float32 time.

    python benchmarks/msda.py                       # fp32 on CPU
    python benchmarks/msda.py --dtype bfloat16      # bf16 on CPU, against our fp32
    python benchmarks/msda.py --device cuda         # fp32 on a GPU (add --dtype bfloat16 for bf16)
"""

import argparse
import ctypes
import statistics
import time
from collections.abc import Callable

import torch
from peak_memory import PeakMemory
from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention

import oisa_kernels


SHAPES = {
    "pixel decoder": {"heads": 8, "levels": [(14, 14), (28, 28), (56, 56)], "channels": 32},
    "adapter extractor": {"heads": 16, "levels": [(32, 32)], "channels": 16},
}
QUERY_LEVELS = [(14, 14), (28, 28), (56, 56)]  # 4116 queries, the multi-scale positions of a 448x448 frame
POINTS = 4


def return_freed_memory_to_the_os() -> None:
    """
    glibc raises its mmap threshold after large frees and then keeps freed blocks in the heap, which would hide a later
    run's allocations from RSS. A fixed threshold keeps every block above 1 MiB mmapped and returned on free (glibc
    only). Blocks above 32 MiB, which include every large temporary of both implementations, are mmapped regardless.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 20)
    libc.mallopt(m_trim_threshold, 1 << 20)


def make_inputs(
    batch: int, heads: int, levels: list[tuple[int, int]], channels: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Value, and locations around each query's position (Gaussian offsets of 2 pixels) with softmaxed weights."""
    generator = torch.Generator().manual_seed(0)
    values = sum(height * width for height, width in levels)
    centres = []
    for height, width in QUERY_LEVELS:
        y, x = torch.meshgrid((torch.arange(height) + 0.5) / height, (torch.arange(width) + 0.5) / width, indexing="ij")
        centres.append(torch.stack((x, y), -1).view(-1, 2))
    reference = torch.cat(centres)
    queries = reference.shape[0]
    level_sizes = torch.tensor([[width, height] for height, width in levels], dtype=torch.float32)
    offsets = torch.randn(batch, queries, heads, len(levels), POINTS, 2, generator=generator) * 2.0
    locations = reference[None, :, None, None, None, :] + offsets / level_sizes[None, None, None, :, None, :]
    weights = torch.randn(batch, queries, heads, len(levels) * POINTS, generator=generator).softmax(-1)
    weights = weights.view(batch, queries, heads, len(levels), POINTS)
    value = torch.randn(batch, values, heads, channels, generator=generator)
    return tuple(tensor.to(device=device, dtype=dtype) for tensor in (value, locations, weights))


def seconds(runs: dict[tuple, Callable[[], None]], device: torch.device, repeats: int) -> dict[tuple, float]:
    """
    Median seconds of each run over `repeats`, after one warm-up. The runs alternate, so that load from other
    processes on the machine falls on all of them alike.
    """
    times = {key: [] for key in runs}
    for run in runs.values():
        run()
    for _ in range(repeats):
        for key, run in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def peak_memory(run: Callable[[], None], device: torch.device) -> int:
    """Peak memory of one run (after a warm-up) above the memory in use before it."""
    run()
    with PeakMemory(device) as memory:
        run()
    return memory.peak_above_start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu":
        return_freed_memory_to_the_os()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}, {dtype}, batch {args.batch}")
    runs = {}
    for name, shape in SHAPES.items():
        value, locations, weights = make_inputs(
            args.batch, shape["heads"], shape["levels"], shape["channels"], device, dtype
        )
        grad_output = torch.randn(
            args.batch, locations.shape[1], shape["heads"] * shape["channels"], device=device, dtype=dtype
        )
        leaves = [tensor.clone().requires_grad_() for tensor in (value, locations, weights)]

        def ours(v, loc, w, levels=shape["levels"]):
            return oisa_kernels.ms_deform_attn(v, levels, None, loc, w)

        implementations = {
            "ours": ours,
            "torch": lambda v, loc, w, levels=shape["levels"]: multi_scale_deformable_attention(v, levels, loc, w),
        }
        for key, function in implementations.items():
            runs[name, "forward", key] = forward_run(function, value, locations, weights)
            runs[name, "fwd+bwd", key] = forward_backward_run(function, leaves, grad_output)
        if dtype != torch.float32:
            wide = [tensor.float() for tensor in (value, locations, weights)]
            runs[name, "forward", "ours float32"] = forward_run(ours, *wide)
            runs[name, "fwd+bwd", "ours float32"] = forward_backward_run(
                ours, [tensor.clone().requires_grad_() for tensor in wide], grad_output.float()
            )

    times = {}
    for name in SHAPES:
        for label in ("forward", "fwd+bwd"):
            pair = {key: run for key, run in runs.items() if key[:2] == (name, label)}
            times.update(seconds(pair, device, args.repeats))
    memory = {key: peak_memory(run, device) for key, run in runs.items()}

    columns = ("ours s", "torch s", "speed-up", "ours MiB", "torch MiB")
    if dtype != torch.float32:
        columns += ("ours fp32 s", "vs fp32")
    print(f"{'shape':18s} {'pass':8s} " + " ".join(f"{column:>9s}" for column in columns))
    for name in SHAPES:
        for label in ("forward", "fwd+bwd"):
            ours, reference, wide = (name, label, "ours"), (name, label, "torch"), (name, label, "ours float32")
            row = (
                f"{name:18s} {label:8s} {times[ours]:9.3f} {times[reference]:9.3f} "
                f"{times[reference] / times[ours]:8.1f}x {memory[ours] / 2**20:9.0f} {memory[reference] / 2**20:9.0f}"
            )
            if wide in times:
                row += f" {times[wide]:11.3f} {times[ours] / times[wide]:8.2f}x"
            print(row)
    print(f"backend of ours: {oisa_kernels.last_backend()}")


def forward_run(function: Callable, value: torch.Tensor, locations: torch.Tensor, weights: torch.Tensor) -> Callable:
    def run() -> None:
        with torch.no_grad():
            function(value, locations, weights)

    return run


def forward_backward_run(function: Callable, leaves: list[torch.Tensor], grad_output: torch.Tensor) -> Callable:
    def run() -> None:
        function(*leaves).backward(grad_output)
        # the gradients are part of the run's memory and must not be held into the next one
        for leaf in leaves:
            leaf.grad = None

    return run


if __name__ == "__main__":
    main()
