"""OisaProcessor: frames, audio and an omnimodal expression in, the model's prompt and tensors out."""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, GotOcr2ImageProcessorPil, ProcessorMixin, WhisperFeatureExtractor

from .media import SAMPLING_RATE, OisaInputError, decode_audio, load_image
from .prompts import (
    HERMES_2_CHAT_TEMPLATE,
    audio_token_count,
    expression_type,
    frame_token_modes,
    question,
    split_evenly,
)


logger = logging.getLogger(__name__)

MAX_AUDIO_SECONDS = 30
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

AudioInput = np.ndarray | str | Path
ImageInput = Image.Image | np.ndarray | str | Path


@dataclass
class OisaExpression:
    """
    A referring expression: exactly one of `text` and `speech` (a waveform at 16 kHz or an audio file), plus
    optionally a `sound` and an `image`. In a text expression, `<audio>` and `<image>` mark where the sound and the
    image go; when a mark is missing it is appended. `explain` asks the model to explain its answer.
    """

    text: str | None = None
    speech: AudioInput | None = None
    sound: AudioInput | None = None
    image: ImageInput | None = None
    explain: bool = False

    @property
    def type(self) -> str:
        """One of the 8 OmniAVS expression types."""
        try:
            return expression_type(
                self.text is not None, self.speech is not None, self.sound is not None, self.image is not None
            )
        except ValueError as error:
            raise OisaInputError(str(error)) from error


def make_image_processor(image_size: int = 448) -> GotOcr2ImageProcessorPil:
    """Frames resized to a square with PIL bicubic (aspect ratio not kept), scaled to [0, 1], ImageNet-normalised."""
    return GotOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size},
        crop_to_patches=False,
        resample=Image.Resampling.BICUBIC,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_convert_rgb=True,
    )


def make_feature_extractor() -> WhisperFeatureExtractor:
    """Whisper-large-v3 log-mel features: 128 bins, 30 s windows at 16 kHz."""
    return WhisperFeatureExtractor(feature_size=128, sampling_rate=SAMPLING_RATE)


class OisaProcessor(ProcessorMixin):
    r"""
    Builds OISA's inputs from video frames, the video's soundtrack and an [`OisaExpression`]: the Hermes-2 prompt with
    one placeholder per embedding (frames, referring image, soundtrack interleaved per frame and whole, speech and
    sound clips), `pixel_values`, log-mel `input_features` and the token modes the model needs.

    Args:
        image_processor ([`GotOcr2ImageProcessorPil`]): the frame transform (square bicubic resize, ImageNet norm).
        feature_extractor ([`WhisperFeatureExtractor`]): 128-bin log-mel features.
        tokenizer ([`Qwen2Tokenizer`]): the tokenizer with OISA's special tokens.
        chat_template (`str`, *optional*): defaults to Hermes-2 with the released system message.
        num_image_tokens (`int`, *optional*, defaults to 256): LLM tokens of a dense frame or referring image.
        max_visible_frames (`int`, *optional*, defaults to 32): frames shown to the LLM at most.
        num_dense_frames (`int`, *optional*, defaults to 4): visible frames shown with all their tokens.
        frame_sampler (`str`, *optional*, defaults to `"release"`): `"release"` or `"linspace"` (B17).
        sub_audio_layout (`str`, *optional*, defaults to `"release"`): the per-frame soundtrack wrappers,
            `"release"` (plain-text `<sub_aud>`/`</sub_aud>` as released evaluation) or `"per_frame"`
            (the `<sub_audio>`/`</sub_audio>` special tokens).
    """

    def __init__(
        self,
        image_processor=None,
        feature_extractor=None,
        tokenizer=None,
        chat_template: str | None = None,
        num_image_tokens: int = 256,
        max_visible_frames: int = 32,
        num_dense_frames: int = 4,
        frame_sampler: str = "release",
        sub_audio_layout: str = "release",
        **kwargs,
    ):
        if frame_sampler not in ("release", "linspace"):
            raise ValueError(f"`frame_sampler` must be 'release' or 'linspace', got {frame_sampler!r}.")
        if sub_audio_layout not in ("release", "per_frame"):
            raise ValueError(f"`sub_audio_layout` must be 'release' or 'per_frame', got {sub_audio_layout!r}.")
        self.num_image_tokens = num_image_tokens
        self.max_visible_frames = max_visible_frames
        self.num_dense_frames = num_dense_frames
        self.frame_sampler = frame_sampler
        self.sub_audio_layout = sub_audio_layout
        super().__init__(
            image_processor, feature_extractor, tokenizer, chat_template=chat_template or HERMES_2_CHAT_TEMPLATE, **kwargs
        )

    @classmethod
    def from_model_config(cls, config, tokenizer) -> "OisaProcessor":
        """The processor of an OISA model: its image size, tokens per dense frame and behaviour profile."""
        return cls(
            make_image_processor(config.image_size),
            make_feature_extractor(),
            tokenizer,
            num_image_tokens=config.num_image_tokens,
            frame_sampler=config.frame_sampler,
            sub_audio_layout=config.sub_audio_layout,
        )

    @property
    def seg_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids("[SEG]")

    def frame_token_modes(self, num_frames: int) -> list[int]:
        """Per frame: 2 dense, 1 pooled, 0 not shown to the LLM (segmented all the same)."""
        return frame_token_modes(num_frames, self.max_visible_frames, self.num_dense_frames, self.frame_sampler)

    def load_audio(self, audio: AudioInput, what: str) -> np.ndarray:
        """A waveform (16 kHz mono) or an audio file, checked to be usable."""
        if isinstance(audio, (str, Path)):
            waveform = decode_audio(audio, what=what)
            name = str(audio)
        else:
            waveform = np.asarray(audio, dtype=np.float32)
            name = f"the {what.lower()} waveform"
            if waveform.ndim == 2:
                waveform = waveform.mean(axis=0 if waveform.shape[0] < waveform.shape[1] else 1)
        if audio_token_count(waveform.size) == 0:
            raise OisaInputError(f"{what} {name} is too short to use ({waveform.size} samples at 16 kHz).")
        if not np.any(np.abs(waveform) > 1e-6) and what != "Soundtrack":
            raise OisaInputError(f"{what} {name} is silent.")
        if waveform.size > MAX_AUDIO_SECONDS * SAMPLING_RATE:
            logger.warning(
                "%s %s lasts %.1f s; like the released model, only its first %d s are used.",
                what, name, waveform.size / SAMPLING_RATE, MAX_AUDIO_SECONDS,
            )
        return waveform

    def load_image(self, image: ImageInput) -> Image.Image:
        if isinstance(image, (str, Path)):
            return load_image(image, "Referring image")
        if isinstance(image, np.ndarray):
            return Image.fromarray(image).convert("RGB")
        return image.convert("RGB")

    def build_prompt(
        self,
        modes: Sequence[int],
        expr_type: str,
        text: str | None,
        explain: bool,
        soundtrack_tokens: int,
        clip_tokens: Sequence[int],
        answer: str | None = None,
    ) -> str:
        """
        The full chat string: one `Frame k` line per visible frame with its image and its share of the soundtrack,
        the whole soundtrack, then the question; placeholders expanded to context tokens.
        """
        visible_modes = [mode for mode in modes if mode > 0]
        if not visible_modes:
            raise OisaInputError("No frame is shown to the LLM; a video needs at least one frame.")
        if self.sub_audio_layout == "release":
            sub_start, sub_end = "<sub_aud>", "</sub_aud>"
        else:
            sub_start, sub_end = "<sub_audio>", "</sub_audio>"
        lines = []
        for number, (mode, tokens) in enumerate(
            zip(visible_modes, split_evenly(soundtrack_tokens, len(visible_modes))), start=1
        ):
            image = self._image_tokens(self.num_image_tokens if mode == 2 else 1)
            lines.append(f"Frame{number}: {image}{sub_start}{'<SUB_AUDIO_CONTEXT>' * tokens}{sub_end}")

        expression = text
        if text is not None:
            if "sound" in expr_type and "<audio>" not in text:
                expression = f"{expression} <audio>"
            if "image" in expr_type and "<image>" not in text:
                expression = f"{expression} <image>"
        user = "\n".join(lines) + "\n<audio>\n" + question(expr_type, expression, explain)
        # expression audio clips and the referring image, in the order their placeholders appear
        parts = user.split("<audio>")
        if len(parts) - 1 != 1 + len(clip_tokens):
            raise OisaInputError(
                f"The expression has {user.count('<audio>') - 1} <audio> mark(s) for {len(clip_tokens)} audio clip(s)."
            )
        audio_blocks = [self._audio_tokens(count) for count in [soundtrack_tokens, *clip_tokens]]
        user = "".join(part + block for part, block in zip(parts, audio_blocks + [""]))
        if user.count("<image>") != (1 if "image" in expr_type else 0):
            raise OisaInputError(f"The expression has {user.count('<image>')} <image> mark(s); it needs one per image.")
        user = user.replace("<image>", self._image_tokens(self.num_image_tokens))

        messages = [{"role": "user", "content": user}]
        prompt = self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
        )
        if answer is not None:
            prompt += answer + "<|im_end|>"
        return prompt

    @staticmethod
    def _image_tokens(count: int) -> str:
        return "<img>" + "<IMG_CONTEXT>" * count + "</img>"

    @staticmethod
    def _audio_tokens(count: int) -> str:
        return "<aud>" + "<AUDIO_CONTEXT>" * count + "</aud>"

    def __call__(
        self,
        frames: Sequence[Image.Image | np.ndarray],
        expression: OisaExpression,
        soundtrack: AudioInput | None = None,
        frame_modes: Sequence[int] | None = None,
        answer: str | None = None,
        return_tensors: str = "pt",
        encode_frames: bool = True,
        **kwargs,
    ) -> BatchFeature:
        """
        frames: the video's frames in order (or only the visible ones, with their `frame_modes`); soundtrack: the
        video's audio (silence when None). With `answer`, `labels` supervise the answer and its `<|im_end|>`. With
        `encode_frames=False`, `pixel_values` holds only the referring image (for a caller that already encoded the
        frames); `image_token_modes` still lists every image.
        """
        if len(frames) == 0:
            raise OisaInputError("The video has no frames.")
        modes = list(frame_modes) if frame_modes is not None else self.frame_token_modes(len(frames))
        if len(modes) != len(frames):
            raise ValueError(f"{len(frames)} frames but {len(modes)} frame modes.")
        expr_type = expression.type

        if soundtrack is None:
            logger.warning("No soundtrack was given; a second of silence is used.")
            soundtrack = np.zeros(SAMPLING_RATE, dtype=np.float32)
        waveforms = [self.load_audio(soundtrack, "Soundtrack")]
        if expression.speech is not None:
            waveforms.append(self.load_audio(expression.speech, "Speech"))
        if expression.sound is not None:
            waveforms.append(self.load_audio(expression.sound, "Sound"))
        token_counts = [audio_token_count(waveform.size) for waveform in waveforms]

        prompt = self.build_prompt(
            modes, expr_type, expression.text, expression.explain, token_counts[0], token_counts[1:], answer
        )
        encoding = self.tokenizer(prompt, return_tensors=return_tensors)
        if answer is not None:
            prompt_only = self.build_prompt(
                modes, expr_type, expression.text, expression.explain, token_counts[0], token_counts[1:]
            )
            num_prompt_tokens = len(self.tokenizer(prompt_only).input_ids)
            labels = encoding["input_ids"].clone()
            labels[:, :num_prompt_tokens] = -100
            encoding["labels"] = labels

        images = [
            frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame))
            for frame in (frames if encode_frames else [])
        ]
        if expression.image is not None:
            images.append(self.load_image(expression.image))
        size = self.image_processor.size["height"]
        pixel_values = (
            self.image_processor(images=images, return_tensors="pt")["pixel_values"]
            if images
            else torch.zeros(0, 3, size, size)
        )
        audio = self.feature_extractor(
            waveforms, sampling_rate=SAMPLING_RATE, padding="max_length", truncation=True, return_tensors="pt"
        )
        mel_lengths = [min(waveform.size, MAX_AUDIO_SECONDS * SAMPLING_RATE) // (SAMPLING_RATE // 100) for waveform in waveforms]

        encoding.update(
            {
                "pixel_values": pixel_values,
                "image_token_modes": torch.tensor(modes + ([2] if expression.image is not None else [])),
                "segmentation_frame_mask": torch.tensor([True] * len(frames) + ([False] if expression.image is not None else [])),
                "input_features": audio["input_features"],
                "audio_feature_lengths": torch.tensor(mel_lengths),
                "audio_token_modes": torch.tensor([2] + [1] * (len(waveforms) - 1)),
            }
        )
        return BatchFeature(encoding)

    def decode_answer(self, generated_ids: torch.Tensor) -> str:
        """Generated ids -> answer text without special tokens."""
        return self.tokenizer.decode(generated_ids, skip_special_tokens=True)


__all__ = ["OisaExpression", "OisaProcessor", "make_feature_extractor", "make_image_processor"]
