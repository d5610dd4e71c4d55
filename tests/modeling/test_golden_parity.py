"""
Parity with the original OISA code on its tiny reference checkpoint (fp32, CPU): the original-format folder
`reference/tiny_original` is loaded through our conversion, and every recorded stage of the original's forward,
inference and training paths is compared (reference/README.md §4). Tolerances are the measured maxima with a margin of
about 5: 2e-5 on hidden states, maps, embeddings, LM and class logits and losses (measured up to 4.1e-6), 2e-4 on
mask logits (measured up to 2.7e-5; their smallest magnitude in the golden run is 1.9e-4).
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F
from transformers import LogitsProcessor, LogitsProcessorList

from modeling_oisa import OisaForReferringSegmentation
from modeling_oisa.losses import point_mask_losses

from ..conftest import SHARED


pytestmark = pytest.mark.reference


TINY_ORIGINAL = Path(os.environ.get("OISA_REFERENCE_DIR", SHARED / "reference")) / "tiny_original"
STATE_TOL = 2e-5
MASK_TOL = 2e-4
LOSS_TOL = 2e-5



def assert_close(actual, expected, atol, name=""):
    expected = torch.as_tensor(np.asarray(expected))
    actual = actual.detach().float()
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    diff = (actual - expected.float()).abs().max().item()
    assert diff <= atol, f"{name}: max abs difference {diff:.3g} > {atol}"


@pytest.fixture(scope="module")
def golden():
    return np.load(TINY_ORIGINAL / "golden.npz")


@pytest.fixture(scope="module")
def golden_json():
    return json.loads((TINY_ORIGINAL / "golden.json").read_text())


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(2)
    return OisaForReferringSegmentation.from_pretrained(TINY_ORIGINAL, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def pixel_values(golden, golden_json):
    # torchvision ToTensor + Normalize in float32, as the original transform (the frames are already 224x224)
    frames = torch.from_numpy(golden["frames_uint8"]).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float32)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float32)
    pixel_values = (frames - mean[:, None, None]) / std[:, None, None]
    assert pixel_values.double().sum().item() == pytest.approx(golden_json["pixel_values_sum_f64"], abs=1e-6)
    return pixel_values


@pytest.fixture(scope="module")
def audio_inputs(golden):
    # mel_len = samples // 160 (process_audiov2); the npz keeps [len after the conv, token count] of each clip
    mel_lengths = torch.tensor([len(golden["audio0_waveform"]) // 160, len(golden["audio1_waveform"]) // 160])
    return torch.from_numpy(golden["audio_mel"]), mel_lengths


@pytest.fixture(scope="module")
def image_features(model, pixel_values):
    with torch.no_grad():
        return model.get_image_features(pixel_values)


@pytest.fixture(scope="module")
def seg_frames(model, golden):
    maps = [torch.from_numpy(golden[f"vision_ms_res{level}"]) for level in range(2, 6)]
    with torch.no_grad():
        return model.segment_frames(torch.from_numpy(golden["e2e_seg_hidden_state"]), maps, output_intermediate=True)


def test_vision_tokens_and_adapter_maps(image_features, golden):
    assert_close(
        image_features.vit_last_hidden_state[0], golden["vision_vit_last_hidden_state_img0"], STATE_TOL, "vit"
    )
    assert_close(image_features.vision_embeds, golden["vision_vit_embeds"], STATE_TOL, "vit_embeds")
    for level, image_map in zip(range(2, 6), image_features.image_maps):
        assert image_map.dtype == torch.float32
        assert_close(image_map, golden[f"vision_ms_res{level}"], STATE_TOL, f"res{level}")


def test_audio_embeddings_batched_and_alone(model, golden, audio_inputs):
    mel, mel_lengths = audio_inputs
    counts = golden["audio_input_lengths"][:, 1].tolist()
    with torch.no_grad():
        encoded = model.audio_tower(mel, mel_lengths).last_hidden_state
        embeds = model.get_audio_features(mel, mel_lengths)
        alone = model.get_audio_features(mel[1:], mel_lengths[1:])
    # rows past a clip's token count are padding in both implementations: compare the real ones
    for clip, count in enumerate(counts):
        assert_close(encoded[clip, :count], golden["audio_encoder_out"][clip, :count], STATE_TOL, f"encoder {clip}")
    assert [len(clip) for clip in embeds] == counts
    assert_close(embeds[0], golden["audio_embeds_0"], STATE_TOL, "audio_embeds_0")
    assert_close(embeds[1], golden["audio_embeds_1"], STATE_TOL, "audio_embeds_1")
    assert_close(alone[0], golden["audio_embeds_1_alone"], STATE_TOL, "audio_embeds_1_alone")


def test_injected_embeddings(model, golden, image_features, audio_inputs):
    input_ids = torch.from_numpy(golden["e2e_input_ids"])[None]
    with torch.no_grad():
        audio_embeds = model.get_audio_features(*audio_inputs)
        inputs_embeds = model.inject_multimodal_embeddings(
            input_ids,
            model.get_input_embeddings()(input_ids),
            image_features.vision_embeds,
            torch.tensor([2, 1, 0, 2]),  # frame flags: dense, pooled, hidden; referring image dense
            audio_embeds,
            torch.tensor([2, 1]),  # the soundtrack also fills the per-frame sub-audio slots
        )
    assert_close(inputs_embeds[0], golden["e2e_inputs_embeds"], STATE_TOL, "inputs_embeds")


def test_llm_prompt_states_and_logits(model, golden):
    with torch.no_grad():
        output = model(inputs_embeds=torch.from_numpy(golden["e2e_inputs_embeds"])[None], output_hidden_states=True)
    for layer, hidden in enumerate(output.hidden_states):
        assert_close(hidden[0], golden["llm_prompt_hidden_states"][layer], STATE_TOL, f"hidden {layer}")
    assert_close(output.last_hidden_state[0], golden["llm_prompt_hidden_states"][-1], STATE_TOL, "last hidden")
    logits = output.logits[0]
    assert_close(logits[-16:], golden["llm_prompt_logits_last16"], STATE_TOL, "logits")
    assert torch.equal(logits.argmax(-1), torch.from_numpy(golden["llm_prompt_argmax"]))
    assert_close(logits.logsumexp(-1), golden["llm_prompt_logsumexp"], STATE_TOL, "logsumexp")


def test_greedy_generation(model, golden):
    inputs_embeds = torch.from_numpy(golden["e2e_inputs_embeds"])[None]
    with torch.no_grad():
        generated = model.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=torch.ones(inputs_embeds.shape[:2], dtype=torch.long),
            max_new_tokens=12,
            do_sample=False,
        )
    assert generated[0].tolist() == golden["greedy_generated_ids"].tolist()


@pytest.fixture(scope="module")
def teacher_forced(model, golden, pixel_values, audio_inputs):
    """Prompt + generated ids through the whole model, from pixels and mels."""
    input_ids = torch.cat([torch.from_numpy(golden["e2e_input_ids"]), torch.from_numpy(golden["e2e_generated_ids"])])
    with torch.no_grad():
        return input_ids, model(
            input_ids=input_ids[None],
            pixel_values=pixel_values,
            image_token_modes=torch.tensor([2, 1, 0, 2]),
            input_features=audio_inputs[0],
            audio_feature_lengths=audio_inputs[1],
            audio_token_modes=torch.tensor([2, 1]),
        )


def test_teacher_forced_full_sequence(teacher_forced, golden):
    _, output = teacher_forced
    prompt_length = len(golden["e2e_input_ids"])
    rows = slice(prompt_length - 1, None)
    assert_close(output.last_hidden_state[0, rows], golden["llm_forced_full_last_hidden"], STATE_TOL, "forced hidden")
    assert_close(output.logits[0, rows], golden["llm_forced_full_logits"], STATE_TOL, "forced logits")


def test_seg_hidden_state_is_the_state_before_seg(model, teacher_forced, golden, golden_json):
    """(f) The release feeds the mask head the state of the token before [SEG] (a lone space, B9)."""
    input_ids, output = teacher_forced
    assert model.config.seg_hidden_state_source == "before_seg"
    seg_position = int((input_ids == model.config.seg_token_id).nonzero()[0])
    assert seg_position == golden_json["seg_hidden_source"]["seg_position"]
    assert int(input_ids[seg_position - 1]) == golden_json["seg_hidden_source"]["token_id_at_position"]
    assert_close(
        output.last_hidden_state[0, seg_position - 1 : seg_position], golden["e2e_seg_hidden_state"], STATE_TOL
    )


def test_mask_head_with_query_propagation(seg_frames, golden):
    assert_close(seg_frames.mask_logits, golden["maskhead_pred_masks"], MASK_TOL, "pred_masks")
    assert_close(seg_frames.class_logits, golden["maskhead_pred_logits"], STATE_TOL, "pred_logits")
    assert_close(seg_frames.mask_logits, golden["e2e_pred_masks"], MASK_TOL, "e2e pred_masks")


def test_mask_head_frames_alone(model, golden):
    seg_hidden_state = torch.from_numpy(golden["e2e_seg_hidden_state"])
    maps = [torch.from_numpy(golden[f"vision_ms_res{level}"]) for level in range(2, 6)]
    with torch.no_grad():
        alone = [
            model.segment_frames(seg_hidden_state, [m[t : t + 1] for m in maps]).mask_logits[0, 0] for t in range(4)
        ]
    assert_close(torch.stack(alone), golden["maskhead_pred_masks_each_frame_alone"], MASK_TOL, "frames alone")


def test_every_prediction_head_call(seg_frames, golden, golden_json):
    # frame-major: for each frame, the initial call and one after each of the 3 decoder layers
    queries = seg_frames.intermediate_queries.flatten(0, 2)
    class_logits = seg_frames.intermediate_class_logits.flatten(0, 2)
    mask_logits = seg_frames.intermediate_mask_logits.flatten(0, 2)
    assert_close(queries, golden["e2e_heads_query"], STATE_TOL, "queries")
    assert_close(class_logits, golden["e2e_heads_class"], STATE_TOL, "class logits")
    assert_close(mask_logits, golden["e2e_heads_mask"], MASK_TOL, "mask logits")
    # the attention mask each call hands to the next layer: sigmoid(resized mask logits) < 0.5 ("may not attend")
    blocked = [
        int(
            (
                F.interpolate(mask[None, None], size=tuple(size), mode="bilinear", align_corners=False).sigmoid() < 0.5
            ).sum()
        )
        for mask, size in zip(mask_logits, golden_json["e2e_heads_attn_target_sizes"])
    ]
    assert blocked == golden["e2e_heads_attn_blocked_count"].tolist()


@pytest.fixture(scope="module")
def training_output(model, golden, pixel_values, audio_inputs):
    """The original training forward's sample (reference/README.md §4.5) in eval mode, seeded as recorded."""
    batch = {
        "input_ids": torch.from_numpy(golden["train_input_ids"])[None],
        "labels": torch.from_numpy(golden["train_labels"])[None],
        "attention_mask": torch.from_numpy(golden["train_attention_mask"])[None].long(),
        "pixel_values": pixel_values,
        # the original's training flags [1, 0, 1, 2] (dense, pooled, dense, referring image)
        "image_token_modes": torch.tensor([2, 1, 2, 2]),
        "input_features": audio_inputs[0],
        "audio_feature_lengths": audio_inputs[1],
        "audio_token_modes": torch.tensor([2, 1]),
        "segmentation_frame_mask": torch.tensor([True, True, True, False]),
        "gt_masks": torch.from_numpy(golden["train_gt_masks_uint8"]).float(),
    }
    # in eval mode the point sampler's two torch.rand calls are the forward's only random draws
    torch.manual_seed(4321)
    with torch.no_grad():
        return batch, model(**batch)


def test_training_forward_outputs(training_output, golden):
    _, output = training_output
    assert_close(output.last_hidden_state[0], golden["train_last_hidden_state"], STATE_TOL, "train hidden")
    assert_close(output.logits[0, -12:], golden["train_logits_answer_region"], STATE_TOL, "train logits")
    assert_close(output.mask_logits[0], golden["train_pred_masks"], MASK_TOL, "train pred masks")
    assert_close(output.class_logits[0], golden["train_pred_class_logits"], STATE_TOL, "train class logits")


def test_training_losses_with_eval_mode_points(training_output, golden_json):
    _, output = training_output
    # the original logs Dice as "Loss/mask" and BCE as "Loss/dice" (B8)
    recorded = golden_json["train_loss_records_eval_mode"]
    for value, tag in (
        (output.lm_loss, "Loss/llm"),
        (output.class_loss, "Loss/cls"),
        (output.dice_loss, "Loss/mask"),
        (output.bce_loss, "Loss/dice"),
        (output.loss, "Loss/total"),
    ):
        assert value.item() == pytest.approx(recorded[tag], abs=LOSS_TOL), tag


def test_training_mask_losses_at_the_recorded_points(training_output, golden, golden_json):
    batch, output = training_output
    losses = point_mask_losses(
        output.mask_logits[0],
        batch["gt_masks"],
        12544,
        3.0,
        0.75,
        point_coords=torch.from_numpy(golden["train_point_coords"]),
    )
    recorded = golden_json["train_loss_records_train_mode"]
    assert losses["bce"].item() == pytest.approx(recorded["Loss/dice"], abs=LOSS_TOL)
    assert losses["dice"].item() == pytest.approx(recorded["Loss/mask"], abs=LOSS_TOL)


def test_full_inference_call_from_the_wav_files_and_frames(model, golden, golden_json):
    """(f) Our processor on the two wav files and the frames, then the model's inference path: same prompt, same
    injected embeddings, same `[SEG]` state (the token before it, release profile), same mask logits and masks."""
    from transformers import AutoTokenizer

    from processing_oisa import OisaProcessor
    from processing_oisa.processing_oisa import make_feature_extractor, make_image_processor, make_video_processor

    processor = OisaProcessor(make_image_processor(224), make_video_processor(224), make_feature_extractor(),
                              AutoTokenizer.from_pretrained(TINY_ORIGINAL), num_image_tokens=64)
    frames = golden["frames_uint8"]
    encoding = processor(videos=list(frames[:3]), speech=TINY_ORIGINAL / "speech.wav", images=frames[3],
                         audio=TINY_ORIGINAL / "soundtrack.wav", frame_modes=[2, 1, 0])
    assert processor.tokenizer.decode(encoding["input_ids"][0]) == golden_json["eval_query_string"]
    assert model.config.seg_hidden_state_source == "before_seg"
    with torch.no_grad():
        features = model.get_image_features(encoding["pixel_values"])
        audio = model.get_audio_features(encoding["input_features"], encoding["audio_feature_lengths"])
        embeds = model.inject_multimodal_embeddings(
            encoding["input_ids"], model.get_input_embeddings()(encoding["input_ids"]), features.vision_embeds,
            encoding["image_token_modes"], audio, encoding["audio_token_modes"])
        assert_close(embeds[0], golden["e2e_inputs_embeds"], STATE_TOL, "e2e_inputs_embeds")
        answer = torch.tensor([golden_json["forced_answer_ids"]])
        full = torch.cat([embeds, model.get_input_embeddings()(answer)], dim=1)
        hidden = model(inputs_embeds=full).last_hidden_state[0]
        seg_position = embeds.shape[1] + golden_json["forced_answer_ids"].index(model.config.seg_token_id)
        seg_state = hidden[seg_position - 1][None]
        assert_close(seg_state, golden["e2e_seg_hidden_state"], STATE_TOL, "e2e_seg_hidden_state")
        decoded = model.segment_frames(seg_state, features.image_maps)
    assert_close(decoded.mask_logits, golden["e2e_pred_masks"], MASK_TOL, "e2e_pred_masks")


class ForcedAnswer(LogitsProcessor):
    """Forces the answer ids one step at a time, as the reference harness's logits processor did (README §4.3)."""

    def __init__(self, answer_ids: list[int]):
        self.answer_ids = answer_ids
        self.step = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.answer_ids[self.step]] = 0.0
        self.step += 1
        return forced


def test_segmenter_answer_path_on_the_forced_answer(model, golden, golden_json, tmp_path, monkeypatch):
    """
    (f) `OisaVideoSegmenter` itself, from a frame folder and the two wav files, with generation forced to the
    reference's answer ids: the state it hands the mask head is the golden `[SEG]` state (the token before `[SEG]`,
    release profile), and its masks, probabilities and presence scores come from the golden mask logits (masks
    binarised, then upsampled: B15).
    """
    from transformers import AutoTokenizer

    from processing_oisa import OisaExpression, OisaProcessor, OisaVideoSegmenter, VideoReader
    from processing_oisa.processing_oisa import make_feature_extractor, make_image_processor, make_video_processor

    frames = golden["frames_uint8"]
    folder = tmp_path / "frames"
    folder.mkdir()
    for index, frame in enumerate(frames[:3]):
        Image.fromarray(frame).save(folder / f"{index}.png")
    processor = OisaProcessor(make_image_processor(224), make_video_processor(224), make_feature_extractor(),
                              AutoTokenizer.from_pretrained(TINY_ORIGINAL), num_image_tokens=64)
    # the reference's frame flags (dense, pooled, hidden); the release sampler would pick [2, 0, 1] for 3 frames
    monkeypatch.setattr(processor, "frame_token_modes", lambda num_frames: [2, 1, 0])
    answer_ids = golden_json["forced_answer_ids"]
    generate = model.generate
    forced = LogitsProcessorList([ForcedAnswer(answer_ids)])
    monkeypatch.setattr(model, "generate", lambda **kwargs: generate(**kwargs, logits_processor=forced))
    segmenter = OisaVideoSegmenter(model, processor, max_new_tokens=len(answer_ids))
    seg_states = []
    segment = segmenter._segment
    monkeypatch.setattr(
        segmenter, "_segment", lambda reader, states, *args: seg_states.append(states) or segment(reader, states, *args)
    )
    expression = OisaExpression(speech=TINY_ORIGINAL / "speech.wav", image=frames[3])
    result = segmenter(VideoReader(folder), expression, soundtrack=TINY_ORIGINAL / "soundtrack.wav",
                       return_probabilities=True)

    # the reference decodes its response with special tokens skipped, as the segmenter does
    assert result.has_seg and result.answer == golden_json["forced_response_text"]
    assert len(seg_states) == 1
    assert_close(seg_states[0], golden["e2e_seg_hidden_state"], STATE_TOL, "segmenter [SEG] state")
    # the golden mask logits of the three frames (the fourth is the referring image, which the segmenter does not
    # segment), upsampled here with F.interpolate rather than with the code under test
    logits = torch.from_numpy(golden["e2e_pred_masks"][0, :3])[:, None]
    binary_upsampled = F.interpolate((logits > 0).float(), size=(224, 224), mode="bilinear", align_corners=False)[:, 0]
    assert np.array_equal(result.masks, (binary_upsampled > 0).numpy())
    probabilities = F.interpolate(logits, size=(224, 224), mode="bilinear", align_corners=False)[:, 0].sigmoid()
    assert_close(torch.from_numpy(result.probabilities), probabilities, MASK_TOL, "segmenter probabilities")
    presence = torch.from_numpy(golden["e2e_pred_logits"][0, :3]).softmax(-1)[:, 0]
    assert_close(torch.from_numpy(result.presence_scores), presence, STATE_TOL, "segmenter presence")
