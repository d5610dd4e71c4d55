"""
Training readers and sample builders of the stage-2 image segmentation sets (spec data_train_eval.md §3.2): REFER
(refcoco, refcoco+, refcocog), gRefCOCO, ADE20K, COCO-Stuff, ReasonSeg, PACO-LVIS and Pascal-Part.

One record is one image; its sample is a multi-turn conversation of up to 4 expressions (chosen deterministically
from the record index), the image as one dense segmentation frame, one GT mask per `[SEG]` turn and no audio clip.
"""

from __future__ import annotations

import io
import json
import pickle
import random
from abc import abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError
from torch.nn import functional as F

from ..media import load_image
from ..processing_oisa import OisaProcessor
from ..prompts import NULL_ANSWER, POSITIVE_ANSWER, target_answer
from ..rle import RleError, decode_rle
from .errors import OisaDataError, resolve_inside


NUM_EXPRESSIONS_PER_SAMPLE = 4
IMAGE_QUESTION = "Please segment the object this sentence describes in this image: <ref>{expression}</ref>"
EXPLAIN_SUFFIX = ", and explain why."
EXPLAIN_PROBABILITY = 0.5
NUM_MEL_BINS, NUM_MEL_FRAMES = 128, 3000


# ---------------------------------------------------------------------------------------------------------------------
# shared helpers


def _read_json(path: Path, dataset: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise OisaDataError("annotation file is missing", dataset=dataset, path=path) from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise OisaDataError(f"annotation file is not valid JSON ({error})", dataset=dataset, path=path) from error


class _ContainersOnlyUnpickler(pickle.Unpickler):
    """Unpickles builtin containers and scalars only: every global (class, function) is refused, so nothing runs."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in an annotation pickle")


def _read_pickle_safely(path: Path, dataset: str) -> Any:
    """A pickle of lists, dicts, strings and numbers (as REFER's `refs(unc).p`), read without running any code."""
    try:
        data = path.read_bytes()
        # Python 2 pickles hold byte strings; latin-1 maps every byte and REFER's sentences are ASCII
        return _ContainersOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except OSError as error:
        raise OisaDataError(f"cannot read annotation pickle ({error})", dataset=dataset, path=path) from error
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise OisaDataError(f"refused or malformed annotation pickle ({error})", dataset=dataset, path=path) from error


def _rasterise_polygons(polygons: Sequence, height: int, width: int) -> np.ndarray:
    """COCO polygons (each a flat `[x1, y1, x2, y2, ...]` list) filled with PIL into one bool mask."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons:
        if (
            not isinstance(polygon, Sequence)
            or len(polygon) < 6
            or len(polygon) % 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in polygon)
        ):
            raise ValueError("a polygon must be a flat list of at least 3 (x, y) number pairs")
        draw.polygon([(float(polygon[i]), float(polygon[i + 1])) for i in range(0, len(polygon), 2)], fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


def decode_coco_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """
    A COCO instance `segmentation` (polygon list, or RLE with string or list counts) as a bool mask; the parts of a
    polygon list are unioned (the original sums them and then uses the mask as foreground > 0).
    """
    if isinstance(segmentation, Mapping):
        try:
            mask = decode_rle(segmentation)
        except RleError as error:
            raise ValueError(str(error)) from error
        if mask.shape != (height, width):
            raise ValueError(f"RLE size {mask.shape} differs from the image size {(height, width)}")
        return mask
    if isinstance(segmentation, Sequence) and not isinstance(segmentation, (str, bytes)):
        return _rasterise_polygons(segmentation, height, width)
    raise ValueError(f"segmentation must be polygons or an RLE, got {type(segmentation).__name__}")


def _choose(rng: random.Random, count: int) -> list[int]:
    """Up to 4 positions out of `count`: a random subset when there are more, else all of them in order (as LISA)."""
    if count > NUM_EXPRESSIONS_PER_SAMPLE:
        return rng.sample(range(count), NUM_EXPRESSIONS_PER_SAMPLE)
    return list(range(count))


def _image_size(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class ImageTurn:
    """One question of an image conversation: the expression, its answer, and its mask (None for a null turn)."""

    question: str
    answer: str
    mask: np.ndarray | None = field(default=None, repr=False, compare=False)


def build_image_conversation_sample(
    processor: OisaProcessor, image_path: Path, turns: Sequence[ImageTurn], dataset: str, record: str | int
) -> dict[str, torch.Tensor]:
    """
    The sample of one image and its turns: Hermes-2 multi-turn prompt (the image before the first question), labels on
    every answer and its `<|im_end|>`, the image as one dense segmentation frame, one mask per `[SEG]` turn, no audio.
    """
    if not turns:
        raise OisaDataError("the image has no expression to train on", dataset=dataset, record=record, path=image_path)
    tokenizer = processor.tokenizer
    template_tokens = ("<ref>", "</ref>", "[SEG]")
    reserved = ["<image>", *(token for token in tokenizer.get_added_vocab() if token not in template_tokens)]
    messages: list[dict[str, str]] = []
    for position, turn in enumerate(turns):
        # an expression holding a special token would add placeholders that no embedding fills, or extra targets
        if (
            any(token in turn.question or token in turn.answer for token in reserved)
            or turn.question.count("<ref>") != 1
            or turn.question.count("</ref>") != 1
            or "[SEG]" in turn.question
            or turn.answer.count("[SEG]") > 1
        ):
            raise OisaDataError(
                f"expression {turn.question!r} holds a reserved token", dataset=dataset, record=record, path=image_path
            )
        content = turn.question
        if position == 0:
            content = processor._image_tokens(processor.num_image_tokens) + "\n" + content
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": turn.answer}]

    def render(count: int, generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            messages[:count], chat_template=processor.chat_template, tokenize=False, add_generation_prompt=generation_prompt
        )

    full = render(len(messages), False)
    if not full.endswith(turns[-1].answer + "<|im_end|>"):
        raise ValueError("the chat template must end the conversation with the last answer and <|im_end|>")
    input_ids = tokenizer(full)["input_ids"]
    labels = [-100] * len(input_ids)
    for position in range(len(turns)):
        start = len(tokenizer(render(2 * position + 1, True))["input_ids"])
        end = len(tokenizer(render(2 * position + 2, False))["input_ids"])
        labels[start:end] = input_ids[start:end]

    image = load_image(image_path, "Image")
    size = processor.image_processor.size["height"]
    masks = [turn.mask for turn in turns if turn.mask is not None]
    if masks:
        stacked = torch.from_numpy(np.stack([np.asarray(mask, dtype=np.float32) for mask in masks]))[:, None]
        # nearest resize to the model's square input, as for the video sets
        gt_masks = F.interpolate(stacked, size=(size, size), mode="nearest")[:, 0]
    else:
        gt_masks = torch.zeros(0, size, size)
    if sum(turn.answer.count("[SEG]") for turn in turns) != gt_masks.shape[0]:
        raise ValueError("every [SEG] answer needs exactly one mask")
    return {
        "input_ids": torch.tensor(input_ids),
        "attention_mask": torch.ones(len(input_ids), dtype=torch.long),
        "labels": torch.tensor(labels),
        "pixel_values": processor.image_processor(images=[image], return_tensors="pt")["pixel_values"],
        "image_token_modes": torch.tensor([2]),
        "segmentation_frame_mask": torch.tensor([True]),
        "input_features": torch.zeros(0, NUM_MEL_BINS, NUM_MEL_FRAMES),
        "audio_feature_lengths": torch.zeros(0, dtype=torch.long),
        "audio_token_modes": torch.zeros(0, dtype=torch.long),
        "gt_masks": gt_masks,
        "gt_mask_valid": torch.ones(gt_masks.shape[0], dtype=torch.bool),
    }


def _question(expression: str) -> str:
    return IMAGE_QUESTION.format(expression=expression)


class _RecordList(Sequence):
    """A read-only list of records."""

    _records: list

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index):
        return self._records[index]

    def __iter__(self) -> Iterator:
        return iter(self._records)


# ---------------------------------------------------------------------------------------------------------------------
# REFER: refcoco, refcoco+, refcocog, and gRefCOCO


@dataclass(frozen=True)
class ReferExpression:
    """One sentence of a referring expression and the instances it refers to (none: a no-target sentence)."""

    text: str
    ann_ids: tuple[int, ...]


@dataclass(frozen=True)
class ReferImageRecord:
    """One image of a REFER-style set: all its train sentences pooled, and the segmentations they refer to."""

    dataset: str
    index: int
    image_id: int
    image_path: Path
    height: int
    width: int
    expressions: tuple[ReferExpression, ...]
    segmentations: Mapping[int, Any] = field(repr=False, compare=False)
    annotation_path: Path = field(repr=False, compare=False)


class _ReferReader(_RecordList):
    """
    `<root>/<folder>/instances.json` (COCO images and instance annotations) and the refs of `<root>/<folder>/`:
    `refs(<split_by>).json` if present, a list of ref dicts with the fields of REFER's pickle (`ref_id`, `ann_id`,
    `image_id`, `split`, `sentences: [{"sent": ...}]`, ...), else `refs(<split_by>).p` read with a restricted
    unpickler that accepts only builtin containers. Images are `<root>/images/mscoco/images/train2014/<file_name>`.
    `root` is LISA's `refer_seg` folder.
    """

    dataset: ClassVar[str]
    folder: ClassVar[str]
    refs_stem: ClassVar[str]
    image_dir: ClassVar[str] = "images/mscoco/images/train2014"
    allows_no_target: ClassVar[bool] = False

    def __init__(self, root: str | Path, split: str = "train"):
        self.root = Path(root)
        self.split = split
        folder = resolve_inside(self.root, self.folder, dataset=self.dataset)
        instances_path = folder / "instances.json"
        instances = _read_json(instances_path, self.dataset)
        refs_path = folder / f"{self.refs_stem}.json"
        if refs_path.is_file():
            refs = _read_json(refs_path, self.dataset)
        else:
            refs_path = folder / f"{self.refs_stem}.p"
            refs = _read_pickle_safely(refs_path, self.dataset)
        images, segmentations = self._parse_instances(instances, instances_path)
        self._records = self._parse_refs(refs, refs_path, images, segmentations)

    def _error(self, message: str, record: Any, path: Path) -> OisaDataError:
        return OisaDataError(message, dataset=self.dataset, record=record, path=path)

    def _parse_instances(self, instances: Any, path: Path) -> tuple[dict[int, dict], dict[int, Any]]:
        if not isinstance(instances, dict) or not isinstance(instances.get("images"), list):
            raise self._error("instances.json needs an 'images' list", None, path)
        if not isinstance(instances.get("annotations"), list):
            raise self._error("instances.json needs an 'annotations' list", None, path)
        images: dict[int, dict] = {}
        for image in instances["images"]:
            if not isinstance(image, dict) or not isinstance(image.get("id"), int):
                raise self._error(f"malformed image entry {image!r}", None, path)
            images[image["id"]] = image
        segmentations: dict[int, Any] = {}
        for annotation in instances["annotations"]:
            if not isinstance(annotation, dict) or not isinstance(annotation.get("id"), int):
                raise self._error(f"malformed annotation entry {annotation!r}", None, path)
            if "segmentation" not in annotation:
                raise self._error("annotation has no 'segmentation'", f"annotation {annotation['id']}", path)
            segmentations[annotation["id"]] = annotation["segmentation"]
        return images, segmentations

    def _ann_ids(self, ref: dict, record: str, path: Path) -> tuple[int, ...]:
        value = ref.get("ann_id")
        ann_ids = value if isinstance(value, list) else [value]
        if not ann_ids or not all(isinstance(v, int) and not isinstance(v, bool) for v in ann_ids):
            raise self._error(f"'ann_id' must be an integer or a list of integers, got {value!r}", record, path)
        if -1 in ann_ids or ref.get("no_target"):
            if not self.allows_no_target:
                raise self._error("no-target ref in a set without null expressions", record, path)
            if any(v != -1 for v in ann_ids):
                raise self._error(f"no-target ref with instances {ann_ids}", record, path)
            return ()
        return tuple(ann_ids)

    def _parse_refs(
        self, refs: Any, path: Path, images: dict[int, dict], segmentations: dict[int, Any]
    ) -> list[ReferImageRecord]:
        if not isinstance(refs, list):
            raise self._error("refs must be a list of ref dicts", None, path)
        by_image: dict[int, list[ReferExpression]] = {}
        for number, ref in enumerate(refs):
            record = f"ref {ref.get('ref_id', number) if isinstance(ref, dict) else number}"
            if not isinstance(ref, dict) or not isinstance(ref.get("image_id"), int):
                raise self._error("a ref must be a dict with an integer 'image_id'", record, path)
            if ref.get("split") != self.split:
                continue
            ann_ids = self._ann_ids(ref, record, path)
            missing = [ann_id for ann_id in ann_ids if ann_id not in segmentations]
            if missing:
                raise self._error(f"ref points to unknown annotations {missing}", record, path)
            if ref["image_id"] not in images:
                raise self._error(f"ref points to unknown image {ref['image_id']}", record, path)
            sentences = ref.get("sentences")
            if not isinstance(sentences, list) or not all(
                isinstance(s, dict) and isinstance(s.get("sent"), str) for s in sentences
            ):
                raise self._error("'sentences' must be a list of {'sent': str}", record, path)
            by_image.setdefault(ref["image_id"], []).extend(ReferExpression(s["sent"], ann_ids) for s in sentences)

        records = []
        for image_id in sorted(by_image):
            image = images[image_id]
            record = f"image {image_id}"
            try:
                height = _image_size(image.get("height"), "height")
                width = _image_size(image.get("width"), "width")
            except ValueError as error:
                raise self._error(str(error), record, path) from error
            file_name = image.get("file_name")
            image_path = resolve_inside(self.root, self.image_dir, file_name, dataset=self.dataset, record=record)
            referred = {ann_id for expression in by_image[image_id] for ann_id in expression.ann_ids}
            records.append(
                ReferImageRecord(
                    dataset=self.dataset,
                    index=len(records),
                    image_id=image_id,
                    image_path=image_path,
                    height=height,
                    width=width,
                    expressions=tuple(by_image[image_id]),
                    segmentations={ann_id: segmentations[ann_id] for ann_id in sorted(referred)},
                    annotation_path=path.parent / "instances.json",
                )
            )
        return records


class RefCOCOReader(_ReferReader):
    dataset, folder, refs_stem = "refcoco", "refcoco", "refs(unc)"


class RefCOCOPlusReader(_ReferReader):
    dataset, folder, refs_stem = "refcoco+", "refcoco+", "refs(unc)"


class RefCOCOgReader(_ReferReader):
    dataset, folder, refs_stem = "refcocog", "refcocog", "refs(umd)"


class GRefCOCOReader(_ReferReader):
    """gRefCOCO: `<root>/grefcoco/grefs(unc).json`; `ann_id` is a list, `[-1]` (or `no_target`) for no target."""

    dataset, folder, refs_stem = "grefcoco", "grefcoco", "grefs(unc)"
    allows_no_target = True


def build_refer_sample(
    record: ReferImageRecord,
    processor: OisaProcessor,
    num_frames: int = 1,
    num_dense_frames: int = 1,
    profile: str = "release",
) -> dict[str, torch.Tensor]:
    """
    Up to 4 of the image's pooled sentences; a sentence's mask is the union of its instances. A no-target sentence
    (gRefCOCO) answers the null answer, without `[SEG]` and mask. `num_frames`, `num_dense_frames`, `profile` are unused.
    """
    rng = random.Random(record.index)
    masks: dict[int, np.ndarray] = {}
    turns = []
    for position in _choose(rng, len(record.expressions)):
        expression = record.expressions[position]
        if not expression.ann_ids:
            turns.append(ImageTurn(_question(expression.text), NULL_ANSWER))
            continue
        mask = np.zeros((record.height, record.width), dtype=bool)
        for ann_id in expression.ann_ids:
            if ann_id not in masks:
                try:
                    masks[ann_id] = decode_coco_segmentation(record.segmentations[ann_id], record.height, record.width)
                except ValueError as error:
                    raise OisaDataError(
                        f"annotation {ann_id}: {error}",
                        dataset=record.dataset,
                        record=f"image {record.image_id}",
                        path=record.annotation_path,
                    ) from error
            mask |= masks[ann_id]
        turns.append(ImageTurn(_question(expression.text), POSITIVE_ANSWER, mask))
    return build_image_conversation_sample(processor, record.image_path, turns, record.dataset, f"image {record.image_id}")


# ---------------------------------------------------------------------------------------------------------------------
# semantic segmentation: ADE20K and COCO-Stuff


@dataclass(frozen=True)
class SemanticRecord:
    """One image of a semantic segmentation set and its label map; `class_names[c]` names label class `c`."""

    dataset: str
    index: int
    image_path: Path
    label_path: Path
    class_names: tuple[str, ...] = field(repr=False, compare=False)


def _read_class_names(root: Path, candidates: Sequence[str], dataset: str) -> tuple[str, ...]:
    for name in candidates:
        path = root / name
        if path.is_file():
            names = _read_json(path, dataset)
            if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
                raise OisaDataError("class file must be a non-empty list of names", dataset=dataset, path=path)
            return tuple(names)
    raise OisaDataError(f"no class file ({' or '.join(candidates)})", dataset=dataset, path=root)


class _SemanticReader(_RecordList):
    dataset: ClassVar[str]
    class_files: ClassVar[tuple[str, ...]]

    def __init__(self, root: str | Path, split: str = "train"):
        self.root = Path(root)
        self.split = split
        self.class_names = _read_class_names(self.root, self.class_files, self.dataset)
        self._records = [
            SemanticRecord(self.dataset, index, image_path, label_path, self.class_names)
            for index, (image_path, label_path) in enumerate(self._pairs())
        ]

    @abstractmethod
    def _pairs(self) -> list[tuple[Path, Path]]:
        """(image, label map) paths of the split."""

    def _pair_folder(self, image_dir: Path, label_dir: Path, image_suffix: str) -> list[tuple[Path, Path]]:
        """Every label PNG with its image of the same stem (a label without its image is an error)."""
        if not label_dir.is_dir():
            raise OisaDataError("label folder is missing", dataset=self.dataset, path=label_dir)
        pairs = []
        for label_path in sorted(label_dir.glob("*.png")):
            image_path = image_dir / (label_path.stem + image_suffix)
            if not image_path.is_file():
                raise OisaDataError("label map has no image", dataset=self.dataset, record=label_path.stem, path=image_path)
            pairs.append((image_path, label_path))
        return pairs

    @staticmethod
    @abstractmethod
    def class_map(label: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
        """Label values -> class indices, 255 where ignored."""


class ADE20KReader(_SemanticReader):
    """
    `<root>/images/<training|validation>/*.jpg`, `<root>/annotations/<same>/*.png` (0 unlabelled, c+1 for class c)
    and the 150 class names in `<root>/ade20k_classes.json` or `<root>/classes.json`.
    """

    dataset = "ade20k"
    class_files = ("ade20k_classes.json", "classes.json")

    def _pairs(self) -> list[tuple[Path, Path]]:
        folder = {"train": "training", "val": "validation"}.get(self.split, self.split)
        return self._pair_folder(
            resolve_inside(self.root, "images", folder, dataset=self.dataset),
            resolve_inside(self.root, "annotations", folder, dataset=self.dataset),
            ".jpg",
        )

    @staticmethod
    def class_map(label: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
        classes = label.astype(np.int64) - 1
        classes[(label == 0) | (classes >= len(class_names))] = 255
        return classes


class COCOStuffReader(_SemanticReader):
    """
    `<root>/cocostuff/<split>2017/*.png` label maps (value c for class c, 255 unlabelled), images
    `<root>/coco/<split>2017/*.jpg`, class names (a JSON list indexed by label value) in
    `<root>/cocostuff/cocostuff_classes.json` or `<root>/cocostuff/classes.json`. `root` is LISA's data folder.
    """

    dataset = "cocostuff"
    class_files = ("cocostuff/cocostuff_classes.json", "cocostuff/classes.json")

    def _pairs(self) -> list[tuple[Path, Path]]:
        folder = f"{self.split}2017"
        return self._pair_folder(
            resolve_inside(self.root, "coco", folder, dataset=self.dataset),
            resolve_inside(self.root, "cocostuff", folder, dataset=self.dataset),
            ".jpg",
        )

    @staticmethod
    def class_map(label: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
        classes = label.astype(np.int64)
        # LISA ignores the classes whose name holds "-" (e.g. "other-plant" style merged stuff classes)
        hyphenated = [index for index, name in enumerate(class_names) if "-" in name]
        classes[np.isin(classes, hyphenated) | (classes >= len(class_names))] = 255
        return classes


_CLASS_MAPS: dict[str, Callable[[np.ndarray, Sequence[str]], np.ndarray]] = {
    ADE20KReader.dataset: ADE20KReader.class_map,
    COCOStuffReader.dataset: COCOStuffReader.class_map,
}


def build_semantic_sample(
    record: SemanticRecord,
    processor: OisaProcessor,
    num_frames: int = 1,
    num_dense_frames: int = 1,
    profile: str = "release",
) -> dict[str, torch.Tensor]:
    """Up to 4 classes present in the label map, prompted by name; each mask is that class's pixels."""
    try:
        with Image.open(record.label_path) as label_image:
            label = np.asarray(label_image)
    except (OSError, UnidentifiedImageError) as error:
        raise OisaDataError(
            f"unreadable label map ({error})", dataset=record.dataset, record=record.index, path=record.label_path
        ) from error
    if label.ndim != 2:
        raise OisaDataError(
            f"label map must be single-channel, got shape {label.shape}",
            dataset=record.dataset,
            record=record.index,
            path=record.label_path,
        )
    classes = _CLASS_MAPS[record.dataset](label, record.class_names)
    present = [int(value) for value in np.unique(classes) if value != 255]
    if not present:
        raise OisaDataError("label map holds no class", dataset=record.dataset, record=record.index, path=record.label_path)
    rng = random.Random(record.index)
    turns = [
        ImageTurn(_question(record.class_names[present[position]]), POSITIVE_ANSWER, classes == present[position])
        for position in _choose(rng, len(present))
    ]
    return build_image_conversation_sample(processor, record.image_path, turns, record.dataset, record.index)


# ---------------------------------------------------------------------------------------------------------------------
# ReasonSeg


@dataclass(frozen=True)
class ReasonSegRecord:
    """One ReasonSeg image, its LISA json (queries and polygons) and its explanation, if any."""

    index: int
    image_path: Path
    annotation_path: Path
    explanation: str | None = None


class ReasonSegReader(_RecordList):
    """
    `<root>/<split>/*.jpg`, each with a LISA json of the same stem (`text`: queries, `shapes`: labelled polygons), and
    optional explanations in `<root>/explanatory/<split>.json` (a list of `{"image": file name, "outputs": text}`).
    """

    dataset = "reason_seg"

    def __init__(self, root: str | Path, split: str = "train"):
        self.root = Path(root)
        folder = resolve_inside(self.root, split, dataset=self.dataset)
        if not folder.is_dir():
            raise OisaDataError("split folder is missing", dataset=self.dataset, path=folder)
        explanations = self._explanations(self.root / "explanatory" / f"{folder.name}.json")
        self._records = []
        for image_path in sorted(folder.glob("*.jpg")):
            annotation_path = image_path.with_suffix(".json")
            if not annotation_path.is_file():
                raise OisaDataError(
                    "image has no annotation json", dataset=self.dataset, record=image_path.name, path=annotation_path
                )
            self._records.append(
                ReasonSegRecord(len(self._records), image_path, annotation_path, explanations.get(image_path.name))
            )

    def _explanations(self, path: Path) -> dict[str, str]:
        if not path.is_file():
            return {}
        entries = _read_json(path, self.dataset)
        if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("image"), str) and isinstance(e.get("outputs"), str) for e in entries
        ):
            raise OisaDataError("explanations must be a list of {'image', 'outputs'}", dataset=self.dataset, path=path)
        return {entry["image"]: entry["outputs"] for entry in entries}


def _reason_seg_mask(annotation: Any, height: int, width: int, ignore_is_foreground: bool) -> np.ndarray:
    """
    LISA's `get_mask_from_json`: polygons painted largest first, so smaller ones win; "flag" shapes are skipped.
    "ignore" polygons are foreground in the release (B28); otherwise they are painted as background, since the
    mask loss has no ignore label.
    """
    if not isinstance(annotation, dict) or not isinstance(annotation.get("shapes"), list):
        raise ValueError("annotation needs a 'shapes' list")
    shapes = []
    for shape in annotation["shapes"]:
        if not isinstance(shape, dict) or not isinstance(shape.get("label"), str):
            raise ValueError(f"malformed shape {shape!r}")
        if shape["label"].lower() == "flag":
            continue
        points = shape.get("points")
        if not isinstance(points, list) or len(points) < 3 or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(v, (int, float)) for v in p) for p in points
        ):
            raise ValueError(f"shape {shape['label']!r} needs at least 3 [x, y] points")
        flat = [float(v) for point in points for v in point]
        shapes.append((int(_rasterise_polygons([flat], height, width).sum()), shape["label"], flat))
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for _, label, flat in sorted(shapes, key=lambda item: -item[0]):
        value = 0 if "ignore" in label.lower() and not ignore_is_foreground else 1
        draw.polygon(list(zip(flat[0::2], flat[1::2])), fill=value, outline=value)
    return np.asarray(canvas, dtype=bool)


def build_reason_seg_sample(
    record: ReasonSegRecord,
    processor: OisaProcessor,
    num_frames: int = 1,
    num_dense_frames: int = 1,
    profile: str = "release",
) -> dict[str, torch.Tensor]:
    """
    Up to 4 of the json's queries, all with the image's one mask. With an explanation, each turn asks (probability
    0.5) `..., and explain why.` and is answered `Sure, it is [SEG]. Explanation: {outputs}`.
    """
    annotation = _read_json(record.annotation_path, ReasonSegReader.dataset)
    queries = annotation.get("text") if isinstance(annotation, dict) else None
    if isinstance(queries, str):
        queries = [queries]
    if not isinstance(queries, list) or not queries or not all(isinstance(q, str) and q for q in queries):
        raise OisaDataError(
            "'text' must be a non-empty list of queries",
            dataset=ReasonSegReader.dataset,
            record=record.image_path.name,
            path=record.annotation_path,
        )
    with Image.open(record.image_path) as image:
        width, height = image.size
    try:
        mask = _reason_seg_mask(annotation, height, width, ignore_is_foreground=profile == "release")
    except ValueError as error:
        raise OisaDataError(
            str(error), dataset=ReasonSegReader.dataset, record=record.image_path.name, path=record.annotation_path
        ) from error
    rng = random.Random(record.index)
    turns = []
    for position in _choose(rng, len(queries)):
        explain = bool(record.explanation) and rng.random() < EXPLAIN_PROBABILITY
        text = _question(queries[position]) + (EXPLAIN_SUFFIX if explain else "")
        answer = target_answer(False, record.explanation if explain else None)
        turns.append(ImageTurn(text, answer, mask))
    return build_image_conversation_sample(
        processor, record.image_path, turns, ReasonSegReader.dataset, record.image_path.name
    )


# ---------------------------------------------------------------------------------------------------------------------
# part segmentation: PACO-LVIS and Pascal-Part


@dataclass(frozen=True)
class PartRecord:
    """One image of a part set: its categories (object, part or None) with their instances' segmentations."""

    dataset: str
    index: int
    image_id: int
    image_path: Path
    height: int
    width: int
    categories: tuple[tuple[str, str | None], ...]
    segmentations: tuple[tuple[Any, ...], ...] = field(repr=False, compare=False)
    annotation_path: Path = field(repr=False, compare=False)


class _PartReader(_RecordList):
    """A COCO-format json whose category names are `object:part` (or a plain object name)."""

    dataset: ClassVar[str]
    annotation_file: ClassVar[str]
    image_dir: ClassVar[str]

    def __init__(self, root: str | Path, split: str = "train"):
        self.root = Path(root)
        path = resolve_inside(self.root, self.annotation_file.format(split=split), dataset=self.dataset)
        data = _read_json(path, self.dataset)
        if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
            raise OisaDataError("needs 'images', 'annotations' and 'categories' lists", dataset=self.dataset, path=path)
        names = {}
        for category in data["categories"]:
            if not isinstance(category, dict) or not isinstance(category.get("id"), int) or not isinstance(category.get("name"), str):
                raise OisaDataError(f"malformed category {category!r}", dataset=self.dataset, path=path)
            names[category["id"]] = self._category_name(category["name"], path)
        by_image: dict[int, dict[int, list]] = {}
        for annotation in data["annotations"]:
            record = f"annotation {annotation.get('id') if isinstance(annotation, dict) else annotation!r}"
            if not isinstance(annotation, dict) or "segmentation" not in annotation:
                raise OisaDataError("annotation needs a 'segmentation'", dataset=self.dataset, record=record, path=path)
            if annotation.get("category_id") not in names:
                raise OisaDataError("annotation has an unknown category", dataset=self.dataset, record=record, path=path)
            by_image.setdefault(annotation.get("image_id"), {}).setdefault(annotation["category_id"], []).append(
                annotation["segmentation"]
            )
        self._records = []
        for image in data["images"]:
            record = f"image {image.get('id') if isinstance(image, dict) else image!r}"
            if not isinstance(image, dict) or not isinstance(image.get("id"), int):
                raise OisaDataError("malformed image entry", dataset=self.dataset, record=record, path=path)
            if image["id"] not in by_image:
                continue  # LISA resamples images without annotations; they are left out here
            try:
                height = _image_size(image.get("height"), "height")
                width = _image_size(image.get("width"), "width")
            except ValueError as error:
                raise OisaDataError(str(error), dataset=self.dataset, record=record, path=path) from error
            categories = sorted(by_image[image["id"]])
            self._records.append(
                PartRecord(
                    dataset=self.dataset,
                    index=len(self._records),
                    image_id=image["id"],
                    image_path=resolve_inside(
                        self.root, self.image_dir, image.get("file_name"), dataset=self.dataset, record=record
                    ),
                    height=height,
                    width=width,
                    categories=tuple(names[c] for c in categories),
                    segmentations=tuple(tuple(by_image[image["id"]][c]) for c in categories),
                    annotation_path=path,
                )
            )

    def _category_name(self, name: str, path: Path) -> tuple[str, str | None]:
        parts = name.strip().split(":")
        if len(parts) > 2 or not all(parts):
            raise OisaDataError(f"category name {name!r} is not 'object:part'", dataset=self.dataset, path=path)
        # LVIS disambiguations such as "bottle_(container)" are dropped, as LISA does
        cleaned = [part.split("_(")[0] for part in parts]
        return (cleaned[0], cleaned[1] if len(cleaned) == 2 else None)


class PacoLvisReader(_PartReader):
    """`<root>/vlpart/paco/annotations/paco_lvis_v1_<split>.json`, images `<root>/coco/<file_name>`."""

    dataset = "paco_lvis"
    annotation_file = "vlpart/paco/annotations/paco_lvis_v1_{split}.json"
    image_dir = "coco"


class PascalPartReader(_PartReader):
    """`<root>/vlpart/pascal_part/<split>.json`, images `<root>/vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/`."""

    dataset = "pascal_part"
    annotation_file = "vlpart/pascal_part/{split}.json"
    image_dir = "vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages"


def part_name(obj: str, part: str | None, rng: random.Random) -> str:
    """`obj part` or `the part of the obj`, 50/50 (LISA); a plain object category is its name."""
    if part is None:
        return obj
    return f"{obj} {part}" if rng.random() < 0.5 else f"the {part} of the {obj}"


def build_part_sample(
    record: PartRecord,
    processor: OisaProcessor,
    num_frames: int = 1,
    num_dense_frames: int = 1,
    profile: str = "release",
) -> dict[str, torch.Tensor]:
    """Up to 4 of the image's categories by (part) name; each mask is the union of the category's instances."""
    rng = random.Random(record.index)
    turns = []
    for position in _choose(rng, len(record.categories)):
        mask = np.zeros((record.height, record.width), dtype=bool)
        for segmentation in record.segmentations[position]:
            try:
                mask |= decode_coco_segmentation(segmentation, record.height, record.width)
            except ValueError as error:
                raise OisaDataError(
                    str(error), dataset=record.dataset, record=f"image {record.image_id}", path=record.annotation_path
                ) from error
        turns.append(ImageTurn(_question(part_name(*record.categories[position], rng)), POSITIVE_ANSWER, mask))
    return build_image_conversation_sample(processor, record.image_path, turns, record.dataset, f"image {record.image_id}")


# format name -> (reader, sample builder), to merge into `training_loop.SAMPLE_BUILDERS`
IMAGE_SAMPLE_BUILDERS: dict[str, tuple[type, Callable[..., dict[str, torch.Tensor]]]] = {
    "refcoco": (RefCOCOReader, build_refer_sample),
    "refcoco+": (RefCOCOPlusReader, build_refer_sample),
    "refcocog": (RefCOCOgReader, build_refer_sample),
    "grefcoco": (GRefCOCOReader, build_refer_sample),
    "ade20k": (ADE20KReader, build_semantic_sample),
    "cocostuff": (COCOStuffReader, build_semantic_sample),
    "reason_seg": (ReasonSegReader, build_reason_seg_sample),
    "paco_lvis": (PacoLvisReader, build_part_sample),
    "pascal_part": (PascalPartReader, build_part_sample),
}
