import json
import shutil

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

from oisa_cli.main import main as oisa_main
from oisa_training.loop import SAMPLE_BUILDERS
from processing_oisa.data.audio_text import expected_audio_length
from processing_oisa.data.errors import OisaDataError
from processing_oisa.data.image_text import ImageTextReader, build_image_text_sample
from processing_oisa.data.mixture import OisaTrainingCollator
from processing_oisa.data.synthetic import make_synthetic_dataset
from processing_oisa.data.synthetic_clips import SCENE_COLOURS, SCENE_SHAPES
from processing_oisa.media import decode_audio


SMALL = {"num_frames": 1, "height": 48, "width": 64}
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_text")
    oisa_main(["tiny-random", str(root / "tiny")])
    make_synthetic_dataset(root / "shapes", "image_text", num_videos=8, seed=5, nulls_per_video=3, **SMALL)
    return root


@pytest.fixture(scope="module")
def processor(workspace):
    return AutoProcessor.from_pretrained(workspace / "tiny")


def test_synthetic_conversations_ask_presence_then_name_the_shapes_from_left_to_right(workspace):
    train, val = ImageTextReader(workspace / "shapes", "train"), ImageTextReader(workspace / "shapes", "val")
    assert (len(train), len(val)) == (6, 2)
    answers = []
    for record in [*train, *val]:
        roles = [role for role, _ in record.conversation]
        assert roles == ["user", "assistant"] * 4
        assert record.conversation[0][1].startswith("<image>\n")
        questions = [text for role, text in record.conversation if role == "user"]
        assert all(text.endswith("in the picture?") for text in questions[:3])
        assert questions[3] == "Name the shapes from left to right."
        answers += [text for role, text in record.conversation[:6] if role == "assistant"]
        naming = record.conversation[-1][1]
        parts = naming.lower().rstrip(".").replace(" and ", ", ").split(", ")
        named = [part.removeprefix("the ") for part in parts]
        assert len(named) == 3
        colours, shapes = zip(*(name.split() for name in named))
        assert set(colours) <= set(SCENE_COLOURS) and set(shapes) <= set(SCENE_SHAPES)
        # left to right: each named colour's pixels lie, on average, right of the previous one's
        image = np.asarray(Image.open(record.image_path).convert("RGB")).astype(int)
        centres = []
        for colour in colours:
            close = np.abs(image - np.array(SCENE_COLOURS[colour])).sum(axis=-1) < 60
            assert close.sum() > 20
            centres.append(np.nonzero(close)[1].mean())
        assert centres == sorted(centres)
    assert set(answers) == {"Yes.", "No."}


def _named_pairs(record) -> list[list[str]]:
    """The picture's (colour, shape) pairs, from the naming turn (checked against the pixels above)."""
    named = record.conversation[-1][1].lower().rstrip(".").replace(" and ", ", ").split(", ")
    return [name.removeprefix("the ").split() for name in named]


def _is_present(thing: list[str], pairs: list[list[str]]) -> bool:
    if thing[-1] == "shape":
        return any(colour == thing[0] for colour, _ in pairs)
    if len(thing) == 1:
        return any(shape == thing[0] for _, shape in pairs)
    return thing in pairs


def test_presence_answers_match_the_picture(workspace):
    for record in ImageTextReader(workspace / "shapes", "train"):
        pairs = _named_pairs(record)
        for (_, question), (_, answer) in zip(record.conversation[0:6:2], record.conversation[1:6:2]):
            thing = question.removeprefix("<image>\n").removesuffix(" in the picture?").split(" ", 3)[3].split()
            assert answer == ("Yes." if _is_present(thing, pairs) else "No."), (question, answer, pairs)


@pytest.fixture(scope="module")
def spoken(workspace):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    root = workspace / "spoken"
    make_synthetic_dataset(root, "image_text", num_videos=12, seed=5, spoken_question_rate=0.5, **SMALL)
    return root


def test_spoken_questions_say_what_they_ask_and_match_the_picture(spoken):
    records = [*ImageTextReader(spoken, "train"), *ImageTextReader(spoken, "val")]
    with_audio = [record for record in records if record.audio_path is not None]
    assert 0 < len(with_audio) < len(records)
    answers = []
    for record in with_audio:
        assert record.conversation[0][1] == "<image>\nIs <ref><audio></ref> in the picture?"
        assert "<audio>" not in "".join(text for _, text in record.conversation[1:])
        # the clip says "the <thing>", one file per phrase, and its declared length is the file's
        phrase = record.audio_path.stem.split("_")
        assert phrase[0] == "the" and record.audio_path.parent == spoken / "audios"
        assert record.audio_length == expected_audio_length(decode_audio(record.audio_path).size)
        answer = record.conversation[1][1]
        assert answer == ("Yes." if _is_present(phrase[1:], _named_pairs(record)) else "No.")
        answers.append(answer)
    assert set(answers) == {"Yes.", "No."}
    written = [record for record in records if record.audio_path is None]
    assert all(record.conversation[0][1].startswith("<image>\nIs there ") for record in written)
    assert sorted((spoken / "audios").iterdir()) == sorted({record.audio_path for record in with_audio})


def test_spoken_question_samples_hold_the_clip_as_an_expression(spoken, processor, workspace):
    reader = ImageTextReader(spoken, "train")
    record = next(record for record in reader if record.audio_path is not None)
    sample = build_image_text_sample(record, processor)
    assert sample["input_features"].shape[0] == 1 and sample["audio_token_modes"].tolist() == [1]
    assert sample["audio_feature_lengths"].tolist() == [decode_audio(record.audio_path).size // 160]
    text = processor.tokenizer.decode(sample["input_ids"])
    audio_block = "<aud>" + "<AUDIO_CONTEXT>" * record.audio_length[1] + "</aud>"
    assert text.count(audio_block) == 1 and text.count("<AUDIO_CONTEXT>") == record.audio_length[1]
    assert f"Is <ref>{audio_block}</ref> in the picture?" in text
    supervised = processor.tokenizer.decode(sample["input_ids"][sample["labels"] != -100])
    assert supervised == "".join(text + "<|im_end|>" for role, text in record.conversation if role == "assistant")

    # a batch mixing spoken and written questions trains the audio path
    unspoken = next(record for record in reader if record.audio_path is None)
    samples = [sample, build_image_text_sample(unspoken, processor)]
    model = AutoModel.from_pretrained(workspace / "tiny", dtype=torch.float32)
    output = model(**OisaTrainingCollator(processor.tokenizer.pad_token_id)(samples))
    assert torch.isfinite(output.loss) and output.lm_loss > 0
    output.loss.backward()
    assert model.audio_projector.linear_1.weight.grad.abs().sum() > 0


def test_spoken_question_rate_is_checked(tmp_path):
    with pytest.raises(ValueError, match="between 0 and 1"):
        make_synthetic_dataset(tmp_path / "a", "image_text", spoken_question_rate=1.5)
    with pytest.raises(ValueError, match="image_text format, not grefcoco"):
        make_synthetic_dataset(tmp_path / "b", "grefcoco", spoken_question_rate=0.5)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_samples_supervise_the_answers_and_show_the_image_once(workspace, processor):
    record = ImageTextReader(workspace / "shapes", "train")[0]
    sample = build_image_text_sample(record, processor)
    size = processor.image_processor.size["height"]
    assert sample["pixel_values"].shape == (1, 3, size, size) and sample["image_token_modes"].tolist() == [2]
    assert sample["segmentation_frame_mask"].tolist() == [False] and sample["gt_masks"].shape == (0, size, size)
    assert sample["input_features"].shape[0] == 0 and sample["audio_token_modes"].shape == (0,)
    text = processor.tokenizer.decode(sample["input_ids"])
    image_block = "<img>" + "<IMG_CONTEXT>" * processor.num_image_tokens + "</img>"
    assert text.count(image_block) == 1 and text.count("<IMG_CONTEXT>") == processor.num_image_tokens
    supervised = processor.tokenizer.decode(sample["input_ids"][sample["labels"] != -100])
    answers = [text for role, text in record.conversation if role == "assistant"]
    assert supervised == "".join(answer + "<|im_end|>" for answer in answers)
    assert SAMPLE_BUILDERS["image_text"] == (ImageTextReader, build_image_text_sample)


def test_forward_trains_on_image_text_samples_without_masks(workspace, processor):
    reader = ImageTextReader(workspace / "shapes", "train")
    samples = [build_image_text_sample(record, processor) for record in reader[:2]]
    model = AutoModel.from_pretrained(workspace / "tiny", dtype=torch.float32)
    output = model(**OisaTrainingCollator(processor.tokenizer.pad_token_id)(samples))
    assert torch.isfinite(output.loss) and output.lm_loss > 0 and not output.mask_logits
    output.loss.backward()
    assert model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


def test_malformed_lines_name_the_problem(tmp_path):
    conversation = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A circle."}]
    twice = [{"from": "human", "value": "<image><image>"}, *conversation[1:]]
    spoken = [{"from": "human", "value": "<image>\nIs <audio> in it?"}, {"from": "gpt", "value": "Yes."}]
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    soundfile.write(tmp_path / "s.wav", np.zeros(1600, dtype=np.float32), 16000)
    bad = [
        {"id": "outside", "image": "../b.png", "conversations": conversation},
        {"id": "missing", "image": "gone.png", "conversations": conversation},
        {"id": "no-image-mark", "image": "a.png", "conversations": [{"from": "human", "value": "hi"}, conversation[1]]},
        {"id": "two", "image": "a.png", "conversations": twice},
        {"id": "no-answer", "image": "a.png", "conversations": conversation[:1]},
        {"id": "no-clip", "image": "a.png", "audio": "gone.wav", "audio_length": [1, 1, 3], "conversations": spoken},
        {"id": "bad-length", "image": "a.png", "audio": "s.wav", "audio_length": [1, 1, 2], "conversations": spoken},
        {"id": "unasked", "image": "a.png", "audio": "s.wav", "audio_length": [1, 1, 3], "conversations": conversation},
        {"id": "unspoken", "image": "a.png", "conversations": spoken},
    ]
    good = {"image": "a.png", "conversations": conversation}
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(line) for line in [*bad, good]))
    with pytest.raises(OisaDataError, match="escapes the dataset root"):
        ImageTextReader(tmp_path)
    reader = ImageTextReader(tmp_path, skip_bad=True)
    assert len(reader) == 1 and reader[0].image_path == tmp_path / "a.png"
    messages = dict((key, str(error)) for key, error in reader.skipped)
    assert "escapes the dataset root" in messages["line 1 (id outside)"]
    assert "image file not found" in messages["line 2 (id missing)"] and "gone.png" in messages["line 2 (id missing)"]
    assert "exactly one <image>" in messages["line 3 (id no-image-mark)"]
    assert "exactly one <image>" in messages["line 4 (id two)"]
    assert "gpt turn" in messages["line 5 (id no-answer)"]
    assert "audio file not found" in messages["line 6 (id no-clip)"] and "gone.wav" in messages["line 6 (id no-clip)"]
    assert "'audio_length' must be" in messages["line 7 (id bad-length)"]
    assert "exactly one <audio>" in messages["line 8 (id unasked)"]
    assert "needs no <audio>" in messages["line 9 (id unspoken)"]
