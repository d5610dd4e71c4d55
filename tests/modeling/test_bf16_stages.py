"""
bfloat16 against float32 stage by stage, on OISA-tiny-synthetic at inference: each stage's output as the bfloat16 model
computes it from its own earlier stages, relative error ||bf16 - fp32|| / ||fp32|| over the whole tensor. The samples
are the 8 positive expressions of one synthetic OmniAVS clip (text, speech, sound and image types), 10 frames each.
The bounds are about twice the largest error measured on them (CPU, one thread, torch 2.13):

| stage output | measured | bound |
| --- | ---: | ---: |
| vision tower (InternViT last hidden state) | 0.0060 | 0.0125 |
| adapter maps (4 levels, float32 deformable attention) | 0.0046 | 0.01 |
| image tokens (projector) | 0.0030 | 0.006 |
| audio tokens (Whisper encoder + projector) | 0.0025 | 0.005 |
| LLM hidden states (whole prompt) | 0.0094 | 0.02 |
| `[SEG]` hidden state | 0.0086 | 0.02 |
| mask logits | 0.0054 | 0.0125 |
| presence (class) logits | 0.0042 | 0.01 |

The answers and the upsampled masks of the segmenter are compared in `test_bf16_accuracy.py`.
"""

import pytest
import torch
from transformers import AutoModel, AutoProcessor

import processing_oisa  # noqa: F401  (registers the processor)
from modeling_oisa import OisaForReferringSegmentation, tiny_synthetic_path
from oisa_cli.main import main as oisa_main
from processing_oisa.data.mixture import build_omniavs_sample
from processing_oisa.data.omniavs import OmniAVSReader


BOUNDS = {
    "vision tower (InternViT last hidden state)": 0.0125,
    "adapter maps (4 levels)": 0.01,
    "image tokens (projector)": 0.006,
    "audio tokens (Whisper encoder + projector)": 0.005,
    "LLM hidden states (whole prompt)": 0.02,
    "[SEG] hidden state": 0.02,
    "mask logits": 0.0125,
    "presence (class) logits": 0.01,
}


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16-stages") / "omniavs"
    assert oisa_main(["make-synthetic", str(root), "--format", "omniavs", "--videos", "1", "--seed", "77",
                      "--split", "test"]) == 0
    processor = AutoProcessor.from_pretrained(tiny_synthetic_path())
    records = [record for record in OmniAVSReader(root, split="test") if not record.is_null]
    assert len(records) == 8 and {record.referring_sound_path is not None for record in records} == {True, False}
    return [build_omniavs_sample(record, processor, num_frames=10, num_dense_frames=4) for record in records]


@pytest.fixture(scope="module")
def models():
    """The shipped checkpoint in float32 and in bfloat16, on one thread (measured so)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = tiny_synthetic_path()
    yield (AutoModel.from_pretrained(path, dtype=dtype).eval() for dtype in (torch.float32, torch.bfloat16))
    torch.set_num_threads(threads)


def stage_outputs(model: OisaForReferringSegmentation, sample: dict) -> dict[str, torch.Tensor]:
    """The output of each stage of the inference path, in the model's dtype, each computed from the stages before."""
    config = model.config
    with torch.no_grad():
        features = model.get_image_features(sample["pixel_values"].to(model.dtype))
        audio = model.get_audio_features(sample["input_features"].to(model.dtype), sample["audio_feature_lengths"])
        input_ids = sample["input_ids"][None]
        embeds = model.inject_multimodal_embeddings(
            input_ids, model.get_input_embeddings()(input_ids), features.vision_embeds, sample["image_token_modes"],
            audio, sample["audio_token_modes"],
        )
        hidden = model.language_model(inputs_embeds=embeds).last_hidden_state[0]
        position = int(torch.nonzero(input_ids[0] == config.seg_token_id)[0])
        if config.seg_hidden_state_source == "before_seg":
            position -= 1
        frames = sample["segmentation_frame_mask"]
        maps = [level[frames] for level in features.image_maps]
        masks = model.segment_frames(hidden[position][None], maps)
    return {
        "vision tower (InternViT last hidden state)": features.vit_last_hidden_state,
        "adapter maps (4 levels)": torch.cat([level.flatten() for level in features.image_maps]),
        "image tokens (projector)": features.vision_embeds,
        "audio tokens (Whisper encoder + projector)": torch.cat(audio),
        "LLM hidden states (whole prompt)": hidden,
        "[SEG] hidden state": hidden[position],
        "mask logits": masks.mask_logits,
        "presence (class) logits": masks.class_logits,
    }


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def test_bfloat16_stages_are_float32_within_the_measured_error(samples, models):
    float32, bfloat16 = models
    worst = dict.fromkeys(BOUNDS, 0.0)
    for sample in samples:
        expected, actual = stage_outputs(float32, sample), stage_outputs(bfloat16, sample)
        assert set(actual) == set(BOUNDS)
        assert actual["vision tower (InternViT last hidden state)"].dtype == torch.bfloat16
        assert actual["LLM hidden states (whole prompt)"].dtype == torch.bfloat16
        for name, value in actual.items():
            worst[name] = max(worst[name], relative_error(value, expected[name]))
    for name, bound in BOUNDS.items():
        assert 0 < worst[name] <= bound, (name, worst[name])
