"""Stage-3 video sets without audio (MeViS and Ref-YouTube-VOS formats) and stage-1 audio-text sets: records, samples, a forward."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

import processing_oisa  # noqa: F401  (registers the OISA auto classes)
from oisa_cli.main import main as oisa_main
from processing_oisa.data.audio_text import AudioTextReader, build_audio_text_sample, expected_audio_length
from processing_oisa.data.errors import OisaDataError
from processing_oisa.data.mixture import OisaTrainingCollator
from processing_oisa.data.video_sets import (
    MevisReader,
    RefYoutubeVosReader,
    RevosReader,
    build_video_expression_sample,
)
from processing_oisa.rle import encode_rle


HEIGHT, WIDTH = 24, 32
QUESTION = "Please segment the object this sentence describes in this video: <ref>{}</ref>"


def _mask(frame: int, anno: int) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[2 + anno : 10 + anno, 3 * frame : 3 * frame + 6] = True
    return mask


def _write_video(frames_dir: Path, video: str, num_frames: int) -> list[str]:
    names = [f"{index:05d}" for index in range(num_frames)]
    (frames_dir / video).mkdir(parents=True)
    for index, name in enumerate(names):
        Image.new("RGB", (WIDTH, HEIGHT), (40 * index, 80, 120)).save(frames_dir / video / f"{name}.jpg")
    return names


def _write_meta_set(data_dir: Path, annotation: Path, anno_list: bool) -> None:
    """
    v1 (5 frames): exp 0 = annotations 0 and 1 (present everywhere), exp 1 = annotation 2 (only on frame 2);
    v2 (2 frames): exp 0 = annotation 3 (both frames).
    """
    presence = {"0": range(5), "1": range(5), "2": [2], "3": range(2)}
    lengths = {"0": 5, "1": 5, "2": 5, "3": 2}
    mask_dict = {
        anno: [encode_rle(_mask(frame, int(anno))) if frame in presence[anno] else None for frame in range(lengths[anno])]
        for anno in presence
    }
    videos = {
        "v1": {
            "frames": _write_video(data_dir / "JPEGImages", "v1", 5),
            "expressions": {
                "0": {"exp": "the two balls", "obj_id": [0, 1], "anno_id": [0, 1]},
                "1": {"exp": "the cat that appears", "obj_id": [2], "anno_id": [2] if anno_list else "2"},
            },
        },
        "v2": {
            "frames": _write_video(data_dir / "JPEGImages", "v2", 2),
            "expressions": {"0": {"exp": "the dog", "obj_id": [0], "anno_id": [3] if anno_list else "3"}},
        },
    }
    annotation.parent.mkdir(parents=True, exist_ok=True)
    annotation.write_text(json.dumps({"videos": videos}))
    (data_dir / "mask_dict.json").write_text(json.dumps(mask_dict))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("video")
    _write_meta_set(root / "mevis" / "train", root / "mevis" / "train" / "meta_expressions.json", anno_list=True)
    _write_meta_set(root / "revos", root / "revos" / "meta_expressions_train_.json", anno_list=True)
    ytvos = root / "ytvos"
    _write_meta_set(ytvos / "train", ytvos / "meta_expressions" / "train" / "meta_expressions.json", anno_list=False)

    audio = root / "audio_text"
    (audio / "clips").mkdir(parents=True)
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, 24000).astype(np.float32)  # 1.5 s
    soundfile.write(audio / "clips" / "dog.wav", noise, 16000)
    conversation = [
        {"from": "human", "value": "<audio>\nDescribe the sound."},
        {"from": "gpt", "value": "A dog barks."},
        {"from": "human", "value": "Is it loud?"},
        {"from": "gpt", "value": "Yes."},
    ]
    lines = [
        {"id": "good", "audio": "clips/dog.wav", "audio_length": list(expected_audio_length(24000)), "conversations": conversation},
        {"id": "stale", "audio": "clips/dog.wav", "audio_length": [50, 25, 27], "conversations": conversation},
    ]
    (audio / "train.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")

    oisa_main(["tiny-random", str(root / "tiny")])
    return root


@pytest.fixture(scope="module")
def processor(workspace):
    return AutoProcessor.from_pretrained(workspace / "tiny")


def _decode(processor, ids: torch.Tensor) -> str:
    return processor.tokenizer.decode(ids)


def test_mevis_records_and_union_masks(workspace):
    records = MevisReader(workspace / "mevis", split="train")
    assert [(record.video_id, record.exp_id, record.text) for record in records] == [
        ("v1", "0", "the two balls"), ("v1", "1", "the cat that appears"), ("v2", "0", "the dog"),
    ]
    first = records[0]
    assert first.anno_ids == ("0", "1")
    assert first.frame_paths[3] == workspace / "mevis" / "train" / "JPEGImages" / "v1" / "00003.jpg"
    masks = first.gt_masks([1, 1])
    assert masks.shape == (2, HEIGHT, WIDTH) and np.array_equal(masks[0], _mask(1, 0) | _mask(1, 1))
    # revos: the MeViS format at the root with the trailing-underscore annotation name
    assert len(RevosReader(workspace / "revos", split="train")) == 3


def test_short_video_repeats_frames_and_every_frame_is_supervised(workspace, processor):
    record = MevisReader(workspace / "mevis")[2]  # v2: 2 frames
    sample = build_video_expression_sample(record, processor, num_frames=4, num_dense_frames=2)
    size = processor.image_processor.size["height"]
    assert sample["pixel_values"].shape == (4, 3, size, size)
    assert sample["image_token_modes"].tolist() == [2, 1, 1, 2]
    assert sample["segmentation_frame_mask"].tolist() == [True] * 4
    # frames [0, 0, 1, 1]: the repeated frames carry the same mask
    assert sample["gt_masks"].shape == (4, size, size) and sample["gt_mask_valid"].all()
    assert torch.equal(sample["gt_masks"][0], sample["gt_masks"][1]) and not torch.equal(sample["gt_masks"][1], sample["gt_masks"][2])
    assert bool((sample["gt_masks"].flatten(1).sum(1) > 0).all())


def test_prompt_labels_and_absent_object(workspace, processor):
    records = MevisReader(workspace / "mevis")
    positive = build_video_expression_sample(records[0], processor, num_frames=4, num_dense_frames=2)
    text = _decode(processor, positive["input_ids"])
    # the OmniAVS text prompt: frames with their soundtrack share, the (silent) soundtrack, then the question
    assert "Frame1: <img>" in text and "Frame4: <img>" in text and "Frame5" not in text
    assert "</aud>\n" + QUESTION.format("the two balls") + "<|im_end|>" in text
    assert positive["input_features"].shape == (1, 128, 3000) and positive["audio_token_modes"].tolist() == [2]
    assert _decode(processor, positive["input_ids"][positive["labels"] != -100]) == "Sure, it is [SEG].<|im_end|>"
    # frames [0, 1, 3, 4]: masks on all four sampled frames, not only the dense ones
    assert bool((positive["gt_masks"].flatten(1).sum(1) > 0).all())

    # the cat is only on frame 2, which is not sampled: still the positive answer, with empty masks (B19 fixed)
    absent = build_video_expression_sample(records[1], processor, num_frames=4, num_dense_frames=2)
    assert _decode(processor, absent["input_ids"][absent["labels"] != -100]) == "Sure, it is [SEG].<|im_end|>"
    assert absent["gt_masks"].shape[0] == 4 and absent["gt_masks"].sum() == 0


def test_ref_youtube_vos_format(workspace, processor):
    records = RefYoutubeVosReader(workspace / "ytvos", split="train")
    assert [record.anno_ids for record in records] == [("0", "1"), ("2",), ("3",)]
    sample = build_video_expression_sample(records[2], processor, num_frames=3, num_dense_frames=1)
    assert sample["gt_masks"].shape[0] == 3 and sample["gt_masks"].sum() > 0

    pickled = workspace / "ytvos_pickle"
    (pickled / "train").mkdir(parents=True)
    (pickled / "train" / "mask_dict.pkl").write_bytes(b"never unpickled")
    with pytest.raises(OisaDataError, match="pickles are not loaded"):
        RefYoutubeVosReader(pickled)


def _mevis_copy(workspace: Path, tmp_path: Path, edit) -> Path:
    """A MeViS set whose annotations (and mask dict) `edit` changed in place."""
    data = tmp_path / "mevis"
    data.mkdir()
    meta = json.loads((workspace / "mevis" / "train" / "meta_expressions.json").read_text())
    mask_dict = json.loads((workspace / "mevis" / "train" / "mask_dict.json").read_text())
    edit(meta, mask_dict)
    (data / "meta_expressions.json").write_text(json.dumps(meta))
    (data / "mask_dict.json").write_text(json.dumps(mask_dict))
    return data


def test_paths_stay_inside_the_root(workspace, tmp_path):
    def escape(meta, mask_dict):
        meta["videos"]["../../v1"] = meta["videos"].pop("v1")

    with pytest.raises(OisaDataError, match="escapes the dataset root"):
        MevisReader(_mevis_copy(workspace, tmp_path, escape), check_files=False)


def test_malformed_annotations(workspace, tmp_path):
    def unknown_anno(meta, mask_dict):
        meta["videos"]["v2"]["expressions"]["0"]["anno_id"] = [99]
        mask_dict["2"][2] = {"size": [HEIGHT, WIDTH], "counts": "bad!"}

    data = _mevis_copy(workspace, tmp_path, unknown_anno)
    with pytest.raises(OisaDataError, match="annotation 99") as error:
        MevisReader(data, check_files=False)
    assert error.value.record == "v2_0"
    reader = MevisReader(data, check_files=False, skip_bad=True)
    assert len(reader) == 2 and [key for key, _ in reader.skipped] == ["v2_0"]
    # frames are not in the copy's root; a bad RLE is reported when its mask is decoded
    with pytest.raises(OisaDataError, match="annotation 2, frame 2"):
        reader[1].gt_masks()


def test_audio_text_samples(workspace, processor):
    records = AudioTextReader(workspace / "audio_text", split="train")
    assert [record.key for record in records] == ["line 1 (id good)", "line 2 (id stale)"]
    sample = build_audio_text_sample(records[0], processor)
    size = processor.image_processor.size["height"]
    assert sample["pixel_values"].shape == (0, 3, size, size) and sample["image_token_modes"].shape == (0,)
    assert sample["segmentation_frame_mask"].shape == (0,) and sample["gt_masks"].shape == (0, size, size)
    assert sample["input_features"].shape == (1, 128, 3000) and sample["audio_feature_lengths"].tolist() == [150]
    assert sample["audio_token_modes"].tolist() == [1]
    text = _decode(processor, sample["input_ids"])
    tokens = expected_audio_length(24000)[1]
    assert "<|im_start|>user\n<aud>" + "<AUDIO_CONTEXT>" * tokens + "</aud>\nDescribe the sound.<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\nYes.<|im_end|>")
    assert _decode(processor, sample["input_ids"][sample["labels"] != -100]) == "A dog barks.<|im_end|>Yes.<|im_end|>"

    with pytest.raises(OisaDataError, match="does not match the audio") as error:
        build_audio_text_sample(records[1], processor)
    assert "line 2 (id stale)" in str(error.value) and "dog.wav" in str(error.value)


def test_audio_text_malformed_lines(tmp_path):
    conversation = [{"from": "human", "value": "<audio> what is it?"}, {"from": "gpt", "value": "rain"}]
    bad = [
        {"audio": "../outside.wav", "audio_length": [1, 1, 3], "conversations": conversation},
        {"audio": "a.wav", "audio_length": [1, 1, 2], "conversations": conversation},
        {"audio": "a.wav", "audio_length": [1, 1, 3], "conversations": [{"from": "human", "value": "no clip"}, conversation[1]]},
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(line) for line in bad))
    reader = AudioTextReader(tmp_path, check_files=False, skip_bad=True)
    assert len(reader) == 0
    messages = [str(error) for _, error in reader.skipped]
    assert "escapes the dataset root" in messages[0] and "audio_length" in messages[1] and "<audio>" in messages[2]


def test_forward_mixes_video_and_audio_text_samples(workspace, processor):
    video = build_video_expression_sample(MevisReader(workspace / "mevis")[0], processor, num_frames=3, num_dense_frames=1)
    audio_text = build_audio_text_sample(AudioTextReader(workspace / "audio_text")[0], processor)
    collator = OisaTrainingCollator(processor.tokenizer.pad_token_id)
    model = AutoModel.from_pretrained(workspace / "tiny", dtype=torch.float32)
    batch = collator([video, audio_text])
    assert batch["images_per_sample"].tolist() == [3, 0] and batch["gt_masks"].shape[0] == 3
    with torch.no_grad():
        output = model(**batch)
        assert torch.isfinite(output.loss) and [logits.shape[0] for logits in output.mask_logits] == [3]
        # a batch of audio-text samples only (stage 1): no image, no mask
        alone = model(**collator([audio_text]))
    assert torch.isfinite(alone.loss) and alone.class_loss is None
