"""The synthetic dataset generator: deterministic, readable by both readers, every expression type and null kind."""

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oisa_cli.main import main as oisa_main
from processing_oisa.data.image_sets import GRefCOCOReader
from processing_oisa.data.omniavs import EXPRESSION_TYPES, OmniAVSReader
from processing_oisa.data.refavs import RefAVSReader
from processing_oisa.data.synthetic import MissingProgramError, make_synthetic_dataset
from processing_oisa.data.synthetic_clips import BACKGROUND, SCENE_COLOURS, SCENE_SHAPES, make_scene
from processing_oisa.media import decode_audio


SMALL = {"num_frames": 4, "height": 48, "width": 64}
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


def _tree(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def omniavs_root(tmp_path_factory) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    root = tmp_path_factory.mktemp("omniavs") / "data"
    make_synthetic_dataset(root, "omniavs", num_videos=4, seed=1, **SMALL)
    return root


@pytest.fixture(scope="module")
def refavs_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("refavs") / "data"
    make_synthetic_dataset(root, "refavs", num_videos=4, seed=1, **SMALL)
    return root


@needs_espeak
def test_same_seed_same_bytes_other_seed_other_annotations(tmp_path, omniavs_root, refavs_root):
    make_synthetic_dataset(tmp_path / "o", "omniavs", num_videos=4, seed=1, **SMALL)
    make_synthetic_dataset(tmp_path / "r", "refavs", num_videos=4, seed=1, **SMALL)
    assert _tree(tmp_path / "o") == _tree(omniavs_root)
    assert _tree(tmp_path / "r") == _tree(refavs_root)
    make_synthetic_dataset(tmp_path / "o2", "omniavs", num_videos=4, seed=2, **SMALL)
    assert (tmp_path / "o2" / "meta_expressions_test.jsonl").read_bytes() != (
        omniavs_root / "meta_expressions_test.jsonl"
    ).read_bytes()


def test_omniavs_covers_every_type_and_every_null_kind(omniavs_root):
    test, train = OmniAVSReader(omniavs_root, "test"), OmniAVSReader(omniavs_root, "train")
    assert len(test) == 30 and len(train) == 10  # 8 types + 2 nulls per video; video 3 is a training video
    records = [*test, *train]
    assert set(Counter(record.expr_type for record in records)) == set(EXPRESSION_TYPES)
    nulls = [record for record in records if record.is_null]
    assert {record.expr_type for record in nulls} == set(EXPRESSION_TYPES)
    texts = {record.text for record in nulls}
    # an absent colour or shape, a sound nobody makes, an unseen look, the sounding shape of a silent clip
    assert "the shape that is making a sound" in texts
    assert {"the shape making the sound <audio>", "the shape that looks like <image>"} <= texts
    assert any(len(record.object_ids) == 2 for record in records)
    assert any(record.explanation for record in records) and any(not record.explanation for record in records)
    for record in records:
        masks = record.gt_masks()
        assert masks.shape == (4, 48, 64)
        if record.is_null:
            assert not masks.any()
        else:
            assert masks.any(axis=(1, 2)).all()  # a referred shape is visible in every frame


def test_omniavs_media_decode(omniavs_root):
    silent = OmniAVSReader(omniavs_root, "test", expr_types=["speech_sound_image"])
    for record in silent:
        soundtrack = decode_audio(record.soundtrack_path)
        assert soundtrack.size > 0
        # video 1 is the silent one
        assert (np.abs(soundtrack).max() < 1e-3) == (record.video_id == "video0001")
        assert decode_audio(record.referring_speech_path).size > 1600
        assert np.abs(decode_audio(record.referring_sound_path)).max() > 0.1
        assert Image.open(record.referring_image_path).mode == "RGB"


def test_refavs_splits_nulls_and_unseen_class(refavs_root):
    readers = {split: RefAVSReader(refavs_root, split) for split in ("test_s", "test_u", "test_n", "train", "val")}
    assert {split: len(reader) for split, reader in readers.items()} == {
        "test_s": 6, "test_u": 6, "test_n": 2, "train": 8, "val": 8,
    }
    assert all(record.is_null for record in readers["test_n"])
    assert any("diamond" in record.uid for record in readers["test_u"])
    assert not any("diamond" in record.uid for split in ("test_s", "train", "val") for record in readers[split])
    null_folders = {record.folder for reader in readers.values() for record in reader if record.is_null}
    # muted folders come without masks, hum folders with all-zero ones: the reader takes both
    assert {folder.split("-")[0] for folder in null_folders} == {"null_m", "null_c"}
    for reader in readers.values():
        for record in reader:
            masks = record.gt_masks()
            assert masks.shape == (4, 48, 64)
            assert masks.any(axis=(1, 2)).all() != record.is_null
            assert decode_audio(record.audio_path).size > 0


def test_scene_keeps_every_shape_visible():
    clip = make_scene(SCENE_SHAPES, ["red", "green", "blue", "yellow"], "diamond", np.random.default_rng(0))
    assert clip.sounding == "diamond" and clip.frames.shape == (8, 96, 128, 3)
    for mask in clip.masks.values():
        assert mask.any(axis=(1, 2)).all()
    with pytest.raises(ValueError, match="not one of the scene's shapes"):
        make_scene(["circle"], ["red"], "square", np.random.default_rng(0))


def test_missing_espeak_is_named_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(MissingProgramError, match="espeak-ng"):
        make_synthetic_dataset(tmp_path / "out", "omniavs", num_videos=1)
    assert not (tmp_path / "out").exists()


def test_command_line(tmp_path, caplog):
    assert oisa_main(["make-synthetic", str(tmp_path / "r"), "--format", "refavs", "--videos", "1", "--seed", "3"]) == 0
    assert len(RefAVSReader(tmp_path / "r", "test_s")) == 6
    assert oisa_main(["make-synthetic", str(tmp_path / "r"), "--format", "refavs", "--videos", "1"]) == 2
    assert "is not empty" in caplog.text
    images = ["make-synthetic", str(tmp_path / "g"), "--format", "grefcoco", "--videos", "1", "--split", "train"]
    assert oisa_main([*images, "--nulls-per-video", "3"]) == 0
    (record,) = GRefCOCOReader(tmp_path / "g", "train")
    assert sum(not expression.ann_ids for expression in record.expressions) == 3
    assert oisa_main([*images[:1], str(tmp_path / "g2"), *images[2:], "--nulls-per-video", "-1"]) == 2
    assert "nulls_per_video must be at least 0" in caplog.text
    assert oisa_main([*images[:1], str(tmp_path / "g3"), *images[2:], "--present-names", "2"]) == 2
    assert "present_names applies to the omniavs format" in caplog.text


@needs_espeak
def test_one_split_holds_every_video_with_the_same_content(tmp_path, omniavs_root):
    make_synthetic_dataset(tmp_path / "all", "omniavs", num_videos=4, seed=1, split="train", **SMALL)
    together = OmniAVSReader(tmp_path / "all", "train")
    spread = [*OmniAVSReader(omniavs_root, "test"), *OmniAVSReader(omniavs_root, "train")]
    assert len(together) == len(spread) == 40
    assert sorted((r.video_id, r.exp_id, r.text, r.expr_type, r.object_ids) for r in together) == sorted(
        (r.video_id, r.exp_id, r.text, r.expr_type, r.object_ids) for r in spread
    )
    assert (tmp_path / "all" / "video_dict.json").read_bytes() == (omniavs_root / "video_dict.json").read_bytes()
    with pytest.raises(ValueError, match="split must be one of"):
        make_synthetic_dataset(tmp_path / "bad", "omniavs", num_videos=1, split="val")



@needs_espeak
def test_silent_name_nulls_name_absent_objects_in_silent_clips(tmp_path):
    common = {"num_videos": 2, "seed": 1, "split": "train", "nulls_per_video": 6, "explanation_rate": 1.0, **SMALL}
    make_synthetic_dataset(tmp_path / "plain", "omniavs", **common)
    make_synthetic_dataset(tmp_path / "names", "omniavs", silent_name_nulls=True, **common)
    plain, names = OmniAVSReader(tmp_path / "plain", "train"), OmniAVSReader(tmp_path / "names", "train")
    # video 0 sounds and comes first: the same; video 1 is silent
    assert [(r.exp_id, r.text) for r in plain if r.video_id == "video0000"] == [
        (r.exp_id, r.text) for r in names if r.video_id == "video0000"
    ]
    assert not decode_audio(tmp_path / "names" / "audios" / "video0001.mp3").any()
    plain_nulls = [r for r in plain if r.video_id == "video0001" and int(r.exp_id) >= len(EXPRESSION_TYPES)]
    name_nulls = [r for r in names if r.video_id == "video0001" and int(r.exp_id) >= len(EXPRESSION_TYPES)]
    assert [r.expr_type for r in name_nulls] == ["text", "speech"] * 3 and all(r.is_null for r in name_nulls)
    assert {r.text for r in plain_nulls} == {"the shape that is making a sound"}
    sounding = [r.text == "the shape that is making a sound" for r in name_nulls]
    assert sounding == [True, True, False, False, True, True]
    # the other pair names an object, by colour and shape, that the clip does not hold: an absent colour, or the
    # colour of a shape of another kind
    frame = np.asarray(Image.open(tmp_path / "names" / "images" / "video0001" / "00000.jpg").convert("RGB")).astype(int)
    for record in name_nulls[2:4]:
        _, colour, shape = record.text.split()
        assert colour in SCENE_COLOURS and shape in SCENE_SHAPES
        colour_present = (np.abs(frame - np.array(SCENE_COLOURS[colour])).sum(axis=-1) < 60).sum() > 20
        if colour_present:
            assert record.explanation.startswith(f"The only {colour} shape in the video is a ")
            assert not record.explanation.endswith(f" {shape}.")
        else:
            assert record.explanation == f"No {colour} shape appears in the video."
    with pytest.raises(ValueError, match="silent_name_nulls applies to the omniavs format"):
        make_synthetic_dataset(tmp_path / "bad", "refavs", silent_name_nulls=True)


@needs_espeak
def test_spoken_names_name_one_object_each_half_of_them_absent(tmp_path):
    common = {"num_videos": 2, "seed": 1, "split": "train", "explanation_rate": 1.0, **SMALL}
    make_synthetic_dataset(tmp_path / "plain", "omniavs", **common)
    make_synthetic_dataset(tmp_path / "names", "omniavs", spoken_names=4, **common)
    records = list(OmniAVSReader(tmp_path / "names", "train"))
    assert [(r.video_id, r.exp_id) for r in records] == [(f"video000{v}", str(k)) for v in range(2) for k in range(4)]
    assert [r.is_null for r in records] == [False, True] * 4
    # the first clip is drawn before any expression: the same clip as without the option; the second is silent
    assert _tree(tmp_path / "names" / "images" / "video0000") == _tree(tmp_path / "plain" / "images" / "video0000")
    assert not decode_audio(tmp_path / "names" / "audios" / "video0001.mp3").any()
    for record in records:
        assert record.expr_type == "speech" and record.referring_speech_path.is_file()
        assert record.referring_sound_path is None and record.referring_image_path is None
        article, colour, shape = record.text.split()
        assert article == "the" and colour in SCENE_COLOURS and shape in SCENE_SHAPES
        frame = np.asarray(Image.open(record.frame_paths[0]).convert("RGB")).astype(int)
        of_colour = np.abs(frame - np.array(SCENE_COLOURS[colour])).sum(axis=-1) < 60
        if record.is_null:
            assert record.explanation in (
                f"No {colour} shape appears in the video.",
                *(f"The only {colour} shape in the video is a {other}." for other in SCENE_SHAPES if other != shape),
            )
            assert (of_colour.sum() > 20) == record.explanation.startswith("The only")
        else:
            assert record.explanation == f"It is the only {colour} shape."
            (mask,) = record.gt_masks([0])
            assert mask.any() and of_colour[mask].mean() > 0.6
    with pytest.raises(ValueError, match="spoken_names applies to the omniavs format"):
        make_synthetic_dataset(tmp_path / "bad", "grefcoco", spoken_names=2)
    with pytest.raises(ValueError, match="spoken_names must be at least 0"):
        make_synthetic_dataset(tmp_path / "bad", "omniavs", spoken_names=-1)


@needs_espeak
def test_present_names_add_text_and_speech_names_of_objects_in_the_clip(tmp_path):
    common = {"num_videos": 2, "seed": 1, "split": "train", "nulls_per_video": 2, "explanation_rate": 1.0, **SMALL}
    make_synthetic_dataset(tmp_path / "plain", "omniavs", **common)
    make_synthetic_dataset(tmp_path / "names", "omniavs", present_names=4, **common)
    plain, names = list(OmniAVSReader(tmp_path / "plain", "train")), list(OmniAVSReader(tmp_path / "names", "train"))
    planned = len(EXPRESSION_TYPES) + 2
    assert [(r.video_id, r.exp_id) for r in names] == [
        (f"video000{v}", str(k)) for v in range(2) for k in range(planned + 4)
    ]
    # the first clip and its planned expressions are drawn before the extra names: the same as without the option
    first = [(r.exp_id, r.expr_type, r.text, r.is_null) for r in plain if r.video_id == "video0000"]
    assert [(r.exp_id, r.expr_type, r.text, r.is_null) for r in names[:planned]] == first
    assert _tree(tmp_path / "names" / "images" / "video0000") == _tree(tmp_path / "plain" / "images" / "video0000")
    extra = [r for r in names if int(r.exp_id) >= planned]
    assert [r.expr_type for r in extra] == ["text", "speech"] * 4
    for record in extra:
        assert not record.is_null
        assert (record.referring_speech_path is not None) == (record.expr_type == "speech")
        assert record.referring_sound_path is None and record.referring_image_path is None
        article, colour, shape = record.text.split()
        assert article == "the" and colour in SCENE_COLOURS and shape in SCENE_SHAPES
        assert record.explanation == f"It is the only {colour} shape."
        frame = np.asarray(Image.open(record.frame_paths[0]).convert("RGB")).astype(int)
        (mask,) = record.gt_masks([0])
        of_colour = np.abs(frame - np.array(SCENE_COLOURS[colour])).sum(axis=-1) < 60
        assert mask.any() and of_colour[mask].mean() > 0.6
    make_synthetic_dataset(tmp_path / "one", "omniavs", present_names=1, **common)
    one = [r.expr_type for r in OmniAVSReader(tmp_path / "one", "train") if int(r.exp_id) >= planned]
    assert one == ["text", "speech"]
    with pytest.raises(ValueError, match="present_names applies to the omniavs format"):
        make_synthetic_dataset(tmp_path / "bad", "image_text", present_names=2)
    with pytest.raises(ValueError, match="present_names must be at least 0"):
        make_synthetic_dataset(tmp_path / "bad", "omniavs", present_names=-1)


@needs_espeak
def test_spoken_pairs_add_speech_naming_two_objects_of_the_clip(tmp_path):
    common = {"num_videos": 2, "seed": 1, "split": "train", "nulls_per_video": 2, "explanation_rate": 1.0, **SMALL}
    make_synthetic_dataset(tmp_path / "names", "omniavs", present_names=1, **common)
    make_synthetic_dataset(tmp_path / "pairs", "omniavs", present_names=1, spoken_pairs=2, **common)
    names, pairs = list(OmniAVSReader(tmp_path / "names", "train")), list(OmniAVSReader(tmp_path / "pairs", "train"))
    before = len(EXPRESSION_TYPES) + 2 + 1
    first = [(r.exp_id, r.expr_type, r.text, r.is_null) for r in names if r.video_id == "video0000"]
    assert [(r.exp_id, r.expr_type, r.text, r.is_null) for r in pairs[:before]] == first
    extra = [r for r in pairs if int(r.exp_id) >= before]
    assert [(r.video_id, r.expr_type) for r in extra] == [(f"video000{v}", "speech") for v in range(2) for _ in "ab"]
    for record in extra:
        assert not record.is_null and record.referring_speech_path is not None
        first_name, second_name = record.text.split(" and ")
        (_, colour, shape), (_, other_colour, other_shape) = first_name.split(), second_name.split()
        assert shape in SCENE_SHAPES and other_shape in SCENE_SHAPES and shape != other_shape
        assert record.explanation == f"Both {first_name} and {second_name} are in the video."
        frame = np.asarray(Image.open(record.frame_paths[0]).convert("RGB")).astype(int)
        (mask,) = record.gt_masks([0])
        for name_colour in (colour, other_colour):
            of_colour = np.abs(frame - np.array(SCENE_COLOURS[name_colour])).sum(axis=-1) < 60
            assert (of_colour & mask).sum() > 0.6 * of_colour.sum()
    with pytest.raises(ValueError, match="spoken_pairs applies to the omniavs format"):
        make_synthetic_dataset(tmp_path / "bad", "refavs", spoken_pairs=1)
    with pytest.raises(ValueError, match="spoken_pairs must be at least 0"):
        make_synthetic_dataset(tmp_path / "bad", "omniavs", spoken_pairs=-1)


def test_grefcoco_images_read_back_with_their_masks(tmp_path):
    from processing_oisa.data.image_sets import decode_coco_segmentation

    make_synthetic_dataset(tmp_path / "g", "grefcoco", num_videos=8, seed=4, **SMALL)
    train, val = GRefCOCOReader(tmp_path / "g", "train"), GRefCOCOReader(tmp_path / "g", "val")
    assert (len(train), len(val)) == (6, 2)
    for record in [*train, *val]:
        image = np.asarray(Image.open(record.image_path).convert("RGB"))
        assert image.shape == (SMALL["height"], SMALL["width"], 3)
        texts = [expression.text for expression in record.expressions]
        # each of the three shapes, one pair, one shape by its colour alone and one by its shape alone, and two null
        # expressions naming what is not there: an absent combination, then an absent colour or shape alone
        assert len(texts) == 8 and sum(" and " in text for text in texts) == 1
        partial = [expression for expression in record.expressions if len(expression.text.split()) == 2]
        partial += [expression for expression in record.expressions if expression.text.endswith(" shape")]
        assert sorted(len(expression.ann_ids) for expression in partial) == [0, 1, 1]
        assert sum(not expression.ann_ids for expression in record.expressions) == 2
        for expression in record.expressions:
            for ann_id in expression.ann_ids:
                mask = decode_coco_segmentation(record.segmentations[ann_id], record.height, record.width)
                # the mask covers a shape's colour, far from the background's
                assert mask.any()
                assert np.abs(image[mask].mean(axis=0) - np.array(BACKGROUND)).max() > 60


def test_single_colour_images_differ_only_by_shape(tmp_path):
    from processing_oisa.data.image_sets import decode_coco_segmentation

    make_synthetic_dataset(tmp_path / "mono", "grefcoco", num_videos=8, seed=4, single_colour_rate=1.0, **SMALL)
    for record in GRefCOCOReader(tmp_path / "mono", "train"):
        image = np.asarray(Image.open(record.image_path).convert("RGB")).astype(int)
        by_text = {expression.text: expression.ann_ids for expression in record.expressions}
        named = {text: ann_ids for text, ann_ids in by_text.items() if len(text.split()) == 3 and len(ann_ids) == 1}
        # three shapes of one colour: each still has a name of its own, and the colour alone refers to all three
        assert len(named) == 3 and len({text.split()[1] for text in named}) == 1
        colour = next(iter(named)).split()[1]
        assert sorted(by_text[f"the {colour} shape"]) == sorted(ann_id for (ann_id,) in named.values())
        colours = []
        for ann_id in record.segmentations:
            mask = decode_coco_segmentation(record.segmentations[ann_id], record.height, record.width)
            colours.append(np.median(image[mask], axis=0))
        assert np.abs(np.array(colours) - colours[0]).max() < 30
    mixed = make_synthetic_dataset(
        tmp_path / "mixed", "grefcoco", num_videos=16, seed=4, single_colour_rate=0.5, **SMALL
    )
    one_colour = [
        len({text.split()[1] for text in (e.text for e in record.expressions) if len(text.split()) == 3}) == 1
        for record in GRefCOCOReader(mixed.root, "train")
    ]
    assert 0 < sum(one_colour) < len(one_colour)


def test_single_colour_rate_only_for_still_images(tmp_path):
    with pytest.raises(ValueError, match="single_colour_rate applies to the still-image formats"):
        make_synthetic_dataset(tmp_path / "r", "refavs", num_videos=4, single_colour_rate=0.5, **SMALL)
    with pytest.raises(ValueError, match="single_colour_rate must be between 0 and 1"):
        make_synthetic_dataset(tmp_path / "g", "grefcoco", num_videos=4, single_colour_rate=1.5, **SMALL)


@needs_espeak
def test_audio_text_transcripts_and_tones(tmp_path):
    from processing_oisa.data.audio_text import AudioTextReader
    from processing_oisa.data.synthetic_clips import TONES_HZ

    assert oisa_main(["make-synthetic", str(tmp_path / "a"), "--format", "audio_text", "--videos", "12"]) == 0
    records = [*AudioTextReader(tmp_path / "a", "train"), *AudioTextReader(tmp_path / "a", "val")]
    assert len(records) == 12
    kinds = Counter()
    for record in records:
        (_, question), (_, answer) = record.conversation
        waveform = decode_audio(record.audio_path)
        if question.endswith("Which shape makes this sound?"):
            kinds["tone"] += 1
            shape = answer.removeprefix("The ").rstrip(".")
            spectrum = np.abs(np.fft.rfft(waveform))
            peak_hz = np.argmax(spectrum) * 16000 / len(waveform)
            assert abs(peak_hz - TONES_HZ[shape]) < 5
        else:
            kinds["speech"] += 1
            assert question == "<audio>\nWhat does the speaker say?"
            words = set(answer.lower().rstrip(".").split())
            vocabulary = {"the", "and", "shape", "that", "is", "making", "a", "sound", "this", "looks", "like"}
            vocabulary |= {"picture", "makes", *SCENE_COLOURS, *SCENE_SHAPES}
            assert words <= vocabulary
            # espeak speaks about a tenth of a second a word or more
            assert waveform.size > 0.1 * 16000 * len(answer.split())
    assert kinds == {"tone": 6, "speech": 6}
