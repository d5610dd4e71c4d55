"""OisaVideoProcessor: which frames of a video the LLM sees, and the frame transform."""

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from huggingface_hub.dataclasses import validate_typed_dict
from PIL import Image
from transformers import BatchFeature, PilBackend
from transformers.image_utils import PILImageResampling, validate_kwargs
from transformers.processing_utils import Unpack, VideosKwargs
from transformers.video_processing_utils import VideoProcessorMixin

from .media import VideoReader
from .prompts import FRAME_SAMPLERS, frame_token_modes


logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Frame = Image.Image | np.ndarray
# a video file or frame folder, an array (T, H, W, 3) or a list of frames; or a batch: a list of those, (B, T, H, W, 3)
VideoInput = str | Path | np.ndarray | Sequence[Frame] | Sequence[str | Path | np.ndarray | Sequence[Frame]]


class OisaVideoProcessorKwargs(VideosKwargs, total=False):
    r"""
    max_visible_frames (`int`, *optional*, defaults to `self.max_visible_frames`):
        Frames shown to the LLM at most; the others are segmented without being shown.
    num_dense_frames (`int`, *optional*, defaults to `self.num_dense_frames`):
        Visible frames shown with all their tokens; the other visible frames get one pooled token.
    frame_sampler (`str`, *optional*, defaults to `self.frame_sampler`):
        `"release"` (the original's sampler) or `"linspace"` (evenly spread, first and last frame included: B17).
    """

    max_visible_frames: int
    num_dense_frames: int
    frame_sampler: str


def _is_frame(item) -> bool:
    return isinstance(item, Image.Image) or (isinstance(item, np.ndarray) and item.ndim == 3)


class OisaVideoProcessor(VideoProcessorMixin, PilBackend):
    r"""
    OISA's video processor. The mask head segments every frame, so every frame is transformed as released: resized to
    a square with PIL's bicubic filter (the aspect ratio is not kept), scaled to [0, 1] and ImageNet-normalised. The
    frame sampler picks the frames the LLM sees: `frame_token_modes` gives 2 (dense: all its tokens), 1 (pooled: one
    token) or 0 (not shown) per frame.

    A video is a video file or a folder of frames (decoded with PyAV), an array `(T, H, W, 3)` or a list of frames
    (PIL images or `(H, W, 3)` uint8 arrays).
    """

    valid_kwargs = OisaVideoProcessorKwargs
    model_input_names = ["pixel_values_videos", "frame_token_modes"]
    resample = PILImageResampling.BICUBIC
    size = {"height": 448, "width": 448}
    image_mean = IMAGENET_MEAN
    image_std = IMAGENET_STD
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    do_sample_frames = True
    max_visible_frames = 32
    num_dense_frames = 4
    frame_sampler = "release"

    def __init__(self, **kwargs: Unpack[OisaVideoProcessorKwargs]):
        super().__init__(**kwargs)
        self._check_sampler(self.frame_sampler)

    @staticmethod
    def _check_sampler(frame_sampler: str) -> None:
        if frame_sampler not in FRAME_SAMPLERS:
            raise ValueError(f"`frame_sampler` must be one of {sorted(FRAME_SAMPLERS)}, got {frame_sampler!r}.")

    def frame_token_modes(
        self,
        num_frames: int,
        max_visible_frames: int | None = None,
        num_dense_frames: int | None = None,
        frame_sampler: str | None = None,
    ) -> list[int]:
        """Per frame: 2 dense, 1 pooled, 0 not shown to the LLM (segmented all the same); arguments override self's."""
        frame_sampler = self.frame_sampler if frame_sampler is None else frame_sampler
        self._check_sampler(frame_sampler)
        return frame_token_modes(
            num_frames,
            self.max_visible_frames if max_visible_frames is None else max_visible_frames,
            self.num_dense_frames if num_dense_frames is None else num_dense_frames,
            frame_sampler,
        )

    def load_videos(self, videos: VideoInput) -> list[list[Image.Image]]:
        """A video or a batch of videos as lists of frames (PIL images); files and frame folders are decoded."""
        if isinstance(videos, np.ndarray) and videos.ndim == 5:
            return [self._load_video(video) for video in videos]
        if isinstance(videos, (list, tuple)) and videos and not _is_frame(videos[0]):
            return [self._load_video(video) for video in videos]
        return [self._load_video(videos)]

    @staticmethod
    def _load_video(video) -> list[Image.Image]:
        if isinstance(video, (str, Path)):
            return [frame for _, frame in VideoReader(video).iter_frames()]
        if isinstance(video, np.ndarray):
            if video.ndim != 4:
                raise ValueError(f"A video array is (frames, height, width, 3); got the shape {video.shape}.")
            video = list(video)
        if not isinstance(video, (list, tuple)) or not all(_is_frame(frame) for frame in video):
            raise TypeError(
                "A video is a file or frame folder path, an array (frames, height, width, 3) or a list of frames "
                f"(PIL images or (height, width, 3) arrays); got {type(video).__name__}."
            )
        return [frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame)) for frame in video]

    def preprocess(self, videos: VideoInput, **kwargs: Unpack[OisaVideoProcessorKwargs]) -> BatchFeature:
        """
        `pixel_values_videos`: the transformed frames of each video, (T, 3, H, W); with `do_sample_frames`, also
        `frame_token_modes`: (T,) per video.
        """
        validate_kwargs(valid_processor_keys=list(self.valid_kwargs.__annotations__), captured_kwargs=kwargs.keys())
        validate_typed_dict(self.valid_kwargs, kwargs)
        kwargs = self._merge_and_standardize_kwargs(**kwargs)
        self._validate_preprocess_kwargs(**kwargs)
        videos = self.load_videos(videos)
        data = {"pixel_values_videos": [self._transform(frames, **kwargs) for frames in videos]}
        if kwargs["do_sample_frames"]:
            data["frame_token_modes"] = [
                self.frame_token_modes(
                    len(frames), kwargs["max_visible_frames"], kwargs["num_dense_frames"], kwargs["frame_sampler"]
                )
                for frames in videos
            ]
        return BatchFeature(data, tensor_type=kwargs["return_tensors"])

    def _transform(self, frames: list[Image.Image], **kwargs) -> np.ndarray:
        """The frames of one video, (T, 3, H, W) float32: each frame through the PIL backend, on its own."""
        images = [
            self.process_image(
                frame, do_convert_rgb=kwargs["do_convert_rgb"], input_data_format=kwargs["input_data_format"]
            )
            for frame in frames
        ]
        size = kwargs["size"]
        if not images:
            return np.zeros((0, 3, size.height, size.width), dtype=np.float32)
        return np.stack(self._preprocess(images, **{**kwargs, "return_tensors": None})["pixel_values"])


__all__ = ["OisaVideoProcessor", "OisaVideoProcessorKwargs"]
