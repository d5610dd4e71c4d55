"""
What an EEMC run trains (configs/refavs_eemc*.json): the original's `--train_params` substring rule in our names gives
the original's trainable list (the reference's `params.trainable`), frozen modules run as in evaluation, and samples
of unequal clips do not share a batch.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import Mask2FormerConfig, RobertaConfig

from modeling_refavs import RefAvsConfig, RefAvsForReferringSegmentation
from modeling_refavs.conversion import convert_original_key
from oisa_tiny.refavs import tiny_refavs_config
from oisa_training.loop import FAMILIES
from oisa_training.refavs_eemc_family import (
    collate_eemc_samples,
    frozen_modules_to_eval,
    select_trainable_parameters,
)
from oisa_training.stage_config import StageConfig
from processing_oisa.data.errors import OisaDataError

from ..conftest import SHARED


REPO = Path(__file__).resolve().parents[2]
REFERENCE = Path(os.environ.get("OISA_REFERENCE_DIR", SHARED / "reference")) / "refavs_eemc"
RELEASE = StageConfig.from_file(REPO / "configs" / "refavs_eemc.json")
FIXED = StageConfig.from_file(REPO / "configs" / "refavs_eemc_fixed.json")


def trainable_names(model: torch.nn.Module, config: StageConfig) -> dict[str, int]:
    return {name: parameter.numel() for name, parameter in select_trainable_parameters(model, config.train_parameters)}


@pytest.mark.reference
def test_the_release_recipe_trains_what_the_original_trains():
    """The reference model's sizes, built on the meta device: names and shapes only."""
    golden = json.loads((REFERENCE / "golden.json").read_text())["params"]
    mask2former = Mask2FormerConfig.from_pretrained(REFERENCE / "configs" / "mask2former_config.json")
    text = RobertaConfig.from_pretrained(REFERENCE / "configs" / "text_config.json")
    with torch.device("meta"):
        model = RefAvsForReferringSegmentation(
            RefAvsConfig(mask2former_config=mask2former.to_dict(), text_config=text.to_dict())
        )
    ours = trainable_names(model, RELEASE)
    original = {convert_original_key(name): numel for name, _, numel in golden["trainable"]}
    assert ours == original
    assert (len(ours), sum(ours.values())) == (golden["trainable_tensors"], golden["trainable_total"]) == (30, 8988546)
    frozen = [name for name, parameter in model.named_parameters() if name not in ours]
    assert all(not model.get_parameter(name).requires_grad for name in frozen)
    # the release leaves its three fusion attentions at their random init
    assert any(name.startswith("integration_attention.") for name in frozen)


def test_the_fixed_recipe_also_trains_the_fusion_attentions():
    model = RefAvsForReferringSegmentation(tiny_refavs_config(profile="fixed"))
    release, fixed = trainable_names(model, RELEASE), trainable_names(model, FIXED)
    added = {name.split(".")[0] for name in set(fixed) - set(release)}
    assert set(release) < set(fixed)
    assert added == {"audio_text_attention", "visual_text_attention", "integration_attention"}
    # the audio encoder (VGGish), the text encoder, the Swin and the decoder stay frozen under both
    for name in fixed:
        frozen_parts = ("text_model.", "audio_encoder.", "pixel_level_module.encoder.", "transformer_module.")
        assert not name.startswith(frozen_parts)


def test_a_rule_that_matches_nothing_is_an_error():
    model = RefAvsForReferringSegmentation(tiny_refavs_config())
    with pytest.raises(ValueError, match=r"\['avs_adapt'\] match no parameter"):
        select_trainable_parameters(model, ["audio_projection.", "avs_adapt"])


def test_frozen_modules_run_as_in_evaluation():
    model = RefAvsForReferringSegmentation(tiny_refavs_config())
    select_trainable_parameters(model, RELEASE.train_parameters)
    FAMILIES["refavs_eemc"].train_mode(model)
    assert not model.text_model.training and not model.pixel_level_module.encoder.training
    assert not model.transformer_module.training
    assert model.training and model.audio_projection.training and model.query_prompter.training
    # a layer holding a trainable adapter stays in training mode, its frozen attention projections do not
    layer = model.pixel_level_module.decoder.encoder.layers[0]
    assert layer.training and layer.self_attn.adapter.training and not layer.self_attn.value_proj.training
    frozen_modules_to_eval(model)
    assert model.query_prompter.training


def test_clips_of_unequal_length_do_not_share_a_batch():
    def sample(frames: int) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": torch.zeros(frames, 3, 8, 8),
            "input_ids": torch.zeros(25, dtype=torch.long),
            "attention_mask": torch.ones(25, dtype=torch.long),
            "audio_input_features": torch.zeros(2, 96, 64),
            "labels": torch.zeros(frames, 4, 4),
        }

    batch = collate_eemc_samples([sample(3), sample(3)])
    assert batch["pixel_values"].shape == (2, 3, 3, 8, 8) and batch["input_ids"].shape == (2, 25)
    with pytest.raises(OisaDataError, match="differ in pixel_values shape"):
        collate_eemc_samples([sample(3), sample(4)])
