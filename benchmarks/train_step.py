"""Samples per second and peak memory of a stage-4 training step (10 frames per sample, batch 2).

The stage-4 setup of `configs/stage4_omniavs.json`: LoRA r32 on the LLM, the ViT-Adapter and the mask head trained
in full, the new token rows trained, AdamW. Random weights and random inputs shaped like an OmniAVS sample (4 dense
and 6 pooled frames, a 10 s soundtrack interleaved per frame and whole, a 3 s spoken expression). The baseline of the
ratio is the same step without gradient checkpointing, in the same process.

    python benchmarks/train_step.py                          # the tiny config, fp32 on CPU
    python benchmarks/train_step.py --size 1b --device cuda  # OISA-1B, bf16 autocast on a GPU
"""

import argparse

import torch
from peak_memory import PeakMemory

from modeling_oisa import OisaConfig, OisaForReferringSegmentation, audio_token_counts
from oisa_tiny import tiny_oisa_config
from oisa_training.setup import TrainingSetup, apply_training_setup


def make_batch(config: OisaConfig, batch_size: int, frames: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Inputs of `batch_size` samples, each with `frames` frames, a soundtrack and a speech clip, and one [SEG]."""
    size = config.image_size
    modes = torch.ones(frames, dtype=torch.long)
    modes[torch.linspace(0, frames - 1, 4).round().long()] = 2
    mel_lengths = torch.tensor([1000, 300])
    soundtrack, speech = (int(count) for count in audio_token_counts(mel_lengths))
    image_slots = int(sum(config.num_image_tokens if mode == 2 else 1 for mode in modes))
    ids = torch.cat(
        [
            torch.randint(0, 300, (20,)),
            torch.full((image_slots,), config.image_token_id),
            torch.full((soundtrack,), config.sub_audio_token_id),
            torch.full((soundtrack + speech,), config.audio_token_id),
            torch.randint(0, 300, (20,)),
            torch.tensor([config.seg_token_id]),
            torch.randint(0, 300, (3,)),
        ]
    )
    labels = ids.clone()
    labels[:-8] = -100
    batch = {
        "input_ids": ids.repeat(batch_size, 1),
        "labels": labels.repeat(batch_size, 1),
        "pixel_values": torch.randn(batch_size * frames, 3, size, size),
        "image_token_modes": modes.repeat(batch_size),
        "images_per_sample": torch.full((batch_size,), frames),
        "input_features": torch.randn(2 * batch_size, 128, 3000),
        "audio_feature_lengths": mel_lengths.repeat(batch_size),
        "audio_token_modes": torch.tensor([2, 1]).repeat(batch_size),
        "gt_masks": (torch.rand(batch_size * frames, size, size) > 0.7).float(),
    }
    return {key: value.to(device) for key, value in batch.items()}


def time_steps(model, optimizer, batch, steps: int, device: torch.device, autocast_dtype) -> PeakMemory:
    def step() -> None:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # warm-up: allocations, kernel builds
    with PeakMemory(device) as measured:
        for _ in range(steps):
            step()
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "1b"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None

    torch.manual_seed(0)
    config = OisaConfig() if args.size == "1b" else tiny_oisa_config()
    model = OisaForReferringSegmentation(config).to(device)
    model = apply_training_setup(
        model,
        TrainingSetup(
            train_modules=["vision_adapter", "mask_head"],
            llm_lora_rank=32,
            new_token_ids=[config.image_token_id, config.audio_token_id, config.seg_token_id, config.sub_audio_token_id],
        ),
    ).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=4e-5)
    batch = make_batch(config, args.batch_size, args.frames, device)
    print(f"OISA {args.size}, stage-4 step, batch {args.batch_size} x {args.frames} frames, "
          f"{batch['input_ids'].shape[1]} tokens per sample, {device}, {autocast_dtype or torch.float32}")

    results = {}
    for checkpointing in (False, True):
        if checkpointing:
            model.get_base_model().activation_checkpointing_enable()
        results[checkpointing] = time_steps(model, optimizer, batch, args.steps, device, autocast_dtype)
    baseline = results[False]
    print(f"{'gradient checkpointing':24s} {'samples/s':>10s} {'vs off':>7s} {'peak GiB':>9s}")
    for checkpointing, measured in results.items():
        rate = args.batch_size * args.steps / measured.seconds
        baseline_rate = args.batch_size * args.steps / baseline.seconds
        print(f"{'on' if checkpointing else 'off':24s} {rate:10.3f} {rate / baseline_rate:7.2f} "
              f"{measured.peak / 2**30:9.2f}")


if __name__ == "__main__":
    main()
