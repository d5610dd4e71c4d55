"""Readers of OmniAVS and Ref-AVS, COCO RLE and the data error: real CSV counts and small synthetic trees."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image
from pycocotools import mask as coco_mask

from processing_oisa.data.errors import OisaDataError, resolve_inside
from processing_oisa.data.omniavs import EXPRESSION_TYPES, OmniAVSReader
from processing_oisa.data.refavs import RefAVSReader, folder_from_uid
from processing_oisa.rle import RleError, decode_rle, encode_rle, rle_runs

from ..conftest import SHARED


REAL_METADATA = SHARED / "data" / "refavs"


def _write_wav(path: Path, seconds: float = 0.1, channels: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = np.sin(np.linspace(0, 200, int(16000 * seconds)))[:, None].repeat(channels, axis=1)
    # The OmniAVS soundtrack is named .mp3; the reader only checks it exists, so WAV bytes do.
    soundfile.write(path, samples.astype(np.float32), 16000, format="WAV")


def _write_image(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# ---------------------------------------------------------------- errors and containment


def test_error_names_dataset_record_and_file_and_pickles():
    error = OisaDataError("missing file", dataset="omniavs", record="v1_3", path="/data/x.jpg")
    assert isinstance(error, ValueError)
    for part in ("missing file", "omniavs", "v1_3", "/data/x.jpg"):
        assert part in str(error)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.dataset, copy.record, copy.path, str(copy)) == ("omniavs", "v1_3", "/data/x.jpg", str(error))


@pytest.mark.parametrize("part", ["../x", "a/../../x", "/etc/passwd", "..\\x", "C:\\x", "", "a\x00b"])
def test_resolve_inside_refuses_escaping_parts(tmp_path, part):
    with pytest.raises(OisaDataError):
        resolve_inside(tmp_path, "images", part, dataset="d", record="r")


def test_resolve_inside_accepts_nested_relative_names(tmp_path):
    assert resolve_inside(tmp_path, "images", "v1", "sub/0001.jpg") == tmp_path / "images" / "v1" / "sub" / "0001.jpg"


# ---------------------------------------------------------------- RLE


def test_rle_matches_pycocotools_strings():
    small = np.zeros((6, 5), dtype=bool)
    small[1:4, 1:3] = True
    small[5, 4] = True
    assert encode_rle(small) == {"size": [6, 5], "counts": "7330:N"}
    assert np.array_equal(decode_rle({"size": [6, 5], "counts": b"7330:N"}), small)
    # Longer runs use the delta coding from the fourth run on, with negative deltas ("WO").
    large = np.zeros((40, 30), dtype=bool)
    large[3:35, 2:29] = True
    large[10:12, 5:7] = False
    counts = "c2P180000WOJ`06@J`069000000000000000000000000000000000000000000U1"
    assert encode_rle(large)["counts"] == counts
    assert np.array_equal(decode_rle({"size": [40, 30], "counts": counts}), large)


def test_rle_round_trips_and_list_form_is_column_major():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (7, 3), (16, 21)]:
        for mask in (rng.random(shape) < 0.4, np.ones(shape, bool), np.zeros(shape, bool)):
            assert np.array_equal(decode_rle(encode_rle(mask)), mask)
            assert np.array_equal(decode_rle(encode_rle(mask, compressed=False)), mask)
    # Column-major runs starting with background: column 0 = [0, 1], column 1 = [1, 1].
    assert encode_rle(np.array([[0, 1], [1, 1]]), compressed=False)["counts"] == [1, 3]
    assert encode_rle(np.ones((2, 2)), compressed=False)["counts"] == [0, 4]


def test_rle_equals_pycocotools_on_random_masks():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (1, 9), (9, 1), (3, 5), (17, 31), (96, 128), (2, 70000)]:
        blob = np.zeros(shape, dtype=bool)
        blob[shape[0] // 4 : 3 * shape[0] // 4 + 1, shape[1] // 3 : 2 * shape[1] // 3 + 1] = True
        corner = np.zeros(shape, dtype=bool)
        corner[-1, -1] = True  # one run as long as the mask: a value of many characters
        for mask in (np.zeros(shape, bool), np.ones(shape, bool), blob, ~blob, corner, rng.random(shape) < 0.5,
                     rng.random(shape) < 0.03):
            # the same mask in C and Fortran order, as a strided view, and as nonzero uint8
            wide = np.zeros((shape[0], 2 * shape[1]), dtype=bool)
            wide[:, ::2] = mask
            for given in (mask, np.asfortranarray(mask), wide[:, ::2], 255 * mask.astype(np.uint8)):
                theirs = coco_mask.encode(np.asfortranarray(given != 0, dtype=np.uint8))
                ours = encode_rle(given)
                assert ours == {"size": theirs["size"], "counts": theirs["counts"].decode("ascii")}
                runs = encode_rle(given, compressed=False)
                assert coco_mask.frPyObjects(runs, *shape)["counts"] == theirs["counts"]
                for decoded in (decode_rle(theirs), decode_rle(runs), coco_mask.decode(ours)):
                    assert np.array_equal(decoded, mask)


@pytest.mark.parametrize(
    "rle",
    [
        {"size": [2, 2], "counts": "7"},  # runs cover 7 pixels, not 4
        {"size": [2, 2], "counts": "~~"},  # characters outside '0'..'o'
        {"size": [2, 2], "counts": "1Q"},  # ends inside a value (continuation bit set)
        {"size": [2, 2], "counts": [1, -1, 4]},  # negative run
        {"size": [2, 2], "counts": [1, 2]},  # does not cover the mask
        {"size": [2], "counts": [4]},
        {"size": [2, 2]},
        {"size": [2, 2], "counts": 4},
    ],
)
def test_malformed_rle_raises(rle):
    with pytest.raises(RleError):
        rle_runs(rle)


# ---------------------------------------------------------------- OmniAVS


H, W, FRAMES = 8, 10, 3


def _object_masks() -> dict[str, list[np.ndarray | None]]:
    first = np.zeros((FRAMES, H, W), dtype=bool)
    first[:, 1:4, 1:4] = True
    second = np.zeros((FRAMES, H, W), dtype=bool)
    second[:, 5:7, 6:9] = True
    return {"1": list(first), "2": [None, second[1], second[2]]}


def _line(video, exp_id, expr_type, obj_id, **extra) -> dict:
    speech, sound, image = expr_type.startswith("speech"), "sound" in expr_type, "image" in expr_type
    return {
        "video_name": video,
        "exp_id": exp_id,
        "expr_type": expr_type,
        "expr": f"the object {exp_id}" + (" <audio>" if sound else "") + (" <image>" if image else ""),
        "obj_id": obj_id,
        "expl": extra.pop("expl", None),
        "referring_speech": "s.wav" if speech else None,
        "referring_sound": "n.wav" if sound else None,
        "referring_image": "i.png" if image else None,
        **extra,
    }


def build_omniavs(root: Path, lines: list, masks: dict | None = None) -> Path:
    """Video v1 (3 PNG frames; objects 1 and 2, 2 absent in frame 0), the referrings, and `lines` as the test jsonl."""
    masks = _object_masks() if masks is None else masks
    file_names = [f"{t:05d}.png" for t in range(FRAMES)]
    for name in file_names:
        _write_image(root / "images" / "v1" / name, np.full((H, W, 3), 60, dtype=np.uint8))
    _write_wav(root / "audios" / "v1.mp3")
    _write_wav(root / "referrings" / "referring_speeches" / "s.wav")
    _write_wav(root / "referrings" / "referring_sounds" / "n.wav")
    _write_image(root / "referrings" / "referring_images" / "i.png", np.zeros((4, 4, 3), dtype=np.uint8))
    mask_dict = {
        key: [None if m is None else (m if isinstance(m, dict) else encode_rle(m)) for m in frames]
        for key, frames in masks.items()
    }
    video_dict = {"v1": {"file_name": file_names, "duration": 1.0, "mask_dict": mask_dict}}
    (root / "video_dict.json").write_text(json.dumps(video_dict))
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    (root / "meta_expressions_test.jsonl").write_text(text)
    return root


def test_omniavs_records_paths_types_and_union_masks(tmp_path):
    lines = [
        _line("v1", i, expr_type, [1, 2] if i == 0 else ([] if i == 1 else ["1"]))
        for i, expr_type in enumerate(EXPRESSION_TYPES)
    ]
    lines[0]["expl"] = "because it moves"
    reader = OmniAVSReader(build_omniavs(tmp_path, lines), "test")
    assert len(reader) == 8 and reader.skipped == []
    by_type = {record.expr_type: record for record in reader}
    text = by_type["text"]
    assert text.key == "v1_0" and text.explanation == "because it moves" and text.object_ids == ("1", "2")
    assert text.frame_paths == tuple(tmp_path / "images" / "v1" / f"{t:05d}.png" for t in range(FRAMES))
    assert text.soundtrack_path == tmp_path / "audios" / "v1.mp3"
    assert (text.referring_speech_path, text.referring_sound_path, text.referring_image_path) == (None, None, None)
    full = by_type["speech_sound_image"]
    assert full.referring_speech_path == tmp_path / "referrings" / "referring_speeches" / "s.wav"
    assert full.referring_sound_path == tmp_path / "referrings" / "referring_sounds" / "n.wav"
    assert full.referring_image_path == tmp_path / "referrings" / "referring_images" / "i.png"
    assert by_type["speech"].is_null and by_type["speech"].explanation is None

    masks = _object_masks()
    union = text.gt_masks()
    assert union.shape == (FRAMES, H, W) and union.dtype == bool
    assert np.array_equal(union[0], masks["1"][0])  # object 2 is absent (null RLE) in frame 0
    assert np.array_equal(union[1], masks["1"][1] | masks["2"][1])  # B12: every object, not just the first
    assert np.array_equal(text.gt_masks([2]), union[2:])
    assert not by_type["speech"].gt_masks().any() and by_type["speech"].gt_masks().shape == (FRAMES, H, W)

    only_text = OmniAVSReader(tmp_path, "test", expr_types=["text", "speech"])
    assert [r.expr_type for r in only_text] == ["text", "speech"]


def test_omniavs_null_mask_size_comes_from_the_first_frame_without_masks(tmp_path):
    reader = OmniAVSReader(build_omniavs(tmp_path, [_line("v1", 0, "text", [])], masks={}), "test")
    assert reader[0].gt_masks().shape == (FRAMES, H, W)


@pytest.mark.parametrize(
    "bad_line, expected",
    [
        (_line("v1", 9, "text_image", [1], referring_image="../../outside.png"), "escapes"),
        (_line("v1", 9, "speech", [1], referring_speech="/etc/passwd"), "escapes"),
        (_line("../v1", 9, "text", [1]), "escapes"),
    ],
)
def test_omniavs_annotation_paths_cannot_leave_the_root(tmp_path, bad_line, expected):
    build_omniavs(tmp_path, [bad_line])
    with pytest.raises(OisaDataError, match=expected):
        OmniAVSReader(tmp_path, "test", check_files=False)


def test_omniavs_video_dict_file_names_cannot_leave_the_root(tmp_path):
    build_omniavs(tmp_path, [_line("v1", 0, "text", [1])])
    video_dict = json.loads((tmp_path / "video_dict.json").read_text())
    video_dict["v1"]["file_name"][1] = "../../../secret.png"
    (tmp_path / "video_dict.json").write_text(json.dumps(video_dict))
    with pytest.raises(OisaDataError, match="escapes"):
        OmniAVSReader(tmp_path, "test", check_files=False)


def test_omniavs_malformed_line(tmp_path):
    build_omniavs(
        tmp_path, [_line("v1", 0, "text", [1]), '{"video_name": "v1", "exp_id": ', _line("v1", 2, "text", [2])]
    )
    with pytest.raises(OisaDataError) as caught:
        OmniAVSReader(tmp_path, "test")
    assert (
        "omniavs" in str(caught.value)
        and "line 2" in str(caught.value)
        and "meta_expressions_test.jsonl" in str(caught.value)
    )
    reader = OmniAVSReader(tmp_path, "test", skip_bad=True)
    assert [r.key for r in reader] == ["v1_0", "v1_2"]
    assert [record for record, _ in reader.skipped] == ["line 2"]


def test_omniavs_missing_frame(tmp_path):
    build_omniavs(tmp_path, [_line("v1", 0, "text", [1]), _line("v1", 1, "speech", [1])])
    (tmp_path / "images" / "v1" / "00001.png").unlink()
    with pytest.raises(OisaDataError) as caught:
        OmniAVSReader(tmp_path, "test")
    message = str(caught.value)
    assert "missing file" in message and "omniavs" in message and "v1_0" in message and "00001.png" in message
    reader = OmniAVSReader(tmp_path, "test", skip_bad=True)
    assert len(reader) == 0 and [record for record, _ in reader.skipped] == ["v1_0", "v1_1"]
    assert len(OmniAVSReader(tmp_path, "test", check_files=False)) == 2


def test_omniavs_frame_size_must_match_the_masks(tmp_path):
    build_omniavs(tmp_path, [_line("v1", 0, "text", [1])])
    _write_image(tmp_path / "images" / "v1" / "00000.png", np.zeros((H + 1, W, 3), dtype=np.uint8))
    with pytest.raises(OisaDataError, match="frame size"):
        OmniAVSReader(tmp_path, "test")


def test_omniavs_missing_referring_file_and_inconsistent_type(tmp_path):
    build_omniavs(tmp_path, [_line("v1", 0, "speech", [1]), _line("v1", 1, "text", [1], referring_image="i.png")])
    (tmp_path / "referrings" / "referring_speeches" / "s.wav").unlink()
    reader = OmniAVSReader(tmp_path, "test", skip_bad=True)
    reasons = {record: error.reason for record, error in reader.skipped}
    assert reasons == {"v1_0": "missing file", "v1_1": "referring_image is set for expr_type 'text'"}


def test_omniavs_bad_rle(tmp_path):
    masks = _object_masks()
    masks["2"][2] = {"size": [H, W], "counts": "not an rle"}
    build_omniavs(tmp_path, [_line("v1", 0, "text", [1]), _line("v1", 1, "text", [1, 2])], masks=masks)
    with pytest.raises(OisaDataError) as caught:
        OmniAVSReader(tmp_path, "test")
    message = str(caught.value)
    assert "undecodable RLE" in message and "v1_1" in message and "video_dict.json" in message
    reader = OmniAVSReader(tmp_path, "test", skip_bad=True)
    assert [r.key for r in reader] == ["v1_0"] and [record for record, _ in reader.skipped] == ["v1_1"]
    # Without the up-front check the same error surfaces when the masks are decoded.
    unchecked = OmniAVSReader(tmp_path, "test", check_masks=False)
    with pytest.raises(OisaDataError, match="v1_1"):
        unchecked[1].gt_masks()


def test_omniavs_unknown_object_and_video(tmp_path):
    build_omniavs(tmp_path, [_line("v1", 0, "text", [7]), _line("v2", 0, "text", [1])])
    reader = OmniAVSReader(tmp_path, "test", skip_bad=True)
    assert [record for record, _ in reader.skipped] == ["v1_0", "v2_0"]


# ---------------------------------------------------------------- Ref-AVS


@pytest.mark.reference
def test_real_refavs_metadata_split_and_null_counts():
    expected = {
        "train": (14113, 608),
        "val": (1349, 72),
        "test_s": (2288, 0),
        "test_u": (1656, 0),
        "test_n": (1028, 1028),
    }
    for split, (rows, nulls) in expected.items():
        reader = RefAVSReader(REAL_METADATA, split, check_files=False)
        assert (len(reader), sum(r.is_null for r in reader)) == (rows, nulls), split
        assert reader.skipped == []
    test_n = RefAVSReader(REAL_METADATA, "test_n", check_files=False)
    first = test_n[0]
    assert first.folder == folder_from_uid(first.uid) != first.vid and first.folder.startswith("null_")
    with pytest.raises(ValueError):
        RefAVSReader(REAL_METADATA, "TODO", check_files=False)


CSV_HEADER = "vid,uid,split,fid,exp\n"


def build_refavs(root: Path, rows: list[str], frames: int = 12) -> Path:
    """Clips a and b (frames 0..11 to test numeric order), a null copy of a, masks for a/fid_0, a/fid_1 and b/fid_0."""
    for folder in ("clipa_0_10", "clipb_0_10", "null_c-clipa_0_10"):
        for t in range(frames):
            _write_image(root / "media" / folder / "frames" / f"{t}.jpg", np.full((6, 8, 3), 10 * t, dtype=np.uint8))
        _write_wav(root / "media" / folder / "audio.wav", channels=2)
    for folder, fid in (("clipa_0_10", 0), ("clipa_0_10", 1), ("clipb_0_10", 0)):
        for t in range(frames):
            mask = np.zeros((6, 8), dtype=np.uint8)
            mask[t % 6, fid] = 255 if t % 2 else 1  # both 1 and 255 are foreground after "> 0"
            _write_image(root / "gt_mask" / folder / f"fid_{fid}" / f"{t:05d}.png", mask)
    (root / "metadata.csv").write_text(CSV_HEADER + "".join(row + "\n" for row in rows))
    return root


REFAVS_ROWS = [
    "clipa_0_10,clipa_0_10_cat_1,test_s,0,The cat.",
    "clipa_0_10,clipa_0_10_cat_1,test_s,0,The cat.",  # duplicate uid: kept, keyed by row
    'clipa_0_10,clipa_0_10_dog_1,test_s,1,"The dog, on the left."',
    "clipb_0_10,clipb_0_10_piano_2,train,0,The piano.",
    "clipa_0_10,null_c-clipa_0_10_null_1,test_n,0,The sounding object",
]


def test_refavs_records_frames_masks_and_null_rows(tmp_path):
    build_refavs(tmp_path, REFAVS_ROWS)
    test_s = RefAVSReader(tmp_path, "test_s")
    assert [(r.row, r.uid, r.fid, r.text) for r in test_s] == [
        (0, "clipa_0_10_cat_1", 0, "The cat."),
        (1, "clipa_0_10_cat_1", 0, "The cat."),
        (2, "clipa_0_10_dog_1", 1, "The dog, on the left."),
    ]
    record = test_s[2]
    assert [p.name for p in record.frame_paths()] == [f"{t}.jpg" for t in range(12)]  # 10.jpg after 9.jpg
    assert record.audio_path == tmp_path / "media" / "clipa_0_10" / "audio.wav"
    masks = record.gt_masks()
    assert masks.shape == (12, 6, 8) and masks.dtype == bool
    assert all(masks[t].sum() == 1 and masks[t][t % 6, 1] for t in range(12))

    (null,) = RefAVSReader(tmp_path, "test_n")
    # B20: null from the uid, media from the null folder, even though gt_mask/clipa_0_10/fid_0 exists.
    assert null.is_null and null.folder == "null_c-clipa_0_10" and null.vid == "clipa_0_10"
    assert null.media_dir == tmp_path / "media" / "null_c-clipa_0_10"
    assert null.mask_paths() is None
    assert null.gt_masks().shape == (12, 6, 8) and not null.gt_masks().any()
    assert len(RefAVSReader(tmp_path, "train")) == 1 and len(RefAVSReader(tmp_path, "val")) == 0


def test_refavs_missing_media_and_masks(tmp_path):
    build_refavs(tmp_path, REFAVS_ROWS)
    (tmp_path / "media" / "clipa_0_10" / "frames" / "3.jpg").rename(
        tmp_path / "media" / "clipa_0_10" / "frames" / "x.jpg"
    )
    (tmp_path / "gt_mask" / "clipb_0_10" / "fid_0" / "00004.png").unlink()
    with pytest.raises(OisaDataError) as caught:
        RefAVSReader(tmp_path, "test_s")
    message = str(caught.value)
    assert "refavs" in message and "row 0 (clipa_0_10_cat_1)" in message and "frames" in message
    skipping = RefAVSReader(tmp_path, "test_s", skip_bad=True)
    assert len(skipping) == 0 and len(skipping.skipped) == 3
    with pytest.raises(OisaDataError, match="00004.png"):
        RefAVSReader(tmp_path, "train")
    # Parsing alone never looks at the media.
    assert len(RefAVSReader(tmp_path, "test_s", check_files=False)) == 3


def test_refavs_missing_audio_and_non_null_mask_folder(tmp_path):
    build_refavs(tmp_path, REFAVS_ROWS + ["clipb_0_10,clipb_0_10_piano_3,train,5,The other piano."])
    (tmp_path / "media" / "clipa_0_10" / "audio.wav").unlink()
    reader = RefAVSReader(tmp_path, "test_s", skip_bad=True)
    assert {error.reason for _, error in reader.skipped} == {"missing file"}
    reader = RefAVSReader(tmp_path, "train", skip_bad=True)
    assert [r.uid for r in reader] == ["clipb_0_10_piano_2"]
    assert [(record, error.reason) for record, error in reader.skipped] == [
        ("row 5 (clipb_0_10_piano_3)", "missing mask folder")
    ]


def test_refavs_malformed_rows_and_unsafe_uid(tmp_path):
    rows = [
        "clipa_0_10,clipa_0_10_cat_1,test_s,0,The cat.",
        "clipa_0_10,clipa_0_10_cat_2,test_s,0",  # a column short
        "x,../../etc_cat_1,test_s,0,Escape.",
        "clipa_0_10,clipa_0_10_cat_3,test_s,zero,Bad fid.",
        "clipa_0_10,clipa_0_10_cat_4,nosplit,0,Bad split.",
    ]
    build_refavs(tmp_path, rows)
    with pytest.raises(OisaDataError, match="row 1"):
        RefAVSReader(tmp_path, "test_s")
    reader = RefAVSReader(tmp_path, "test_s", skip_bad=True)
    assert [r.row for r in reader] == [0]
    reasons = [error.reason for _, error in reader.skipped]
    assert [record for record, _ in reader.skipped] == ["row 1", "row 2", "row 3", "row 4"]
    assert "escapes" in reasons[1] and "fid" in reasons[2] and "split" in reasons[3]


def test_refavs_bad_header(tmp_path):
    (tmp_path / "metadata.csv").write_text("a,b\n1,2\n")
    with pytest.raises(OisaDataError, match="header"):
        RefAVSReader(tmp_path, "train")
