"""The one-call segmenter of either model family, picked by the model's `config.model_type`."""

import inspect
import os

import torch

from modeling_oisa import OisaCheckpointError

from .media import OisaInputError
from .refavs_eemc.segmenter_refavs import RefAvsVideoSegmenter
from .segmenter import OisaVideoSegmenter, load_model_and_processor


VideoSegmenter = OisaVideoSegmenter | RefAvsVideoSegmenter
SEGMENTERS: dict[str, type[VideoSegmenter]] = {"oisa": OisaVideoSegmenter, "refavs_eemc": RefAvsVideoSegmenter}
FAMILY_NAMES = {"oisa": "OISA", "refavs_eemc": "EEMC"}


def video_segmenter(model, processor, **kwargs) -> VideoSegmenter:
    """
    [`OisaVideoSegmenter`] for an OISA model, [`RefAvsVideoSegmenter`] for an EEMC one, with `kwargs` (`chunk_size`
    for both; `max_new_tokens`, `max_cached_frames` for OISA; `clip_seconds` for EEMC). An option the model's
    segmenter does not take is refused, naming it.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SEGMENTERS:
        name = getattr(config, "name_or_path", "") or type(model).__name__
        raise OisaCheckpointError(f"{name}: a {model_type or type(model).__name__} model, neither OISA nor EEMC")
    segmenter_class = SEGMENTERS[model_type]
    options = set(inspect.signature(segmenter_class).parameters) - {"model", "processor"}
    unknown = sorted(set(kwargs) - options)
    if unknown:
        raise OisaInputError(
            f"{', '.join(unknown)}: not an option of {FAMILY_NAMES[model_type]}'s segmenter (it takes "
            f"{', '.join(sorted(options))})"
        )
    return segmenter_class(model, processor, **kwargs)


def load_video_segmenter(
    model_name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "auto",
    **kwargs,
) -> VideoSegmenter:
    """
    The segmenter of an OISA or EEMC checkpoint folder, Hub id or shipped name, its model on `device` in `dtype`
    (as [`OisaVideoSegmenter.from_pretrained`]); `kwargs` as [`video_segmenter`].
    """
    return video_segmenter(*load_model_and_processor(model_name_or_path, device, dtype), **kwargs)
