"""
The tiny random-weight EEMC that the original code made (`reference/refavs_eemc`, its README §5) through this
package's handling of original checkpoints: its 286 keys map to ours and back exactly, and the same state dict saved
as a `.pth`, as the released `ckpt_best_miou.pth` is, loads through `from_pretrained` to the model that the golden
parity test (tests/modeling_refavs/test_golden_parity.py) builds, with the same outputs.
"""

import lzma
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from transformers import Mask2FormerConfig, RobertaConfig

from modeling_refavs import RefAvsConfig, RefAvsForReferringSegmentation
from modeling_refavs.conversion import (
    convert_original_state_dict,
    load_original_state_dict,
    original_state_dict_from_ours,
)

from ..conftest import SHARED


pytestmark = pytest.mark.reference

REFERENCE = Path(os.environ.get("OISA_REFERENCE_DIR", SHARED / "reference")) / "refavs_eemc"


def read_xz_safetensors(path: Path) -> dict[str, torch.Tensor]:
    with lzma.open(path) as handle:
        return load_safetensors(handle.read())


@pytest.fixture(scope="module")
def original_state_dicts() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return read_xz_safetensors(REFERENCE / "model.safetensors.xz"), read_xz_safetensors(
        REFERENCE / "text_model.safetensors.xz"
    )


@pytest.fixture(scope="module")
def golden_config() -> RefAvsConfig:
    """The config the golden parity test builds from the reference's configs."""
    mask2former = Mask2FormerConfig.from_pretrained(REFERENCE / "configs" / "mask2former_config.json")
    text = RobertaConfig.from_pretrained(REFERENCE / "configs" / "text_config.json")
    return RefAvsConfig(mask2former_config=mask2former.to_dict(), text_config=text.to_dict())


def test_the_reference_keys_map_to_ours_and_back_exactly(original_state_dicts, golden_config):
    state_dict, text_state_dict = original_state_dicts
    converted = convert_original_state_dict(state_dict, text_state_dict)
    original, text = original_state_dict_from_ours(converted, golden_config)
    # all 286 keys, buffers included: the Swin index buffers and Mask2Former's loss weights are rebuilt as the original
    # builds them
    assert len(state_dict) == 286 and sorted(original) == sorted(state_dict)
    assert [key for key in state_dict if not torch.equal(original[key], state_dict[key])] == []
    assert [key for key in state_dict if original[key].dtype != state_dict[key].dtype] == []
    # the text encoder's, less the pooler EEMC never reads and the constant position ids
    dropped = {"pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids"}
    assert sorted(text) == sorted(set(text_state_dict) - dropped)
    assert all(torch.equal(text[key], text_state_dict[key]) for key in text)


@pytest.mark.slow
def test_the_reference_as_a_pth_loads_as_the_golden_path(tmp_path, original_state_dicts, golden_config):
    state_dict, text_state_dict = original_state_dicts
    # the original layout: the state dict as torch.save writes it, the text encoder's folder, the Mask2Former config
    folder = tmp_path / "eemc"
    (folder / "text_encoder").mkdir(parents=True)
    torch.save(state_dict, folder / "ckpt_best_miou.pth")
    shutil.copy(REFERENCE / "configs" / "text_config.json", folder / "text_encoder" / "config.json")
    save_file(text_state_dict, folder / "text_encoder" / "model.safetensors")
    shutil.copy(REFERENCE / "configs" / "mask2former_config.json", folder / "mask2former_config.json")

    torch.manual_seed(0)
    loaded = RefAvsForReferringSegmentation.from_pretrained(folder).eval()
    golden = RefAvsForReferringSegmentation(golden_config).eval()
    load_original_state_dict(golden, state_dict, text_state_dict)

    ours, theirs = loaded.state_dict(), golden.state_dict()
    assert set(ours) == set(theirs)
    assert [key for key in ours if not torch.equal(ours[key], theirs[key])] == []
    for name in ("audio_feature_dim", "fusion_dim", "projection_hidden_dim", "adapter_hidden_dim", "profile"):
        assert getattr(loaded.config, name) == getattr(golden_config, name), name
    assert loaded.config.mask2former_config.to_dict() == golden_config.mask2former_config.to_dict()

    # the golden inputs of video 0, first two frames (the Swin-B-wide tiny model at 384x384 costs seconds per frame)
    inputs = np.load(REFERENCE / "golden.npz")
    batch = {
        "pixel_values": torch.from_numpy(inputs["inputs/pixel_values"][:1, :2]),
        "audio_features": torch.from_numpy(inputs["inputs/audio_feats"][:1]),
        "input_ids": torch.from_numpy(inputs["inputs/token_ids"][:1]),
        "attention_mask": torch.from_numpy(inputs["inputs/attention_mask"][:1]),
    }
    with torch.no_grad():
        from_pth, from_golden_path = loaded(**batch), golden(**batch)
    assert torch.equal(from_pth.logits, from_golden_path.logits)
    assert torch.equal(from_pth.text_embeds, from_golden_path.text_embeds)
