"""One forward of OISA-1B (random weights) on a 10-frame 448x448 clip with 10 s of audio, stage by stage.

Prints, per stage, the time, its share of the whole forward and the peak memory reached (process RSS on CPU,
`torch.cuda.max_memory_allocated` on GPU). The baseline of the ratios is the whole forward of the same run.

    python benchmarks/model_forward.py                 # fp32 on CPU
    python benchmarks/model_forward.py --device cuda   # bf16 on a GPU
    python benchmarks/model_forward.py --compare-msda  # also the PyTorch deformable attention, as a baseline
"""

import argparse
import os
import time

import torch
from peak_memory import PeakMemory

from modeling_oisa import OisaConfig, OisaForReferringSegmentation, audio_token_counts


def build_prompt(config: OisaConfig, modes: torch.Tensor, audio_tokens: int) -> torch.Tensor:
    """Token ids of a release-layout prompt holding exactly the placeholders of the inputs."""
    image_slots = int(sum(config.num_image_tokens if mode == 2 else int(mode) for mode in modes))
    text = torch.randint(0, 151000, (1, 60))
    parts = [
        text[:, :30],
        torch.full((1, image_slots), config.image_token_id),
        torch.full((1, audio_tokens), config.sub_audio_token_id),
        torch.full((1, audio_tokens), config.audio_token_id),
        text[:, 30:],
        torch.tensor([[config.seg_token_id]]),
    ]
    return torch.cat(parts, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--audio-seconds", type=float, default=10.0)
    parser.add_argument("--compare-msda", action="store_true", help="rerun vision and mask head with the PyTorch MSDA")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    torch.manual_seed(0)
    config = OisaConfig()
    start = time.perf_counter()
    model = OisaForReferringSegmentation(config).to(device=device, dtype=dtype).eval()
    print(f"OISA-1B built in {time.perf_counter() - start:.1f} s: {model.num_parameters():,} parameters, {dtype}, {device}")

    size = config.image_size
    pixel_values = torch.randn(args.frames, 3, size, size, device=device)
    modes = torch.ones(args.frames, dtype=torch.long)
    modes[torch.linspace(0, args.frames - 1, 4).round().long()] = 2
    mel_length = int(args.audio_seconds * 100)
    input_features = torch.randn(1, 128, 3000, device=device)
    feature_lengths = torch.tensor([mel_length], device=device)
    audio_tokens = int(audio_token_counts(feature_lengths)[0])
    input_ids = build_prompt(config, modes, audio_tokens).to(device)

    stages = {}
    with torch.no_grad(), PeakMemory(device) as whole:
        with PeakMemory(device) as stage:
            image_features = model.get_image_features(pixel_values)
        stages["vision (InternViT + adapter)"] = stage
        with PeakMemory(device) as stage:
            audio = model.get_audio_features(input_features, feature_lengths)
        stages["audio (Whisper encoder)"] = stage
        with PeakMemory(device) as stage:
            embeds = model.inject_multimodal_embeddings(
                input_ids,
                model.get_input_embeddings()(input_ids),
                image_features.vision_embeds,
                modes,
                audio,
                torch.tensor([2]),
            )
            hidden = model.language_model(inputs_embeds=embeds).last_hidden_state
            model.lm_head(hidden[:, -1:])
        stages[f"LLM prefill ({input_ids.shape[1]} tokens)"] = stage
        with PeakMemory(device) as stage:
            model.segment_frames(hidden[0, -1:], image_features.image_maps)
        stages[f"mask head ({args.frames} frames)"] = stage

    print(f"{'stage':36s} {'seconds':>8s} {'share':>7s} {'peak GiB':>9s}")
    for name, measured in stages.items():
        print(f"{name:36s} {measured.seconds:8.2f} {measured.seconds / whole.seconds:7.1%} {measured.peak / 2**30:9.2f}")
    print(f"{'whole forward':36s} {whole.seconds:8.2f} {1:7.1%} {whole.peak / 2**30:9.2f}")

    if args.compare_msda:
        # the same deformable-attention stages through transformers' grid_sample path, in this process
        os.environ["OISA_MSDA_BACKEND"] = "torch"
        with torch.no_grad():
            with PeakMemory(device) as vision_torch:
                maps = model.get_image_features(pixel_values).image_maps
            with PeakMemory(device) as mask_torch:
                model.segment_frames(hidden[0, -1:], maps)
        print(f"deformable attention through PyTorch (OISA_MSDA_BACKEND=torch): vision {vision_torch.seconds:.2f} s "
              f"({vision_torch.seconds / stages['vision (InternViT + adapter)'].seconds:.2f}x the compiled op), "
              f"mask head {mask_torch.seconds:.2f} s "
              f"({mask_torch.seconds / stages[f'mask head ({args.frames} frames)'].seconds:.2f}x), peak "
              f"{max(vision_torch.peak, mask_torch.peak) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
