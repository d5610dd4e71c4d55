"""
OISA-1B's mask head (random weights) in float32 against bfloat16, in one process: the float32 model's head, and the
same head after `model.to(torch.bfloat16)` (the pixel decoder stays float32 as released; the query decoder computes in
bfloat16). Both decode `--frames` random maps of the adapter's shapes and layout (channels-last, float32) in chunks of
8 for one `[SEG]` query; the calls alternate, after one warm-up call each. Prints the median seconds of the pixel
decoder alone and of the whole head (pixel decoder and query decoder) per dtype, and their ratio.

    python benchmarks/mask_head.py                  # 10 frames, 3 timed calls per dtype
"""

import argparse
import copy
import statistics
import time

import torch
from oisa_1b import build_random_oisa_1b, processor_name

from modeling_oisa.allocator import reuse_freed_memory
from modeling_oisa.precision import cpu_has_bf16_matmul


CHUNK_SIZE = 8  # OisaVideoSegmenter's default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    reuse_freed_memory()  # as `oisa segment` runs
    device = torch.device("cpu")
    print(
        f"{processor_name(device)}; bfloat16 matrix units: {'yes' if cpu_has_bf16_matmul() else 'no'}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.frames} frames in chunks of {CHUNK_SIZE}"
    )
    model = build_random_oisa_1b()
    heads = {"float32": copy.deepcopy(model.mask_head)}
    heads["bfloat16"] = model.to(torch.bfloat16).mask_head
    del model
    torch.manual_seed(0)
    maps = [
        torch.randn(args.frames, 1024, size, size).contiguous(memory_format=torch.channels_last)
        for size in (112, 56, 28, 14)
    ]
    seg_state = torch.randn(1, 896)
    seconds = {(dtype, part): [] for dtype in heads for part in ("pixel decoder", "mask head")}
    with torch.inference_mode():
        for dtype, head in heads.items():
            head(seg_state.to(getattr(torch, dtype)), maps, chunk_size=CHUNK_SIZE)  # warm-up
        for _ in range(args.repeats):
            for dtype, head in heads.items():
                start = time.perf_counter()
                for chunk in range(0, args.frames, CHUNK_SIZE):
                    head.decode_pixels([level[chunk : chunk + CHUNK_SIZE] for level in maps])
                seconds[dtype, "pixel decoder"].append(time.perf_counter() - start)
                start = time.perf_counter()
                head(seg_state.to(getattr(torch, dtype)), maps, chunk_size=CHUNK_SIZE)
                seconds[dtype, "mask head"].append(time.perf_counter() - start)
    print(f"\n{'part':16s}{'float32 s':>12s}{'bfloat16 s':>12s}{'ratio':>8s}")
    for part in ("pixel decoder", "mask head"):
        float32, bfloat16 = (statistics.median(seconds[dtype, part]) for dtype in heads)
        print(f"{part:16s}{float32:12.2f}{bfloat16:12.2f}{bfloat16 / float32:8.2f}")
    for (dtype, part), values in seconds.items():
        print(f"{dtype} {part}: " + ", ".join(f"{value:.2f}" for value in values))


if __name__ == "__main__":
    main()
