"""
Merging the LoRA pairs of an unmerged original checkpoint (`modeling_oisa.conversion.original.merge_lora`): the ViT
backbone LoRA (`use_backbone_lora`, alpha = 2r, spec/model.md §6.3), whose fused `attn.qkv` is merged before it is
split in three, and every error the merge raises, each naming the tensor and its file.
"""

import re

import pytest
import torch
from safetensors.torch import load_file

from modeling_oisa import OisaCheckpointError, OisaForReferringSegmentation
from modeling_oisa.conversion.original import merge_lora

from ..conversion.test_conversion import TINY_ORIGINAL, copy_original


pytestmark = pytest.mark.reference


BACKBONE_LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
BACKBONE_SCALE = 2.0
LAYER_MODULE = re.compile(r"^vision_model\.encoder\.layers\.\d+\.(.+)$")


@pytest.fixture(scope="module")
def original_tensors():
    return load_file(TINY_ORIGINAL / "model.safetensors")


@pytest.fixture(scope="module")
def converted():
    return OisaForReferringSegmentation.from_pretrained(TINY_ORIGINAL, dtype=torch.float32)


def backbone_lora_wrapped(tensors: dict, rank: int, wrapper: str) -> dict:
    """
    The tensors as a stage that trained the ViT with LoRA leaves them: `wrapper` is where PEFT wrapped it (the spec's
    `vision_model.encoder.base_model.model.layers...` or InternVL's `vision_model.base_model.model.encoder...`), a
    nonzero pair on every target linear, its base weight holding W - 2 * B @ A.
    """
    generator = torch.Generator().manual_seed(3)
    wrapped = {}
    for key, tensor in tensors.items():
        if not key.startswith(f"{wrapper}."):
            wrapped[key] = tensor
            continue
        module, _, parameter = key.rpartition(".")
        inner = module.replace(f"{wrapper}.", f"{wrapper}.base_model.model.", 1)
        layer = LAYER_MODULE.match(module)
        if layer is None or layer[1] not in BACKBONE_LORA_TARGETS:
            wrapped[f"{inner}.{parameter}"] = tensor
            continue
        if parameter == "weight":
            lora_a = torch.randn(rank, tensor.shape[1], generator=generator) * 0.1
            lora_b = torch.randn(tensor.shape[0], rank, generator=generator) * 0.1
            tensor = tensor - BACKBONE_SCALE * lora_b @ lora_a
            wrapped[f"{inner}.lora_A.default.weight"] = lora_a
            wrapped[f"{inner}.lora_B.default.weight"] = lora_b
        wrapped[f"{inner}.base_layer.{parameter}"] = tensor.contiguous()
    return wrapped


@pytest.mark.parametrize("wrapper", ["vision_model.encoder", "vision_model"])
def test_backbone_lora_is_merged_with_alpha_2r_before_qkv_is_split(converted, original_tensors, tmp_path, wrapper):
    rank = 4
    wrapped = backbone_lora_wrapped(original_tensors, rank, wrapper)
    assert sum(".lora_A." in key for key in wrapped) == 4 * len(BACKBONE_LORA_TARGETS)
    assert any(f"{wrapper}.base_model.model." in key for key in wrapped)

    def set_backbone_lora(config):
        config["use_backbone_lora"] = rank

    model = OisaForReferringSegmentation.from_pretrained(
        copy_original(tmp_path / "lora", wrapped, set_backbone_lora), dtype=torch.float32
    )
    merged, reference = model.state_dict(), converted.state_dict()
    assert merged.keys() == reference.keys()
    for key in reference:
        # measured: 6e-8 (W - 2BA + 2BA rounds back to W); a scale of 1 or 4 leaves 0.16 or 0.32
        torch.testing.assert_close(merged[key], reference[key], atol=1e-5, rtol=0, msg=key)


# --------------------------------------------------------------------------------------------------------------------
# errors of the merge
# --------------------------------------------------------------------------------------------------------------------

Q_PROJ = "language_model.base_model.model.model.layers.0.self_attn.q_proj"


def lora_checkpoint(**extra: torch.Tensor) -> tuple[dict, dict]:
    """A wrapped q_proj (64 x 64) with a rank-2 pair, plus `extra` tensors; every tensor from shard-1."""
    tensors = {
        f"{Q_PROJ}.base_layer.weight": torch.zeros(64, 64),
        f"{Q_PROJ}.lora_A.default.weight": torch.ones(2, 64),
        f"{Q_PROJ}.lora_B.default.weight": torch.ones(64, 2),
        **extra,
    }
    return tensors, {key: "shard-1.safetensors" for key in tensors}


def test_a_pair_merges_with_its_scale():
    merged, files = merge_lora(*lora_checkpoint())
    key = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert list(merged) == [key] and files[key] == "shard-1.safetensors"
    assert torch.equal(merged[key], torch.full((64, 64), 2.0 * 2))  # scale 2 x (B @ A = 2 everywhere)


@pytest.mark.parametrize(
    "tensors, message",
    [
        pytest.param(
            {f"{Q_PROJ}.lora_magnitude_vector.default.weight": torch.ones(64)},
            rf"Unsupported LoRA tensor '{Q_PROJ}\.lora_magnitude_vector\.default\.weight' in shard-1",
            id="DoRA magnitude",
        ),
        pytest.param(
            {
                "language_model.model.norm.weight": torch.ones(64),
                "language_model.base_model.model.model.norm.weight": torch.ones(64),
            },
            r"Key 'language_model\.base_model\.model\.model\.norm\.weight' in shard-1\.safetensors duplicates "
            r"'language_model\.model\.norm\.weight' once unwrapped",
            id="duplicate once unwrapped",
        ),
        pytest.param(
            {"audio_model.base_model.model.encoder.layers.0.fc1.lora_A.default.weight": torch.ones(2, 64)},
            r"LoRA tensor 'audio_model\.base_model\.model\.encoder\.layers\.0\.fc1\.lora_A\.default\.weight' in "
            r"shard-1\.safetensors has no lora_B",
            id="A without B",
        ),
        pytest.param(
            {"audio_model.base_model.model.encoder.layers.0.fc1.lora_B.default.weight": torch.ones(64, 2)},
            r"has no lora_A",
            id="B without A",
        ),
        pytest.param(
            {
                "language_model.base_model.model.model.layers.1.mlp.up_proj.lora_A.default.weight": torch.ones(2, 64),
                "language_model.base_model.model.model.layers.1.mlp.up_proj.lora_B.default.weight": torch.ones(64, 2),
            },
            r"LoRA tensor '.*layers\.1\.mlp\.up_proj\.lora_A\.default\.weight' in shard-1\.safetensors has no base "
            r"weight 'language_model\.model\.layers\.1\.mlp\.up_proj\.weight'",
            id="no base weight",
        ),
        pytest.param(
            {
                "mlp1.1.weight": torch.zeros(64, 256),
                "mlp1.1.lora_A.default.weight": torch.ones(2, 256),
                "mlp1.1.lora_B.default.weight": torch.ones(64, 2),
            },
            r"LoRA on 'mlp1\.1' \(shard-1\.safetensors\) is not part of the original model",
            id="LoRA outside the wrapped towers",
        ),
        pytest.param(
            {f"{Q_PROJ}.lora_A.default.weight": torch.ones(2, 32)},
            r"LoRA pair of 'language_model\.model\.layers\.0\.self_attn\.q_proj\.weight' \(shard-1\.safetensors\) "
            r"has shapes \(2, 32\) and \(64, 2\), which do not fit the base weight \(64, 64\)",
            id="pair that does not fit",
        ),
    ],
)
def test_merge_errors_name_the_tensor_and_its_file(tensors, message):
    with pytest.raises(OisaCheckpointError, match=message):
        merge_lora(*lora_checkpoint(**tensors))


def test_a_merge_error_stops_loading_and_names_the_file(original_tensors, tmp_path):
    key = "language_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    directory = copy_original(tmp_path / "half-pair", {**original_tensors, key: torch.ones(2, 64)})
    with pytest.raises(OisaCheckpointError, match="has no lora_B") as error:
        OisaForReferringSegmentation.from_pretrained(directory)
    assert str(directory / "model.safetensors") in str(error.value)
