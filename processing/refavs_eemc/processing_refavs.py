"""
RefAvsProcessor: videos, their soundtracks and referring expressions in, EEMC's inputs out (as the original Ref-AVS
dataset prepares them); foreground logit maps back to masks at the frames' size.
"""

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from transformers import BatchFeature, ProcessorMixin
from transformers.image_utils import PILImageResampling
from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil
from transformers.utils import TensorType

from ..media import SAMPLING_RATE, OisaInputError, VideoReader, check_waveform, decode_audio, silent_soundtrack
from .feature_extraction_vggish import VggishFeatureExtractor


logger = logging.getLogger(__name__)

# the original's `get_text_emb`: tokenizer(exp, max_length=25, padding="max_length", truncation=True)
TEXT_LENGTH = 25
# `facebook/mask2former-swin-base-ade-semantic`'s image processor: 384x384, PIL bilinear, 1/255, ImageNet mean / std
# written as its config writes them, the float32 values of 0.485, ... (the normalisation runs in float64: the std
# written 0.229, 0.224, 0.225 moves pixel values by up to 2.4e-7)
IMAGE_SIZE = 384
MASK2FORMER_MEAN = (0.48500001430511475, 0.4560000002384186, 0.4059999883174896)
MASK2FORMER_STD = (0.2290000021457672, 0.2239999920129776, 0.22499999403953552)
# the original's ground truth: cv2.resize to 256x256
MASK_SIZE = 256
# a frame counts for second k when its time is at least k minus this (container timestamps jitter by a millisecond)
FRAME_TIME_TOLERANCE = 1e-3

Frame = Image.Image | np.ndarray
# a video file, a folder of frames, an array (T, H, W, 3) or a list of frames
VideoInput = str | Path | np.ndarray | Sequence[Frame]
AudioInput = str | Path | np.ndarray
MaskInput = np.ndarray | torch.Tensor | Sequence[np.ndarray]


def make_refavs_image_processor(image_size: int = IMAGE_SIZE) -> Mask2FormerImageProcessorPil:
    """
    The original's frame transform, transformers' Mask2Former image processor with the PIL backend (the backend the
    original ran; the package does not depend on torchvision): PIL bilinear resize to `image_size` squared (aspect
    ratio not kept), x * (1/255) in float64 cast to float32, then (x - mean) / std in float32.
    """
    return Mask2FormerImageProcessorPil(
        size={"height": image_size, "width": image_size},
        resample=PILImageResampling.BILINEAR,
        rescale_factor=1 / 255,
        image_mean=MASK2FORMER_MEAN,
        image_std=MASK2FORMER_STD,
        size_divisor=32,
        ignore_index=255,
        num_labels=150,
    )


def one_frame_per_second(timestamps: Sequence[float], duration: float) -> list[int]:
    """
    Indices of the frames Ref-AVS annotates: the first frame of each whole second of the video (k = 0, 1, ... seconds
    after its first frame; a partial last second is left out, and a video shorter than a second gives its first
    frame). `timestamps` and `duration` are a [`VideoInfo`]'s.
    """
    times = np.asarray(timestamps, dtype=np.float64) - timestamps[0]
    seconds = max(1, math.floor(duration - timestamps[0] + FRAME_TIME_TOLERANCE))
    indices = np.searchsorted(times, np.arange(seconds) - FRAME_TIME_TOLERANCE, side="left")
    return np.minimum(indices, len(times) - 1).tolist()


def _linear_taps(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """
    OpenCV's bilinear taps along one axis (`cv2.resize`, INTER_LINEAR, uint8): for each output position the first
    source index, unclamped, and the two weights in 11-bit fixed point, computed from float32 positions as OpenCV does.
    """
    scale = 1.0 / (target / source)
    position = ((np.arange(target) + 0.5) * scale - 0.5).astype(np.float32)
    first = np.floor(position).astype(np.int64)
    fraction = position - first.astype(np.float32)
    return first, fraction, np.float32(1.0) - fraction


def _fixed_point(weight: np.ndarray) -> np.ndarray:
    return np.rint(weight * np.float32(2048)).astype(np.int64)


def resize_uint8_like_cv2(image: np.ndarray, size: int) -> np.ndarray:
    """
    `cv2.resize(image, (size, size))` of a uint8 image (..., H, W), bit for bit (checked against OpenCV 4.14 on random
    images of many sizes): 11-bit weights, the horizontal pass exact, the vertical pass as OpenCV's SIMD path rounds it
    (each row product shifted by 4 then by 16, the sum rounded by 2 bits); an exact halving is the 2x2 mean OpenCV
    switches to.
    """
    height, width = image.shape[-2:]
    source = image.astype(np.int64)
    if (height, width) == (size, size):
        return image.copy()
    if (height, width) == (2 * size, 2 * size):
        blocks = source.reshape(*source.shape[:-2], size, 2, size, 2).sum((-3, -1))
        return ((blocks + 2) >> 2).astype(np.uint8)
    columns, fraction, complement = _linear_taps(width, size)
    # columns outside the image take the edge pixel whole
    outside = (columns < 0) | (columns >= width - 1)
    fraction[outside], complement[outside] = 0, 1
    columns = np.clip(columns, 0, width - 1)
    rows = source[..., columns] * _fixed_point(complement) + source[..., np.minimum(columns + 1, width - 1)] * (
        _fixed_point(fraction)
    )
    first_rows, fraction, complement = _linear_taps(height, size)
    top = rows[..., np.clip(first_rows, 0, height - 1), :]
    bottom = rows[..., np.clip(first_rows + 1, 0, height - 1), :]
    top = ((top >> 4) * _fixed_point(complement)[:, None]) >> 16
    bottom = ((bottom >> 4) * _fixed_point(fraction)[:, None]) >> 16
    return np.clip((top + bottom + 2) >> 2, 0, 255).astype(np.uint8)


def resize_masks_like_original(masks: np.ndarray, size: int = MASK_SIZE) -> np.ndarray:
    """
    Binary masks (..., H, W) to (..., size, size) as the original Ref-AVS dataset resizes its ground truth: the 0/255
    mask through `cv2.resize` (bilinear), to gray, `> 0`. Gray of equal channels is the value itself, so this is the
    resize of the 0/255 mask, then `> 0`; it dilates the mask by up to a pixel.
    """
    return resize_uint8_like_cv2(np.where(masks, 255, 0).astype(np.uint8), size) > 0


class RefAvsProcessor(ProcessorMixin):
    r"""
    Builds EEMC's inputs as the original Ref-AVS dataset does: frames to `pixel_values` with the Mask2Former image
    processor, the expression to `max_text_length` RoBERTa token ids, the soundtrack to VGGish log-mel examples, and
    ground-truth masks to `mask_size` squared with the original's OpenCV recipe. [`~RefAvsProcessor.post_process_masks`]
    turns the model's foreground logit maps back into masks at the frames' size.

    Args:
        image_processor ([`Mask2FormerImageProcessorPil`]): the frames' transform, see
            [`make_refavs_image_processor`].
        feature_extractor ([`VggishFeatureExtractor`]): VGGish's log-mel front end, 0.96 s examples at 16 kHz.
        tokenizer ([`RobertaTokenizer`]): the expression's tokenizer (DistilRoBERTa's for the released model).
        max_text_length (`int`, *optional*, defaults to 25): tokens of every expression, padded or truncated.
        mask_size (`int`, *optional*, defaults to 256): side of the ground-truth masks (`labels`), the model's
            `config.mask_size`.
    """

    def __init__(
        self,
        image_processor=None,
        feature_extractor=None,
        tokenizer=None,
        max_text_length: int = TEXT_LENGTH,
        mask_size: int = MASK_SIZE,
        **kwargs,
    ):
        self.max_text_length = max_text_length
        self.mask_size = mask_size
        super().__init__(image_processor, feature_extractor, tokenizer, **kwargs)

    @classmethod
    def get_processor_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict, dict]:
        """
        The saved processor config with its image processor and feature extractor built here: `AutoImageProcessor`
        would pick the torchvision backend where torchvision is installed, whose resize differs from the original's.
        """
        processor_dict, kwargs = super().get_processor_dict(pretrained_model_name_or_path, **kwargs)
        if isinstance(processor_dict.get("image_processor"), dict):
            processor_dict["image_processor"] = Mask2FormerImageProcessorPil.from_dict(
                processor_dict["image_processor"]
            )
        if isinstance(processor_dict.get("feature_extractor"), dict):
            processor_dict["feature_extractor"] = VggishFeatureExtractor.from_dict(processor_dict["feature_extractor"])
        return processor_dict, kwargs

    @classmethod
    def from_model_config(cls, config, tokenizer) -> "RefAvsProcessor":
        """The processor of an EEMC model (`RefAvsConfig`): its Swin's input size and its mask size."""
        image_size = config.mask2former_config.backbone_config.image_size
        return cls(
            make_refavs_image_processor(image_size),
            VggishFeatureExtractor(),
            tokenizer,
            mask_size=config.mask_size,
        )

    def load_frames(self, video: VideoInput) -> tuple[list[Image.Image], VideoReader]:
        """
        A video's frames and its reader: for a video file, the first frame of each whole second (Ref-AVS annotates one
        frame per second, see [`one_frame_per_second`]); for a folder of frames (Ref-AVS's `media/<folder>/frames/`),
        an array (T, H, W, 3) or a list of frames, every frame.
        """
        if isinstance(video, (str, Path)):
            reader = VideoReader(video)
            indices = range(reader.info.num_frames)
            if not Path(video).is_dir():
                indices = one_frame_per_second(reader.info.timestamps, reader.info.duration)
            return reader.read(list(indices)), reader
        if isinstance(video, np.ndarray) and video.ndim != 4:
            raise OisaInputError(f"The video array has shape {video.shape}; a video is (frames, height, width, 3).")
        reader = VideoReader.from_frames(video)
        return reader.read(list(range(reader.info.num_frames))), reader

    def load_soundtrack(self, audio: AudioInput | None, video: VideoInput, reader: VideoReader) -> np.ndarray:
        """
        A clip's soundtrack as a 16 kHz mono waveform: `audio` (a file, or a waveform (samples,) or (channels,
        samples) at 16 kHz) or, without it, the video file's own audio, or the `audio.wav` beside a Ref-AVS `frames`
        folder. Without any, silence as long as the video (at least a second): VGGish examples whose log-mel is
        log(0.01) everywhere, what the original's front end computes for silence.
        """
        if isinstance(audio, (str, Path)):
            return decode_audio(audio, what="Soundtrack")
        if audio is not None:
            waveform = check_waveform(audio, "The soundtrack waveform")
            if waveform.ndim == 2:
                waveform = waveform.mean(axis=0 if waveform.shape[0] < waveform.shape[1] else 1)
            return waveform
        if isinstance(video, (str, Path)):
            refavs_audio = Path(video).parent / "audio.wav"
            if Path(video).is_dir() and Path(video).name == "frames" and refavs_audio.is_file():
                return decode_audio(refavs_audio, what="Soundtrack")
            soundtrack = reader.soundtrack()
            if soundtrack is not None:
                return soundtrack
        duration = reader.info.duration - reader.info.timestamps[0]
        logger.warning("No soundtrack for the video; %.1f s of silence is used.", max(duration, 1.0))
        return silent_soundtrack(duration)

    def audio_examples(self, waveform: np.ndarray, name: str) -> np.ndarray:
        """VGGish's log-mel examples of a 16 kHz waveform, (N, 96, 64) float32; at least one."""
        try:
            features = self.feature_extractor(waveform, sampling_rate=SAMPLING_RATE, return_tensors="np")
        except OisaInputError as error:
            raise OisaInputError(f"{name}: {error}") from error
        return features["input_features"]

    def load_masks(self, masks: MaskInput, num_frames: int, name: str) -> np.ndarray:
        """One video's ground truth, (T, H, W) bool or numbers (foreground where not 0, as the original's `> 0`)."""
        if isinstance(masks, torch.Tensor):
            masks = masks.detach().cpu().numpy()
        if isinstance(masks, (list, tuple)) and masks:
            if len({np.shape(mask) for mask in masks}) != 1:
                raise OisaInputError(f"The masks of {name} differ in size; every mask of a video has one size.")
            masks = np.stack([np.asarray(mask) for mask in masks])
        array = np.asarray(masks) if isinstance(masks, np.ndarray) else None
        if array is None or array.ndim != 3 or array.dtype.kind not in "biuf" or 0 in array.shape:
            described = f"{array.dtype} {array.shape}" if array is not None else type(masks).__name__
            raise OisaInputError(
                f"The masks of {name} are {described}; give one (height, width) mask per frame: (T, H, W), bool or "
                "numbers with the foreground not 0."
            )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise OisaInputError(f"The masks of {name} hold non-finite values (NaN or infinity).")
        if len(array) != num_frames:
            raise OisaInputError(
                f"There are {len(array)} masks for the {num_frames} frames of {name}; give one mask per frame."
            )
        return array != 0

    def __call__(
        self,
        videos: VideoInput | Sequence[VideoInput] | None = None,
        text: str | Sequence[str] | None = None,
        audio: AudioInput | Sequence[AudioInput | None] | None = None,
        masks: MaskInput | Sequence[MaskInput] | None = None,
        return_tensors: str | TensorType | None = "pt",
    ) -> BatchFeature:
        r"""
        One sample, or a batch when `text` is a list (then `videos`, and `audio` and `masks` when given, are lists of
        as many).

        Args:
            videos (`str`, `Path`, `np.ndarray` or `list`):
                A video file (one frame per second is taken, see [`~RefAvsProcessor.load_frames`]), a folder of frames,
                an array `(T, H, W, 3)` uint8 or a list of frames (PIL images or `(H, W, 3)` uint8 arrays). The
                videos of a batch need as many frames.
            text (`str` or `list[str]`):
                The referring expression.
            audio (`str`, `Path` or `np.ndarray`, *optional*):
                The soundtrack, an audio file or a 16 kHz waveform; by default the video's own (see
                [`~RefAvsProcessor.load_soundtrack`]). The soundtracks of a batch need as many 0.96 s examples.
            masks (`np.ndarray`, `torch.Tensor` or `list`, *optional*):
                Ground truth, one mask per frame `(T, H, W)`: gives `labels`.
            return_tensors (`str` or [`~utils.TensorType`], *optional*, defaults to `"pt"`):
                The type of the returned tensors.

        Returns:
            [`BatchFeature`]: `pixel_values` (B, T, 3, size, size), `input_ids` and `attention_mask`
            (B, max_text_length), `audio_input_features` (B, N, 96, 64) and, with `masks`, `labels`
            (B, T, mask_size, mask_size) float 0/1.
        """
        texts, videos, audios, all_masks = self._batch(videos, text, audio, masks)
        pixel_values, examples, labels = [], [], []
        for index, (video, expression, soundtrack, video_masks) in enumerate(zip(videos, texts, audios, all_masks)):
            name = f"video {index}" if len(videos) > 1 else "the video"
            frames, reader = self.load_frames(video)
            images = self.image_processor(images=frames, return_tensors="np")["pixel_values"]
            pixel_values.append(images)
            waveform = self.load_soundtrack(soundtrack, video, reader)
            examples.append(self.audio_examples(waveform, f"The soundtrack of {name}"))
            if video_masks is not None:
                labels.append(
                    resize_masks_like_original(self.load_masks(video_masks, len(frames), name), self.mask_size)
                )
        _check_same_length([len(images) for images in pixel_values], "frames")
        _check_same_length([len(clip) for clip in examples], "0.96 s soundtrack examples")
        encoding = self.tokenizer(
            texts, max_length=self.max_text_length, padding="max_length", truncation=True, return_tensors="np"
        )
        data = {
            "pixel_values": np.stack(pixel_values),
            "input_ids": encoding["input_ids"],
            "attention_mask": encoding["attention_mask"],
            "audio_input_features": np.stack(examples),
        }
        if labels:
            data["labels"] = np.stack(labels).astype(np.float32)
        return BatchFeature(data, tensor_type=return_tensors)

    @staticmethod
    def _batch(videos, text, audio, masks) -> tuple[list, list, list, list]:
        """The arguments as lists of one entry per sample; a batch when `text` is a list."""
        if videos is None:
            raise OisaInputError("The video is a NoneType; give a video file, a folder of frames or the frames.")
        if isinstance(text, str):
            texts, videos, audios, all_masks = [text], [videos], [audio], [masks]
            if isinstance(videos[0], (list, tuple)) and videos[0] and isinstance(videos[0][0], (str, Path)):
                raise OisaInputError(
                    f"`videos` holds {len(videos[0])} videos but `text` is one expression; give one text per video."
                )
        elif isinstance(text, (list, tuple)) and text:
            texts = list(text)
            count = len(texts)
            if not isinstance(videos, (list, tuple, np.ndarray)) or len(videos) != count:
                given = len(videos) if isinstance(videos, (list, tuple, np.ndarray)) else 1
                raise OisaInputError(f"{count} texts but {given} videos; a batch gives one video per text.")
            audios = [None] * count if audio is None else audio
            all_masks = [None] * count if masks is None else masks
            for argument, values in (("audio", audios), ("masks", all_masks)):
                if not isinstance(values, (list, tuple, np.ndarray, torch.Tensor)) or len(values) != count:
                    raise OisaInputError(f"{count} texts but `{argument}` is not a list of {count}; give one per text.")
            if any(entry is None for entry in all_masks) and any(entry is not None for entry in all_masks):
                raise OisaInputError("Masks are given for some videos of the batch only; give them for all or none.")
        else:
            raise OisaInputError(f"The text is a {type(text).__name__}; give the referring expression as a string.")
        for expression in texts:
            if not isinstance(expression, str):
                raise OisaInputError(
                    f"The text is a {type(expression).__name__}; give the referring expression as a string."
                )
            if not expression.strip():
                raise OisaInputError("The text expression is empty: give its words.")
        return texts, list(videos), list(audios), list(all_masks)

    def post_process_masks(
        self,
        outputs_or_logits,
        frame_sizes: tuple[int, int] | Sequence[tuple[int, int]] | torch.Tensor,
        threshold: float = 0.0,
    ) -> torch.Tensor | list[torch.Tensor]:
        r"""
        The model's foreground logit maps (`mask_size` squared) to boolean masks at the frames' size: the logits
        resized bilinearly (`align_corners=False`, as the model's own read-out resizes), then `> threshold`. The
        original never maps back: it scores at 256x256, where the logits are thresholded at 0.

        Args:
            outputs_or_logits:
                The model's output (its `logits`) or logits, `(B, T, h, w)` or `(T, h, w)`.
            frame_sizes (`tuple[int, int]`, a sequence of them, or a tensor `(B, 2)`):
                (height, width) of the frames, or one per video of `(B, T, h, w)` logits.
            threshold (`float`, *optional*, defaults to 0.0):
                Logits above it are foreground.

        Returns:
            `torch.Tensor` of shape `(..., height, width)`, boolean; a list of `(T, height, width)` tensors, one per
            video, when `frame_sizes` gives one size per video.
        """
        logits = getattr(outputs_or_logits, "logits", outputs_or_logits)
        if isinstance(frame_sizes, torch.Tensor):
            frame_sizes = frame_sizes.tolist()
        if len(frame_sizes) == 2 and all(isinstance(side, (int, np.integer)) for side in frame_sizes):
            return _resize_logits(logits, (int(frame_sizes[0]), int(frame_sizes[1]))) > threshold
        if logits.ndim != 4 or len(frame_sizes) != len(logits):
            raise ValueError(
                f"One frame size per video needs logits (B, T, h, w) with B = {len(frame_sizes)}; got logits of shape "
                f"{tuple(logits.shape)}."
            )
        return [
            _resize_logits(video_logits, (int(size[0]), int(size[1]))) > threshold
            for video_logits, size in zip(logits, frame_sizes)
        ]


def _resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits (..., h, w) resized bilinearly to `size` in float32."""
    leading = logits.shape[:-2]
    flat = logits.reshape(-1, 1, *logits.shape[-2:]).float()
    return F.interpolate(flat, size=size, mode="bilinear", align_corners=False).reshape(*leading, *size)


def _check_same_length(lengths: list[int], what: str) -> None:
    if len(set(lengths)) > 1:
        raise OisaInputError(
            f"The videos of the batch have {', '.join(map(str, lengths))} {what}; a batch needs as many for every "
            "video: process the others one at a time."
        )


__all__ = [
    "RefAvsProcessor",
    "make_refavs_image_processor",
    "one_frame_per_second",
    "resize_masks_like_original",
    "resize_uint8_like_cv2",
]
