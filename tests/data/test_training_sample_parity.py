"""
The training sample of the reference run (reference/README.md §4.5), built by our own path: an OmniAVS folder holding
the reference's frames, soundtrack, speech clip, referring image and GT masks, read by `OmniAVSReader`, turned into a
sample by `build_omniavs_sample` with the processor `oisa convert` writes for the tiny original, and collated by
`OisaTrainingCollator`. It is compared field by field with what the original's `preprocess_mpt` and
`concat_pad_data_collator` made (`train_input_ids`, `train_labels`, `train_attention_mask`, the pixel values, mel
features, the image and audio flags, the GT masks and their flags).

The one intended deviation is the per-frame soundtrack layout (B4): the original's training collapses every
sub-audio segment behind Frame 1; we lay them out per frame, as the released evaluation does (profile `release`) or
with the special-token wrappers (profile `fixed`). Put back the reference's layout and the ids, the labels and the
recorded training losses are the reference's.
"""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

import processing_oisa  # noqa: F401  (registers the processor)
from oisa_cli.main import main as oisa_main
from processing_oisa.data.mixture import OisaTrainingCollator, build_omniavs_sample
from processing_oisa.data.omniavs import OmniAVSReader
from processing_oisa.rle import encode_rle

from ..modeling.test_golden_parity import LOSS_TOL, TINY_ORIGINAL


SUB_AUDIO = "<SUB_AUDIO_CONTEXT>"
# A user turn's frame line: `Frame k: <img>...</img>`, then whatever carries the frame's share of the soundtrack
FRAME_LINE = re.compile(
    r"(Frame\d+: <img>(?:<IMG_CONTEXT>)+</img>)((?:<sub_audio>|</sub_audio>|<SUB_AUDIO_CONTEXT>)*)\n"
)


pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def golden():
    return np.load(TINY_ORIGINAL / "golden.npz")


@pytest.fixture(scope="module")
def golden_json():
    return json.loads((TINY_ORIGINAL / "golden.json").read_text())


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The tiny original as `oisa convert` writes it: weights, config and the processor training reads."""
    directory = tmp_path_factory.mktemp("converted") / "tiny"
    assert oisa_main(["convert", str(TINY_ORIGINAL), str(directory)]) == 0
    return directory


@pytest.fixture(scope="module")
def record(golden, tmp_path_factory):
    """
    The reference's training expression as an OmniAVS record: a speech_image expression over 3 frames (frames 0-2 of
    `frames_uint8`), the soundtrack, the speech clip and the referring image (image 3), one object whose masks are
    `train_gt_masks_uint8` (empty in frame 1).
    """
    root = tmp_path_factory.mktemp("omniavs")
    frames, masks = golden["frames_uint8"], golden["train_gt_masks_uint8"]
    names = [f"{index:05d}.png" for index in range(3)]
    (root / "images" / "v0").mkdir(parents=True)
    for name, frame in zip(names, frames[:3]):
        Image.fromarray(frame).save(root / "images" / "v0" / name)
    (root / "audios").mkdir()
    # the reader wants the soundtrack as <video>.mp3; the decoder reads the container, whatever its name
    shutil.copy(TINY_ORIGINAL / "soundtrack.wav", root / "audios" / "v0.mp3")
    for folder in ("referring_speeches", "referring_images"):
        (root / "referrings" / folder).mkdir(parents=True)
    shutil.copy(TINY_ORIGINAL / "speech.wav", root / "referrings" / "referring_speeches" / "speech.wav")
    Image.fromarray(frames[3]).save(root / "referrings" / "referring_images" / "image.png")
    mask_dict = {"1": [encode_rle(mask) if mask.any() else None for mask in masks]}
    (root / "video_dict.json").write_text(json.dumps({"v0": {"file_name": names, "mask_dict": mask_dict}}))
    line = {
        "video_name": "v0", "exp_id": 0, "expr_type": "speech_image", "expr": "the one that speaks", "obj_id": ["1"],
        "expl": None, "referring_speech": "speech.wav", "referring_sound": None, "referring_image": "image.png",
    }
    (root / "meta_expressions_train.jsonl").write_text(json.dumps(line) + "\n")
    records = list(OmniAVSReader(root, split="train"))
    assert len(records) == 1
    return records[0]


def build(record, processor, profile: str) -> dict[str, torch.Tensor]:
    # 3 frames, 2 of them dense: both samplers take frames [0, 1, 2] and dense positions [0, 2], the reference's
    # frame flags [1, 0, 1] (dense, pooled, dense)
    sample = build_omniavs_sample(record, processor, num_frames=3, num_dense_frames=2, profile=profile)
    return OisaTrainingCollator(processor.tokenizer.pad_token_id)([sample])


@pytest.fixture(scope="module")
def processor(converted):
    return AutoProcessor.from_pretrained(converted)


@pytest.fixture(scope="module")
def release_batch(record, processor):
    assert processor.sub_audio_layout == "release" and processor.num_image_tokens == 64
    return build(record, processor, "release")


def reference_text(golden, processor) -> str:
    text = processor.tokenizer.decode(golden["train_input_ids"])
    # the reference's ids are the tokenizer's ids of its decoded text: a rewritten text can be re-tokenised
    assert processor.tokenizer(text, return_tensors="pt")["input_ids"][0].tolist() == golden["train_input_ids"].tolist()
    return text


def per_frame_layout(reference: str, start: str, end: str) -> str:
    """
    The reference's text with the soundtrack split over the 3 frames and each share wrapped in `start`/`end` behind
    its own frame: the reference's training layout with B4 fixed. The reference's (B4) shape is asserted first: all
    50 context tokens behind Frame 1, in runs of 16, 17 and 17 closed by `</sub_audio>`, and a lone `<sub_audio>`
    behind Frames 2 and 3 (data_train_eval.md §2.6 and its corrections, item 1).
    """
    shares = [match.group(2) for match in FRAME_LINE.finditer(reference)]
    assert shares == [
        "<sub_audio>" + "</sub_audio>".join(SUB_AUDIO * run for run in (16, 17, 17)) + "</sub_audio>",
        "<sub_audio>",
        "<sub_audio>",
    ]
    # segment i gets 50 // 3 + (1 if i < 50 % 3 else 0) tokens: 17, 17, 16 (§2.6, step 2)
    runs = iter((17, 17, 16))
    return FRAME_LINE.sub(lambda match: f"{match.group(1)}{start}{SUB_AUDIO * next(runs)}{end}\n", reference)


def test_training_ids_are_the_reference_ones_but_for_the_sub_audio_layout(release_batch, golden, processor):
    """Profile `release`: the reference's ids with the soundtrack interleaved per frame as released evaluation (B4)."""
    tokenizer = processor.tokenizer
    expected = per_frame_layout(reference_text(golden, processor), "<sub_aud>", "</sub_aud>")
    assert tokenizer.decode(release_batch["input_ids"][0]) == expected
    expected_ids = tokenizer(expected, return_tensors="pt")["input_ids"][0]
    assert torch.equal(release_batch["input_ids"][0], expected_ids)
    # the soundtrack's 50 context tokens, in the reference's (B4) place or ours
    sub_audio_id = tokenizer.convert_tokens_to_ids(SUB_AUDIO)
    assert (release_batch["input_ids"][0] == sub_audio_id).sum() == 50
    assert (golden["train_input_ids"] == sub_audio_id).sum() == 50


def test_training_ids_with_the_fixed_layout(record, converted, golden):
    """Profile `fixed`: the reference's ids with each frame's share in its own `<sub_audio>`...`</sub_audio>` (B4)."""
    processor = AutoProcessor.from_pretrained(converted)
    processor.sub_audio_layout = "per_frame"
    batch = build(record, processor, "fixed")
    expected = per_frame_layout(reference_text(golden, processor), "<sub_audio>", "</sub_audio>")
    assert torch.equal(batch["input_ids"][0], processor.tokenizer(expected, return_tensors="pt")["input_ids"][0])
    assert torch.equal(batch["labels"][0][-11:], torch.from_numpy(golden["train_labels"][-11:]))


def test_training_labels_and_attention_mask(release_batch, golden, golden_json):
    """Only the answer and its `<|im_end|>` are supervised, with the reference's ids; nothing is padding."""
    labels, golden_labels = release_batch["labels"][0], torch.from_numpy(golden["train_labels"])
    supervised = labels != -100
    assert supervised.sum() == golden_json["train_num_supervised_labels"] == 11
    # the supervised tokens close both sequences; the ids before them differ only in the sub-audio layout (B4)
    assert supervised[-11:].all() and torch.equal(golden_labels != -100, torch.arange(len(golden_labels)) >= 487)
    assert labels[supervised].tolist() == golden_json["train_supervised_label_ids"] == golden_labels[-11:].tolist()
    assert torch.equal(labels[supervised], release_batch["input_ids"][0][supervised])
    # B21 fixed: the mask says which tokens are real, here all of them, as the reference's `input_ids != 0` did
    assert golden["train_attention_mask"].all() and release_batch["attention_mask"].bool().all()
    assert release_batch["attention_mask"].shape == release_batch["input_ids"].shape


def test_training_images_audio_and_masks(release_batch, golden, golden_json):
    batch = release_batch
    # pixel values: torchvision ToTensor + Normalize of the same frames, then the referring image, bit for bit
    pixels = torch.from_numpy(golden["frames_uint8"]).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    pixels = (pixels - mean[:, None, None]) / std[:, None, None]
    assert torch.equal(batch["pixel_values"], pixels)
    assert batch["pixel_values"].double().sum().item() == pytest.approx(golden_json["pixel_values_sum_f64"], abs=1e-6)
    # the reference's dense_frame_flag [1, 0, 1, 2]: dense, pooled, dense frames, then the referring image (dense);
    # seg_image_num 3: the masks go with the first three images
    flags_to_modes = {1: 2, 0: 1, 2: 2}
    assert batch["image_token_modes"].tolist() == [flags_to_modes[f] for f in golden_json["train_dense_frame_flag"]]
    assert batch["segmentation_frame_mask"].tolist() == [True, True, True, False]
    assert batch["images_per_sample"].tolist() == [4]
    # audio: the soundtrack then the speech clip (audio_flags [2, 1]); mel as in the processor parity test
    np.testing.assert_allclose(batch["input_features"].numpy(), golden["audio_mel"], atol=5e-5, rtol=0)
    assert batch["audio_token_modes"].tolist() == [2, 1]
    # mel frames -> frames after the stride-2 conv, the reference's `audio_input_lengths[:, 0]`
    assert ((batch["audio_feature_lengths"] + 1) // 2).tolist() == golden["audio_input_lengths"][:, 0].tolist()
    # the GT masks of the three frames (frame 1 empty) and mask_flag ones(3)
    assert torch.equal(batch["gt_masks"], torch.from_numpy(golden["train_gt_masks_uint8"]).float())
    assert batch["gt_mask_valid"].tolist() == [True, True, True]


def test_training_losses_of_our_sample_in_the_reference_layout(release_batch, converted, golden, golden_json):
    """
    Our collated batch, its ids and labels swapped for the reference's (the B4 layout, the only deviation), gives the
    reference's training losses (eval-mode points, seeded as recorded): every field but the ids enters the loss.
    """
    model = AutoModel.from_pretrained(converted, dtype=torch.float32).eval()
    batch = dict(release_batch)
    batch["input_ids"] = torch.from_numpy(golden["train_input_ids"])[None]
    batch["labels"] = torch.from_numpy(golden["train_labels"])[None]
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    torch.manual_seed(4321)
    with torch.no_grad():
        output = model(**batch)
    recorded = golden_json["train_loss_records_eval_mode"]
    # the original logs Dice as "Loss/mask" and BCE as "Loss/dice" (B8)
    for value, tag in (
        (output.lm_loss, "Loss/llm"),
        (output.class_loss, "Loss/cls"),
        (output.dice_loss, "Loss/mask"),
        (output.bce_loss, "Loss/dice"),
        (output.loss, "Loss/total"),
    ):
        assert value.item() == pytest.approx(recorded[tag], abs=LOSS_TOL), tag
