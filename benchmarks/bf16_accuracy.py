"""
How much bfloat16 changes the answer, against float32 on the same weights and inputs, on the CPU.

`tiny`: the shipped OISA-tiny-synthetic over a synthetic OmniAVS set (`oisa make-synthetic`, held-out seed 5 by
default), evaluated by `eval.py` once with `--dtype float32` and once with `--dtype bfloat16`: the share of expressions
answered with the same text, and with the same `[SEG]` decision, the J&F of each run (the mean of the 8 types', as the
paper's All) and the per-expression J&F differences. Targets: the same answers on at least 95% of expressions, J&F
within 0.01.

`1b`: OISA-1B with random weights (`oisa_1b.build_random_oisa_1b`, the inputs of `benchmarks/model_forward.py`), the
relative error ||bf16 - fp32|| / ||fp32|| (Frobenius, over the whole tensor) of each stage's output: as the bfloat16
model computes it from the bfloat16 outputs before it ("end to end"), and for the LLM and the mask head also from the
float32 inputs cast to bfloat16 ("stage alone"). The bfloat16 model is the float32 one cast with `model.to(bfloat16)`:
the deformable-attention blocks keep their float32 weights and compute in float32.

    python benchmarks/bf16_accuracy.py                    # both
    python benchmarks/bf16_accuracy.py --parts tiny --videos 40 --seed 5
    python benchmarks/bf16_accuracy.py --parts 1b --frames 10
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from oisa_1b import build_random_oisa_1b, processor_name, random_inputs

from modeling_oisa import OisaForReferringSegmentation
from modeling_oisa.precision import cpu_has_bf16_matmul


REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- OISA-tiny-synthetic on a synthetic eval set


def evaluate(data: Path, out: Path, dtype: str) -> tuple[dict, dict[str, dict], float]:
    """`eval.py` on `data` in `dtype`: its metrics, its result line per expression and its wall time."""
    command = [sys.executable, str(REPO / "eval.py"), "--model", "oisa-tiny-synthetic", "--dataset", "omniavs",
               "--data-root", str(data), "--out", str(out), "--dtype", dtype]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=REPO)
    seconds = time.perf_counter() - started
    lines = [json.loads(line) for path in sorted(out.glob("results-*.jsonl")) for line in path.read_text().splitlines()]
    return json.loads((out / "metrics.json").read_text()), {line["key"]: line for line in lines}, seconds


def compare_tiny(videos: int, seed: int) -> None:
    with tempfile.TemporaryDirectory(prefix="oisa-bf16-accuracy-") as work:
        work = Path(work)
        synthetic = ["make-synthetic", str(work / "data"), "--format", "omniavs", "--videos", str(videos), "--seed",
                     str(seed), "--split", "test"]
        subprocess.run([sys.executable, "-m", "oisa_cli.main", *synthetic], check=True, stdout=subprocess.DEVNULL)
        runs = {dtype: evaluate(work / "data", work / dtype, dtype) for dtype in ("float32", "bfloat16")}
    (metrics32, lines32, seconds32), (metrics16, lines16, seconds16) = runs["float32"], runs["bfloat16"]
    keys = sorted(lines32)
    if sorted(lines16) != keys or any(lines32[key]["status"] != "ok" or lines16[key]["status"] != "ok" for key in keys):
        raise SystemExit("the two runs did not score the same expressions")
    same_answer = [lines32[key]["answer"] == lines16[key]["answer"] for key in keys]
    same_seg = [lines32[key]["has_seg"] == lines16[key]["has_seg"] for key in keys]
    score = {key: ((lines32[key]["j"] + lines32[key]["f"]) / 2, (lines16[key]["j"] + lines16[key]["f"]) / 2)
             for key in keys}
    differences = [abs(high - low) for high, low in score.values()]
    all32, all16 = metrics32["segmentation"]["J&F"], metrics16["segmentation"]["J&F"]
    nulls = [key for key in keys if lines32[key]["is_null"]]
    print(f"\nOISA-tiny-synthetic, {len(keys)} expressions of {videos} synthetic clips (seed {seed}), eval.py")
    print("| quantity | float32 | bfloat16 |")
    print("| --- | ---: | ---: |")
    print(f"| J&F (All: mean of the 8 types) | {all32:.4f} | {all16:.4f} |")
    print(f"| nulls answered null (of {len(nulls)}) | {sum(not lines32[key]['has_seg'] for key in nulls)} | "
          f"{sum(not lines16[key]['has_seg'] for key in nulls)} |")
    print(f"| eval.py wall time, s | {seconds32:.0f} | {seconds16:.0f} |")
    print(f"\nsame answer text: {sum(same_answer)} of {len(keys)} ({sum(same_answer) / len(keys):.1%}); "
          f"same [SEG] decision: {sum(same_seg)} of {len(keys)}")
    print(f"J&F difference: All {abs(all16 - all32):.5f}; per expression mean {statistics.mean(differences):.4f}, "
          f"largest {max(differences):.4f}, {sum(value > 0.01 for value in differences)} above 0.01")
    for key, same in zip(keys, same_answer):
        if not same:
            print(f"  {key}: float32 {lines32[key]['answer']!r}  bfloat16 {lines16[key]['answer']!r}")
    verdict = sum(same_answer) / len(keys) >= 0.95 and abs(all16 - all32) <= 0.01
    print(f"targets (>= 95% same answers, J&F within 0.01): {'met' if verdict else 'MISSED'}")


# ---------------------------------------------------------------- OISA-1B, random weights, stage by stage


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm()).item()


def stage_outputs(
    model: OisaForReferringSegmentation, inputs: dict, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Every stage's output of one forward in `dtype` (the model's), each from the outputs before it; the maps."""
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"].to(dtype))
        audio = model.get_audio_features(inputs["input_features"].to(dtype), inputs["feature_lengths"])
        input_ids = inputs["input_ids"]
        embeds = model.inject_multimodal_embeddings(
            input_ids, model.get_input_embeddings()(input_ids), features.vision_embeds, inputs["modes"], audio,
            torch.tensor([2]),
        )
        hidden = model.language_model(inputs_embeds=embeds).last_hidden_state
        masks = model.segment_frames(hidden[0, -1:], features.image_maps)
        return {
            "vision tower (InternViT last hidden state)": features.vit_last_hidden_state,
            "adapter maps (4 levels)": torch.cat([level.flatten() for level in features.image_maps]),
            "image tokens (projector)": features.vision_embeds,
            "audio tokens (Whisper encoder + projector)": torch.cat(audio),
            "LLM input embeddings": embeds,
            "LLM hidden states (whole prompt)": hidden,
            "[SEG] hidden state": hidden[0, -1:],
            "next-token logits at [SEG]": model.lm_head(hidden[:, -1:]),
            "mask logits": masks.mask_logits,
            "presence (class) logits": masks.class_logits,
        }, features.image_maps


def stages_alone(model: OisaForReferringSegmentation, reference: dict, maps: list[torch.Tensor]) -> dict[str, float]:
    """
    The LLM (with its head) and the mask head in bfloat16 on the float32 model's inputs to them: the LLM's embeddings
    and the `[SEG]` state cast to bfloat16, the adapter maps as they are (the bfloat16 model's adapter gives float32
    maps too).
    """
    with torch.no_grad():
        embeds = reference["LLM input embeddings"].to(torch.bfloat16)
        hidden = model.language_model(inputs_embeds=embeds).last_hidden_state
        seg = reference["[SEG] hidden state"].to(torch.bfloat16)
        masks = model.segment_frames(seg, maps)
    return {
        "LLM hidden states (whole prompt)": relative_error(hidden, reference["LLM hidden states (whole prompt)"]),
        "[SEG] hidden state": relative_error(hidden[0, -1:], reference["[SEG] hidden state"]),
        "next-token logits at [SEG]": relative_error(
            model.lm_head(hidden[:, -1:]), reference["next-token logits at [SEG]"]
        ),
        "mask logits": relative_error(masks.mask_logits, reference["mask logits"]),
        "presence (class) logits": relative_error(masks.class_logits, reference["presence (class) logits"]),
    }


def compare_1b(frames: int, audio_seconds: float) -> None:
    device = torch.device("cpu")
    model = build_random_oisa_1b()
    inputs = random_inputs(model.config, frames, audio_seconds, device)
    started = time.perf_counter()
    float32, maps = stage_outputs(model, inputs, torch.float32)
    seconds32 = time.perf_counter() - started
    model.to(torch.bfloat16)
    started = time.perf_counter()
    bfloat16, _ = stage_outputs(model, inputs, torch.bfloat16)
    alone = stages_alone(model, float32, maps)
    seconds16 = time.perf_counter() - started
    print(f"\nOISA-1B (random weights), {frames} frames of {model.config.image_size}x{model.config.image_size}, "
          f"{audio_seconds:g} s of audio, {inputs['input_ids'].shape[1]} prompt tokens; "
          f"float32 {seconds32:.0f} s, bfloat16 {seconds16:.0f} s")
    print("| stage output | shape | relative error, end to end | stage alone |")
    print("| --- | --- | ---: | ---: |")
    for name, expected in float32.items():
        shape = "x".join(str(size) for size in expected.shape) if name != "adapter maps (4 levels)" else "4 maps"
        # the vision and audio stages read the data itself, the embeddings only gather earlier outputs
        single = f"{alone[name]:.4f}" if name in alone else "same"
        print(f"| {name} | {shape} | {relative_error(bfloat16[name], expected):.4f} | {single} |")
    agree = ((bfloat16["mask logits"] > 0) == (float32["mask logits"] > 0)).float().mean().item()
    print(f"mask logits with the float32 sign (end to end): {agree:.5f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=["tiny", "1b"], default=["tiny", "1b"])
    parser.add_argument("--videos", type=int, default=40, help="synthetic clips (10 expressions each)")
    parser.add_argument("--seed", type=int, default=5, help="of the synthetic set (5: held out from training)")
    parser.add_argument("--frames", type=int, default=10, help="OISA-1B's frames")
    parser.add_argument("--audio-seconds", type=float, default=10.0)
    args = parser.parse_args()
    units = "yes" if cpu_has_bf16_matmul() else "no"
    print(f"{processor_name(torch.device('cpu'))}; bfloat16 matrix units: {units}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    if "tiny" in args.parts:
        compare_tiny(args.videos, args.seed)
    if "1b" in args.parts:
        compare_1b(args.frames, args.audio_seconds)


if __name__ == "__main__":
    main()
