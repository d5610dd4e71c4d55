"""
`oisa_training.setup`: what a stage trains and how it is merged back. The audio LoRA of stage 1 (made trainable:
B2's option (b), alpha = 4r as the original codes it) trains and merges to the outputs it had unmerged; every error
`apply_training_setup` raises is triggered; merging a model that was not wrapped gives it back.
"""

import pytest
import torch
from peft import PeftModel

from modeling_oisa import OisaForReferringSegmentation
from oisa_training.setup import TrainingSetup, apply_training_setup, merge_training_setup

from ..conftest import make_sample


AUDIO_LORA_MODULES = {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}


def fresh_model(tiny_config) -> OisaForReferringSegmentation:
    torch.manual_seed(0)
    return OisaForReferringSegmentation(tiny_config)


def test_unknown_modules_to_train_are_an_error(tiny_config):
    with pytest.raises(ValueError, match=r"Unknown modules to train: \['audio_mlp', 'mask_decoder'\]"):
        apply_training_setup(fresh_model(tiny_config), TrainingSetup(train_modules=["mask_decoder", "audio_mlp"]))


def test_lora_on_the_llm_and_the_audio_encoder_at_once_is_an_error(tiny_config):
    with pytest.raises(ValueError, match="not both"):
        apply_training_setup(fresh_model(tiny_config), TrainingSetup(llm_lora_rank=4, audio_lora_rank=4))


def test_a_stage_without_lora_trains_its_modules_in_full_and_merges_to_itself(tiny_config):
    model = fresh_model(tiny_config)
    trained = apply_training_setup(model, TrainingSetup(train_modules=["audio_projector", "mask_head"]))
    assert trained is model
    trainable = {name.split(".")[0] for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable == {"audio_projector", "mask_head"}
    assert all(parameter.requires_grad for parameter in model.audio_projector.parameters())
    assert merge_training_setup(model) is model


@pytest.fixture(scope="module")
def audio_lora_run(tiny_config):
    """Stage 1 with its audio LoRA trainable: rank 4 on the Whisper encoder plus the audio projector, 4 AdamW steps."""
    model = fresh_model(tiny_config)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    wrapped = apply_training_setup(model, TrainingSetup(train_modules=["audio_projector"], audio_lora_rank=4))
    sample = make_sample()
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    wrapped.train()
    losses = []
    for step in range(4):
        torch.manual_seed(step)
        loss = wrapped(**sample).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return wrapped.eval(), before, losses, sample


def test_audio_lora_wraps_only_the_audio_encoder_with_alpha_4r(audio_lora_run):
    wrapped, _, _, _ = audio_lora_run
    assert isinstance(wrapped, PeftModel)
    lora_layers = {name: module for name, module in wrapped.named_modules() if hasattr(module, "lora_A")}
    assert lora_layers
    for name, module in lora_layers.items():
        assert ".audio_tower.layers." in name and name.rsplit(".", 1)[1] in AUDIO_LORA_MODULES, name
        assert module.r["default"] == 4 and module.scaling["default"] == 4.0, name
    # every targeted linear of every encoder layer
    layers = wrapped.base_model.model.audio_tower.layers
    assert len(lora_layers) == len(layers) * len(AUDIO_LORA_MODULES)
    trainable = {name for name, parameter in wrapped.named_parameters() if parameter.requires_grad}
    assert trainable and all("lora_" in name or ".audio_projector." in name for name in trainable)
    assert any(".audio_projector." in name for name in trainable)


def test_audio_lora_trains(audio_lora_run):
    """The loss falls; the LoRA pairs and the projector moved; nothing else did."""
    wrapped, before, losses, _ = audio_lora_run
    assert losses[-1] < losses[0]
    for name, module in wrapped.named_modules():
        if hasattr(module, "lora_B"):
            assert module.lora_B["default"].weight.abs().max() > 0, name  # PEFT starts B at zero
    merged_names = {}
    for name, parameter in wrapped.named_parameters():
        if "lora_" in name or "original_module" in name:
            continue
        # `base_model.model.<name>`, the trained copy of a module in full as `<module>.modules_to_save.default`
        plain = name.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
        plain = plain.replace(".base_layer", "")
        merged_names[plain] = parameter
    assert merged_names.keys() == before.keys()
    for name, parameter in merged_names.items():
        moved = not torch.equal(parameter, before[name])
        assert moved == name.startswith("audio_projector."), name


def test_audio_lora_merges_to_the_unmerged_outputs(audio_lora_run, tiny_config):
    wrapped, before, _, sample = audio_lora_run
    inputs = {key: value for key, value in sample.items() if key != "labels"}
    with torch.no_grad():
        unmerged = wrapped(**inputs)
        merged_model = merge_training_setup(wrapped)
        merged = merged_model(**inputs)
    assert type(merged_model) is OisaForReferringSegmentation
    assert merged_model.state_dict().keys() == fresh_model(tiny_config).state_dict().keys()
    # measured: 3e-7 on logits up to 0.72, 2e-7 on mask logits up to 0.56
    torch.testing.assert_close(merged.logits, unmerged.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged.mask_logits[0], unmerged.mask_logits[0], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        untouched = fresh_model(tiny_config).eval()(**inputs)
    # training moved them far more (measured: 0.76 and 0.029)
    assert (merged.logits - untouched.logits).abs().max() > 0.1
    assert (merged.mask_logits[0] - untouched.mask_logits[0]).abs().max() > 1e-2
    # the merge folded a real change into the encoder: its linears moved, the rest of the model did not
    merged_state = merged_model.state_dict()
    for name, tensor in before.items():
        changed = not torch.equal(merged_state[name], tensor)
        expected = name.startswith("audio_projector.") or (
            name.startswith("audio_tower.layers.") and name.endswith(".weight")
            and name.split(".")[-2] in AUDIO_LORA_MODULES
        )
        assert changed == expected, name
