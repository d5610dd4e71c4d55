"""The EEMC model on a tiny random config: profiles and switches, cached memory, shapes, loss, batch mixing."""

import pytest
import torch
from transformers import AutoConfig, AutoModel

from modeling_refavs import PROFILE_SWITCHES, RefAvsForReferringSegmentation, cached_memory
from oisa_tiny.refavs import tiny_refavs_config


def make_inputs(batch_size: int = 2, num_frames: int = 3, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(batch_size, num_frames, 3, 64, 64, generator=generator),
        "audio_features": torch.randn(batch_size, num_frames, 12, generator=generator),
        "input_ids": torch.randint(3, 40, (batch_size, 6), generator=generator),
        "attention_mask": torch.ones(batch_size, 6, dtype=torch.long),
        "labels": (torch.rand(batch_size, num_frames, 32, 32, generator=generator) > 0.5).float(),
    }


@pytest.fixture(scope="module", params=["release", "fixed"])
def tiny_model(request):
    torch.manual_seed(0)
    return RefAvsForReferringSegmentation(tiny_refavs_config(profile=request.param)).eval()


def test_profiles_set_every_switch_and_a_switch_stands_alone():
    for profile in ("release", "fixed"):
        config = tiny_refavs_config(profile=profile)
        assert {switch: getattr(config, switch) for switch in PROFILE_SWITCHES} == {
            switch: values[profile] for switch, values in PROFILE_SWITCHES.items()
        }
    mixed = tiny_refavs_config(profile="release", integration_attention_over="tokens")
    assert mixed.integration_attention_over == "tokens" and mixed.visual_token_layout == "flat_view"
    with pytest.raises(ValueError, match="integration_attention_over"):
        tiny_refavs_config(integration_attention_over="frames")
    with pytest.raises(ValueError, match="profile"):
        tiny_refavs_config(profile="paper")
    with pytest.raises(ValueError, match="fusion_dim"):
        tiny_refavs_config(fusion_dim=64)


def test_cached_memory_closed_forms():
    features = torch.tensor([[1.0, 3.0, 8.0]])[..., None]
    # release: 2F - running mean including the current step
    inclusive = cached_memory(features, 1.0, "inclusive_over_tokens")
    assert torch.allclose(inclusive[0, :, 0], torch.tensor([2 - 1.0, 6 - 2.0, 16 - 4.0]))
    # the paper: (beta + 1) F - beta * mean of the previous steps, 0 at the first
    exclusive = cached_memory(features, 1.0, "exclusive_over_time")
    assert torch.allclose(exclusive[0, :, 0], torch.tensor([2.0, 6 - 1.0, 16 - 2.0]))


def test_forward_shapes_loss_and_gradients(tiny_model):
    inputs = make_inputs()
    output = tiny_model(**inputs)
    assert output.logits.shape == (2, 3, 32, 32)
    assert output.integrated_tokens.shape == (2, 3, 6 + 1 + 4 + 1 + 3, 128)
    assert output.prompted_queries.shape == (8, 6, 32)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    adapter = tiny_model.pixel_level_module.decoder.encoder.layers[0].self_attn.adapter
    assert adapter[0].weight.grad is not None and tiny_model.query_prompter.pool_gate.grad is not None
    tiny_model.zero_grad()


def test_text_features_may_replace_token_ids(tiny_model):
    inputs = make_inputs()
    with torch.no_grad():
        from_ids = tiny_model(**inputs).logits
        features = tiny_model.encode_text(inputs.pop("input_ids"), inputs.pop("attention_mask"))
        from_features = tiny_model(**inputs, text_features=features).logits
    torch.testing.assert_close(from_features, from_ids)


def test_release_mixes_the_batch_and_fixed_does_not():
    first, partner_a, partner_b = make_inputs(1, seed=1), make_inputs(1, seed=2), make_inputs(1, seed=3)
    batch = lambda other: {k: torch.cat([first[k], other[k]]) for k in first}  # noqa: E731
    for profile, mixes in (("release", True), ("fixed", False)):
        torch.manual_seed(0)
        model = RefAvsForReferringSegmentation(tiny_refavs_config(profile=profile)).eval()
        with torch.no_grad():
            with_a = model(**batch(partner_a)).integrated_tokens[0]
            with_b = model(**batch(partner_b)).integrated_tokens[0]
        difference = (with_a - with_b).abs().max().item()
        assert (difference > 1e-3) if mixes else (difference < 1e-6), (profile, difference)


def test_auto_classes_and_save_load_round_trip(tmp_path):
    values = tiny_refavs_config().to_dict()
    assert values.pop("model_type") == "refavs_eemc"
    config = AutoConfig.for_model("refavs_eemc", **values)
    torch.manual_seed(0)
    model = AutoModel.from_config(config).eval()
    assert isinstance(model, RefAvsForReferringSegmentation)
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    inputs = make_inputs()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits)


def test_swin_small_map_windows():
    # the tiny Swin's last stage has a 2x2 map, its window size, and two blocks: the second shifts only when every
    # size is partitioned (transformers 5), not under the clamp transformers 4.30 applied (the released profile)
    frames = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    last_maps = {}
    for mode in ("always_partition", "clamp"):
        torch.manual_seed(0)
        model = RefAvsForReferringSegmentation(tiny_refavs_config(swin_small_map_windows=mode)).eval()
        with torch.no_grad():
            ours = model.pixel_level(frames)
            if mode == "always_partition":
                # the same as transformers' own Mask2Former pixel-level module
                library = model.pixel_level_module(frames)
                assert torch.equal(ours.encoder_last_hidden_state, library.encoder_last_hidden_state)
                assert torch.equal(ours.decoder_last_hidden_state, library.decoder_last_hidden_state)
        last_maps[mode] = ours.encoder_last_hidden_state
    assert (last_maps["clamp"] - last_maps["always_partition"]).abs().max() > 1e-2


def test_new_parts_start_as_the_original_leaves_them():
    # release: N(0, 0.02) adapter weights in series, gates at 1 (what the original's from_pretrained gives); fixed:
    # a residual adapter that starts as the identity
    release = RefAvsForReferringSegmentation(tiny_refavs_config(profile="release"))
    fixed = RefAvsForReferringSegmentation(tiny_refavs_config(profile="fixed"))
    assert release.query_prompter.attention_gate.item() == release.query_prompter.pool_gate.item() == 1.0
    release_adapter = release.pixel_level_module.decoder.encoder.layers[0].self_attn.adapter
    assert 0.015 < release_adapter[2].weight.std().item() < 0.025 and not release_adapter[2].bias.any()
    attention = fixed.pixel_level_module.decoder.encoder.layers[0].self_attn
    hidden = torch.randn(1, 4 + 16 + 64, 32)
    shapes = [(2, 2), (4, 4), (8, 8)]
    reference_points = torch.rand(1, hidden.shape[1], 3, 2)
    kwargs = {"encoder_hidden_states": hidden, "reference_points": reference_points, "spatial_shapes_list": shapes}
    with torch.no_grad():
        adapted = attention(hidden, **kwargs)[0]
        plain = super(type(attention), attention).forward(hidden, **kwargs)[0]
    assert torch.equal(adapted, plain)


def test_every_parameter_of_a_new_model_is_initialised():
    # torch.empty-backed parameters that no init touches hold whatever memory they got (once NaN in the pixel
    # decoder's level embedding)
    torch.manual_seed(0)
    model = RefAvsForReferringSegmentation(tiny_refavs_config())
    for name, parameter in model.named_parameters():
        assert torch.isfinite(parameter).all(), name
    level_embed = model.pixel_level_module.decoder.level_embed
    assert 0.8 < level_embed.std().item() < 1.2 and abs(level_embed.mean().item()) < 0.2
