"""OisaVideoProcessor: which frames of a video the LLM sees, and the frame transform."""

import logging
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from huggingface_hub.dataclasses import validate_typed_dict
from PIL import Image
from transformers import BatchFeature, PilBackend
from transformers.image_transforms import convert_to_rgb
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


def _split_batch(videos: VideoInput) -> list:
    """A video, or a batch of videos, as a list of videos."""
    if isinstance(videos, np.ndarray) and videos.ndim == 5:
        return list(videos)
    if isinstance(videos, (list, tuple)) and videos and not _is_frame(videos[0]):
        return list(videos)
    return [videos]


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
        return [list(frames) for frames, _ in map(self._frames, _split_batch(videos))]

    @staticmethod
    def _frames(video) -> tuple[Iterable[Image.Image], int]:
        """A video's frames and their count; a file's or a folder's are decoded one at a time, as they are taken."""
        if isinstance(video, (str, Path)):
            reader = VideoReader(video)
            return (frame for _, frame in reader.iter_frames()), reader.info.num_frames
        if isinstance(video, np.ndarray):
            if video.ndim != 4:
                raise ValueError(f"A video array is (frames, height, width, 3); got the shape {video.shape}.")
            video = list(video)
        if not isinstance(video, (list, tuple)) or not all(_is_frame(frame) for frame in video):
            raise TypeError(
                "A video is a file or frame folder path, an array (frames, height, width, 3) or a list of frames "
                f"(PIL images or (height, width, 3) arrays); got {type(video).__name__}."
            )
        frames = [frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame)) for frame in video]
        return frames, len(frames)

    def preprocess(self, videos: VideoInput, **kwargs: Unpack[OisaVideoProcessorKwargs]) -> BatchFeature:
        """
        `pixel_values_videos`: the transformed frames of each video, (T, 3, H, W); with `do_sample_frames`, also
        `frame_token_modes`: (T,) per video.
        """
        validate_kwargs(valid_processor_keys=list(self.valid_kwargs.__annotations__), captured_kwargs=kwargs.keys())
        validate_typed_dict(self.valid_kwargs, kwargs)
        kwargs = self._merge_and_standardize_kwargs(**kwargs)
        self._validate_preprocess_kwargs(**kwargs)
        videos = [self._frames(video) for video in _split_batch(videos)]
        pixel_values = [self._transform(frames, frame_count, **kwargs) for frames, frame_count in videos]
        if kwargs["return_tensors"] is not None and len(pixel_values) == 1:
            pixel_values = pixel_values[0][None]  # a view: converting a list would copy the frames once more
        data = {"pixel_values_videos": pixel_values}
        if kwargs["do_sample_frames"]:
            data["frame_token_modes"] = [
                self.frame_token_modes(
                    frame_count, kwargs["max_visible_frames"], kwargs["num_dense_frames"], kwargs["frame_sampler"]
                )
                for _, frame_count in videos
            ]
        return BatchFeature(data, tensor_type=kwargs["return_tensors"])

    def _transform(self, frames: Iterable[Image.Image], frame_count: int, **kwargs) -> np.ndarray:
        """
        The `frame_count` frames of one video, (T, 3, H, W) float32, bit for bit the PIL backend's per-frame
        transform: each frame is resized with PIL, then rescaled and normalised by looking its values up in a table of
        what the backend's `rescale` and `normalize` make of each uint8 value. Frames are resized as they come, one
        thread per torch thread (PIL's resize and numpy's take release the GIL), while the next ones are decoded.
        """
        size = kwargs["size"]
        if not size.height or not size.width:
            raise ValueError(f"`size` of the OISA video processor gives a height and a width; got {dict(size)}.")
        if frame_count == 0:
            return np.zeros((0, 3, size.height, size.width), dtype=np.float32)
        frames = iter(frames)
        first = self._resized_pixels(next(frames), **kwargs)
        table = self._value_table(first.shape[0], **kwargs)
        transformed = np.empty((frame_count, *first.shape), dtype=table.dtype)

        def transform(index: int, pixels: np.ndarray) -> None:
            for channel, values in enumerate(table):
                # every index is in the table: "clip" never clips, and unlike "raise" writes to `out` unbuffered
                np.take(values, pixels[channel], out=transformed[index, channel], mode="clip")

        def resize_and_transform(index: int, frame: Image.Image) -> None:
            transform(index, self._resized_pixels(frame, **kwargs))

        transform(0, first)
        workers = torch.get_num_threads()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            waiting = deque()
            for index, frame in enumerate(frames, start=1):
                waiting.append(pool.submit(resize_and_transform, index, frame))
                if len(waiting) > workers:  # at most one decoded frame waits per thread
                    waiting.popleft().result()
            for future in waiting:
                future.result()
        if kwargs["do_pad"]:
            return np.stack(self.pad(list(transformed), pad_size=kwargs["pad_size"]))
        return transformed

    def _resized_pixels(self, frame: Image.Image, **kwargs) -> np.ndarray:
        """One frame converted and resized as the PIL backend does (then center-cropped if asked): (C, H, W) uint8."""
        if frame.mode != "RGB" or "transparency" in frame.info:
            # what the backend resizes: the frame composited onto white (or left as is) and back from an array
            pixels = convert_to_rgb(frame, return_numpy=True) if kwargs["do_convert_rgb"] else np.array(frame)
            frame = Image.fromarray(pixels)
        if kwargs["do_resize"]:
            resample = PILImageResampling.BILINEAR if kwargs["resample"] is None else kwargs["resample"]
            frame = frame.resize((kwargs["size"].width, kwargs["size"].height), resample=resample)
        pixels = np.asarray(frame)
        if pixels.dtype != np.uint8:
            raise ValueError(f"Frames are 8-bit images; one is a {frame.mode} image.")
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        return self.center_crop(pixels, kwargs["crop_size"]) if kwargs["do_center_crop"] else pixels

    def _value_table(self, num_channels: int, **kwargs) -> np.ndarray:
        """(channels, 256): each uint8 value of each channel after the backend's `rescale` and `normalize`."""
        values = np.broadcast_to(np.arange(256, dtype=np.uint8), (num_channels, 1, 256))
        if kwargs["do_rescale"]:
            values = self.rescale(values, kwargs["rescale_factor"])
        if kwargs["do_normalize"]:
            values = self.normalize(values, kwargs["image_mean"], kwargs["image_std"])
        return values[:, 0]


__all__ = ["OisaVideoProcessor", "OisaVideoProcessorKwargs"]
