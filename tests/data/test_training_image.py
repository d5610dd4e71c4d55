"""Stage-2 image segmentation readers and samples: tiny datasets of each format written in tmp_path."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

import processing_oisa  # noqa: F401  (registers the Auto classes)
from oisa_cli.main import main as oisa_main
from processing_oisa.data.errors import OisaDataError
from processing_oisa.data.image_sets import (
    ADE20KReader,
    COCOStuffReader,
    GRefCOCOReader,
    PacoLvisReader,
    PascalPartReader,
    ReasonSegReader,
    RefCOCOPlusReader,
    RefCOCOReader,
    build_part_sample,
    build_reason_seg_sample,
    build_refer_sample,
    build_semantic_sample,
)
from processing_oisa.data.mixture import OisaTrainingCollator
from processing_oisa.prompts import NULL_ANSWER


H, W = 30, 40
ASK = "Please segment the object this sentence describes in this image: "


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    oisa_main(["tiny-random", str(directory)])
    return directory


@pytest.fixture(scope="module")
def processor(tiny):
    return AutoProcessor.from_pretrained(tiny)


def _image(path: Path, size=(W, H)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _rle(mask: np.ndarray) -> dict:
    flat = mask.ravel(order="F").astype(np.uint8)
    runs, current, count = [], 0, 0
    for value in flat:
        if value == current:
            count += 1
        else:
            runs.append(count)
            current, count = value, 1
    runs.append(count)
    return {"size": list(mask.shape), "counts": runs}


RLE_MASK = np.zeros((H, W), dtype=bool)
RLE_MASK[20:28, 25:35] = True
# polygon: the rectangle x 2..12, y 3..9
POLYGON = [[2, 3, 12, 3, 12, 9, 2, 9]]


def _instances(file_name="COCO_train2014_1.jpg"):
    return {
        "images": [{"id": 1, "file_name": file_name, "height": H, "width": W}],
        "annotations": [
            {"id": 10, "image_id": 1, "segmentation": POLYGON},
            {"id": 11, "image_id": 1, "segmentation": _rle(RLE_MASK)},
        ],
    }


REFS = [
    {"ref_id": 0, "ann_id": 10, "image_id": 1, "split": "train", "sentences": [{"sent": "left box"}, {"sent": "small one"}]},
    {"ref_id": 1, "ann_id": 11, "image_id": 1, "split": "train",
     "sentences": [{"sent": "right box"}, {"sent": "lower thing"}, {"sent": "the patch"}]},
    {"ref_id": 2, "ann_id": 10, "image_id": 1, "split": "val", "sentences": [{"sent": "val only"}]},
]


def build_refer(root: Path, folder="refcoco", refs_name="refs(unc).json", refs=REFS, instances=None) -> None:
    _image(root / "images/mscoco/images/train2014/COCO_train2014_1.jpg")
    _json(root / folder / "instances.json", instances or _instances())
    if refs_name.endswith(".p"):
        (root / folder / refs_name).write_bytes(pickle.dumps(refs, protocol=2))
    else:
        _json(root / folder / refs_name, refs)


def _turns(processor, sample) -> tuple[str, str]:
    text = processor.tokenizer.decode(sample["input_ids"])
    supervised = processor.tokenizer.decode(sample["input_ids"][sample["labels"] != -100])
    return text, supervised


def _check_common(processor, sample, answers: list[str]) -> str:
    text, supervised = _turns(processor, sample)
    assert supervised == "".join(answer + "<|im_end|>" for answer in answers)
    assert text.count("<IMG_CONTEXT>") == processor.num_image_tokens
    assert text.count("<|im_start|>user\n<img>") == 1 and text.endswith(answers[-1] + "<|im_end|>")
    assert text.count(ASK) == len(answers)
    num_seg = sum(answer.count("[SEG]") for answer in answers)
    assert sample["gt_masks"].shape == (num_seg, 224, 224) and sample["gt_mask_valid"].all()
    assert sample["pixel_values"].shape == (1, 3, 224, 224)
    assert sample["image_token_modes"].tolist() == [2] and sample["segmentation_frame_mask"].tolist() == [True]
    assert sample["input_features"].shape == (0, 128, 3000) and sample["audio_token_modes"].numel() == 0
    return text


def _answers(text: str) -> list[str]:
    return [part.split("<|im_end|>")[0] for part in text.split("<|im_start|>assistant\n")[1:]]


def _questions(text: str) -> list[str]:
    return [part.split("</ref>")[0] for part in text.split(ASK + "<ref>")[1:]]


def test_refcoco_records_prompts_and_masks(tmp_path, processor):
    build_refer(tmp_path)
    records = RefCOCOReader(tmp_path)
    assert len(records) == 1 and records[0].image_id == 1
    assert [e.text for e in records[0].expressions] == ["left box", "small one", "right box", "lower thing", "the patch"]
    sample = build_refer_sample(records[0], processor)
    text = _check_common(processor, sample, ["Sure, it is [SEG]."] * 4)
    questions = _questions(text)
    assert len(set(questions)) == 4 and "val only" not in text
    # deterministic per record
    again = build_refer_sample(records[0], processor)
    assert torch.equal(again["input_ids"], sample["input_ids"]) and torch.equal(again["gt_masks"], sample["gt_masks"])
    scale_y, scale_x = 224 / H, 224 / W
    for question, mask in zip(questions, sample["gt_masks"]):
        if question in ("left box", "small one"):
            assert mask[int(5 * scale_y), int(6 * scale_x)] == 1 and mask[int(24 * scale_y), int(30 * scale_x)] == 0
        else:
            assert mask[int(24 * scale_y), int(30 * scale_x)] == 1 and mask[int(5 * scale_y), int(6 * scale_x)] == 0


def test_refer_pickle_is_read_without_globals(tmp_path):
    build_refer(tmp_path, folder="refcoco+", refs_name="refs(unc).p")
    assert len(RefCOCOPlusReader(tmp_path)[0].expressions) == 5
    (tmp_path / "refcoco+" / "refs(unc).p").write_bytes(pickle.dumps([{"ref": Path("x")}]))
    with pytest.raises(OisaDataError, match="refused or malformed annotation pickle"):
        RefCOCOPlusReader(tmp_path)


def test_grefcoco_null_turns_and_union(tmp_path, processor):
    refs = [
        {"ref_id": 0, "ann_id": [10, 11], "image_id": 1, "split": "train", "sentences": [{"sent": "both boxes"}]},
        {"ref_id": 1, "ann_id": [-1], "no_target": True, "image_id": 1, "split": "train",
         "sentences": [{"sent": "the giraffe"}]},
    ]
    build_refer(tmp_path, folder="grefcoco", refs_name="grefs(unc).json", refs=refs)
    record = GRefCOCOReader(tmp_path)[0]
    assert record.expressions[1].ann_ids == ()
    sample = build_refer_sample(record, processor)
    text = _check_common(processor, sample, ["Sure, it is [SEG].", NULL_ANSWER])
    assert _questions(text) == ["both boxes", "the giraffe"]
    mask = sample["gt_masks"][0]
    assert mask[int(5 * 224 / H), int(6 * 224 / W)] == 1 and mask[int(24 * 224 / H), int(30 * 224 / W)] == 1
    # a null ref is malformed in a set without null expressions
    (tmp_path / "refcoco").mkdir()
    (tmp_path / "grefcoco" / "instances.json").rename(tmp_path / "refcoco" / "instances.json")
    _json(tmp_path / "refcoco" / "refs(unc).json", refs)
    with pytest.raises(OisaDataError, match=r"no-target.*dataset: refcoco, record: ref 1"):
        RefCOCOReader(tmp_path)


def test_path_containment_and_malformed_annotations(tmp_path):
    build_refer(tmp_path, instances=_instances(file_name="../../etc/passwd"))
    with pytest.raises(OisaDataError, match="escapes the dataset root"):
        RefCOCOReader(tmp_path)
    bad = _instances()
    del bad["annotations"]
    _json(tmp_path / "refcoco" / "instances.json", bad)
    with pytest.raises(OisaDataError, match=r"'annotations' list \[dataset: refcoco, file: .*instances.json\]"):
        RefCOCOReader(tmp_path)


def test_refer_bad_polygon_fails_at_build(tmp_path, processor):
    instances = _instances()
    instances["annotations"][0]["segmentation"] = [[1, 2, 3]]
    build_refer(tmp_path, instances=instances)
    with pytest.raises(OisaDataError, match=r"annotation 10: a polygon.*record: image 1"):
        build_refer_sample(RefCOCOReader(tmp_path)[0], processor)


def _label(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label.astype(np.uint8)).save(path)


def test_ade20k_class_prompts(tmp_path, processor):
    _json(tmp_path / "ade20k_classes.json", [f"class{i}" for i in range(150)])
    label = np.zeros((H, W), dtype=np.uint8)
    label[:10] = 1  # class0
    label[10:20] = 4  # class3
    _image(tmp_path / "images/training/a.jpg")
    _label(tmp_path / "annotations/training/a.png", label)
    records = ADE20KReader(tmp_path)
    assert len(records) == 1
    sample = build_semantic_sample(records[0], processor)
    text = _check_common(processor, sample, ["Sure, it is [SEG]."] * 2)
    assert _questions(text) == ["class0", "class3"]
    assert sample["gt_masks"][0, :70].all() and not sample["gt_masks"][0, 80:].any()
    assert sample["gt_masks"][1, 80:140].all() and sample["gt_masks"][1].sum() < 224 * 224 / 2


def test_cocostuff_ignores_hyphenated_classes(tmp_path, processor):
    _json(tmp_path / "cocostuff/classes.json", ["person", "bicycle", "wall-other", "sky"])
    label = np.full((H, W), 255, dtype=np.uint8)
    label[:5], label[5:10], label[10:15] = 0, 2, 3
    _image(tmp_path / "coco/train2017/b.jpg")
    _label(tmp_path / "cocostuff/train2017/b.png", label)
    sample = build_semantic_sample(COCOStuffReader(tmp_path)[0], processor)
    text = _check_common(processor, sample, ["Sure, it is [SEG]."] * 2)
    assert _questions(text) == ["person", "sky"]


def test_reason_seg_explanations_and_masks(tmp_path, processor):
    for index in range(6):
        _image(tmp_path / f"train/{index}.jpg")
        _json(tmp_path / f"train/{index}.json", {
            "text": [f"what holds the tea {k}" for k in range(5)],
            "is_sentence": True,
            "shapes": [
                {"label": "target", "points": [[0, 0], [20, 0], [20, 15], [0, 15]], "shape_type": "polygon"},
                {"label": "ignore", "points": [[5, 5], [10, 5], [10, 10], [5, 10]], "shape_type": "polygon"},
                {"label": "flag", "points": [[30, 20], [39, 20], [39, 29]], "shape_type": "polygon"},
            ],
        })
    _json(tmp_path / "explanatory/train.json", [{"image": f"{i}.jpg", "outputs": "it holds tea"} for i in range(6)])
    records = ReasonSegReader(tmp_path)
    assert len(records) == 6 and records[0].explanation == "it holds tea"
    explained = 0
    for record in records:
        sample = build_reason_seg_sample(record, processor)
        text = processor.tokenizer.decode(sample["input_ids"])
        answers = _answers(text)
        _check_common(processor, sample, answers)
        assert len(answers) == 4
        for answer in answers:
            assert answer in ("Sure, it is [SEG].", "Sure, it is [SEG]. Explanation: it holds tea")
        explained += sum("Explanation" in answer for answer in answers)
        assert text.count(", and explain why.<|im_end|>") == sum("Explanation" in answer for answer in answers)
    assert 0 < explained < 24
    release = build_reason_seg_sample(records[0], processor)["gt_masks"][0]
    clean = build_reason_seg_sample(records[0], processor, profile="clean")["gt_masks"][0]
    centre = (int(7.5 * 224 / H), int(7.5 * 224 / W))
    assert release[centre] == 1 and clean[centre] == 0  # B28: "ignore" is foreground only in the release
    assert release[int(25 * 224 / H), int(38 * 224 / W)] == 0  # "flag" shapes are skipped


def _part_json(categories, file_name):
    return {
        "images": [{"id": 7, "file_name": file_name, "height": H, "width": W}],
        "categories": categories,
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "segmentation": POLYGON},
            {"id": 2, "image_id": 7, "category_id": 1, "segmentation": _rle(RLE_MASK)},
            {"id": 3, "image_id": 7, "category_id": 2, "segmentation": POLYGON},
        ],
    }


def test_paco_lvis_and_pascal_part_names(tmp_path, processor):
    _json(tmp_path / "vlpart/paco/annotations/paco_lvis_v1_train.json",
          _part_json([{"id": 1, "name": "mug:handle"}, {"id": 2, "name": "bottle_(container)"}], "train2017/c.jpg"))
    _image(tmp_path / "coco/train2017/c.jpg")
    sample = build_part_sample(PacoLvisReader(tmp_path)[0], processor)
    text = _check_common(processor, sample, ["Sure, it is [SEG]."] * 2)
    assert _questions(text)[0] in ("mug handle", "the handle of the mug") and _questions(text)[1] == "bottle"
    assert sample["gt_masks"][0].sum() > sample["gt_masks"][1].sum()  # union of the category's two instances

    _json(tmp_path / "vlpart/pascal_part/train.json",
          _part_json([{"id": 1, "name": "dog:leg"}, {"id": 2, "name": "dog:head"}], "d.jpg"))
    _image(tmp_path / "vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/d.jpg")
    text = _check_common(processor, build_part_sample(PascalPartReader(tmp_path)[0], processor), ["Sure, it is [SEG]."] * 2)
    assert _questions(text)[1] in ("dog head", "the head of the dog")


def test_collated_image_batch_trains(tmp_path, tiny, processor):
    refs = REFS + [{"ref_id": 3, "ann_id": [-1], "image_id": 1, "split": "train", "sentences": [{"sent": "a cat"}]}]
    build_refer(tmp_path, folder="grefcoco", refs_name="grefs(unc).json", refs=[
        dict(ref, ann_id=[ref["ann_id"]]) if isinstance(ref["ann_id"], int) else ref for ref in refs[:1] + refs[3:]
    ])
    build_refer(tmp_path)
    samples = [build_refer_sample(RefCOCOReader(tmp_path)[0], processor), build_refer_sample(GRefCOCOReader(tmp_path)[0], processor)]
    batch = OisaTrainingCollator(processor.tokenizer.pad_token_id)(samples)
    num_seg = int((batch["input_ids"] == processor.seg_token_id).sum())
    assert num_seg == 4 + 2 and batch["gt_masks"].shape[0] == num_seg
    assert batch["input_features"].shape[0] == 0
    model = AutoModel.from_pretrained(tiny, dtype=torch.float32)
    output = model(**batch)
    assert torch.isfinite(output.loss) and len(output.mask_logits) == num_seg
