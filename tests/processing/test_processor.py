import json
import re

import numpy as np
import pytest
import soundfile
import torch
from huggingface_hub.errors import StrictDataclassFieldValidationError
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer

import processing_oisa  # noqa: F401  (registers the processor)
from oisa_tiny import build_tiny_tokenizer
from processing_oisa import OisaExpression, OisaInputError, OisaProcessor, VideoReader, write_video
from processing_oisa.data.synthetic_clips import tone
from processing_oisa.processing_oisa import make_feature_extractor, make_image_processor, make_video_processor
from processing_oisa.prompts import (
    RELEASE_SYSTEM_MESSAGE,
    frame_token_modes,
    sample_release_frames,
    split_evenly,
    target_answer,
)

from ..conftest import SHARED


REFERENCE = SHARED / "reference" / "tiny_original"
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
    return OisaProcessor(make_image_processor(224), make_video_processor(224), make_feature_extractor(),
                         build_tiny_tokenizer(), num_image_tokens=64)


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
    encoding = processor(videos=frames, expression=expression, audio=soundtrack, frame_modes=[2, 1, 0])
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


@pytest.mark.reference
def test_release_prompt_and_inputs_equal_the_original(processor):
    """The golden speech_image input of the original: same string, same ids (original tokenizer), same features."""
    golden = json.loads((REFERENCE / "golden.json").read_text())
    arrays = np.load(REFERENCE / "golden.npz")
    original = OisaProcessor(make_image_processor(224), make_video_processor(224), make_feature_extractor(),
                             AutoTokenizer.from_pretrained(REFERENCE), num_image_tokens=64)
    frames = list(arrays["frames_uint8"][:3])
    expression = OisaExpression(speech=REFERENCE / "speech.wav", image=arrays["frames_uint8"][3])
    encoding = original(videos=frames, expression=expression, audio=REFERENCE / "soundtrack.wav", frame_modes=[2, 1, 0])
    assert original.tokenizer.decode(encoding["input_ids"][0]) == golden["eval_query_string"]
    assert torch.equal(encoding["input_ids"][0], torch.from_numpy(arrays["e2e_input_ids"]))
    pixels = torch.from_numpy(arrays["frames_uint8"]).permute(0, 3, 1, 2).float() / 255
    pixels = (pixels - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    assert torch.equal(encoding["pixel_values"], pixels)
    np.testing.assert_allclose(encoding["input_features"].numpy(), arrays["audio_mel"], atol=5e-5)
    assert encoding["audio_feature_lengths"].tolist() == [200, 130]


def test_answer_labels_supervise_only_the_answer(processor):
    frames = [np.zeros((32, 32, 3), dtype=np.uint8)] * 2
    encoding = processor(text="the dog", videos=frames, audio=tone(440, 1.0), answer="Sure, it is [SEG].")
    labels, ids = encoding["labels"][0], encoding["input_ids"][0]
    supervised = ids[labels != -100]
    assert processor.tokenizer.decode(supervised) == "Sure, it is [SEG].<|im_end|>"
    assert int((ids == processor.seg_token_id).sum()) == 1


def test_per_frame_layout_uses_special_token_wrappers():
    processor = OisaProcessor(make_image_processor(224), make_video_processor(224), make_feature_extractor(),
                              build_tiny_tokenizer(), num_image_tokens=64, sub_audio_layout="per_frame")
    encoding = processor(text="x", videos=[np.zeros((32, 32, 3), dtype=np.uint8)] * 3, audio=tone(440, 2.0),
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
    assert (loaded.num_image_tokens, loaded.sub_audio_layout) == (64, "release")
    assert loaded.video_processor.frame_sampler == "release"
    assert loaded.seg_token_id == processor.seg_token_id
    frames = [np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)] * 2
    expression = OisaExpression(text="the cat <audio>", sound=tone(700, 0.5))
    first = processor(videos=frames, expression=expression, audio=tone(440, 1.0))
    second = loaded(videos=frames, expression=expression, audio=tone(440, 1.0))
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_bad_expressions_get_one_clear_error(processor, tmp_path):
    frames = [np.zeros((32, 32, 3), dtype=np.uint8)]
    with pytest.raises(OisaInputError, match="exactly one of text and speech"):
        processor(videos=frames, expression=OisaExpression(), audio=tone(440, 1.0))
    with pytest.raises(OisaInputError, match="exactly one of text and speech"):
        processor(videos=frames, expression=OisaExpression(text="a", speech=tone(300, 1.0)), audio=tone(440, 1.0))
    with pytest.raises(OisaInputError, match="Speech the speech waveform is silent"):
        processor(videos=frames, speech=np.zeros(16000, dtype=np.float32), audio=tone(440, 1.0))
    with pytest.raises(OisaInputError, match="has no audio samples"):
        processor(videos=frames, expression=OisaExpression(speech=np.zeros(0, dtype=np.float32)), audio=tone(440, 1.0))
    with pytest.raises(OisaInputError, match="does not exist"):
        processor(videos=frames, expression=OisaExpression(speech=tmp_path / "missing.wav"), audio=tone(440, 1.0))
    (tmp_path / "not_image.jpg").write_text("hello")
    with pytest.raises(OisaInputError, match="not_image.jpg is not a readable image"):
        processor(text="like <image>", videos=frames, images=tmp_path / "not_image.jpg", audio=tone(440, 1.0))
    with pytest.raises(OisaInputError, match="no frames"):
        processor(videos=[], expression=OisaExpression(text="a"), audio=tone(440, 1.0))


def test_long_audio_is_cut_to_30_seconds_with_a_warning(processor, caplog):
    frames = [np.zeros((32, 32, 3), dtype=np.uint8)]
    with caplog.at_level("WARNING"):
        encoding = processor(videos=frames, expression=OisaExpression(speech=tone(300, 40.0)), audio=tone(440, 1.0))
    assert "only its first 30 s are used" in caplog.text
    assert encoding["audio_feature_lengths"].tolist() == [100, 3000]
    assert int((encoding["input_ids"] == processor.tokenizer.audio_token_id).sum()) == 25 + 750


def test_frames_already_encoded_leave_only_the_referring_image(processor):
    frames = [np.zeros((32, 32, 3), dtype=np.uint8)] * 3
    expression = OisaExpression(text="like <image>", image=np.full((20, 20, 3), 200, dtype=np.uint8))
    full = processor(videos=frames, expression=expression, audio=tone(440, 1.0), frame_modes=[2, 1, 0])
    light = processor(videos=frames, expression=expression, audio=tone(440, 1.0), frame_modes=[2, 1, 0],
                      encode_frames=False)
    assert light["pixel_values"].shape[0] == 1 and torch.equal(light["pixel_values"][0], full["pixel_values"][-1])
    assert torch.equal(light["input_ids"], full["input_ids"]) and light["image_token_modes"].tolist() == [2, 1, 0, 2]


def test_videos_as_a_path_an_array_or_a_list_of_frames(processor, tmp_path):
    frames = np.random.default_rng(1).integers(0, 256, (4, 30, 40, 3), dtype=np.uint8)
    for index, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / f"{index}.png")
    expected = processor(text="the dog", videos=frames, audio=tone(440, 1.0))
    for video in (tmp_path, str(tmp_path), list(frames), [Image.fromarray(frame) for frame in frames]):
        encoding = processor(text="the dog", videos=video, audio=tone(440, 1.0))
        for key in expected:
            assert torch.equal(encoding[key], expected[key]), (type(video), key)
    assert expected["pixel_values"].shape == (4, 3, 224, 224)
    assert expected["image_token_modes"].tolist() == frame_token_modes(4, 32, 4, "release")
    write_video(tmp_path / "clip.mp4", frames, 5.0)
    from_file = processor(text="the dog", videos=tmp_path / "clip.mp4", audio=tone(440, 1.0))
    decoded = processor(text="the dog", videos=VideoReader(tmp_path / "clip.mp4").read(range(4)), audio=tone(440, 1.0))
    assert torch.equal(from_file["pixel_values"], decoded["pixel_values"])
    with pytest.raises(ValueError, match="one video a call"):
        processor(text="the dog", videos=[frames, frames], audio=tone(440, 1.0))
    with pytest.raises(ValueError, match="pass it as `videos=`"):
        processor(text="the dog", audio=tone(440, 1.0))


def test_audio_as_a_path_or_a_waveform(processor, tmp_path):
    frames = [np.zeros((32, 32, 3), dtype=np.uint8)] * 2
    soundtrack, speech = tone(440, 2.0), tone(300, 1.2)
    soundfile.write(tmp_path / "soundtrack.wav", soundtrack, 16000, subtype="FLOAT")
    soundfile.write(tmp_path / "speech.wav", speech, 16000, subtype="FLOAT")
    from_arrays = processor(videos=frames, audio=soundtrack, speech=speech)
    from_files = processor(videos=frames, audio=tmp_path / "soundtrack.wav", speech=str(tmp_path / "speech.wav"))
    for key in from_arrays:
        assert torch.equal(from_arrays[key], from_files[key]), key
    assert from_arrays["audio_feature_lengths"].tolist() == [200, 120]
    assert from_arrays["audio_token_modes"].tolist() == [2, 1]


def test_the_referring_image_as_images(processor, tmp_path):
    frames = [np.zeros((32, 32, 3), dtype=np.uint8)] * 2
    image = np.random.default_rng(2).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "image.png")
    expected = processor(text="like <image>", videos=frames, images=image, audio=tone(440, 1.0))
    assert expected["image_token_modes"].tolist() == [2, 2, 2]
    assert expected["segmentation_frame_mask"].tolist() == [True, True, False]
    assert torch.equal(expected["pixel_values"][-1], processor.image_processor(images=[image], return_tensors="pt")[
        "pixel_values"][0])
    for given in (Image.fromarray(image), tmp_path / "image.png", str(tmp_path / "image.png"), [image]):
        encoding = processor(text="like <image>", videos=frames, images=given, audio=tone(440, 1.0))
        for key in expected:
            assert torch.equal(encoding[key], expected[key]), (type(given), key)
    with pytest.raises(OisaInputError, match="at most one referring image"):
        processor(text="like <image>", videos=frames, images=[image, image], audio=tone(440, 1.0))


def test_expression_parts_as_kwargs_or_whole(processor):
    frames = [np.full((32, 32, 3), 90, dtype=np.uint8)] * 3
    image = np.full((20, 20, 3), 200, dtype=np.uint8)
    parts = processor(videos=frames, audio=tone(440, 1.0), speech=tone(300, 1.0), sound=tone(660, 0.5), images=image,
                      explain=True)
    whole = processor(videos=frames, audio=tone(440, 1.0), expression=OisaExpression(
        speech=tone(300, 1.0), sound=tone(660, 0.5), image=image, explain=True))
    for key in parts:
        assert torch.equal(parts[key], whole[key]), key
    # the sound: 0.5 s -> 50 mel frames -> 25 after the stride-2 conv -> 12 tokens after pooling
    assert processor.tokenizer.decode(parts["input_ids"][0]).endswith(
        "referring audio is <aud>" + "<AUDIO_CONTEXT>" * 12 + "</aud>, referring image is <img>"
        + "<IMG_CONTEXT>" * 64 + "</img>, and explain why.<|im_end|><|im_start|>assistant\n")
    with pytest.raises(ValueError, match="not both"):
        processor(text="a", videos=frames, expression=OisaExpression(text="a"))
    with pytest.raises(ValueError, match="not both"):
        processor(videos=frames, expression=OisaExpression(text="a"), explain=True)
    with pytest.raises(TypeError, match="pass the frames as `videos=`"):
        processor(frames, OisaExpression(text="a"))
    # the kwargs are typed (OisaProcessorKwargs) and checked
    with pytest.raises(StrictDataclassFieldValidationError, match="explain"):
        processor(text="a", videos=frames, explain="yes")


def test_sampler_settings_as_kwargs(processor):
    frames = [np.zeros((32, 32, 3), dtype=np.uint8)] * 6
    encoding = processor(text="a", videos=frames, audio=tone(440, 1.0), max_visible_frames=3, num_dense_frames=1)
    # release, 3 of 6 frames: first, last and 1 + 0 * ((6 - 2) // 1); the first of them dense
    assert encoding["image_token_modes"].tolist() == frame_token_modes(6, 3, 1, "release") == [2, 1, 0, 0, 0, 1]
    assert processor.video_processor.max_visible_frames == 32
    encoding = processor(text="a", videos=frames, audio=tone(440, 1.0), videos_kwargs={"frame_sampler": "linspace"})
    assert encoding["image_token_modes"].tolist() == frame_token_modes(6, 32, 4, "linspace")


def test_a_processor_saved_before_it_had_a_video_processor_loads(processor, tmp_path):
    """Its frame sampler's settings were the processor's own, its frames took the image processor's transform."""
    video_processor = processor.video_processor
    settings = (video_processor.frame_sampler, video_processor.max_visible_frames, video_processor.num_dense_frames)
    video_processor.frame_sampler, video_processor.max_visible_frames, video_processor.num_dense_frames = (
        "linspace", 3, 1)
    try:
        processor.save_pretrained(tmp_path)
        frames = [np.random.default_rng(3).integers(0, 255, (40, 50, 3), dtype=np.uint8)] * 5
        expected = processor(text="a", videos=frames, audio=tone(440, 1.0))
    finally:
        video_processor.frame_sampler, video_processor.max_visible_frames, video_processor.num_dense_frames = settings
    config = json.loads((tmp_path / "processor_config.json").read_text())
    older = {key: value for key, value in config.items() if key != "video_processor"}
    older.update(frame_sampler="linspace", max_visible_frames=3, num_dense_frames=1)
    (tmp_path / "processor_config.json").write_text(json.dumps(older))
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert (loaded.video_processor.frame_sampler, loaded.video_processor.max_visible_frames,
            loaded.video_processor.num_dense_frames, loaded.video_processor.size["height"]) == ("linspace", 3, 1, 224)
    encoding = loaded(text="a", videos=frames, audio=tone(440, 1.0))
    # linspace, 3 of 5 frames: 0, 2 and 4, the first dense
    assert encoding["image_token_modes"].tolist() == [2, 0, 1, 0, 1]
    for key in expected:
        assert torch.equal(encoding[key], expected[key]), key
