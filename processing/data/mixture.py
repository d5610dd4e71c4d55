"""Training samples from dataset records, their collation, and streamed, resumable mixtures of sources."""

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from datasets import IterableDataset, interleave_datasets
from datasets.distributed import split_dataset_by_node
from torch.nn import functional as F

from ..media import OisaInputError, load_image
from ..processing_oisa import OisaExpression, OisaProcessor
from ..prompts import FRAME_SAMPLERS, target_answer
from .errors import OisaDataError


logger = logging.getLogger(__name__)


def sample_training_frames(num_frames: int, count: int, sampler: str) -> list[int]:
    """
    `count` frame indices for a training sample. `release`: the original sampler (a video shorter than `count`
    gives all its frames); `linspace`: evenly spread, repeating frames when the video is short (B17 fixed).
    """
    if sampler == "linspace":
        return [round(i * (num_frames - 1) / max(count - 1, 1)) for i in range(count)]
    return FRAME_SAMPLERS["release"](num_frames, count)


def _video_sample(
    processor: OisaProcessor,
    frame_paths: Sequence,
    expression: OisaExpression,
    soundtrack,
    answer: str,
    frame_masks: Callable[[list[int]], np.ndarray] | None,
    num_frames: int,
    num_dense_frames: int,
    sampler: str,
) -> dict[str, torch.Tensor]:
    """Sampled frames (dense / pooled), the prompt with its answer, and one GT mask per frame (none without `[SEG]`)."""
    indices = sample_training_frames(len(frame_paths), num_frames, sampler)
    dense_positions = set(FRAME_SAMPLERS[sampler](len(indices), min(num_dense_frames, len(indices))))
    modes = [2 if position in dense_positions else 1 for position in range(len(indices))]
    frames = [load_image(frame_paths[index], "Frame") for index in indices]
    encoding = processor(videos=frames, audio=soundtrack, expression=expression, frame_modes=modes, answer=answer)
    sample = {key: value[0] if key in ("input_ids", "attention_mask", "labels") else value for key, value in encoding.items()}

    size = processor.video_processor.size["height"]
    if frame_masks is None:
        sample["gt_masks"] = torch.zeros(0, size, size)
    else:
        masks = torch.from_numpy(frame_masks(indices)).float()[:, None]
        # nearest resize to the model's square input, as the original does
        sample["gt_masks"] = F.interpolate(masks, size=(size, size), mode="nearest")[:, 0]
    sample["gt_mask_valid"] = torch.ones(sample["gt_masks"].shape[0], dtype=torch.bool)
    return sample


def build_omniavs_sample(
    record,
    processor: OisaProcessor,
    num_frames: int = 10,
    num_dense_frames: int = 4,
    profile: str = "release",
) -> dict[str, torch.Tensor]:
    """
    One training sample from an OmniAVS-format record (`processing_oisa.data.omniavs.OmniAVSRecord`): sampled
    frames (dense / pooled), the referring media, the prompt with its target answer, and one GT mask per frame at
    the model's input size. Null expressions answer without `[SEG]` and carry no masks.
    """
    has_speech = record.referring_speech_path is not None
    # B10 fixed: every type with an explanation asks for one (the release's text types never asked in training)
    explain = bool(record.explanation)
    expression = OisaExpression(
        text=None if has_speech else record.text,
        speech=record.referring_speech_path,
        sound=record.referring_sound_path,
        image=record.referring_image_path,
        explain=explain,
    )
    answer = target_answer(record.is_null, record.explanation)
    return _video_sample(
        processor,
        record.frame_paths,
        expression,
        record.soundtrack_path,
        answer,
        None if record.is_null else record.gt_masks,
        num_frames,
        num_dense_frames,
        "release" if profile == "release" else "linspace",
    )


def build_refavs_sample(
    record,
    processor: OisaProcessor,
    num_frames: int = 10,
    num_dense_frames: int = 4,
    profile: str = "release",
) -> dict[str, torch.Tensor]:
    """
    One training sample from a Ref-AVS record (`processing_oisa.data.refavs.RefAVSRecord`), prompted as an
    OmniAVS text expression over the clip and its audio. Null rows (from the uid, B20 fixed) answer without `[SEG]`.
    """
    frame_paths = record.frame_paths()
    answer = target_answer(record.is_null, None)

    def frame_masks(indices: list[int]) -> np.ndarray:
        return record.gt_masks()[indices]

    return _video_sample(
        processor,
        frame_paths,
        OisaExpression(text=record.text),
        record.audio_path,
        answer,
        None if record.is_null else frame_masks,
        num_frames,
        num_dense_frames,
        "release" if profile == "release" else "linspace",
    )


class OisaTrainingCollator:
    """
    Pads the token sequences of a batch (pad id, -100 labels, zero attention) and concatenates the images, audio
    clips and GT masks sample after sample, with `images_per_sample` to keep them aligned (B7, B21 fixed).
    """

    concatenated = (
        "pixel_values",
        "image_token_modes",
        "segmentation_frame_mask",
        "input_features",
        "audio_feature_lengths",
        "audio_token_modes",
        "gt_masks",
        "gt_mask_valid",
    )

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(sample["input_ids"].shape[0] for sample in samples)

        def pad(key: str, value: int) -> torch.Tensor:
            return torch.stack(
                [F.pad(sample[key], (0, length - sample[key].shape[0]), value=value) for sample in samples]
            )

        batch = {
            "input_ids": pad("input_ids", self.pad_token_id),
            "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", -100),
            "images_per_sample": torch.tensor([sample["pixel_values"].shape[0] for sample in samples]),
        }
        for key in self.concatenated:
            batch[key] = torch.cat([sample[key] for sample in samples])
        return batch


@dataclass
class MixtureSource:
    """One dataset of a training mixture: its records, how to turn a record into a sample, and its weight."""

    name: str
    records: Sequence
    build_sample: Callable
    weight: float | None = None


class SampleBuilder:
    """
    Turns the (source, index) items of a stream into training samples in the DataLoader workers. A record that cannot
    be built (missing or corrupt media, bad annotation) is logged and counted in `num_bad_samples`, and the batch
    goes on without it (a batch of only bad records holds nothing else). `sample_keys` names every item drawn,
    `source:index`.
    """

    def __init__(self, sources: Sequence[MixtureSource], collator: OisaTrainingCollator):
        self.sources = {source.name: source for source in sources}
        self.collator = collator
        self.bad_samples = 0

    def __call__(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        samples = []
        for item in items:
            source = self.sources[item["source"]]
            try:
                samples.append(source.build_sample(source.records[item["index"]]))
            except (OisaDataError, OisaInputError, OSError) as error:
                self.bad_samples += 1
                logger.warning("skipped %s record %d: %s", item["source"], item["index"], error)
        batch = self.collator(samples) if samples else {}
        batch["num_bad_samples"] = torch.tensor(len(items) - len(samples))
        batch["sample_keys"] = [f"{item['source']}:{item['index']}" for item in items]
        return batch


def _source_items(name: str, shards: list[list[int]]) -> Iterator[dict]:
    for shard in shards:
        for index in shard:
            yield {"source": name, "index": index}


def build_training_stream(
    sources: Sequence[MixtureSource],
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    shuffle_buffer: int = 1000,
    num_shards: int = 7,
    skip_per_process: int = 0,
) -> IterableDataset:
    """
    An endless stream of (source, index) items: each source shuffled with a buffer and repeated, sources
    interleaved by weight (default: their record counts, the original proportions), split across processes. Each
    source is split into shards so DataLoader workers share it. Deterministic under `seed`. The shard count is one no
    usual world size divides, so processes take every n-th item of one global order and the samples of a step do not
    depend on the number of processes. A run resumes with `skip_per_process`, the items each process had drawn: the
    global order is skipped by that many times the world size, before it is split.
    """
    streams, weights = [], []
    for source in sources:
        indices = np.arange(len(source.records))
        shards = [shard.tolist() for shard in np.array_split(indices, min(num_shards, len(indices)))]
        stream = IterableDataset.from_generator(
            _source_items, gen_kwargs={"name": source.name, "shards": shards}
        ).shuffle(seed=seed, buffer_size=shuffle_buffer)
        streams.append(stream.repeat(None))
        weights.append(source.weight if source.weight is not None else float(len(source.records)))
    total = sum(weights)
    mixture = interleave_datasets(
        streams, probabilities=[weight / total for weight in weights], seed=seed, stopping_strategy="all_exhausted"
    ) if len(streams) > 1 else streams[0]
    if skip_per_process:
        mixture = mixture.skip(skip_per_process * world_size)
    return split_dataset_by_node(mixture, rank=rank, world_size=world_size)

