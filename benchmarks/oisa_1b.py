"""
OISA-1B with random weights for the benchmarks: the full-size configuration (`OisaConfig()`, 1.61 B parameters), built
in memory with inputs in the release's layout, or written to a folder with a processor (`AutoModel` and
`AutoProcessor` load it), and the name of the processor that runs it.
"""

import platform
from pathlib import Path

import torch

from modeling_oisa import OisaConfig, OisaForReferringSegmentation, audio_token_counts
from oisa_tiny import build_tiny_tokenizer
from processing_oisa.processing_oisa import OisaProcessor


# added to the logit of `[SEG]` at every step of a written model's generation (`always_seg`): random weights answer
# noise, which would leave the mask head out
SEG_LOGIT_BIAS = 100.0


def processor_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model as /proc/cpuinfo (Linux) or `platform` states it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_random_oisa_1b(config: OisaConfig | None = None, seed: int = 0) -> OisaForReferringSegmentation:
    """OISA-1B (`OisaConfig()` unless `config` is given) with random weights, in float32, in eval mode."""
    torch.manual_seed(seed)
    return OisaForReferringSegmentation(config or OisaConfig()).eval()


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


def random_inputs(config: OisaConfig, frames: int, audio_seconds: float, device: torch.device) -> dict:
    """
    One clip of `frames` random frames (4 of them dense, as the release shows up to 32 frames, the rest pooled), a
    soundtrack of `audio_seconds` as random log-mel features, and a prompt holding their placeholders and ending in
    `[SEG]`: `pixel_values`, `input_features`, `feature_lengths`, `modes` (image token modes) and `input_ids`.
    """
    size = config.image_size
    modes = torch.ones(frames, dtype=torch.long)
    modes[torch.linspace(0, frames - 1, 4).round().long()] = 2
    feature_lengths = torch.tensor([int(audio_seconds * 100)], device=device)
    inputs = {
        "pixel_values": torch.randn(frames, 3, size, size, device=device),
        "input_features": torch.randn(1, 128, 3000, device=device),
        "feature_lengths": feature_lengths,
        "modes": modes,
    }
    inputs["input_ids"] = build_prompt(config, modes, int(audio_token_counts(feature_lengths)[0])).to(device)
    return inputs


def write_random_oisa_1b(
    folder: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0, always_seg: bool = False
) -> None:
    """
    Writes OISA-1B with random weights in `dtype` (bfloat16 as released; the deformable-attention blocks stay float32)
    and its processor to `folder`. The processor's tokenizer is the offline tiny one, carrying OISA's special tokens
    (the config takes their ids; the vocabulary keeps its 151,664 rows). `always_seg` biases generation towards
    `[SEG]` at every step (`SEG_LOGIT_BIAS`, in the saved generation config), so that the mask head runs.
    """
    tokenizer = build_tiny_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    config = OisaConfig(
        image_token_id=ids("<IMG_CONTEXT>"),
        audio_token_id=ids("<AUDIO_CONTEXT>"),
        seg_token_id=ids("[SEG]"),
        sub_audio_token_id=ids("<SUB_AUDIO_CONTEXT>"),
    )
    model = build_random_oisa_1b(config, seed).to(dtype)
    model.generation_config.eos_token_id = ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if always_seg:
        # the list form survives the JSON round trip (a tuple key would come back as a string)
        model.generation_config.sequence_bias = [[[config.seg_token_id], SEG_LOGIT_BIAS]]
    model.save_pretrained(folder)
    OisaProcessor.from_model_config(config, tokenizer).save_pretrained(folder)
