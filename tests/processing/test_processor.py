import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, AutoTokenizer

import processing_oisa  # noqa: F401  (registers the processor)
from oisa_tiny import build_tiny_tokenizer
from processing_oisa import OisaExpression, OisaInputError, OisaProcessor
from processing_oisa.data.synthetic_clips import tone
from processing_oisa.processing_oisa import make_feature_extractor, make_image_processor
from processing_oisa.prompts import (
    RELEASE_SYSTEM_MESSAGE,
    frame_token_modes,
    sample_release_frames,
    split_evenly,
    target_answer,
)


REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "tiny_original"
ASK = "Please segment the object this sentence describes in this video: "
# spec/model.md §2.4, verbatim: (base, with explanation) per expression type
RELEASE_QUESTIONS = {
    "text": (ASK + "<ref>{e}</ref>", ASK + "<ref>{e}</ref>, and explain why."),
    "speech": (ASK + "<ref><audio></ref>", ASK + "<ref><audio></ref>, and explain why."),
    "text_sound": (ASK + "<ref>{e}</ref>", ASK + "<ref>{e}</ref>, and explain why."),
    "speech_sound": (ASK + "<ref><audio></ref>, referring audio is <audio>.",
                     ASK + "<ref><audio></ref>, referring audio is <audio>, and explain why."),
    "text_image": (ASK + "<ref>{e}</ref>", ASK + "<ref>{e}</ref>, and explain why."),
    "speech_image": (ASK + "<ref><audio></ref>, referring image is <image>",
                     ASK + "<ref><audio></ref>, referring image is <image>, and explain why."),
    "text_sound_image": (ASK + "<ref>{e}</ref>", ASK + "<ref>{e}</ref>, and explain why."),
    "speech_sound_image": (ASK + "<ref><audio></ref>, referring audio is <audio>, referring image is <image>",
                           ASK + "<ref><audio></ref>, referring audio is <audio>, referring image is <image>, and explain why."),
}
TEXTS = {"text": "the red circle", "text_sound": "the shape making the sound <audio>",
         "text_image": "the shape like <image>", "text_sound_image": "the shape like <image> making <audio>"}


@pytest.fixture(scope="module")
def processor():
    return OisaProcessor(make_image_processor(224), make_feature_extractor(), build_tiny_tokenizer(), num_image_tokens=64)


def expand(question: str, soundtrack: int, clips: list[int], image_tokens: int) -> str:
    """The question with its placeholders expanded the released way (clips in order of appearance)."""
    for count in clips:
        question = question.replace("<audio>", "<aud>" + "<AUDIO_CONTEXT>" * count + "</aud>", 1)
    return question.replace("<image>", "<img>" + "<IMG_CONTEXT>" * image_tokens + "</img>")


@pytest.mark.parametrize("explain", [False, True])
@pytest.mark.parametrize("expr_type", list(RELEASE_QUESTIONS))
def test_release_prompt_of_every_expression_type(processor, expr_type, explain):
    frames = [np.full((48, 64, 3), 40 * index, dtype=np.uint8) for index in range(3)]
    speech, sound, soundtrack = tone(300, 1.0), tone(500, 0.6), tone(440, 2.0)  # 25, 15 and 50 tokens
    expression = OisaExpression(
        text=TEXTS.get(expr_type, "the red circle") if expr_type.startswith("text") else None,
        speech=speech if expr_type.startswith("speech") else None,
        sound=sound if "sound" in expr_type else None,
        image=frames[0] if "image" in expr_type else None,
        explain=explain,
    )
    assert expression.type == expr_type
    encoding = processor(frames, expression, soundtrack=soundtrack, frame_modes=[2, 1, 0])
    clips = ([25] if expr_type.startswith("speech") else []) + ([15] if "sound" in expr_type else [])
    question = RELEASE_QUESTIONS[expr_type][int(explain)].format(e=TEXTS.get(expr_type, "the red circle"))
    user = (
        "Frame1: <img>" + "<IMG_CONTEXT>" * 64 + "</img><sub_aud>" + "<SUB_AUDIO_CONTEXT>" * 25 + "</sub_aud>\n"
        "Frame2: <img><IMG_CONTEXT></img><sub_aud>" + "<SUB_AUDIO_CONTEXT>" * 25 + "</sub_aud>\n"
        "<aud>" + "<AUDIO_CONTEXT>" * 50 + "</aud>\n" + expand(question, 50, clips, 64)
    )
    expected = (f"<|im_start|>system\n{RELEASE_SYSTEM_MESSAGE}<|im_end|><|im_start|>user\n{user}<|im_end|>"
                "<|im_start|>assistant\n")
    prompt = processor.tokenizer.decode(encoding["input_ids"][0])
    assert prompt == expected
    ids = encoding["input_ids"][0]
    tokenizer = processor.tokenizer
    assert int((ids == tokenizer.image_token_id).sum()) == 64 + 1 + (64 if "image" in expr_type else 0)
    assert int((ids == tokenizer.audio_token_id).sum()) == 50 + sum(clips)
    assert int((ids == tokenizer.sub_audio_token_id).sum()) == 50
    assert encoding["image_token_modes"].tolist() == [2, 1, 0] + ([2] if "image" in expr_type else [])
    assert encoding["audio_token_modes"].tolist() == [2] + [1] * len(clips)
    assert encoding["input_features"].shape == (1 + len(clips), 128, 3000)
    assert encoding["pixel_values"].shape == (3 + ("image" in expr_type), 3, 224, 224)


def test_release_prompt_and_inputs_equal_the_original(processor):
    """The golden speech_image input of the original: same string, same ids (original tokenizer), same features."""
    golden = json.loads((REFERENCE / "golden.json").read_text())
    arrays = np.load(REFERENCE / "golden.npz")
    original = OisaProcessor(make_image_processor(224), make_feature_extractor(),
                             AutoTokenizer.from_pretrained(REFERENCE), num_image_tokens=64)
    frames = list(arrays["frames_uint8"][:3])
    expression = OisaExpression(speech=REFERENCE / "speech.wav", image=arrays["frames_uint8"][3])
    encoding = original(frames, expression, soundtrack=REFERENCE / "soundtrack.wav", frame_modes=[2, 1, 0])
    assert original.tokenizer.decode(encoding["input_ids"][0]) == golden["eval_query_string"]
    assert torch.equal(encoding["input_ids"][0], torch.from_numpy(arrays["e2e_input_ids"]))
    pixels = torch.from_numpy(arrays["frames_uint8"]).permute(0, 3, 1, 2).float() / 255
    pixels = (pixels - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    assert torch.equal(encoding["pixel_values"], pixels)
    np.testing.assert_allclose(encoding["input_features"].numpy(), arrays["audio_mel"], atol=5e-5)
    assert encoding["audio_feature_lengths"].tolist() == [200, 130]


def test_answer_labels_supervise_only_the_answer(processor):
    frames = [np.zeros((32, 32, 3), dtype=np.uint8)] * 2
    encoding = processor(frames, OisaExpression(text="the dog"), soundtrack=tone(440, 1.0), answer="Sure, it is [SEG].")
    labels, ids = encoding["labels"][0], encoding["input_ids"][0]
    supervised = ids[labels != -100]
    assert processor.tokenizer.decode(supervised) == "Sure, it is [SEG].<|im_end|>"
    assert int((ids == processor.seg_token_id).sum()) == 1


def test_per_frame_layout_uses_special_token_wrappers():
    processor = OisaProcessor(make_image_processor(224), make_feature_extractor(), build_tiny_tokenizer(),
                              num_image_tokens=64, sub_audio_layout="per_frame")
    encoding = processor([np.zeros((32, 32, 3), dtype=np.uint8)] * 3, OisaExpression(text="x"), soundtrack=tone(440, 2.0),
                         frame_modes=[2, 2, 1])
    prompt = processor.tokenizer.decode(encoding["input_ids"][0])
    segments = re.findall(r"<sub_audio>((?:<SUB_AUDIO_CONTEXT>)*)</sub_audio>", prompt)
    assert [len(segment) // len("<SUB_AUDIO_CONTEXT>") for segment in segments] == [17, 17, 16]
    assert "<sub_aud>" not in prompt


def test_frame_selection():
    assert sample_release_frames(32, 4) == [0, 1, 16, 31]
    modes = frame_token_modes(100, 32, 4, "release")
    assert sum(mode > 0 for mode in modes) == 32 and sum(mode == 2 for mode in modes) == 4
    assert modes[0] == 2 and modes[99] == 2
    assert frame_token_modes(3, 32, 4, "release") == [2, 2, 2]  # fewer than 4 frames works (the original crashed)
    linspace = frame_token_modes(10, 32, 4, "linspace")
    assert [index for index, mode in enumerate(linspace) if mode == 2] == [0, 3, 6, 9]
    assert split_evenly(50, 3) == [17, 17, 16] and split_evenly(2, 3) == [1, 1, 0]


def test_target_answers():
    assert target_answer(False, None) == "Sure, it is [SEG]."
    assert target_answer(False, "it barks") == "Sure, it is [SEG]. Explanation: it barks"
    assert target_answer(True, None) == "No target matches this expression."
    # B11 fixed: one period before the explanation of a null answer
    assert target_answer(True, "none barks") == "No target matches this expression. Explanation: none barks"


def test_processor_save_and_load(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, OisaProcessor)
    assert (loaded.num_image_tokens, loaded.frame_sampler, loaded.sub_audio_layout) == (64, "release", "release")
    assert loaded.seg_token_id == processor.seg_token_id
    frames = [np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)] * 2
    expression = OisaExpression(text="the cat <audio>", sound=tone(700, 0.5))
    first, second = processor(frames, expression, soundtrack=tone(440, 1.0)), loaded(frames, expression, soundtrack=tone(440, 1.0))
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_bad_expressions_get_one_clear_error(processor, tmp_path):
    frames = [np.zeros((32, 32, 3), dtype=np.uint8)]
    with pytest.raises(OisaInputError, match="exactly one of text and speech"):
        processor(frames, OisaExpression(), soundtrack=tone(440, 1.0))
    with pytest.raises(OisaInputError, match="exactly one of text and speech"):
        processor(frames, OisaExpression(text="a", speech=tone(300, 1.0)), soundtrack=tone(440, 1.0))
    with pytest.raises(OisaInputError, match="Speech the speech waveform is silent"):
        processor(frames, OisaExpression(speech=np.zeros(16000, dtype=np.float32)), soundtrack=tone(440, 1.0))
    with pytest.raises(OisaInputError, match="too short"):
        processor(frames, OisaExpression(speech=np.zeros(0, dtype=np.float32)), soundtrack=tone(440, 1.0))
    with pytest.raises(OisaInputError, match="does not exist"):
        processor(frames, OisaExpression(speech=tmp_path / "missing.wav"), soundtrack=tone(440, 1.0))
    (tmp_path / "not_image.jpg").write_text("hello")
    with pytest.raises(OisaInputError, match="not_image.jpg is not a readable image"):
        processor(frames, OisaExpression(text="like <image>", image=tmp_path / "not_image.jpg"), soundtrack=tone(440, 1.0))
    with pytest.raises(OisaInputError, match="no frames"):
        processor([], OisaExpression(text="a"), soundtrack=tone(440, 1.0))


def test_long_audio_is_cut_to_30_seconds_with_a_warning(processor, caplog):
    frames = [np.zeros((32, 32, 3), dtype=np.uint8)]
    with caplog.at_level("WARNING"):
        encoding = processor(frames, OisaExpression(speech=tone(300, 40.0)), soundtrack=tone(440, 1.0))
    assert "only its first 30 s are used" in caplog.text
    assert encoding["audio_feature_lengths"].tolist() == [100, 3000]
    assert int((encoding["input_ids"] == processor.tokenizer.audio_token_id).sum()) == 25 + 750


def test_frames_already_encoded_leave_only_the_referring_image(processor):
    frames = [np.zeros((32, 32, 3), dtype=np.uint8)] * 3
    expression = OisaExpression(text="like <image>", image=np.full((20, 20, 3), 200, dtype=np.uint8))
    full = processor(frames, expression, soundtrack=tone(440, 1.0), frame_modes=[2, 1, 0])
    light = processor(frames, expression, soundtrack=tone(440, 1.0), frame_modes=[2, 1, 0], encode_frames=False)
    assert light["pixel_values"].shape[0] == 1 and torch.equal(light["pixel_values"][0], full["pixel_values"][-1])
    assert torch.equal(light["input_ids"], full["input_ids"]) and light["image_token_modes"].tolist() == [2, 1, 0, 2]
