"""One call from a video and text expressions to an EEMC mask for every frame, in OISA's segmenter's result type."""

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from modeling_oisa import OisaCheckpointError
from modeling_refavs import RefAvsConfig

from ..media import SAMPLING_RATE, OisaInputError, VideoReader
from ..processing_oisa import OisaExpression
from ..segmenter import OisaEncodedVideo, OisaSegmentation, load_model_and_processor
from .processing_refavs import AudioInput, RefAvsProcessor, one_frame_per_second


logger = logging.getLogger(__name__)

# a Ref-AVS clip: 10 s, so 10 frames (one a second) and 10 VGGish examples, what EEMC was trained on
CLIP_SECONDS = 10
# a soundtrack shorter than the sampled seconds by more than this is said to be filled with silence
SOUNDTRACK_SHORTFALL_SECONDS = 0.5


class RefAvsVideoSegmenter:
    """
    Segments what text expressions refer to in a video with EEMC (`modeling_refavs`) in one call, as
    [`OisaVideoSegmenter`] does for OISA and with its result type, [`OisaSegmentation`].

    What EEMC sees: the first frame of each whole second of a video file, as Ref-AVS annotates and [`RefAvsProcessor`]
    samples (a folder of frames or frames in memory: every frame, taken as one a second), in clips of `clip_seconds`
    such frames (10 by default, a Ref-AVS clip; None: the whole video as one clip) with the soundtrack of those seconds
    (one VGGish example a second). Each clip is one forward of the model: the prompts of a frame come from the fusion
    of all the clip's frames.

    Masks: one per frame of the video, at its size. A sampled frame's mask is the processor's post-processing of its
    logits (`post_process_masks`, logits > 0); every other frame holds the mask of the last sampled frame before it
    (`frame_sources` names it), so the masks of a 25 fps video change once a second. EEMC does not run on the other
    frames: a frame's prompts come from its own visual cues fused with the other frames of its clip at one a second,
    and 25 frames a second is neither what it was trained on nor what the released code computes.

    Batch: one video and one expression per forward. Under `release` (`integration_attention_over="batch"`) the
    integration attention runs across the videos of a batch, so a result depends on which videos share it; alone,
    each token attends only to itself. `batch` says this in every result; under `fixed` nothing depends on the batch.

    The other fields: `answer` and `explanation` are "" (EEMC generates no text); `has_seg` is True (EEMC always
    segments; an empty mask is its "nothing there"); `presence_scores` are each frame's foreground fraction at the
    model's mask size (logits > 0 at `mask_size` squared, what Ref-AVS's null metric S pools), not a probability;
    `probabilities` are the sigmoid of the logits resized to the frame (bilinear, as the masks), so > 0.5 is the mask
    (but for logits within float32's rounding of 0).
    """

    def __init__(
        self,
        model,
        processor: RefAvsProcessor,
        chunk_size: int = 8,
        clip_seconds: int | None = CLIP_SECONDS,
    ):
        config = getattr(model, "config", None)
        if not isinstance(config, RefAvsConfig):
            name = getattr(config, "name_or_path", "") or type(model).__name__
            model_type = getattr(config, "model_type", None) or type(model).__name__
            raise OisaCheckpointError(f"{name}: a {model_type} model, not EEMC ({RefAvsConfig.model_type})")
        if not isinstance(processor, RefAvsProcessor):
            raise OisaInputError(f"The processor is a {type(processor).__name__}; EEMC takes a RefAvsProcessor.")
        if chunk_size < 1:
            raise OisaInputError(f"chunk_size must be at least 1, got {chunk_size}")
        if clip_seconds is not None and clip_seconds < 1:
            raise OisaInputError(f"clip_seconds must be at least 1 (or None: the whole video), got {clip_seconds}")
        self.model = model
        self.processor = processor
        self.chunk_size = chunk_size
        self.clip_seconds = clip_seconds

    @classmethod
    def from_pretrained(
        cls,
        model_name_or_path: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "auto",
        **kwargs,
    ) -> "RefAvsVideoSegmenter":
        """
        The segmenter of an EEMC checkpoint folder or Hub id, its model on `device` in `dtype` ("auto": bfloat16 on
        GPUs and on CPUs with bfloat16 matrix units, float32 elsewhere), as [`OisaVideoSegmenter.from_pretrained`].
        `kwargs` go to the segmenter (`chunk_size`, `clip_seconds`).
        """
        return cls(*load_model_and_processor(model_name_or_path, device, dtype), **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def batch(self) -> str:
        """How each result was batched, and whether that matters for this model's profile."""
        if self.model.config.integration_attention_over == "batch":
            forwards = (
                f"one forward per clip of up to {self.clip_seconds} sampled frames"
                if self.clip_seconds
                else "one forward for all its sampled frames"
            )
            return (
                "one video (release profile: results depend on which videos share a batch, since the integration "
                f"attention runs across the batch; this one ran alone, {forwards})"
            )
        return (
            "one video (fixed profile: the integration attention runs within each frame; no result depends on the "
            "batch)"
        )

    def sampled_frames(self, reader: VideoReader) -> list[int]:
        """The frames EEMC sees, in order: one a second of a video file, every frame of a folder or frames in memory."""
        info = reader.info
        if reader.frames is None and not reader.is_folder:
            return one_frame_per_second(info.timestamps, info.duration)
        return list(range(info.num_frames))

    def __call__(
        self,
        video: str | Path | VideoReader | np.ndarray | Sequence,
        expressions: str | OisaExpression | Sequence[str | OisaExpression],
        soundtrack: AudioInput | None = None,
        progress: Callable[[int, int], None] | None = None,
        return_probabilities: bool = False,
        on_masks: Callable[[int, list, np.ndarray], None] | None = None,
        keep_masks: bool = True,
    ) -> OisaSegmentation | list[OisaSegmentation]:
        """
        video: a video file, a folder of frames, a [`VideoReader`] or frames in memory (a uint8 array (T, H, W, 3) or a
        list of PIL images or arrays, one a second); expressions: text, as strings or text-only [`OisaExpression`]s;
        soundtrack: an audio file or a 16 kHz waveform (by default the video's own, or the `audio.wav` beside a
        Ref-AVS `frames` folder; silence, with a warning, when there is none). The arguments after these are
        [`OisaVideoSegmenter`]'s: `progress(done, total)` per chunk of `chunk_size` frames, `on_masks(start, frames,
        masks)` with each chunk's frames and masks (expressions, frames, H, W), `keep_masks=False` for results without
        masks, `return_probabilities` for per-frame foreground probabilities.
        """
        single = not isinstance(expressions, (list, tuple))
        texts = [_text(expression) for expression in ([expressions] if single else list(expressions))]
        if not texts:
            raise OisaInputError("No expression was given.")
        reader = _reader(video)
        info = reader.info
        sampled = self.sampled_frames(reader)
        waveform = self._soundtrack(soundtrack, reader, len(sampled))
        # each frame's mask is that of the last sampled frame at or before it (position in `sampled`)
        positions = np.maximum(np.searchsorted(sampled, np.arange(info.num_frames), side="right") - 1, 0)
        size = (info.height, info.width)
        count = len(texts)
        masks = np.zeros((count, info.num_frames, *size), dtype=bool) if keep_masks else None
        probabilities = np.zeros((count, info.num_frames, *size), dtype=np.float32) if return_probabilities else None
        areas = np.zeros((count, info.num_frames), dtype=np.int64)
        presence = np.zeros((count, info.num_frames), dtype=np.float32)

        clip_length = self.clip_seconds or len(sampled)
        sampled_images = _frames_at(reader, sampled)
        video_frames = reader.iter_frames() if on_masks is not None else None
        next_frame = 0
        for first in range(0, len(sampled), clip_length):
            last = min(first + clip_length, len(sampled))
            images = [next(sampled_images) for _ in range(first, last)]
            logits = self._clip_logits(images, texts, waveform[first * SAMPLING_RATE : last * SAMPLING_RATE])
            clip_presence = (logits > 0).float().mean((-2, -1)).numpy()
            stop = int(np.searchsorted(positions, last, side="left"))
            for start in range(next_frame, stop, self.chunk_size):
                end = min(start + self.chunk_size, stop)
                sources = torch.from_numpy(positions[start:end] - first)
                chunk_logits = logits[:, sources]
                chunk_masks = self.processor.post_process_masks(chunk_logits, size).numpy()
                areas[:, start:end] = chunk_masks.sum(axis=(2, 3))
                presence[:, start:end] = clip_presence[:, sources.numpy()]
                if keep_masks:
                    masks[:, start:end] = chunk_masks
                if return_probabilities:
                    probabilities[:, start:end] = _foreground_probabilities(chunk_logits, size).numpy()
                if on_masks is not None:
                    on_masks(start, [next(video_frames)[1] for _ in range(start, end)], chunk_masks)
                if progress is not None:
                    progress(end, info.num_frames)
            next_frame = stop

        frame_sources = [sampled[position] for position in positions.tolist()]
        results = [
            OisaSegmentation(
                expression_type="text",
                answer="",
                explanation="",
                has_seg=True,
                masks=masks[index] if keep_masks else None,
                presence_scores=presence[index],
                mask_areas=areas[index].tolist(),
                timestamps=list(info.timestamps),
                probabilities=probabilities[index] if return_probabilities else None,
                frame_sources=frame_sources,
                batch=self.batch,
            )
            for index in range(count)
        ]
        return results[0] if single else results

    def _soundtrack(self, soundtrack: AudioInput | None, reader: VideoReader, seconds: int) -> np.ndarray:
        """The 16 kHz soundtrack as the processor finds it, cut or filled with silence to `seconds`."""
        source = reader.path if reader.frames is None else None
        waveform = self.processor.load_soundtrack(soundtrack, source, reader)
        wanted = seconds * SAMPLING_RATE
        if len(waveform) < wanted - SOUNDTRACK_SHORTFALL_SECONDS * SAMPLING_RATE:
            logger.warning(
                "The soundtrack of %s is %.2f s, shorter than the %d s EEMC sees; silence fills the rest.",
                reader.path,
                len(waveform) / SAMPLING_RATE,
                seconds,
            )
        return np.pad(waveform[:wanted], (0, max(wanted - len(waveform), 0)))

    def _clip_logits(self, images: list, texts: list[str], waveform: np.ndarray) -> torch.Tensor:
        """Foreground logits (expressions, frames, mask_size, mask_size) of one clip, one forward per expression."""
        logits = []
        with torch.no_grad():
            for text in texts:
                inputs = self.processor(videos=images, text=text, audio=waveform)
                inputs = inputs.to(device=self.device, dtype=self.model.dtype)
                logits.append(self.model(**inputs).logits[0].float().cpu())
        return torch.stack(logits)


def _text(expression: str | OisaExpression) -> str:
    """The words of a text expression; anything EEMC cannot take is refused."""
    if isinstance(expression, str):
        expression = OisaExpression(text=expression)
    if not isinstance(expression, OisaExpression):
        raise OisaInputError(
            f"An expression is a {type(expression).__name__}; give strings or text-only OisaExpression objects."
        )
    extras = [
        name
        for name, given in (
            ("speech", expression.speech is not None),
            ("a sound", expression.sound is not None),
            ("an image", expression.image is not None),
            ("explain", expression.explain),
        )
        if given
    ]
    if extras or expression.text is None:
        found = f"this one has {' and '.join(extras)}" if extras else "this one has none"
        raise OisaInputError(f"EEMC takes a text expression only; {found}.")
    return expression.text


def _reader(video: str | Path | VideoReader | np.ndarray | Sequence) -> VideoReader:
    if isinstance(video, OisaEncodedVideo):
        raise OisaInputError("The video is an OisaEncodedVideo, OISA's encoding; give EEMC the video itself.")
    if isinstance(video, VideoReader):
        return video
    if isinstance(video, (str, Path)):
        return VideoReader(video)
    return VideoReader.from_frames(video)


def _frames_at(reader: VideoReader, indices: list[int]) -> Iterator:
    """The frames at `indices` (non-decreasing, repeats allowed), in one pass over the video."""
    position = 0
    for index, frame in reader.iter_frames():
        while position < len(indices) and indices[position] == index:
            yield frame
            position += 1
        if position == len(indices):
            return


def _foreground_probabilities(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Sigmoid of logits (..., h, w) resized bilinearly to `size`, as `RefAvsProcessor.post_process_masks` resizes."""
    flat = logits.reshape(-1, 1, *logits.shape[-2:])
    resized = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return resized.sigmoid().reshape(*logits.shape[:-2], *size)
