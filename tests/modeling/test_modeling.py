import pytest
import torch
from transformers.models.internvl.modeling_internvl import InternVLModel

from modeling_oisa import OisaConfig, OisaForReferringSegmentation, OisaInjectionError
from modeling_oisa.deformable_attention import softmax_over_short_rows
from modeling_oisa.modeling_oisa import pixel_shuffle
from oisa_tiny import tiny_oisa_config

from ..conftest import SEG_TOKEN, make_sample


def test_training_forward_backward_reaches_every_trained_part(tiny_config):
    torch.manual_seed(1)
    model = OisaForReferringSegmentation(tiny_config).train()
    output = model(**make_sample())
    for name in ("loss", "lm_loss", "class_loss", "dice_loss", "bce_loss"):
        assert torch.isfinite(getattr(output, name)), name
    expected = output.lm_loss + 1.0 * output.class_loss + 2.0 * output.dice_loss + 0.5 * output.bce_loss
    torch.testing.assert_close(output.loss, expected)
    output.loss.backward()
    trained = {
        "adapter": model.vision_adapter.extractors[0].attention.attn.sampling_offsets.weight,
        "adapter spatial prior": model.vision_adapter.spatial_prior.stem[0].weight,
        "pixel decoder": model.mask_head.pixel_decoder.encoder.layers[0].self_attn.value_proj.weight,
        "query decoder": model.mask_head.query_decoder.layers[0].cross_attn.in_proj_weight,
        "seg projection": model.mask_head.query_decoder.seg_token_projection.layers[0].layers[0].weight,
        "llm q_proj": model.language_model.layers[0].self_attn.q_proj.weight,
        "llm mlp": model.language_model.layers[1].mlp.down_proj.weight,
        "audio projector": model.audio_projector.linear_1.weight,
        "vision projector": model.multi_modal_projector.linear_1.weight,
    }
    for name, parameter in trained.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        assert torch.isfinite(parameter.grad).all(), name


def test_mask_outputs_have_the_frames_of_their_sample(tiny_model):
    sample = make_sample(num_frames=4)
    with torch.no_grad():
        output = tiny_model(**sample)
    assert len(output.mask_logits) == 1
    assert output.mask_logits[0].shape == (4, 56, 56)
    assert output.class_logits[0].shape == (4, 2)


@pytest.mark.slow
def test_mixed_batch_keeps_frames_and_masks_aligned(tiny_model):
    """B7: a batch of samples with different frame counts and a referring image pairs each [SEG] with its own frames."""
    first, second = make_sample(num_frames=3, seed=1), make_sample(num_frames=5, with_referring_image=False, seed=2)
    length = max(first["input_ids"].shape[1], second["input_ids"].shape[1])

    def pad(tensor, value):
        return torch.nn.functional.pad(tensor, (0, length - tensor.shape[1]), value=value)

    batch = {
        "input_ids": torch.cat([pad(first["input_ids"], 379), pad(second["input_ids"], 379)]),
        "attention_mask": torch.cat([pad(first["attention_mask"], 0), pad(second["attention_mask"], 0)]),
        "labels": torch.cat([pad(first["labels"], -100), pad(second["labels"], -100)]),
        "images_per_sample": torch.tensor([4, 5]),
        "input_features": torch.cat([first["input_features"], second["input_features"]]),
        "audio_feature_lengths": torch.cat([first["audio_feature_lengths"], second["audio_feature_lengths"]]),
        "audio_token_modes": torch.tensor([2, 1, 2, 1]),
    }
    for key in ("pixel_values", "image_token_modes", "segmentation_frame_mask", "gt_masks"):
        batch[key] = torch.cat([first[key], second[key]])
    with torch.no_grad():
        batched = tiny_model(**batch)
        alone = [tiny_model(**first), tiny_model(**second)]
    assert [logits.shape[0] for logits in batched.mask_logits] == [3, 5]
    for batched_logits, single in zip(batched.mask_logits, alone):
        torch.testing.assert_close(batched_logits, single.mask_logits[0], atol=1e-3, rtol=1e-4)


def test_training_runs_the_adapter_on_segmentation_frames_only(tiny_model):
    """Referring images get their LLM tokens from the ViT alone; the frames' maps and masks are those of the full path."""
    sample = make_sample(num_frames=3, seed=3)
    frames = sample["segmentation_frame_mask"]
    assert not frames.all()
    with torch.no_grad():
        full = tiny_model.get_image_features(sample["pixel_values"])
        some = tiny_model.get_image_features(sample["pixel_values"], maps_for=frames)
        none = tiny_model.get_image_features(sample["pixel_values"], maps_for=torch.zeros_like(frames))
        output = tiny_model(**sample)
        seg_states = output.last_hidden_state[0][sample["input_ids"][0] == SEG_TOKEN]
        expected = tiny_model.segment_frames(seg_states, [level[frames] for level in full.image_maps])
    for features in (some, none):
        torch.testing.assert_close(features.vision_embeds, full.vision_embeds)
        torch.testing.assert_close(features.vit_last_hidden_state, full.vit_last_hidden_state)
    assert none.image_maps == []
    for level, full_level in zip(some.image_maps, full.image_maps):
        torch.testing.assert_close(level, full_level[frames])
    torch.testing.assert_close(output.mask_logits[0], expected.mask_logits[0])


def test_wrong_number_of_ground_truth_masks_is_a_clear_error(tiny_model):
    sample = make_sample(num_frames=3)
    sample["gt_masks"] = sample["gt_masks"][:2]
    with pytest.raises(ValueError, match="ground-truth masks"):
        tiny_model(**sample)


def test_injection_count_mismatch_is_a_clear_error(tiny_model):
    sample = make_sample()
    sample["image_token_modes"] = torch.tensor([2, 2, 0, 2])  # one more dense image than the prompt has slots for
    with pytest.raises(OisaInjectionError, match=r"<IMG_CONTEXT>"):
        tiny_model(**sample)
    sample = make_sample()
    sample["audio_token_modes"] = torch.tensor([1, 1])  # no soundtrack for the per-frame slots
    with pytest.raises(OisaInjectionError, match=r"<SUB_AUDIO_CONTEXT>"):
        tiny_model(**sample)


def test_injection_writes_pooled_dense_and_audio_embeddings(tiny_model):
    sample = make_sample()
    with torch.no_grad():
        features = tiny_model.get_image_features(sample["pixel_values"])
        audio = tiny_model.get_audio_features(sample["input_features"], sample["audio_feature_lengths"])
        embeds = tiny_model.inject_multimodal_embeddings(
            sample["input_ids"],
            tiny_model.get_input_embeddings()(sample["input_ids"]),
            features.vision_embeds,
            sample["image_token_modes"],
            audio,
            sample["audio_token_modes"],
        )[0]
    ids = sample["input_ids"][0]
    image_rows = embeds[ids == tiny_model.config.image_token_id]
    torch.testing.assert_close(image_rows[:64], features.vision_embeds[0])
    torch.testing.assert_close(image_rows[64], features.vision_embeds[1].mean(0))
    torch.testing.assert_close(image_rows[65:], features.vision_embeds[3])
    assert [clip.shape[0] for clip in audio] == [50, 32]
    torch.testing.assert_close(embeds[ids == tiny_model.config.audio_token_id], torch.cat(audio))
    torch.testing.assert_close(embeds[ids == tiny_model.config.sub_audio_token_id], audio[0])


def test_generate_with_multimodal_inputs(tiny_model):
    sample = make_sample()
    prompt = {key: sample[key] for key in ("pixel_values", "image_token_modes", "input_features",
                                           "audio_feature_lengths", "audio_token_modes")}
    input_ids = sample["input_ids"][:, :-3]
    with torch.no_grad():
        generated = tiny_model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                        max_new_tokens=5, do_sample=False, **prompt)
        # greedy decoding with the cache equals repeated argmax over full teacher-forced forwards
        sequence = input_ids
        while sequence.shape[1] < generated.shape[1]:
            logits = tiny_model(input_ids=sequence, **prompt).logits[:, -1]
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    assert input_ids.shape[1] < generated.shape[1] <= input_ids.shape[1] + 5
    assert torch.equal(generated, sequence)
    if generated.shape[1] < input_ids.shape[1] + 5:
        assert generated[0, -1] == tiny_model.generation_config.eos_token_id


def test_query_is_carried_from_frame_to_frame(tiny_model):
    sample = make_sample(num_frames=3, with_referring_image=False)
    seg = torch.randn(1, tiny_model.config.text_config.hidden_size)
    with torch.no_grad():
        maps = tiny_model.get_image_features(sample["pixel_values"]).image_maps
        together = tiny_model.segment_frames(seg, maps).mask_logits[0]
        frame1_alone = tiny_model.segment_frames(seg, [level[1:2] for level in maps]).mask_logits[0, 0]
        changed_first = [level.clone() for level in maps]
        for level in changed_first:
            level[0] = torch.randn_like(level[0])
        after_change = tiny_model.segment_frames(seg, changed_first).mask_logits[0]
    # frame 1 depends on frame 0: alone, or after another frame 0, it comes out differently
    assert (together[1] - frame1_alone).abs().max() > 1e-2
    assert (together[1] - after_change[1]).abs().max() > 1e-2
    torch.testing.assert_close(together[0], tiny_model.segment_frames(seg, [level[:1] for level in maps]).mask_logits[0, 0])


def test_long_video_in_chunks_equals_one_piece(tiny_model):
    generator = torch.Generator().manual_seed(3)
    num_frames = 7
    maps = [torch.randn(num_frames, 64, 224 // stride, 224 // stride, generator=generator) for stride in (4, 8, 16, 32)]
    seg = torch.randn(2, tiny_model.config.text_config.hidden_size, generator=generator)
    with torch.no_grad():
        whole = tiny_model.segment_frames(seg, maps, chunk_size=num_frames)
        chunked = tiny_model.segment_frames(seg, maps, chunk_size=3)
    assert chunked.mask_logits.shape == (2, num_frames, 56, 56)
    torch.testing.assert_close(chunked.mask_logits, whole.mask_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(chunked.class_logits, whole.class_logits, atol=1e-5, rtol=1e-5)


def test_pixel_shuffle_matches_internvl():
    tokens = torch.randn(2, 16 * 16, 8)
    reference = InternVLModel.pixel_shuffle(None, tokens.reshape(2, 16, 16, 8), scale_factor=0.5).reshape(2, 64, 32)
    assert torch.equal(pixel_shuffle(tokens, 0.5), reference)
    # token (r, c) = [x(2r,2c) | x(2r,2c+1) | x(2r+1,2c) | x(2r+1,2c+1)]
    grid = tokens.reshape(2, 16, 16, 8)
    expected = torch.cat([grid[:, 2, 4], grid[:, 2, 5], grid[:, 3, 4], grid[:, 3, 5]], dim=-1)
    assert torch.equal(pixel_shuffle(tokens, 0.5)[:, 1 * 8 + 2], expected)


def test_adapter_maps_and_vision_tokens_have_the_released_geometry(tiny_model):
    with torch.no_grad():
        features = tiny_model.get_image_features(torch.randn(2, 3, 224, 224))
    assert features.vision_embeds.shape == (2, 64, 64)
    assert [tuple(level.shape) for level in features.image_maps] == [
        (2, 64, 56, 56), (2, 64, 28, 28), (2, 64, 14, 14), (2, 64, 7, 7)
    ]
    assert features.vit_last_hidden_state.shape == (2, 257, 64)


def test_bfloat16_model_keeps_deformable_blocks_in_float32(tiny_config):
    torch.manual_seed(0)
    model = OisaForReferringSegmentation(tiny_config).eval().to(torch.bfloat16)
    sample = make_sample()
    with torch.no_grad():
        features = model.get_image_features(sample["pixel_values"])
        output = model(**{k: v for k, v in sample.items() if k != "labels"})
    assert features.vision_embeds.dtype == torch.bfloat16
    assert all(level.dtype == torch.float32 for level in features.image_maps)
    assert output.logits.dtype == torch.bfloat16 and torch.isfinite(output.mask_logits[0]).all()


def test_gradient_checkpointing_reaches_every_tower(tiny_config):
    torch.manual_seed(0)
    model = OisaForReferringSegmentation(tiny_config).train()
    model.activation_checkpointing_enable()
    checkpointed = {type(module).__name__ for module in model.modules() if getattr(module, "gradient_checkpointing", False)}
    assert {"InternVLVisionLayer", "OisaAdapterExtractor", "Qwen2DecoderLayer", "WhisperEncoderLayer",
            "OisaQueryDecoderLayer"} <= checkpointed
    reference = OisaForReferringSegmentation(tiny_config).train()
    reference.load_state_dict(model.state_dict())
    sample = make_sample()
    torch.manual_seed(5)
    loss = model(**sample).loss
    loss.backward()
    torch.manual_seed(5)
    reference_loss = reference(**sample).loss
    reference_loss.backward()
    torch.testing.assert_close(loss, reference_loss)
    torch.testing.assert_close(
        model.vision_tower.encoder.layer[0].attention.q_proj.weight.grad,
        reference.vision_tower.encoder.layer[0].attention.q_proj.weight.grad,
    )


def test_initialisation_is_deterministic_and_complete(tiny_config):
    """B31: every parameter is initialised, from the seed alone."""
    torch.manual_seed(42)
    first = OisaForReferringSegmentation(tiny_config)
    torch.manual_seed(42)
    second = OisaForReferringSegmentation(tiny_config)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
        assert torch.isfinite(a).all(), name
    pixel_attention = first.mask_head.pixel_decoder.encoder.layers[0].self_attn
    torch.testing.assert_close(pixel_attention.sampling_offsets.bias, pixel_attention.offset_grid())
    assert torch.all(pixel_attention.attention_weights.weight == 0)
    assert first.mask_head.pixel_decoder.level_embed.std() > 0.5
    assert first.vision_adapter.level_embed.std() > 0.5


def test_default_config_is_oisa_1b_with_the_original_parameter_counts():
    config = OisaConfig()
    assert config.image_size == 448 and config.num_image_tokens == 256
    assert config.text_config.vocab_size == 151664 and config.tie_word_embeddings is False
    with torch.device("meta"):
        model = OisaForReferringSegmentation(config)

    def count(*modules):
        return sum(parameter.numel() for module in modules for parameter in module.parameters())

    assert count(model.vision_tower, model.vision_adapter) == 317_519_296
    assert count(model.language_model, model.lm_head) == 629_680_000
    assert count(model.audio_tower) == 636_968_960
    assert count(model.multi_modal_projector) == 4_482_816
    assert count(model.audio_projector) == 1_954_048
    # the original's 18,909,378 less the 51,200 of its unused query embeddings
    assert count(model.mask_head) == 18_909_378 - 51_200
    assert model.lm_head.weight is not model.language_model.embed_tokens.weight


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"vision_config": {"image_size": 440, "patch_size": 14, "hidden_size": 64, "num_attention_heads": 4}}, "multiple of 32"),
        ({"adapter_interaction_indexes": [[0, 1], [3, 3]]}, "consecutive"),
        ({"adapter_deform_num_heads": 3}, "divisible"),
        ({"profile": "newest"}, "profile"),
        ({"mask_upsampling": "nearest"}, "mask_upsampling"),
    ],
)
def test_config_rejects_impossible_settings(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_oisa_config(**overrides)


def test_profiles_set_every_switch_and_switches_stand_alone():
    release = OisaConfig()
    assert (release.seg_hidden_state_source, release.mask_upsampling, release.frame_sampler) == (
        "before_seg", "binarize_then_upsample", "release")
    fixed = OisaConfig(profile="fixed")
    assert (fixed.seg_hidden_state_source, fixed.mask_upsampling, fixed.sub_audio_layout) == (
        "seg", "upsample_logits", "per_frame")
    mixed = OisaConfig(profile="release", mask_upsampling="upsample_logits")
    assert mixed.mask_upsampling == "upsample_logits" and mixed.seg_hidden_state_source == "before_seg"
    assert OisaConfig.from_dict(mixed.to_dict()).mask_upsampling == "upsample_logits"


def test_loss_without_supervised_tokens_or_seg_is_finite(tiny_model):
    sample = make_sample()
    sample["labels"] = torch.full_like(sample["labels"], -100)
    sample["input_ids"] = sample["input_ids"].masked_fill(sample["input_ids"] == SEG_TOKEN, 16)
    sample["gt_masks"] = sample["gt_masks"][:0]
    with torch.no_grad():
        output = tiny_model(**sample)
    assert output.lm_loss == 0 and output.class_loss == 0 and torch.isfinite(output.loss)


def test_the_adapter_norms_read_channels_last_maps_for_a_single_image(tiny_model):
    # a channels-first input makes each float32 norm copy its map first (three times as long on OISA-1B's 112x112x1024)
    layouts = []
    hooks = [
        norm.register_forward_pre_hook(
            lambda module, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last))
        )
        for norm in tiny_model.vision_adapter.output_norms
    ]
    size = tiny_model.config.image_size
    with torch.no_grad():
        tiny_model.get_image_features(torch.randn(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    assert layouts == [True] * 4


@pytest.mark.parametrize("shape", [(2, 50, 8, 12), (3, 40, 16, 4)])
def test_the_short_row_softmax_is_torch_softmax(shape):
    # the deformable attention's CPU softmax over each head's few sampling points, taken over transposed rows
    torch.manual_seed(0)
    scores = torch.randn(shape) * 30
    assert torch.allclose(softmax_over_short_rows(scores), scores.softmax(-1), rtol=0, atol=2**-24)
    low = scores.bfloat16()
    assert softmax_over_short_rows(low).dtype == torch.bfloat16
    assert torch.allclose(softmax_over_short_rows(low).float(), low.softmax(-1).float(), rtol=0, atol=2**-8)
    # the same gradient as torch's softmax (the maximum's shift has none)
    scores = scores.double().requires_grad_()
    weights = torch.randn(shape, dtype=torch.float64)
    (ours,) = torch.autograd.grad((softmax_over_short_rows(scores) * weights).sum(), scores)
    (theirs,) = torch.autograd.grad((scores.softmax(-1) * weights).sum(), scores)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-12)
