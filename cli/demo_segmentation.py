"""The demo of `oisa demo`: a synthetic clip, expressions of several types about it, their masks, videos and picture."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from processing_oisa.data.synthetic import REFERRING_SOUND_SECONDS, SPEECH_PROGRAM, synthesize_speech
from processing_oisa.data.synthetic_clips import TONES_HZ, SyntheticClip, make_scene, shape_crop, tone
from processing_oisa.media import SAMPLING_RATE, write_video
from processing_oisa.metrics.omniavs import score_expression
from processing_oisa.processing_oisa import OisaExpression
from processing_oisa.visualization import overlay_mask


logger = logging.getLogger(__name__)

DEMO_SHAPES = ("circle", "square", "triangle")
DEMO_COLOURS = ("red", "green", "blue")
DEMO_SOUNDING = "square"
# a colour and a shape that are not in the demo clip, for the null expression
ABSENT_NAME = "the purple diamond"
SPOKEN_TEXT = "the blue triangle"
DEMO_TINT = (0, 200, 255)


@dataclass
class DemoCase:
    """One expression of the demo with the shapes it refers to (none for a null expression)."""

    label: str
    expression: OisaExpression
    targets: tuple[str, ...]

    @property
    def description(self) -> str:
        words = self.expression.text if self.expression.text is not None else f"(spoken) {SPOKEN_TEXT}"
        return f"{self.label}: {words}"


def demo_clip(seed: int) -> SyntheticClip:
    """The demo's clip: a red circle, a green square and a blue triangle moving, the square sounding."""
    return make_scene(list(DEMO_SHAPES), list(DEMO_COLOURS), DEMO_SOUNDING, np.random.default_rng(seed))


def demo_cases(clip: SyntheticClip, speech_dir: Path | None) -> list[DemoCase]:
    """Expressions of several types about `clip`; the spoken one only when `speech_dir` is given (espeak-ng)."""
    sound = tone(TONES_HZ[DEMO_SOUNDING], REFERRING_SOUND_SECONDS)
    cases = [
        DemoCase("text", OisaExpression(text="the red circle"), ("circle",)),
        DemoCase("text", OisaExpression(text="the shape that is making a sound"), (DEMO_SOUNDING,)),
        DemoCase("text + sound", OisaExpression(text="the shape making the sound <audio>", sound=sound), ("square",)),
        DemoCase(
            "text + image",
            OisaExpression(
                text="the shape that looks like <image>", image=Image.fromarray(shape_crop(clip, "triangle"))
            ),
            ("triangle",),
        ),
        DemoCase("text, null", OisaExpression(text=ABSENT_NAME), ()),
    ]
    if speech_dir is not None:
        speech_path = speech_dir / "speech.wav"
        synthesize_speech(shutil.which(SPEECH_PROGRAM), SPOKEN_TEXT, speech_path)
        cases.insert(1, DemoCase("speech", OisaExpression(speech=speech_path), ("triangle",)))
    return cases


def demo_picture(
    cases: list[DemoCase], answers: list[str], overlays: list[np.ndarray], frame_indices: list[int]
) -> Image.Image:
    """One row per expression: its text and answer, then the chosen frames of its overlays (T, H, W, 3)."""
    scale, caption = 2, 30
    height, width = overlays[0].shape[1] * scale, overlays[0].shape[2] * scale
    sheet = Image.new("RGB", (len(frame_indices) * width, len(cases) * (height + caption)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for row, (case, answer, frames) in enumerate(zip(cases, answers, overlays)):
        top = row * (height + caption)
        draw.text((4, top + 2), case.description, fill=(0, 0, 0))
        draw.text((4, top + 15), f"answer: {answer}", fill=(60, 60, 160))
        for column, index in enumerate(frame_indices):
            tile = Image.fromarray(frames[index]).resize((width, height), Image.Resampling.NEAREST)
            sheet.paste(tile, (column * width, top + caption))
    return sheet


def run_demo(out_dir: Path, model: str, seed: int = 0, device: str | None = None) -> dict:
    """
    Writes to `out_dir` the demo clip (clip.mp4 with its soundtrack), one overlay video per expression, demo.png (every
    expression on four frames) and result.json (answers and J&F against the clip's true masks). Returns the summary.
    """
    from transformers import AutoModel, AutoProcessor

    from modeling_oisa import resolve_model_name
    from processing_oisa.segmenter import OisaVideoSegmenter

    model_path = resolve_model_name(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    clip = demo_clip(seed)
    fps = clip.fps
    write_video(out_dir / "clip.mp4", clip.frames, fps, audio=clip.soundtrack, sampling_rate=SAMPLING_RATE)
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    segmenter = OisaVideoSegmenter(
        AutoModel.from_pretrained(model_path).to(torch_device).eval(), AutoProcessor.from_pretrained(model_path)
    )
    with tempfile.TemporaryDirectory() as scratch:
        speech_dir = Path(scratch) if shutil.which(SPEECH_PROGRAM) else None
        if speech_dir is None:
            logger.warning("%s is not installed: the demo leaves out its spoken expression", SPEECH_PROGRAM)
        cases = demo_cases(clip, speech_dir)
        results = segmenter(out_dir / "clip.mp4", [case.expression for case in cases], soundtrack=clip.soundtrack)

    summary = {"model": model, "seed": seed, "frames": len(clip.frames), "expressions": []}
    all_overlays = []
    for number, (case, result) in enumerate(zip(cases, results)):
        truth = np.zeros_like(clip.frames[..., 0], dtype=bool)
        for shape in case.targets:
            truth |= clip.masks[shape]
        score = score_expression(result.masks, truth)
        name = f"{number:02d}-{case.label.replace(' + ', '-').replace(', ', '-').replace(' ', '-')}"
        overlays = np.stack(
            [overlay_mask(frame, mask, colour=DEMO_TINT) for frame, mask in zip(clip.frames, result.masks)]
        )
        write_video(out_dir / f"{name}.mp4", overlays, fps)
        all_overlays.append(overlays)
        summary["expressions"].append(
            {
                "name": name,
                "type": result.expression_type,
                "expression": case.description,
                "answer": result.answer,
                "targets": list(case.targets),
                "J": score.j,
                "F": score.f,
                "J&F": score.jf,
            }
        )
        logger.info("%s -> %s (J&F %.3f)", case.description, result.answer, score.jf)
    frame_indices = np.linspace(0, len(clip.frames) - 1, 4).round().astype(int).tolist()
    answers = [result.answer for result in results]
    demo_picture(cases, answers, all_overlays, frame_indices).save(out_dir / "demo.png")
    temporary = out_dir / "result.json.tmp"
    temporary.write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    temporary.replace(out_dir / "result.json")
    logger.info("wrote clip.mp4, %d overlay videos, demo.png and result.json to %s", len(cases), out_dir)
    return summary
