import gc
import os
from pathlib import Path

import pytest
import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `oisa segment` and eval.py set process-wide what suits a process running one job: glibc's freed memory kept for reuse
# (left at glibc's defaults here, where many tests run those entry points in this one process; tests/modeling/
# test_allocator.py runs it in child processes) and the garbage collector's frozen objects (undone after each test)
os.environ.setdefault("OISA_REUSE_FREED_MEMORY", "0")

from modeling_oisa import OisaForReferringSegmentation
from oisa_tiny import tiny_oisa_config  # noqa: E402


IMAGE_TOKEN, AUDIO_TOKEN, SEG_TOKEN, SUB_AUDIO_TOKEN = 384, 393, 396, 399


@pytest.fixture(autouse=True)
def collectable_objects():
    """Objects that an entry point run in-process froze out of the garbage collector's passes become collectable."""
    yield
    gc.unfreeze()


@pytest.fixture(scope="session")
def tiny_config():
    return tiny_oisa_config()


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return OisaForReferringSegmentation(tiny_config).eval()


def make_sample(num_frames: int = 3, with_referring_image: bool = True, seed: int = 0) -> dict:
    """
    One expression over `num_frames` frames (dense, pooled, then hidden), an optional referring image, a 2 s soundtrack
    and a 1.3 s speech clip, with a prompt holding exactly the placeholders those inputs fill, ending in `[SEG]`.
    """
    generator = torch.Generator().manual_seed(seed)
    frame_modes = [2, 1] + [0] * (num_frames - 2)
    modes = frame_modes + ([2] if with_referring_image else [])
    image_tokens = sum(64 if mode == 2 else mode for mode in modes)
    # soundtrack 2.0 s -> 200 mel frames -> 50 tokens; speech 1.3 s -> 130 frames -> 32 tokens
    mel_lengths = torch.tensor([200, 130])
    ids = [380, 10, 11] + [IMAGE_TOKEN] * image_tokens + [12] + [AUDIO_TOKEN] * 82 + [13] + [SUB_AUDIO_TOKEN] * 50
    ids += [381, 380, 14, 15, SEG_TOKEN, 16, 381]
    input_ids = torch.tensor([ids])
    labels = input_ids.clone()
    labels[:, :-4] = -100
    gt_masks = torch.zeros(num_frames, 224, 224)
    for frame in range(0, num_frames, 2):
        gt_masks[frame, 40 + 10 * frame : 120, 30:150] = 1.0
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "pixel_values": torch.randn(len(modes), 3, 224, 224, generator=generator),
        "image_token_modes": torch.tensor(modes),
        "input_features": torch.randn(2, 128, 3000, generator=generator),
        "audio_feature_lengths": mel_lengths,
        "audio_token_modes": torch.tensor([2, 1]),
        "segmentation_frame_mask": torch.tensor([True] * num_frames + ([False] if with_referring_image else [])),
        "gt_masks": gt_masks,
    }


# ../shared beside the checkout holds the reference outputs of the original code and the real Ref-AVS annotations
SHARED = Path(os.environ.get("OISA_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """
    Tests marked `reference` read ../shared: without it they skip with one line saying where it is expected, or fail
    where OISA_REQUIRE_REFERENCE=1 (.ci/run), so that CI never skips them.
    """
    if item.get_closest_marker("reference") is None or (SHARED / "reference").is_dir():
        return
    message = f"the reference set (../shared) is expected at {SHARED}"
    if os.environ.get("OISA_REQUIRE_REFERENCE") == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)
