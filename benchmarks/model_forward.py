"""One forward of OISA-1B (random weights) on a 10-frame 448x448 clip with 10 s of audio, stage by stage, in float32
and in the dtype `--dtype` stands for, in the same process.

Prints the CPU (or GPU) and whether it has bfloat16 matrix units, then per stage the time and peak memory (process RSS
on CPU, `torch.cuda.max_memory_allocated` on GPU) of a float32 forward and of the same model cast to the chosen dtype
(`model.to(dtype)`: the deformable-attention blocks stay float32), and their ratio. Then the mask head alone, both
dtypes alternating over `--repeats` runs on the same adapter maps (median). `--dtype auto` is what
`modeling_oisa.precision.resolve_dtype` picks: bfloat16 on CUDA and on a CPU with bfloat16 matrix units, else float32.

    python benchmarks/model_forward.py                       # float32 against auto on CPU
    python benchmarks/model_forward.py --dtype bfloat16      # float32 against bfloat16
    python benchmarks/model_forward.py --mask-head-only      # the mask head alone, on random adapter maps
    python benchmarks/model_forward.py --device cuda
    python benchmarks/model_forward.py --compare-msda        # also the float32 PyTorch deformable attention
"""

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable

import torch
from oisa_1b import build_random_oisa_1b, processor_name, random_inputs
from peak_memory import PeakMemory

from modeling_oisa import OisaForReferringSegmentation
from modeling_oisa.precision import cpu_has_bf16_matmul, resolve_dtype


STAGES = ("vision (InternViT + adapter)", "audio (Whisper encoder)", "LLM prefill", "mask head", "whole forward")


def forward_by_stage(
    model: OisaForReferringSegmentation, inputs: dict
) -> tuple[dict[str, PeakMemory], list[torch.Tensor], torch.Tensor]:
    """One forward, stage by stage; returns the measured stages, the adapter maps and the `[SEG]` hidden state."""
    device = inputs["pixel_values"].device
    stages = {}
    with torch.no_grad(), PeakMemory(device) as whole:
        with PeakMemory(device) as stages[STAGES[0]]:
            image_features = model.get_image_features(inputs["pixel_values"])
        with PeakMemory(device) as stages[STAGES[1]]:
            audio = model.get_audio_features(inputs["input_features"], inputs["feature_lengths"])
        with PeakMemory(device) as stages[STAGES[2]]:
            input_ids = inputs["input_ids"]
            embeds = model.inject_multimodal_embeddings(
                input_ids,
                model.get_input_embeddings()(input_ids),
                image_features.vision_embeds,
                inputs["modes"],
                audio,
                torch.tensor([2]),
            )
            hidden = model.language_model(inputs_embeds=embeds).last_hidden_state
            model.lm_head(hidden[:, -1:])
        with PeakMemory(device) as stages[STAGES[3]]:
            model.segment_frames(hidden[0, -1:], image_features.image_maps)
    stages[STAGES[4]] = whole
    return stages, image_features.image_maps, hidden[0, -1:]


def alternating_seconds(runs: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each run over `repeats`, after one warm-up; the runs alternate, so load falls on all alike."""
    times = {name: [] for name in runs}
    with torch.no_grad():
        for run in runs.values():
            run()
        for _ in range(repeats):
            for name, run in runs.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                run()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--audio-seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3, help="mask-head runs per dtype, alternating (median)")
    parser.add_argument("--mask-head-only", action="store_true", help="skip the forward; random adapter maps")
    parser.add_argument("--compare-msda", action="store_true", help="rerun vision and mask head with the PyTorch MSDA")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    low = str(dtype).removeprefix("torch.")

    bf16_units = "yes" if cpu_has_bf16_matmul() else "no"
    print(
        f"{processor_name(device)}; bfloat16 matrix units: {bf16_units if device.type == 'cpu' else 'n/a'}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; --dtype {args.dtype} -> {low}"
    )
    start = time.perf_counter()
    model = build_random_oisa_1b().to(device)
    config = model.config
    print(f"OISA-1B built in {time.perf_counter() - start:.1f} s: {model.num_parameters():,} parameters, {device}")

    size = config.image_size
    inputs = random_inputs(config, args.frames, args.audio_seconds, device)

    measured, msda_line = {}, None
    if args.mask_head_only:
        channels = config.mask_head_in_channels
        image_maps = [torch.randn(args.frames, channels, size // s, size // s, device=device) for s in (4, 8, 16, 32)]
        seg_hidden = torch.randn(1, config.text_config.hidden_size, device=device)
    else:
        measured["float32"], image_maps, seg_hidden = forward_by_stage(model, inputs)
        if args.compare_msda:
            msda_line = compare_msda(model, inputs, image_maps, seg_hidden, measured["float32"], args.frames)
    # a float32 copy of the mask head, to alternate with the cast model's
    float32_head = copy.deepcopy(model.mask_head) if dtype != torch.float32 else model.mask_head
    if dtype != torch.float32:
        model.to(dtype)
        if not args.mask_head_only:
            measured[low], _, _ = forward_by_stage(model, inputs)

    if measured:
        print(
            f"\nforward, {args.frames} frames, {inputs['input_ids'].shape[1]} prompt tokens "
            f"(seconds, peak {'RSS' if device.type == 'cpu' else 'allocated'} GiB)"
        )
        header = "".join(f"{name + ' s':>12s}{'GiB':>7s}" for name in measured)
        print(f"{'stage':30s}{header}" + (f"{'ratio':>8s}" if len(measured) > 1 else ""))
        for stage in STAGES:
            row = "".join(
                f"{timed[stage].seconds:12.2f}{timed[stage].peak / 2**30:7.2f}" for timed in measured.values()
            )
            if len(measured) > 1:
                row += f"{measured[low][stage].seconds / measured['float32'][stage].seconds:8.2f}"
            print(f"{stage:30s}{row}")
    if msda_line is not None:
        print(msda_line)

    seg_low = seg_hidden.to(model.dtype)
    runs = {"float32": lambda: float32_head(seg_hidden.float(), image_maps)}
    if dtype != torch.float32:
        runs[low] = lambda: model.segment_frames(seg_low, image_maps)
    seconds = alternating_seconds(runs, args.repeats, device)
    print(
        f"\nmask head alone, {args.frames} frames, median of {args.repeats} alternating runs: "
        + ", ".join(f"{name} {value:.2f} s" for name, value in seconds.items())
        + (f" ({seconds[low] / seconds['float32']:.2f}x)" if len(seconds) > 1 else "")
    )


def compare_msda(
    model: OisaForReferringSegmentation,
    inputs: dict,
    image_maps: list[torch.Tensor],
    seg_hidden: torch.Tensor,
    float32: dict[str, PeakMemory],
    frames: int,
) -> str:
    """The float32 vision and mask-head stages again through transformers' grid_sample deformable attention."""
    device = inputs["pixel_values"].device
    requested = os.environ.get("OISA_MSDA_BACKEND")
    os.environ["OISA_MSDA_BACKEND"] = "torch"
    try:
        with torch.no_grad():
            with PeakMemory(device) as vision_torch:
                model.get_image_features(inputs["pixel_values"])
            with PeakMemory(device) as mask_torch:
                model.segment_frames(seg_hidden, image_maps)
    finally:
        if requested is None:
            del os.environ["OISA_MSDA_BACKEND"]
        else:
            os.environ["OISA_MSDA_BACKEND"] = requested
    return (
        f"deformable attention through PyTorch (OISA_MSDA_BACKEND=torch): vision {vision_torch.seconds:.2f} s "
        f"({vision_torch.seconds / float32[STAGES[0]].seconds:.2f}x the compiled op), mask head "
        f"{mask_torch.seconds:.2f} s ({mask_torch.seconds / float32[STAGES[3]].seconds:.2f}x), peak "
        f"{max(vision_torch.peak, mask_torch.peak) / 2**30:.2f} GiB ({frames} frames)"
    )


if __name__ == "__main__":
    main()
