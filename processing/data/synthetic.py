"""
Synthetic OmniAVS and Ref-AVS datasets of moving coloured shapes, written in the released on-disk layouts (the ones
`OmniAVSReader` and `RefAVSReader` read), so that evaluation and training code can run end to end without the real
data. The same seed gives byte-identical annotation files (and media files, given the same PIL, PyAV and espeak-ng).

OmniAVS: every video gets one expression of each of the 8 types plus `nulls_per_video` null ones (an absent colour
or shape, a tone no shape in the clip makes, or "the shape that is making a sound" in a silent clip). Speech
expressions are spoken by `espeak-ng`, sounds are a shape's tone, images a crop of the shape. Ref-AVS: text
expressions, one object each; `test_u` videos hold the class no other split has (the diamond); null rows live in
`null_m-<vid>` (muted) and `null_c-<vid>` (a hum no shape makes) folders. Still images come in the gRefCOCO layout
(referring expressions with masks) and as InternVL-style image-text conversations (`image_text`, optionally with
spoken questions); `audio_text` holds spoken expressions to transcribe and tones to name the shape of.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import av
import numpy as np
import soundfile
from PIL import Image

from ..media import SAMPLING_RATE, decode_audio
from ..rle import encode_rle
from .audio_text import expected_audio_length
from .omniavs import EXPRESSION_TYPES, referring_modalities
from .synthetic_clips import (
    HUM_HZ,
    SCENE_COLOURS,
    SCENE_SHAPES,
    SHAPES,
    TONES_HZ,
    SyntheticClip,
    make_scene,
    shape_crop,
    shape_image,
    tone,
)


logger = logging.getLogger(__name__)

FORMATS = ("omniavs", "refavs", "grefcoco", "image_text", "audio_text")
STILL_IMAGE_FORMATS = ("grefcoco", "image_text")
SPEECH_PROGRAM = "espeak-ng"
# Videos take their split from these cycles, in order; OmniAVS video 1, 5, 9... are silent.
OMNIAVS_SPLIT_CYCLE = ("test", "test", "test", "train")
REFAVS_SPLIT_CYCLE = ("test_s", "test_u", "train", "val")
GREFCOCO_SPLIT_CYCLE = ("train", "train", "train", "val")
# where REFER's readers look for the COCO images
GREFCOCO_IMAGE_DIR = "images/mscoco/images/train2014"
SILENT_EVERY, SILENT_OFFSET = 4, 1
PLAIN_TYPES = ("text", "speech")
REFAVS_UNSEEN_SHAPE = "diamond"
# Null folders of a split's videos go to this split (Ref-AVS's test_n is built from test_s videos).
REFAVS_NULL_SPLIT = {"test_s": "test_n", "train": "train", "val": "val"}
REFAVS_NULL_TEXTS = (
    "The sounding object.",
    "The first object to make a sound.",
    "The object making the loudest sound.",
    "The object making a continuous sound.",
)
REFERRING_SOUND_SECONDS = 1.0
# every colour-shape name the synthetic scenes can hold
SCENE_NAMES = tuple(f"the {colour} {shape}" for colour in SCENE_COLOURS for shape in SCENE_SHAPES)


class MissingProgramError(RuntimeError):
    """A program the generator runs (espeak-ng) is not installed."""


@dataclass(frozen=True)
class SyntheticDataset:
    """What was written: the root, the format, and the number of videos and of (null) expressions per split."""

    root: Path
    format: str
    num_videos: int
    expressions: dict[str, int]
    null_expressions: dict[str, int]


@dataclass(frozen=True)
class _Expression:
    """One planned OmniAVS expression: `text` holds the <audio>/<image> marks; `targets` are shapes, () for null."""

    expr_type: str
    text: str
    targets: tuple[str, ...]
    explanation: str
    sound: np.ndarray | None = field(default=None, repr=False)
    image: np.ndarray | None = field(default=None, repr=False)


def make_synthetic_dataset(
    out_dir: str | os.PathLike[str],
    format: Literal["omniavs", "refavs", "grefcoco", "image_text", "audio_text"] = "omniavs",
    num_videos: int = 4,
    seed: int = 0,
    *,
    num_frames: int = 8,
    height: int = 96,
    width: int = 128,
    fps: float = 4.0,
    nulls_per_video: int = 2,
    explanation_rate: float = 0.5,
    split: str | None = None,
    single_colour_rate: float = 0.0,
    spoken_question_rate: float = 0.0,
    silent_name_nulls: bool = False,
    spoken_names: int = 0,
    present_names: int = 0,
    spoken_pairs: int = 0,
) -> SyntheticDataset:
    """
    Writes a synthetic dataset of `num_videos` clips (still images for gRefCOCO and image-text, audio clips for
    audio-text) under `out_dir` (created; it must be empty or absent).

    `nulls_per_video`: null expressions per OmniAVS video or gRefCOCO image, null rows per Ref-AVS null folder,
    questions per image-text image. `explanation_rate`: the
    share of OmniAVS expressions with an explanation. `split`: put every video in this split instead of spreading them
    over the format's splits (the clips and expressions stay those of the same seed). `single_colour_rate`: the share
    of still images whose three shapes share one colour, so that only their shapes tell them apart.
    `spoken_question_rate`: the share of image-text images whose first question is spoken. `silent_name_nulls`: in
    silent OmniAVS clips, every other pair of planned null expressions names an absent object rather than asking for
    the sounding shape, so that silence alone does not tell that a name refers to something. `spoken_names`: instead
    of the 8 types and the nulls, every OmniAVS clip gets this many speech expressions that each name one object by
    colour and shape, every other one absent (null), in silent and sounding clips alike. `present_names`: every OmniAVS
    clip gets this many more expressions after its others, text and speech in turn (across clips), each naming one
    object of the clip by colour and shape (none null), so that a name is not null more often than not. `spoken_pairs`:
    every OmniAVS clip gets this many more speech expressions after those, each naming two of its objects ("the red
    circle and the blue square"), none null. OmniAVS,
    audio-text and spoken questions need `espeak-ng` for their speech.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if num_videos < 1:
        raise ValueError(f"num_videos must be at least 1, got {num_videos}")
    if nulls_per_video < 0:
        raise ValueError(f"nulls_per_video must be at least 0, got {nulls_per_video}")
    if not 0.0 <= single_colour_rate <= 1.0:
        raise ValueError(f"single_colour_rate must be between 0 and 1, got {single_colour_rate}")
    if single_colour_rate and format not in STILL_IMAGE_FORMATS:
        raise ValueError(f"single_colour_rate applies to the still-image formats {STILL_IMAGE_FORMATS}, not {format}")
    if not 0.0 <= spoken_question_rate <= 1.0:
        raise ValueError(f"spoken_question_rate must be between 0 and 1, got {spoken_question_rate}")
    if spoken_question_rate and format != "image_text":
        raise ValueError(f"spoken_question_rate applies to the image_text format, not {format}")
    if silent_name_nulls and format != "omniavs":
        raise ValueError(f"silent_name_nulls applies to the omniavs format, not {format}")
    if spoken_names < 0:
        raise ValueError(f"spoken_names must be at least 0, got {spoken_names}")
    if spoken_names and format != "omniavs":
        raise ValueError(f"spoken_names applies to the omniavs format, not {format}")
    if present_names < 0:
        raise ValueError(f"present_names must be at least 0, got {present_names}")
    if present_names and format != "omniavs":
        raise ValueError(f"present_names applies to the omniavs format, not {format}")
    if spoken_pairs < 0:
        raise ValueError(f"spoken_pairs must be at least 0, got {spoken_pairs}")
    if spoken_pairs and format != "omniavs":
        raise ValueError(f"spoken_pairs applies to the omniavs format, not {format}")
    cycle = {
        "omniavs": OMNIAVS_SPLIT_CYCLE,
        "refavs": REFAVS_SPLIT_CYCLE,
        "grefcoco": GREFCOCO_SPLIT_CYCLE,
        "image_text": GREFCOCO_SPLIT_CYCLE,
        "audio_text": GREFCOCO_SPLIT_CYCLE,
    }[format]
    if split is not None and split not in cycle:
        raise ValueError(f"split must be one of {sorted(set(cycle))} for {format}, got {split!r}")
    split_cycle = cycle if split is None else (split,)
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} is a file; the synthetic dataset needs a new folder")
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; the synthetic dataset needs a new folder")
    speaks = format in ("omniavs", "audio_text") or spoken_question_rate > 0
    speech_program = _speech_program() if speaks else ""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    geometry = {"num_frames": num_frames, "height": height, "width": width, "fps": fps}
    if format == "omniavs":
        return _write_omniavs(
            root,
            rng,
            num_videos,
            geometry,
            nulls_per_video,
            explanation_rate,
            speech_program,
            split_cycle,
            silent_name_nulls,
            spoken_names,
            present_names,
            spoken_pairs,
        )
    if format == "grefcoco":
        return _write_grefcoco(root, rng, num_videos, geometry, nulls_per_video, split_cycle, single_colour_rate)
    if format == "image_text":
        return _write_image_text(
            root,
            rng,
            num_videos,
            geometry,
            nulls_per_video,
            split_cycle,
            single_colour_rate,
            spoken_question_rate,
            speech_program,
        )
    if format == "audio_text":
        return _write_audio_text(root, rng, num_videos, speech_program, split_cycle)
    return _write_refavs(root, rng, num_videos, geometry, nulls_per_video, split_cycle)


def expression_corpus() -> list[str]:
    """Sentences with every word of the synthetic expressions and explanations, to learn tokenizer merges from."""
    return [
        " and ".join(SCENE_NAMES),
        "the shape that is making a sound, the shape making the sound <audio>, the shape that looks like <image>",
        "Only the makes a sound. It is the only shape. Both are in the video. The video is silent, so no shape makes"
        " a sound. No shape appears in the video. The only shape in the video is a. No shape in the video makes this"
        " Hz tone. The picture shows the, and it makes this tone. is in the video, but the video is silent.",
    ]


# ---------------------------------------------------------------- files


def _speech_program() -> str:
    program = shutil.which(SPEECH_PROGRAM)
    if program is None:
        raise MissingProgramError(
            f"{SPEECH_PROGRAM} is needed to speak the synthetic speech expressions but is not on PATH; "
            f"install it (e.g. `apt-get install -y {SPEECH_PROGRAM}`)"
        )
    return program


def synthesize_speech(program: str, text: str, path: Path) -> None:
    """Speaks `text` into the WAV file `path` with espeak-ng (offline, deterministic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run([program, "-w", str(path), text], check=True, capture_output=True, timeout=60)
    except subprocess.CalledProcessError as error:
        message = error.stderr.decode(errors="replace").strip()
        raise RuntimeError(f"{program} failed to write {path}: {message}") from error


def _write_wav(path: Path, waveform: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, waveform, SAMPLING_RATE, subtype="PCM_16", format="WAV")


def _write_mp3(path: Path, waveform: np.ndarray) -> None:
    """A mono MP3 at 16 kHz, as OmniAVS ships its soundtracks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp3") as container:
        stream = container.add_stream("libmp3lame", rate=SAMPLING_RATE)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.asarray(waveform, dtype=np.float32)[None], format="flt", layout="mono")
        frame.sample_rate = SAMPLING_RATE
        # the encoder takes its own sample format and frame size
        converter = av.AudioResampler(
            format=stream.codec_context.format.name,
            layout="mono",
            rate=SAMPLING_RATE,
            frame_size=stream.codec_context.frame_size or None,
        )
        for converted in [*converter.resample(frame), *converter.resample(None)]:
            for packet in stream.encode(converted):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _save_image(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"quality": 95} if path.suffix == ".jpg" else {}
    Image.fromarray(array).save(path, **options)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)


# ---------------------------------------------------------------- scenes


def _scene(rng: np.random.Generator, shapes: Sequence[str], silent: bool, geometry: dict) -> SyntheticClip:
    colours = [str(c) for c in rng.choice(list(SCENE_COLOURS), size=len(shapes), replace=False)]
    sounding = None if silent else str(rng.choice(list(shapes)))
    return make_scene(list(shapes), colours, sounding, rng, **geometry)


def _name(clip: SyntheticClip, shape: str) -> str:
    return f"{clip.colours[shape]} {shape}"


def _absent_colour(clip: SyntheticClip, rng: np.random.Generator) -> str:
    return str(rng.choice([colour for colour in SCENE_COLOURS if colour not in clip.colours.values()]))


def _absent_shape(clip: SyntheticClip, rng: np.random.Generator) -> str:
    return str(rng.choice([shape for shape in SCENE_SHAPES if shape not in clip.masks]))


# ---------------------------------------------------------------- OmniAVS


def _absent_object_expression(clip: SyntheticClip, rng: np.random.Generator) -> _Expression:
    """A null text expression: a present shape in an absent colour, or an absent shape in a present colour."""
    shape = str(rng.choice(list(clip.masks)))
    if rng.random() < 0.5:
        colour = _absent_colour(clip, rng)
        return _Expression("", f"the {colour} {shape}", (), f"No {colour} shape appears in the video.")
    absent = _absent_shape(clip, rng)
    colour = clip.colours[shape]
    return _Expression("", f"the {colour} {absent}", (), f"The only {colour} shape in the video is a {shape}.")


def _absent_part_expression(clip: SyntheticClip, rng: np.random.Generator) -> str:
    """A null text naming only a colour or only a shape that no object in the clip has."""
    if rng.random() < 0.5:
        return f"the {_absent_colour(clip, rng)} shape"
    return f"the {_absent_shape(clip, rng)}"


def _plain_expression(
    clip: SyntheticClip, rng: np.random.Generator, null: bool, absent_name: bool = False
) -> _Expression:
    """
    Text only: by colour and shape, by sound, or two objects; null: an absent colour or shape, or, in a silent clip
    unless `absent_name`, the shape that is making a sound.
    """
    shapes = list(clip.masks)
    if null:
        if clip.sounding is None and not absent_name:
            explanation = "The video is silent, so no shape makes a sound."
            return _Expression("", "the shape that is making a sound", (), explanation)
        return _absent_object_expression(clip, rng)
    choices = ["colour", "two"] + (["sound"] if clip.sounding else [])
    choice = choices[int(rng.integers(len(choices)))]
    if choice == "sound":
        shape = clip.sounding
        return _Expression(
            "", "the shape that is making a sound", (shape,), f"Only the {_name(clip, shape)} makes a sound."
        )
    if choice == "two":
        return _pair_expression(clip, rng)
    shape = str(rng.choice(shapes))
    return _Expression("", f"the {_name(clip, shape)}", (shape,), f"It is the only {clip.colours[shape]} shape.")


def _pair_expression(clip: SyntheticClip, rng: np.random.Generator) -> _Expression:
    """Two objects of the clip, each by colour and shape."""
    first, second = (str(s) for s in rng.choice(list(clip.masks), size=2, replace=False))
    return _Expression(
        "",
        f"the {_name(clip, first)} and the {_name(clip, second)}",
        (first, second),
        f"Both the {_name(clip, first)} and the {_name(clip, second)} are in the video.",
    )


def _sound_expression(clip: SyntheticClip, rng: np.random.Generator, null: bool) -> _Expression:
    """"The shape making the sound <audio>": the sounding shape's tone; null: a tone nobody makes in the clip."""
    text = "the shape making the sound <audio>"
    if clip.sounding is None:
        shape = str(rng.choice(list(clip.masks)))
        sound = tone(TONES_HZ[shape], REFERRING_SOUND_SECONDS)
        return _Expression("", text, (), "The video is silent: no shape makes this sound.", sound=sound)
    if null:
        absent = _absent_shape(clip, rng)
        hz = int(TONES_HZ[absent])
        sound = tone(TONES_HZ[absent], REFERRING_SOUND_SECONDS)
        return _Expression("", text, (), f"No shape in the video makes this {hz} Hz tone.", sound=sound)
    shape = clip.sounding
    sound = tone(TONES_HZ[shape], REFERRING_SOUND_SECONDS)
    return _Expression("", text, (shape,), f"The {_name(clip, shape)} makes this tone.", sound=sound)


def _image_expression(clip: SyntheticClip, rng: np.random.Generator, null: bool) -> _Expression:
    """"The shape that looks like <image>": a crop of the shape; null: a picture of an absent colour and shape."""
    text = "the shape that looks like <image>"
    shape = str(rng.choice(list(clip.masks)))
    if null:
        colour = _absent_colour(clip, rng)
        explanation = f"No {colour} {shape} appears in the video."
        return _Expression("", text, (), explanation, image=shape_image(shape, colour))
    explanation = f"The picture shows the {_name(clip, shape)}."
    return _Expression("", text, (shape,), explanation, image=shape_crop(clip, shape))


def _sound_image_expression(clip: SyntheticClip, rng: np.random.Generator, null: bool) -> _Expression:
    """Both: the sounding shape's crop and tone; null: an absent look, or a present but silent shape."""
    text = "the shape that looks like <image> and makes the sound <audio>"
    if clip.sounding is None:
        shape = str(rng.choice(list(clip.masks)))
        sound = tone(TONES_HZ[shape], REFERRING_SOUND_SECONDS)
        explanation = f"The {_name(clip, shape)} is in the video, but the video is silent."
        return _Expression("", text, (), explanation, sound=sound, image=shape_crop(clip, shape))
    shape = clip.sounding
    sound = tone(TONES_HZ[shape], REFERRING_SOUND_SECONDS)
    if null:
        colour = _absent_colour(clip, rng)
        explanation = f"No {colour} {shape} appears in the video."
        return _Expression("", text, (), explanation, sound=sound, image=shape_image(shape, colour))
    explanation = f"The picture shows the {_name(clip, shape)}, and it makes this tone."
    return _Expression("", text, (shape,), explanation, sound=sound, image=shape_crop(clip, shape))


def _name_expression(clip: SyntheticClip, rng: np.random.Generator, null: bool) -> _Expression:
    """One object by colour and shape; null: an absent colour or shape."""
    if null:
        return _absent_object_expression(clip, rng)
    shape = str(rng.choice(list(clip.masks)))
    return _Expression("", f"the {_name(clip, shape)}", (shape,), f"It is the only {clip.colours[shape]} shape.")


def _plan_expression(
    clip: SyntheticClip, rng: np.random.Generator, expr_type: str, null: bool, absent_name: bool = False
) -> _Expression:
    _, has_sound, has_image = referring_modalities(expr_type)
    if not has_sound and not has_image:
        return replace(_plain_expression(clip, rng, null, absent_name), expr_type=expr_type)
    build = {
        (True, False): _sound_expression,
        (False, True): _image_expression,
        (True, True): _sound_image_expression,
    }[(has_sound, has_image)]
    return replace(build(clip, rng, null), expr_type=expr_type)


def _spoken(text: str) -> str:
    """What the speech of a speech expression says: its text with the marks read as words."""
    return text.replace("<audio>", "this sound").replace("<image>", "this picture")


def _write_omniavs(
    root: Path,
    rng: np.random.Generator,
    num_videos: int,
    geometry: dict,
    nulls_per_video: int,
    explanation_rate: float,
    speech_program: str,
    split_cycle: Sequence[str],
    silent_name_nulls: bool,
    spoken_names: int,
    present_names: int,
    spoken_pairs: int,
) -> SyntheticDataset:
    video_dict: dict[str, dict] = {}
    lines: dict[str, list[str]] = {split: [] for split in sorted(set(split_cycle))}
    counts: Counter[str] = Counter()
    nulls: Counter[str] = Counter()
    referrings = root / "referrings"
    for index in range(num_videos):
        video = f"video{index:04d}"
        split = split_cycle[index % len(split_cycle)]
        shapes = [str(s) for s in rng.choice(list(SCENE_SHAPES), size=3, replace=False)]
        clip = _scene(rng, shapes, index % SILENT_EVERY == SILENT_OFFSET, geometry)
        file_names = [f"{t:05d}.jpg" for t in range(len(clip.frames))]
        for name, frame in zip(file_names, clip.frames):
            _save_image(root / "images" / video / name, frame)
        _write_mp3(root / "audios" / f"{video}.mp3", clip.soundtrack)
        object_ids = {shape: number for number, shape in enumerate(shapes)}
        video_dict[video] = {
            "file_name": file_names,
            "duration": round(len(clip.frames) / clip.fps, 3),
            "mask_dict": {
                str(object_ids[shape]): [encode_rle(mask) if mask.any() else None for mask in clip.masks[shape]]
                for shape in shapes
            },
        }
        silent = clip.sounding is None
        # A silent clip's sound expressions are null already; its planned nulls are text and speech in turn, asking for
        # "the shape that is making a sound" (with `silent_name_nulls`, every other text-speech pair names an absent
        # object instead). Other clips take the null types in turn, so that a few videos cover all eight.
        first = index * nulls_per_video
        null_types = [
            PLAIN_TYPES[k % len(PLAIN_TYPES)] if silent else EXPRESSION_TYPES[(first + k) % len(EXPRESSION_TYPES)]
            for k in range(nulls_per_video)
        ]
        absent_names = [
            silent and silent_name_nulls and (k // len(PLAIN_TYPES)) % 2 == 1 for k in range(nulls_per_video)
        ]
        # (type, null, absent_name, kind): "name" expressions name one object by colour and shape, "pair" ones two
        plan = [(expr_type, False, False, "planned") for expr_type in EXPRESSION_TYPES]
        plan += [(expr_type, True, absent_name, "planned") for expr_type, absent_name in zip(null_types, absent_names)]
        if spoken_names:
            plan = [("speech", k % 2 == 1, True, "name") for k in range(spoken_names)]
        plan += [
            (PLAIN_TYPES[(index * present_names + k) % len(PLAIN_TYPES)], False, False, "name")
            for k in range(present_names)
        ]
        plan += [("speech", False, False, "pair") for _ in range(spoken_pairs)]
        for exp_id, (expr_type, null, absent_name, kind) in enumerate(plan):
            if kind == "name":
                expression = replace(_name_expression(clip, rng, null), expr_type=expr_type)
            elif kind == "pair":
                expression = replace(_pair_expression(clip, rng), expr_type=expr_type)
            else:
                expression = _plan_expression(clip, rng, expr_type, null, absent_name)
            has_speech, _, _ = referring_modalities(expr_type)
            stem = f"{video}_{exp_id}"
            entry = {
                "video_name": video,
                "exp_id": exp_id,
                "expr_type": expr_type,
                "expr": expression.text,
                "obj_id": sorted(object_ids[shape] for shape in expression.targets),
                "expl": expression.explanation if rng.random() < explanation_rate else None,
                "referring_image": None,
                "referring_speech": None,
                "referring_sound": None,
            }
            if has_speech:
                entry["referring_speech"] = f"{stem}.wav"
                speech_path = referrings / "referring_speeches" / f"{stem}.wav"
                synthesize_speech(speech_program, _spoken(expression.text), speech_path)
            if expression.sound is not None:
                entry["referring_sound"] = f"{stem}.wav"
                _write_wav(referrings / "referring_sounds" / f"{stem}.wav", expression.sound)
            if expression.image is not None:
                entry["referring_image"] = f"{stem}.png"
                _save_image(referrings / "referring_images" / f"{stem}.png", expression.image)
            lines[split].append(json.dumps(entry, ensure_ascii=False))
            counts[split] += 1
            nulls[split] += not expression.targets
    for split, split_lines in lines.items():
        _write_text(root / f"meta_expressions_{split}.jsonl", "".join(line + "\n" for line in split_lines))
    _write_text(root / "video_dict.json", json.dumps(video_dict))
    logger.info("wrote a synthetic OmniAVS of %d videos, %s expressions, to %s", num_videos, dict(counts), root)
    return SyntheticDataset(root, "omniavs", num_videos, dict(counts), dict(nulls))


# ---------------------------------------------------------------- Ref-AVS


def _object_texts(clip: SyntheticClip, shape: str) -> list[str]:
    if shape == clip.sounding:
        return [f"The {_name(clip, shape)}.", f"The {shape} making a sound."]
    return [f"The {_name(clip, shape)}.", f"The {_name(clip, shape)} making no sound."]


def _write_refavs_media(root: Path, folder: str, clip: SyntheticClip, soundtrack: np.ndarray) -> None:
    for index, frame in enumerate(clip.frames):
        _save_image(root / "media" / folder / "frames" / f"{index}.jpg", frame)
    _write_wav(root / "media" / folder / "audio.wav", soundtrack)


def _write_masks(root: Path, folder: str, fid: int, masks: np.ndarray) -> None:
    for index, mask in enumerate(masks):
        _save_image(root / "gt_mask" / folder / f"fid_{fid}" / f"{index:05d}.png", mask.astype(np.uint8) * 255)


def _write_refavs(
    root: Path,
    rng: np.random.Generator,
    num_videos: int,
    geometry: dict,
    nulls_per_video: int,
    split_cycle: Sequence[str],
) -> SyntheticDataset:
    rows: list[tuple[str, str, str, int, str]] = []
    null_folders = 0
    for index in range(num_videos):
        split = split_cycle[index % len(split_cycle)]
        seen = [str(s) for s in rng.permutation(list(SHAPES))]
        # test_u videos hold the unseen class, as Ref-AVS's test_u targets classes absent from training
        shapes = [REFAVS_UNSEEN_SHAPE, *seen[:2]] if split == "test_u" else seen
        clip = _scene(rng, shapes, False, geometry)
        vid = f"synth{index:04d}_0_{round(1000 * len(clip.frames) / clip.fps)}"
        _write_refavs_media(root, vid, clip, clip.soundtrack)
        for fid, shape in enumerate(shapes):
            _write_masks(root, vid, fid, clip.masks[shape])
            for k, text in enumerate(_object_texts(clip, shape), start=1):
                rows.append((vid, f"{vid}_{shape}_{k}", split, fid, text))
        null_split = REFAVS_NULL_SPLIT.get(split)
        if null_split is None or nulls_per_video == 0:
            continue
        # muted folders come without masks, hum folders with all-zero masks: the official loader needs the latter,
        # OISA's took a missing folder for null, so a reader must accept both
        muted = null_folders % 2 == 0
        null_folders += 1
        folder = f"null_{'m' if muted else 'c'}-{vid}"
        seconds = len(clip.soundtrack) / SAMPLING_RATE
        soundtrack = np.zeros_like(clip.soundtrack) if muted else tone(HUM_HZ, seconds)
        _write_refavs_media(root, folder, clip, soundtrack)
        if not muted:
            _write_masks(root, folder, 0, np.zeros_like(clip.masks[shapes[0]]))
        for k in range(nulls_per_video):
            rows.append((vid, f"{folder}_null_{k + 1}", null_split, 0, REFAVS_NULL_TEXTS[k % len(REFAVS_NULL_TEXTS)]))
    with open(root / "metadata.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(("vid", "uid", "split", "fid", "exp"))
        writer.writerows(rows)
    counts = Counter(row[2] for row in rows)
    nulls = Counter(row[2] for row in rows if row[1].startswith("null"))
    logger.info("wrote a synthetic Ref-AVS of %d videos, %s rows, to %s", num_videos, dict(counts), root)
    return SyntheticDataset(root, "refavs", num_videos, dict(counts), dict(nulls))


# ---------------------------------------------------------------- still images


def _still_scenes(
    rng: np.random.Generator,
    num_images: int,
    geometry: dict,
    split_cycle: Sequence[str],
    single_colour_rate: float,
) -> Iterator[tuple[int, str, list[str], SyntheticClip]]:
    """
    (index, split, shapes, one-frame silent scene) of each still image: three shapes drawn from SCENE_SHAPES, in three
    colours, or with probability `single_colour_rate` in one (no draw is spent on it at 0, so old seeds keep their
    images).
    """
    single_frame = {**geometry, "num_frames": 1}
    for index in range(num_images):
        split = split_cycle[index % len(split_cycle)]
        shapes = [str(s) for s in rng.choice(list(SCENE_SHAPES), size=3, replace=False)]
        if single_colour_rate and rng.random() < single_colour_rate:
            colour = str(rng.choice(list(SCENE_COLOURS)))
            yield index, split, shapes, make_scene(shapes, [colour] * len(shapes), None, rng, **single_frame)
        else:
            yield index, split, shapes, _scene(rng, shapes, True, single_frame)


# ---------------------------------------------------------------- gRefCOCO


def _write_grefcoco(
    root: Path,
    rng: np.random.Generator,
    num_images: int,
    geometry: dict,
    nulls_per_image: int,
    split_cycle: Sequence[str],
    single_colour_rate: float,
) -> SyntheticDataset:
    """
    Still images of three shapes with gRefCOCO refs: each shape by colour and shape, one pair, the shapes of one colour
    by that colour alone and one shape by its shape alone (so that the `[SEG]` state learns both), and null ones: in
    turn an absent colour-shape combination and an absent colour or shape alone.
    """
    images, annotations, refs = [], [], []
    counts: Counter[str] = Counter()
    nulls: Counter[str] = Counter()
    for index, split, shapes, clip in _still_scenes(rng, num_images, geometry, split_cycle, single_colour_rate):
        file_name = f"COCO_train2014_{index:012d}.jpg"
        _save_image(root / GREFCOCO_IMAGE_DIR / file_name, clip.frames[0])
        height, width = clip.frames.shape[1:3]
        images.append({"id": index, "file_name": file_name, "height": height, "width": width})
        ann_ids = {}
        for shape in shapes:
            ann_ids[shape] = len(annotations)
            rle = encode_rle(clip.masks[shape][0])
            annotations.append({"id": len(annotations), "image_id": index, "segmentation": rle})
        first, second = (str(s) for s in rng.choice(shapes, size=2, replace=False))
        sentences = [(f"the {_name(clip, shape)}", [ann_ids[shape]]) for shape in shapes]
        pair = f"the {_name(clip, first)} and the {_name(clip, second)}"
        sentences.append((pair, [ann_ids[first], ann_ids[second]]))
        by_colour, by_shape = (str(s) for s in rng.choice(shapes, size=2, replace=False))
        colour = clip.colours[by_colour]
        sentences.append((f"the {colour} shape", [ann_ids[s] for s in shapes if clip.colours[s] == colour]))
        sentences.append((f"the {by_shape}", [ann_ids[by_shape]]))
        for k in range(nulls_per_image):
            null = _absent_object_expression(clip, rng).text if k % 2 == 0 else _absent_part_expression(clip, rng)
            sentences.append((null, [-1]))
        for sentence, ann_id in sentences:
            refs.append(
                {
                    "ref_id": len(refs),
                    "image_id": index,
                    "ann_id": ann_id,
                    "split": split,
                    "sentences": [{"sent": sentence}],
                }
            )
            counts[split] += 1
            nulls[split] += ann_id == [-1]
    folder = root / "grefcoco"
    folder.mkdir(parents=True, exist_ok=True)
    _write_text(folder / "instances.json", json.dumps({"images": images, "annotations": annotations}))
    _write_text(folder / "grefs(unc).json", json.dumps(refs))
    logger.info("wrote a synthetic gRefCOCO of %d images, %s expressions, to %s", num_images, dict(counts), root)
    return SyntheticDataset(root, "grefcoco", num_images, dict(counts), dict(nulls))


# ---------------------------------------------------------------- image-text conversations

NAMING_QUESTION = "Name the shapes from left to right."
# how a spoken presence question refers to its clip, as the speech expressions' question does
SPOKEN_REFERENCE = "<ref><audio></ref>"


def _presence_thing(clip: SyntheticClip, rng: np.random.Generator, present: bool) -> str:
    """What a presence question asks about: a colour-shape combination, a colour alone or a shape alone."""
    kind = int(rng.integers(3))
    if present:
        shape = str(rng.choice(list(clip.masks)))
        return [f"{clip.colours[shape]} {shape}", f"{clip.colours[shape]} shape", shape][kind]
    if kind == 0:
        return _absent_object_expression(clip, rng).text.removeprefix("the ")
    return _absent_part_expression(clip, rng).removeprefix("the ")


def _text_presence_question(thing: str) -> str:
    article = "an" if thing[0] in "aeiou" else "a"
    return f"Is there {article} {thing} in the picture?"


def _write_image_text(
    root: Path,
    rng: np.random.Generator,
    num_images: int,
    geometry: dict,
    questions_per_image: int,
    split_cycle: Sequence[str],
    single_colour_rate: float,
    spoken_question_rate: float,
    speech_program: str,
) -> SyntheticDataset:
    """
    Still images of three shapes with InternVL-style conversations (`<split>.jsonl`): `questions_per_image` questions
    on whether a colour, a shape or a combination is in the picture (half of them answered "No."), then the shapes
    named from left to right. They teach a model trained from scratch to read its image tokens, which deciding that
    nothing matches an expression needs. The "No." answers count as null expressions. With probability
    `spoken_question_rate` an image's first question is spoken instead ("Is <ref><audio></ref> in the picture?", the
    clip saying "the red circle" as OmniAVS speech expressions do; one clip per phrase, under `audios/`), so that
    spoken words too get checked against the picture.
    """
    lines: dict[str, list[str]] = {split: [] for split in sorted(set(split_cycle))}
    counts: Counter[str] = Counter()
    nulls: Counter[str] = Counter()
    spoken_lengths: dict[str, list[int]] = {}
    for index, split, shapes, clip in _still_scenes(rng, num_images, geometry, split_cycle, single_colour_rate):
        image = f"images/{index:06d}.jpg"
        _save_image(root / image, clip.frames[0])
        entry: dict = {"id": index, "image": image}
        spoken = questions_per_image > 0 and spoken_question_rate > 0 and rng.random() < spoken_question_rate
        turns = []
        for k in range(questions_per_image):
            present = bool(rng.random() < 0.5)
            thing = _presence_thing(clip, rng, present)
            question = _text_presence_question(thing)
            if spoken and k == 0:
                phrase = f"the {thing}"
                entry["audio"] = f"audios/{phrase.replace(' ', '_')}.wav"
                if phrase not in spoken_lengths:
                    synthesize_speech(speech_program, phrase, root / entry["audio"])
                    # espeak-ng writes its own sampling rate: count the samples the reader will get
                    spoken_lengths[phrase] = list(expected_audio_length(decode_audio(root / entry["audio"]).size))
                entry["audio_length"] = spoken_lengths[phrase]
                question = f"Is {SPOKEN_REFERENCE} in the picture?"
            turns += [("human", f"<image>\n{question}" if k == 0 else question), ("gpt", "Yes." if present else "No.")]
            nulls[split] += not present
        centre_x = {shape: np.nonzero(clip.masks[shape][0])[1].mean() for shape in shapes}
        names = [f"the {_name(clip, shape)}" for shape in sorted(shapes, key=centre_x.get)]
        naming = f"{', '.join(names[:-1])} and {names[-1]}."
        naming = naming[0].upper() + naming[1:]
        turns += [("human", NAMING_QUESTION if turns else f"<image>\n{NAMING_QUESTION}"), ("gpt", naming)]
        entry["conversations"] = [{"from": r, "value": v} for r, v in turns]
        lines[split].append(json.dumps(entry))
        counts[split] += questions_per_image + 1
    for split, split_lines in lines.items():
        _write_text(root / f"{split}.jsonl", "".join(line + "\n" for line in split_lines))
    logger.info("wrote %d synthetic image-text conversations, %s turns, to %s", num_images, dict(counts), root)
    return SyntheticDataset(root, "image_text", num_images, dict(counts), dict(nulls))


# ---------------------------------------------------------------- audio-text conversations

TRANSCRIBE_QUESTION = "What does the speaker say?"
TONE_QUESTION = "Which shape makes this sound?"
# the fixed sentences of the OmniAVS expressions, as their speech says them
SPOKEN_TEMPLATES = tuple(
    _spoken(text)
    for text in (
        "the shape that is making a sound",
        "the shape making the sound <audio>",
        "the shape that looks like <image>",
        "the shape that looks like <image> and makes the sound <audio>",
    )
)


def _spoken_expression(rng: np.random.Generator) -> str:
    """What an OmniAVS speech expression may say: a colour-shape name, a pair of them, or a fixed sentence."""
    kind = int(rng.integers(3))
    if kind == 0:
        return str(rng.choice(SCENE_NAMES))
    if kind == 1:
        first, second = (str(name) for name in rng.choice(SCENE_NAMES, size=2, replace=False))
        return f"{first} and {second}"
    return str(rng.choice(SPOKEN_TEMPLATES))


def _write_audio_text(
    root: Path, rng: np.random.Generator, num_clips: int, speech_program: str, split_cycle: Sequence[str]
) -> SyntheticDataset:
    """
    Audio clips with one question each in the audio-text jsonl layout (`<split>.jsonl`): every other clip is an
    expression spoken by espeak-ng, asked to be transcribed, the others a shape's tone, asked which shape makes it.
    They teach a model trained from scratch the words of the speech expressions and the shape each tone stands for.
    """
    lines: dict[str, list[str]] = {split: [] for split in sorted(set(split_cycle))}
    counts: Counter[str] = Counter()
    for index in range(num_clips):
        split = split_cycle[index % len(split_cycle)]
        audio = f"audios/{index:06d}.wav"
        if index % 2 == 0:
            sentence = _spoken_expression(rng)
            synthesize_speech(speech_program, sentence, root / audio)
            # espeak-ng writes its own sampling rate: count the samples the reader will get
            num_samples = decode_audio(root / audio).size
            question, answer = TRANSCRIBE_QUESTION, sentence[0].upper() + sentence[1:] + "."
        else:
            shape = str(rng.choice(list(SCENE_SHAPES)))
            waveform = tone(TONES_HZ[shape], REFERRING_SOUND_SECONDS)
            _write_wav(root / audio, waveform)
            num_samples = waveform.size
            question, answer = TONE_QUESTION, f"The {shape}."
        entry = {
            "id": index,
            "audio": audio,
            "audio_length": list(expected_audio_length(num_samples)),
            "conversations": [{"from": "human", "value": f"<audio>\n{question}"}, {"from": "gpt", "value": answer}],
        }
        lines[split].append(json.dumps(entry))
        counts[split] += 1
    for split, split_lines in lines.items():
        _write_text(root / f"{split}.jsonl", "".join(line + "\n" for line in split_lines))
    logger.info("wrote %d synthetic audio-text conversations, %s clips, to %s", num_clips, dict(counts), root)
    return SyntheticDataset(root, "audio_text", num_clips, dict(counts), {})


__all__ = ["FORMATS", "MissingProgramError", "SyntheticDataset", "make_synthetic_dataset", "synthesize_speech"]
