import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

from processing_oisa.cli import main as oisa_main
from processing_oisa.errors import OisaDataError
from processing_oisa.synthetic import SCENE_COLOURS, SCENE_SHAPES
from processing_oisa.synthetic_dataset import make_synthetic_dataset
from processing_oisa.training_data import OisaTrainingCollator
from processing_oisa.training_image_text import ImageTextReader, build_image_text_sample
from processing_oisa.training_loop import SAMPLE_BUILDERS


SMALL = {"num_frames": 1, "height": 48, "width": 64}


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


def test_presence_answers_match_the_picture(workspace):
    for record in ImageTextReader(workspace / "shapes", "train"):
        # the naming turn, checked against the pixels above, lists the picture's colour-shape pairs
        named = record.conversation[-1][1].lower().rstrip(".").replace(" and ", ", ").split(", ")
        pairs = [name.removeprefix("the ").split() for name in named]
        for (_, question), (_, answer) in zip(record.conversation[0:6:2], record.conversation[1:6:2]):
            thing = question.removeprefix("<image>\n").removesuffix(" in the picture?").split(" ", 3)[3].split()
            if thing[-1] == "shape":
                present = any(colour == thing[0] for colour, _ in pairs)
            elif len(thing) == 1:
                present = any(shape == thing[0] for _, shape in pairs)
            else:
                present = thing in pairs
            assert answer == ("Yes." if present else "No."), (question, answer, named)


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
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    bad = [
        {"id": "outside", "image": "../b.png", "conversations": conversation},
        {"id": "missing", "image": "gone.png", "conversations": conversation},
        {"id": "no-image-mark", "image": "a.png", "conversations": [{"from": "human", "value": "hi"}, conversation[1]]},
        {"id": "two", "image": "a.png", "conversations": twice},
        {"id": "no-answer", "image": "a.png", "conversations": conversation[:1]},
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
