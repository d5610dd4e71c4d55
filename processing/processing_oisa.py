"""OisaProcessor: a video, its soundtrack and an omnimodal expression in, the model's prompt and tensors out; mask
logits back to masks."""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from transformers import BatchFeature, GotOcr2ImageProcessorPil, ProcessorMixin, WhisperFeatureExtractor
from transformers.processing_utils import ProcessingKwargs, Unpack
from transformers.utils import TensorType

from .media import SAMPLING_RATE, OisaInputError, check_image, check_waveform, decode_audio, load_image
from .prompts import (
    HERMES_2_CHAT_TEMPLATE,
    audio_token_count,
    expression_type,
    question,
    split_evenly,
)
from .video_processing_oisa import IMAGENET_MEAN, IMAGENET_STD, OisaVideoProcessor, OisaVideoProcessorKwargs, VideoInput


logger = logging.getLogger(__name__)

MAX_AUDIO_SECONDS = 30
MASK_UPSAMPLING_MODES = ("binarize_then_upsample", "upsample_logits")

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

    def __post_init__(self) -> None:
        if self.text is not None and not self.text.strip():
            raise OisaInputError("The text expression is empty: give its words, or speech instead of text.")

    @property
    def type(self) -> str:
        """One of the 8 OmniAVS expression types."""
        try:
            return expression_type(
                self.text is not None, self.speech is not None, self.sound is not None, self.image is not None
            )
        except ValueError as error:
            raise OisaInputError(str(error)) from error


class OisaProcessorKwargs(ProcessingKwargs, total=False):
    r"""
    speech (`np.ndarray`, `str` or `Path`, *optional*):
        The spoken expression (instead of `text`): a 16 kHz waveform or an audio file.
    sound (`np.ndarray`, `str` or `Path`, *optional*):
        A sound the expression refers to: a 16 kHz waveform or an audio file.
    explain (`bool`, *optional*, defaults to `False`):
        Asks the model to explain its answer.
    expression ([`OisaExpression`], *optional*):
        The whole expression at once, instead of `text`, `images`, `speech`, `sound` and `explain`.
    answer (`str`, *optional*):
        The training target: adds `labels` that supervise it and its `<|im_end|>`.
    frame_modes (`list[int]`, *optional*):
        Per frame 2 (dense), 1 (pooled) or 0 (not shown to the LLM), instead of the video processor's sampler.
    encode_frames (`bool`, *optional*, defaults to `True`):
        `False` leaves the frames out of `pixel_values`, for a caller that already encoded them; `image_token_modes`
        still lists every image.
    """

    videos_kwargs: OisaVideoProcessorKwargs
    speech: AudioInput | None
    sound: AudioInput | None
    explain: bool
    expression: OisaExpression | None
    answer: str | None
    frame_modes: list[int] | None
    encode_frames: bool


def make_image_processor(image_size: int = 448) -> GotOcr2ImageProcessorPil:
    """The referring image's transform, the frames' one: a square PIL bicubic resize, [0, 1], ImageNet-normalised."""
    return GotOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size},
        crop_to_patches=False,
        resample=Image.Resampling.BICUBIC,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_convert_rgb=True,
    )


def make_video_processor(image_size: int = 448, frame_sampler: str = "release") -> OisaVideoProcessor:
    """The frames' transform at `image_size` and the frame sampler of a profile (`"release"` or `"linspace"`)."""
    return OisaVideoProcessor(size={"height": image_size, "width": image_size}, frame_sampler=frame_sampler)


def make_feature_extractor() -> WhisperFeatureExtractor:
    """Whisper-large-v3 log-mel features: 128 bins, 30 s windows at 16 kHz."""
    return WhisperFeatureExtractor(feature_size=128, sampling_rate=SAMPLING_RATE)


def upsample_masks(mask_logits: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """
    Mask logits (..., h, w) -> boolean masks at `size`. `binarize_then_upsample` (B15, as released) upsamples the
    binary mask bilinearly and keeps any positive value, which dilates it slightly; `upsample_logits` upsamples the
    logits and thresholds at 0.
    """
    leading = mask_logits.shape[:-2]
    flat = mask_logits.reshape(-1, 1, *mask_logits.shape[-2:]).float()
    if mode == "binarize_then_upsample":
        flat = (flat > 0).float()
    upsampled = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return (upsampled > 0).reshape(*leading, *size)


def upsample_probabilities(mask_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Mask logits (..., h, w) -> foreground probabilities at `size`: logits upsampled bilinearly, then a sigmoid."""
    leading = mask_logits.shape[:-2]
    flat = mask_logits.reshape(-1, 1, *mask_logits.shape[-2:]).float()
    upsampled = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return upsampled.sigmoid().reshape(*leading, *size)


class OisaProcessor(ProcessorMixin):
    r"""
    Builds OISA's inputs from a video, its soundtrack and a referring expression: the Hermes-2 prompt with one
    placeholder per embedding (frames, referring image, soundtrack interleaved per frame and whole, speech and sound
    clips), `pixel_values`, log-mel `input_features` and the token modes the model needs; and turns the model's mask
    logits back into masks at the video's size ([`~OisaProcessor.post_process_masks`]).

    Args:
        image_processor ([`GotOcr2ImageProcessorPil`]): the referring image's transform (square bicubic resize,
            ImageNet norm).
        video_processor ([`OisaVideoProcessor`]): the frames' transform (the same) and the frame sampler.
        feature_extractor ([`WhisperFeatureExtractor`]): 128-bin log-mel features.
        tokenizer ([`Qwen2Tokenizer`]): the tokenizer with OISA's special tokens.
        chat_template (`str`, *optional*): defaults to Hermes-2 with the released system message.
        num_image_tokens (`int`, *optional*, defaults to 256): LLM tokens of a dense frame or referring image.
        sub_audio_layout (`str`, *optional*, defaults to `"release"`): the per-frame soundtrack wrappers,
            `"release"` (plain-text `<sub_aud>`/`</sub_aud>` as released evaluation) or `"per_frame"`
            (the `<sub_audio>`/`</sub_audio>` special tokens).
    """

    valid_processor_kwargs = OisaProcessorKwargs
    audio_kwargs = {"sampling_rate": SAMPLING_RATE, "padding": "max_length", "truncation": True}

    def __init__(
        self,
        image_processor=None,
        video_processor: OisaVideoProcessor | None = None,
        feature_extractor=None,
        tokenizer=None,
        chat_template: str | None = None,
        num_image_tokens: int = 256,
        sub_audio_layout: str = "release",
        **kwargs,
    ):
        if not isinstance(video_processor, OisaVideoProcessor):
            raise TypeError(f"`video_processor` must be an OisaVideoProcessor, got {type(video_processor).__name__}.")
        if sub_audio_layout not in ("release", "per_frame"):
            raise ValueError(f"`sub_audio_layout` must be 'release' or 'per_frame', got {sub_audio_layout!r}.")
        self.video_processor = video_processor
        self.num_image_tokens = num_image_tokens
        self.sub_audio_layout = sub_audio_layout
        chat_template = chat_template or HERMES_2_CHAT_TEMPLATE
        super().__init__(image_processor, feature_extractor, tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def get_attributes(cls) -> list[str]:
        # transformers loads a `video_processor` attribute with AutoVideoProcessor, which needs torchvision; this
        # class saves its video processor in processor_config.json like transformers does, and loads it itself
        # (`get_processor_dict`)
        return [name for name in super().get_attributes() if name != "video_processor"]

    @classmethod
    def get_processor_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict, dict]:
        """The saved processor config, with its video processor built (derived in a processor saved without one)."""
        processor_dict, kwargs = super().get_processor_dict(pretrained_model_name_or_path, **kwargs)
        if "video_processor" not in processor_dict:
            processor_dict["video_processor"] = _video_processor_dict_of_older_processor(processor_dict)
        processor_dict["video_processor"] = OisaVideoProcessor.from_dict(processor_dict["video_processor"])
        return processor_dict, kwargs

    @classmethod
    def from_model_config(cls, config, tokenizer) -> "OisaProcessor":
        """The processor of an OISA model: its image size, tokens per dense frame and behaviour profile."""
        return cls(
            make_image_processor(config.image_size),
            make_video_processor(config.image_size, config.frame_sampler),
            make_feature_extractor(),
            tokenizer,
            num_image_tokens=config.num_image_tokens,
            sub_audio_layout=config.sub_audio_layout,
        )

    @property
    def seg_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids("[SEG]")

    def frame_token_modes(self, num_frames: int) -> list[int]:
        """Per frame: 2 dense, 1 pooled, 0 not shown to the LLM (segmented all the same)."""
        return self.video_processor.frame_token_modes(num_frames)

    def load_audio(self, audio: AudioInput, what: str) -> np.ndarray:
        """A waveform (16 kHz mono) or an audio file, checked to be usable."""
        if isinstance(audio, (str, Path)):
            # only the first MAX_AUDIO_SECONDS are used: decoding stops there
            waveform = decode_audio(audio, what=what, max_seconds=MAX_AUDIO_SECONDS)
            name = str(audio)
        else:
            name = f"the {what.lower()} waveform"
            waveform = check_waveform(audio, f"{what} {name}")
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
        """The referring image as RGB: a file, a PIL image or a uint8 array (H, W, 3) or (H, W)."""
        if isinstance(image, (str, Path)):
            return load_image(image, "Referring image")
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
                raise OisaInputError(
                    f"The referring image array is {image.dtype} {image.shape}; give uint8 (H, W, 3) or a PIL image."
                )
            image = Image.fromarray(image)
        elif not isinstance(image, Image.Image):
            raise OisaInputError(f"The referring image is a {type(image).__name__}; give a file, a PIL image or an array.")
        check_image(image, "The referring image")
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
        text: str | None = None,
        videos: VideoInput | None = None,
        audio: AudioInput | None = None,
        images: ImageInput | Sequence[ImageInput] | None = None,
        return_tensors: str | TensorType | None = "pt",
        **kwargs: Unpack[OisaProcessorKwargs],
    ) -> BatchFeature:
        r"""
        One sample: a video, its soundtrack and a referring expression.

        Args:
            text (`str`, *optional*):
                The expression's text; `<audio>` and `<image>` mark where its sound and image go (appended when
                missing). A spoken expression comes as `speech` instead.
            videos (`str`, `Path`, `np.ndarray` or `list`):
                The video: a video file or a folder of frames, an array `(T, H, W, 3)` or a list of frames (PIL
                images or `(H, W, 3)` arrays). With `frame_modes`, it may hold only the frames shown to the LLM.
            audio (`np.ndarray`, `str` or `Path`, *optional*):
                The video's soundtrack, a 16 kHz waveform or an audio file; a second of silence (with a warning) when
                None.
            images (`PIL.Image.Image`, `np.ndarray`, `str` or `Path`, *optional*):
                The referring image.
            return_tensors (`str` or [`~utils.TensorType`], *optional*, defaults to `"pt"`):
                The type of the returned tensors.
            **kwargs ([`OisaProcessorKwargs`]):
                `speech`, `sound` and `explain` (or the whole `expression`), `answer`, `frame_modes`,
                `encode_frames`, and the sub-processors' `text_kwargs`, `images_kwargs`, `videos_kwargs`,
                `audio_kwargs`.

        Returns:
            [`BatchFeature`]: `input_ids`, `attention_mask` (and `labels` with an `answer`), `pixel_values` (the
            frames, then the referring image), `image_token_modes`, `segmentation_frame_mask`, `input_features`,
            `audio_feature_lengths` and `audio_token_modes`.
        """
        if text is not None and not isinstance(text, str):
            raise TypeError(
                "`text` is the expression's text, a string; pass the frames as `videos=` and an OisaExpression as "
                "`expression=`."
            )
        if videos is None:
            raise ValueError("OISA segments a video: pass it as `videos=`.")
        output_kwargs = self._merge_kwargs(
            OisaProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        expression = self._expression(text, images, output_kwargs)
        loaded = self.video_processor.load_videos(videos)
        if len(loaded) != 1:
            raise ValueError(f"OisaProcessor takes one video a call, got {len(loaded)}.")
        frames = loaded[0]
        if not frames:
            raise OisaInputError("The video has no frames.")
        videos_kwargs = output_kwargs["videos_kwargs"]
        frame_modes = output_kwargs.get("frame_modes")
        if frame_modes is None:
            modes = self.video_processor.frame_token_modes(
                len(frames),
                videos_kwargs.get("max_visible_frames"),
                videos_kwargs.get("num_dense_frames"),
                videos_kwargs.get("frame_sampler"),
            )
        else:
            modes = list(frame_modes)
        if len(modes) != len(frames):
            raise ValueError(f"{len(frames)} frames but {len(modes)} frame modes.")
        expr_type = expression.type

        if audio is None:
            logger.warning("No soundtrack was given; a second of silence is used.")
            audio = np.zeros(SAMPLING_RATE, dtype=np.float32)
        waveforms = [self.load_audio(audio, "Soundtrack")]
        if expression.speech is not None:
            waveforms.append(self.load_audio(expression.speech, "Speech"))
        if expression.sound is not None:
            waveforms.append(self.load_audio(expression.sound, "Sound"))
        token_counts = [audio_token_count(waveform.size) for waveform in waveforms]

        text_kwargs = output_kwargs["text_kwargs"]
        answer = output_kwargs.get("answer")
        prompt = self.build_prompt(
            modes, expr_type, expression.text, expression.explain, token_counts[0], token_counts[1:], answer
        )
        encoding = self.tokenizer(prompt, **{**text_kwargs, "return_tensors": "pt"})
        if answer is not None:
            prompt_only = self.build_prompt(
                modes, expr_type, expression.text, expression.explain, token_counts[0], token_counts[1:]
            )
            num_prompt_tokens = len(self.tokenizer(prompt_only, **{**text_kwargs, "return_tensors": None}).input_ids)
            labels = encoding["input_ids"].clone()
            labels[:, :num_prompt_tokens] = -100
            encoding["labels"] = labels

        pixel_values = []
        if output_kwargs.get("encode_frames", True):
            video_inputs = self.video_processor(
                frames, **{**videos_kwargs, "do_sample_frames": False, "return_tensors": "pt"}
            )
            pixel_values.append(video_inputs["pixel_values_videos"][0])
        if expression.image is not None:
            image_inputs = self.image_processor(
                images=[self.load_image(expression.image)], **{**output_kwargs["images_kwargs"], "return_tensors": "pt"}
            )
            pixel_values.append(image_inputs["pixel_values"])
        size = self.video_processor.size
        audio_inputs = self.feature_extractor(waveforms, **{**output_kwargs["audio_kwargs"], "return_tensors": "pt"})
        mel_lengths = [
            min(waveform.size, MAX_AUDIO_SECONDS * SAMPLING_RATE) // (SAMPLING_RATE // 100) for waveform in waveforms
        ]
        has_image = expression.image is not None
        data = {
            **encoding,
            "pixel_values": torch.cat(pixel_values) if pixel_values else torch.zeros(0, 3, size.height, size.width),
            "image_token_modes": torch.tensor(modes + ([2] if has_image else [])),
            "segmentation_frame_mask": torch.tensor([True] * len(frames) + ([False] if has_image else [])),
            "input_features": audio_inputs["input_features"],
            "audio_feature_lengths": torch.tensor(mel_lengths),
            "audio_token_modes": torch.tensor([2] + [1] * (len(waveforms) - 1)),
        }
        return BatchFeature(data, tensor_type=return_tensors)

    @staticmethod
    def _expression(text: str | None, images, output_kwargs: dict) -> OisaExpression:
        """The expression from its parts, or the `expression` given whole (then no part may be given)."""
        if isinstance(images, (list, tuple)):
            if len(images) != 1:
                raise OisaInputError(f"An expression has at most one referring image, got {len(images)}.")
            images = images[0]
        parts = {
            "text": text,
            "speech": output_kwargs.get("speech"),
            "sound": output_kwargs.get("sound"),
            "image": images,
        }
        explain = output_kwargs.get("explain", False)
        expression = output_kwargs.get("expression")
        if expression is None:
            return OisaExpression(**parts, explain=explain)
        if explain or any(value is not None for value in parts.values()):
            raise ValueError(
                "Give the expression either whole (`expression`) or as its parts (`text`, `images`, `speech`, "
                "`sound`, `explain`), not both."
            )
        return expression

    def post_process_masks(
        self,
        outputs_or_mask_logits,
        original_sizes: tuple[int, int] | Sequence[tuple[int, int]] | torch.Tensor,
        mask_upsampling: str,
        binarize: bool = True,
        presence_gating: bool = False,
    ) -> torch.Tensor | list[torch.Tensor]:
        r"""
        The model's mask logits (a quarter of its input size) to masks at the video's size.

        Args:
            outputs_or_mask_logits:
                The model's or the mask head's output (its `mask_logits`, and its `class_logits` for presence
                gating), or mask logits: a tensor `(..., h, w)` or one tensor per `[SEG]`.
            original_sizes (`tuple[int, int]`, a sequence of them, or a tensor):
                The video's (height, width), or one per tensor of a sequence of mask logits.
            mask_upsampling (`str`):
                The model's `config.mask_upsampling`: `"binarize_then_upsample"` (as released, B15: the binary mask
                upsampled bilinearly, any positive value kept, a slight dilation) or `"upsample_logits"` (the logits
                upsampled bilinearly, thresholded at 0).
            binarize (`bool`, *optional*, defaults to `True`):
                `False` returns foreground probabilities instead (logits upsampled bilinearly, then a sigmoid),
                whatever `mask_upsampling`.
            presence_gating (`bool`, *optional*, defaults to `False`):
                The model's `config.use_presence_gating`: empties the frames whose presence logits say "no object".

        Returns:
            `torch.Tensor` of shape `(..., height, width)`, boolean (float probabilities without `binarize`); a list
            of them for a sequence of mask logits.
        """
        if mask_upsampling not in MASK_UPSAMPLING_MODES:
            raise ValueError(f"`mask_upsampling` must be one of {MASK_UPSAMPLING_MODES}, got {mask_upsampling!r}.")
        mask_logits = getattr(outputs_or_mask_logits, "mask_logits", outputs_or_mask_logits)
        class_logits = getattr(outputs_or_mask_logits, "class_logits", None)
        if presence_gating and class_logits is None:
            raise ValueError("Presence gating needs the presence logits: pass the model's output, not mask logits.")
        if isinstance(original_sizes, torch.Tensor):
            original_sizes = original_sizes.tolist()
        if isinstance(mask_logits, torch.Tensor):
            return self._post_process(
                mask_logits, class_logits, original_sizes, mask_upsampling, binarize, presence_gating
            )
        if isinstance(original_sizes[0], int):
            original_sizes = [original_sizes] * len(mask_logits)
        if len(original_sizes) != len(mask_logits):
            raise ValueError(f"{len(mask_logits)} mask logits but {len(original_sizes)} sizes.")
        class_logits = [None] * len(mask_logits) if class_logits is None else class_logits
        return [
            self._post_process(logits, presence, size, mask_upsampling, binarize, presence_gating)
            for logits, presence, size in zip(mask_logits, class_logits, original_sizes)
        ]

    @staticmethod
    def _post_process(
        mask_logits: torch.Tensor,
        class_logits: torch.Tensor | None,
        size: Sequence[int],
        mask_upsampling: str,
        binarize: bool,
        presence_gating: bool,
    ) -> torch.Tensor:
        size = (int(size[0]), int(size[1]))
        if binarize:
            result = upsample_masks(mask_logits, size, mask_upsampling)
        else:
            result = upsample_probabilities(mask_logits, size)
        if presence_gating:
            result[class_logits.softmax(-1)[..., 1] > 0.5] = 0
        return result

    def decode_answer(self, generated_ids: torch.Tensor) -> str:
        """Generated ids -> answer text without special tokens."""
        return self.tokenizer.decode(generated_ids, skip_special_tokens=True)


def _video_processor_dict_of_older_processor(processor_dict: dict) -> dict:
    """
    The video processor of a processor saved before it had one: its frames took the image processor's transform and
    its frame sampler's settings were the processor's own (they move out of `processor_dict`).
    """
    image = processor_dict.get("image_processor")
    if not isinstance(image, dict):
        raise ValueError("The processor config has no video processor, and no image processor to derive one from.")
    transform_keys = ("size", "resample", "do_resize", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
                      "image_std", "do_convert_rgb")
    sampler_keys = ("max_visible_frames", "num_dense_frames", "frame_sampler")
    return {
        **{key: image[key] for key in transform_keys if key in image},
        **{key: processor_dict.pop(key) for key in sampler_keys if key in processor_dict},
    }


__all__ = [
    "OisaExpression",
    "OisaProcessor",
    "OisaProcessorKwargs",
    "make_feature_extractor",
    "make_image_processor",
    "make_video_processor",
    "upsample_masks",
    "upsample_probabilities",
]
