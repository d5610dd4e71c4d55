"""
One forward of EEMC (the Ref-AVS baseline, full size, random weights) against one of OISA-1B (random weights) on the
same 10 s clip, in the same process, stage by stage, and their ratio.

The clip (synthetic moving shapes with a tone, 10 s at `--fps`, `--height`x`--width`) is written to an mp4 and read back
as each model's processor reads it:
- EEMC: `RefAvsProcessor` on the file: the first frame of each second (10 frames at 384x384), the expression as 25
  tokens (an offline tiny RoBERTa tokenizer: ids only, the model keeps DistilRoBERTa's 50,265 rows), the soundtrack as
  10 VGGish examples. The model: `RefAvsConfig()` (Mask2Former Swin-B, 6-layer DistilRoBERTa, the release profile)
  with the public VGGish's sizes as its audio encoder.
- OISA: `benchmarks/model_forward.py`'s forward of OISA-1B (`oisa_1b.build_random_oisa_1b`, 1.61 B parameters), on the
  same 10 frames through OISA's video transform (448x448; 4 dense, the rest pooled, as `oisa_1b.random_inputs`) and
  the same soundtrack through its Whisper feature extractor, with `oisa_1b.build_prompt`'s prompt.

Prints the CPU (or GPU), then per stage the seconds and peak memory (process RSS on CPU) of each model, and the ratio
of the whole forwards. A warm-up forward of EEMC on one frame comes first (the deformable-attention op is built on first
use), and EEMC runs again after OISA-1B: the ratio is OISA-1B's time over the mean of EEMC's two, and the spread of
EEMC's two shows how much the machine's load moved.

    python benchmarks/refavs_forward.py                      # float32, EEMC then OISA-1B
    python benchmarks/refavs_forward.py --dtype auto         # bfloat16 on a CPU with bfloat16 matrix units
    python benchmarks/refavs_forward.py --skip-oisa          # EEMC alone
"""

import argparse
import gc
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from model_forward import forward_by_stage
from oisa_1b import build_prompt, build_random_oisa_1b, processor_name
from peak_memory import PeakMemory

from modeling_oisa import audio_token_counts
from modeling_oisa.precision import cpu_has_bf16_matmul, resolve_dtype
from modeling_refavs import RefAvsConfig, RefAvsForReferringSegmentation, VggishConfig
from oisa_tiny.refavs_tokenizer import build_tiny_refavs_tokenizer
from processing_oisa.data.synthetic_clips import make_shapes_clip
from processing_oisa.media import VideoReader, decode_audio, write_video
from processing_oisa.processing_oisa import make_feature_extractor, make_video_processor
from processing_oisa.refavs_eemc import RefAvsProcessor, one_frame_per_second


CLIP_SECONDS = 10
EXPRESSION = "The dog that barks on the left."
# EEMC's stages, each the modules whose forward hooks time it
EEMC_STAGES = {
    "text encoder (DistilRoBERTa)": ("text_model",),
    "audio encoder (VGGish, 10 examples)": ("audio_encoder",),
    "Swin-B (10 frames)": ("pixel_level_module.encoder.swin",),
    "pixel decoder (with adapters)": ("pixel_level_module.decoder",),
    "fusion and integration attentions": ("audio_text_attention", "visual_text_attention", "integration_attention"),
    "masked-attention decoder": ("transformer_module",),
}


class StageTimer:
    """Wall seconds spent in the forwards of named submodules, through forward hooks."""

    def __init__(self, model: torch.nn.Module, stages: dict[str, tuple[str, ...]]):
        self.seconds: dict[str, float] = defaultdict(float)
        self.handles = []
        for stage, names in stages.items():
            for name in names:
                module = model.get_submodule(name)
                self.handles.append(module.register_forward_pre_hook(self._start))
                self.handles.append(module.register_forward_hook(self._stop(stage)))

    @staticmethod
    def _start(module, args) -> None:
        module._benchmark_started = time.perf_counter()

    def _stop(self, stage: str):
        def hook(module, args, output) -> None:
            self.seconds[stage] += time.perf_counter() - module._benchmark_started

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def write_clip(folder: Path, fps: float, height: int, width: int) -> Path:
    clip = make_shapes_clip(num_frames=int(CLIP_SECONDS * fps), height=height, width=width, fps=fps, seed=0)
    path = folder / "clip.mp4"
    write_video(path, clip.frames, clip.fps, clip.soundtrack)
    return path


def build_eemc(clip: Path, dtype: torch.dtype, device: torch.device) -> tuple[RefAvsForReferringSegmentation, dict]:
    """Full-size EEMC with random weights and its inputs for the clip, after a warm-up forward on one frame."""
    config = RefAvsConfig(audio_config=VggishConfig())
    torch.manual_seed(0)
    start = time.perf_counter()
    model = RefAvsForReferringSegmentation(config).eval().to(device, dtype)
    print(f"EEMC built in {time.perf_counter() - start:.1f} s: {model.num_parameters():,} parameters")
    processor = RefAvsProcessor.from_model_config(config, build_tiny_refavs_tokenizer())
    inputs = processor(videos=clip, text=EXPRESSION).to(device=device, dtype=dtype)
    print("EEMC inputs: " + ", ".join(f"{name} {tuple(value.shape)}" for name, value in inputs.items()))
    with torch.no_grad():
        model(**{**inputs, "pixel_values": inputs["pixel_values"][:, :1]})
    return model, inputs


def eemc_forward(model: RefAvsForReferringSegmentation, inputs: dict) -> tuple[dict[str, float], PeakMemory]:
    """One forward of EEMC: seconds per stage, and the whole forward's time and peak memory."""
    timer = StageTimer(model, EEMC_STAGES)
    with torch.no_grad(), PeakMemory(inputs["pixel_values"].device) as whole:
        model(**inputs)
    timer.remove()
    stages = dict(timer.seconds)
    stages["rest (projections, cached memory, prompts, read-out)"] = whole.seconds - sum(stages.values())
    stages["whole forward"] = whole.seconds
    return stages, whole


def oisa_inputs(clip: Path, image_size: int, config, device: torch.device) -> dict:
    """model_forward's inputs made from the clip: its 10 frames a second apart and its soundtrack."""
    reader = VideoReader(clip)
    frames = reader.read(one_frame_per_second(reader.info.timestamps, reader.info.duration))
    video = make_video_processor(image_size)(frames, do_sample_frames=False, return_tensors="pt")
    soundtrack = decode_audio(clip, what="Clip")
    features = make_feature_extractor()(soundtrack, sampling_rate=16000, return_tensors="pt")
    modes = torch.ones(len(frames), dtype=torch.long)
    modes[torch.linspace(0, len(frames) - 1, 4).round().long()] = 2
    lengths = torch.tensor([min(len(soundtrack) // 160, 3000)])
    return {
        "pixel_values": video["pixel_values_videos"][0].to(device),
        "input_features": features["input_features"].to(device),
        "feature_lengths": lengths.to(device),
        "modes": modes,
        "input_ids": build_prompt(config, modes, int(audio_token_counts(lengths)[0])).to(device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--fps", type=float, default=10.0, help="frame rate of the 10 s clip")
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--skip-oisa", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    name = str(dtype).removeprefix("torch.")
    units = ("yes" if cpu_has_bf16_matmul() else "no") if device.type == "cpu" else "n/a"
    print(
        f"{processor_name(device)}; bfloat16 matrix units: {units}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; --dtype {args.dtype} -> {name}"
    )

    memory = "RSS" if device.type == "cpu" else "allocated"
    with tempfile.TemporaryDirectory() as folder:
        clip = write_clip(Path(folder), args.fps, args.height, args.width)
        print(f"clip: {CLIP_SECONDS} s, {int(CLIP_SECONDS * args.fps)} frames of {args.width}x{args.height}, a tone")
        eemc_model, eemc_inputs = build_eemc(clip, dtype, device)
        eemc_runs = [eemc_forward(eemc_model, eemc_inputs)]
        if not args.skip_oisa:
            start = time.perf_counter()
            model = build_random_oisa_1b().to(device, dtype)
            print(f"OISA-1B built in {time.perf_counter() - start:.1f} s: {model.num_parameters():,} parameters")
            inputs = oisa_inputs(clip, model.config.image_size, model.config, device)
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            inputs["input_features"] = inputs["input_features"].to(dtype)
            print(f"OISA inputs: {len(inputs['modes'])} frames, {inputs['input_ids'].shape[1]} prompt tokens")
            oisa, _, _ = forward_by_stage(model, inputs)
            del model, inputs
            gc.collect()
            # EEMC again: a change of the machine's load between the two models shows as a change of EEMC's time
            eemc_runs.append(eemc_forward(eemc_model, eemc_inputs))

    print(f"\nEEMC forward, {name} (seconds{'' if args.skip_oisa else ', before and after OISA-1B'})")
    for stage in eemc_runs[0][0]:
        print(f"  {stage:55s}" + "".join(f"{stages[stage]:8.2f}" for stages, _ in eemc_runs))
    # after OISA-1B the process keeps memory it freed: only the first run's peak is EEMC's
    print(f"  {'peak ' + memory + ' GiB (first run)':55s}{eemc_runs[0][1].peak / 2**30:8.2f}")
    if args.skip_oisa:
        return
    print(f"\nOISA-1B forward, {name} (seconds, peak {memory} GiB)")
    for stage, measured in oisa.items():
        print(f"  {stage:55s}{measured.seconds:8.2f}{measured.peak / 2**30:8.2f}")
    eemc_seconds = [stages["whole forward"] for stages, _ in eemc_runs]
    oisa_seconds = oisa["whole forward"].seconds
    print(
        f"\nwhole forward on the same 10 s clip, {name}: EEMC {eemc_seconds[0]:.2f} s before and "
        f"{eemc_seconds[1]:.2f} s after OISA-1B's {oisa_seconds:.2f} s; "
        f"OISA-1B / EEMC = {oisa_seconds / statistics.mean(eemc_seconds):.2f} "
        f"(against their mean; {oisa_seconds / max(eemc_seconds):.2f} to {oisa_seconds / min(eemc_seconds):.2f})"
    )


if __name__ == "__main__":
    main()
