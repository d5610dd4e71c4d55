"""One call from a video and omnimodal expressions to an answer and one mask per frame."""

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoProcessor

from modeling_oisa import OisaCheckpointError, resolve_model_name
from modeling_oisa.precision import resolve_dtype

from .media import OisaInputError, VideoReader, decode_audio, silent_soundtrack
from .processing_oisa import MAX_AUDIO_SECONDS, AudioInput, OisaExpression, OisaProcessor
from .prompts import parse_answer


logger = logging.getLogger(__name__)


@dataclass
class OisaSegmentation:
    """
    The result for one expression: the answer text (special tokens dropped), its explanation ("" when none), one
    boolean mask (height, width) per frame at the frame's own size (None when the caller took them chunk by chunk,
    `keep_masks=False`), each mask's area in pixels, the per-frame probability that the object is present, the frame
    times in seconds and, when asked for, per-frame foreground probabilities (T, H, W).

    A model that segments only some frames (EEMC, one a second) also says, per frame, which frame's mask it holds
    (`frame_sources`), and how the video was batched (`batch`); both are None for OISA, which segments every frame and
    runs one video at a time. For EEMC the other fields are read as [`RefAvsVideoSegmenter`] says.
    """

    expression_type: str
    answer: str
    explanation: str
    has_seg: bool
    masks: np.ndarray | None
    presence_scores: np.ndarray
    mask_areas: list[int] = field(default_factory=list)
    timestamps: list[float] = field(default_factory=list)
    probabilities: np.ndarray | None = None
    frame_sources: list[int] | None = None
    batch: str | None = None


@dataclass
class OisaEncodedVideo:
    """
    A video encoded once by [`OisaVideoSegmenter.encode_video`], to pass again instead of the video so that later
    expressions about it reuse its frames and features: its reader, each frame's token mode, the frames the LLM sees
    and their embeddings and, for a video of at most `max_cached_frames` frames, every frame and its feature maps.
    """

    reader: VideoReader
    frame_modes: list[int]
    visible_frames: list
    vision_embeds: torch.Tensor
    frames: list | None = None
    image_maps: list[torch.Tensor] | None = None


def load_model_and_processor(
    model_name_or_path: str | os.PathLike, device: str | torch.device | None = None, dtype: str | torch.dtype = "auto"
) -> tuple:
    """
    The model (OISA or EEMC, in evaluation mode) and processor of a checkpoint folder, Hub id or shipped name, the
    model on `device` (default: CUDA when available, else the CPU) in `dtype` (as [`OisaVideoSegmenter.from_pretrained`]
    says).
    """
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    try:
        dtype = resolve_dtype(dtype, device)
    except ValueError as error:
        raise OisaInputError(f"dtype: {error}") from error
    path = resolve_model_name(str(model_name_or_path))
    try:
        model = AutoModel.from_pretrained(path, dtype=dtype).to(device).eval()
        processor = AutoProcessor.from_pretrained(path)
    except OSError as error:
        raise OisaCheckpointError(
            f"{model_name_or_path}: no such local folder or Hub repo, or it cannot be read ({error})"
        ) from error
    return model, processor


class OisaVideoSegmenter:
    """
    Segments the objects that expressions refer to in a video. The LLM sees at most `max_visible_frames` frames; the
    mask head runs over every frame, `chunk_size` frames at a time, for all expressions at once, so a video's
    features are computed once however many expressions there are, and memory does not grow with its length.
    Videos of at most `max_cached_frames` frames are encoded once and kept; longer ones are decoded again for the
    mask pass instead.
    """

    def __init__(
        self,
        model,
        processor: OisaProcessor,
        chunk_size: int = 8,
        max_new_tokens: int = 100,
        max_cached_frames: int = 16,
    ):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type != "oisa":
            name = getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
            raise OisaCheckpointError(
                f"{name}: a {model_type or type(model).__name__} model, not OISA (processing_oisa.video_segmenter "
                "picks the segmenter of either family)"
            )
        self.model = model
        self.processor = processor
        self.chunk_size = chunk_size
        self.max_new_tokens = max_new_tokens
        self.max_cached_frames = max_cached_frames

    @classmethod
    def from_pretrained(
        cls,
        model_name_or_path: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "auto",
        **kwargs,
    ) -> "OisaVideoSegmenter":
        """
        The segmenter of a checkpoint folder, Hub id or shipped name (`oisa-tiny-synthetic`), its model on `device`
        (default: CUDA when available, else the CPU) in `dtype`: "auto" is bfloat16 on GPUs and on CPUs with bfloat16
        matrix units, float32 elsewhere, said once in the log (`modeling_oisa.precision.resolve_dtype`); a torch dtype
        or its name is used as given. `kwargs` go to the segmenter (`chunk_size`, `max_new_tokens`...).
        """
        return cls(*load_model_and_processor(model_name_or_path, device, dtype), **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def __call__(
        self,
        video: str | Path | VideoReader | OisaEncodedVideo | np.ndarray | Sequence,
        expressions: OisaExpression | Sequence[OisaExpression],
        soundtrack: AudioInput | None = None,
        progress: Callable[[int, int], None] | None = None,
        return_probabilities: bool = False,
        on_masks: Callable[[int, list, np.ndarray], None] | None = None,
        keep_masks: bool = True,
    ) -> OisaSegmentation | list[OisaSegmentation]:
        """
        video: a video file, a folder of frames, or frames in memory (a uint8 array (T, H, W, 3) or a list of PIL
        images or arrays, at one frame a second), or a video [`encode_video`] returned, whose frames and features are
        then reused; soundtrack: a separate audio file or waveform (by default the
        video's own; silence, with a warning, when it has none). `progress(done, total)` is called per chunk.
        `return_probabilities` also returns per-frame foreground probabilities at the frame size (Ref-AVS's metrics
        need scores, not masks). `on_masks(start, frames, masks)` receives each chunk as it is segmented: its frames
        and the masks (expressions, frames, H, W) of the expressions answered with `[SEG]`, in order; with
        `keep_masks=False` the results hold no masks, so memory stays flat in the video's length.
        """
        single = isinstance(expressions, OisaExpression)
        expressions = [expressions] if single else list(expressions)
        if not expressions:
            raise OisaInputError("No expression was given.")
        if not all(isinstance(expression, OisaExpression) for expression in expressions):
            raise OisaInputError("Expressions are OisaExpression objects.")
        encoded = video if isinstance(video, OisaEncodedVideo) else None
        reader = encoded.reader if encoded is not None else self._reader(video)
        info = reader.info
        # the model hears the first MAX_AUDIO_SECONDS: decoding stops there
        if isinstance(soundtrack, (str, Path)):
            soundtrack = decode_audio(soundtrack, what="Soundtrack", max_seconds=MAX_AUDIO_SECONDS)
        elif soundtrack is None:
            soundtrack = reader.soundtrack(max_seconds=MAX_AUDIO_SECONDS)
        if soundtrack is None:
            logger.warning("Video %s has no audio track; a silent soundtrack is used.", reader.path)
            soundtrack = silent_soundtrack(info.duration)

        if encoded is None:
            encoded = self.encode_video(reader)
        visible_modes = [mode for mode in encoded.frame_modes if mode > 0]
        with torch.no_grad():
            answers = [
                self._answer(encoded.visible_frames, visible_modes, encoded.vision_embeds, soundtrack, expression)
                for expression in expressions
            ]
            seg_states = [state for _, state in answers if state is not None]
            if seg_states:
                mask_logits, areas, class_logits, probabilities = self._segment(
                    reader, torch.cat(seg_states), encoded.image_maps, progress, return_probabilities,
                    encoded.frames, on_masks, keep_masks,
                )
            results, next_query = [], 0
            for expression, (parsed, state) in zip(expressions, answers):
                size = (info.num_frames, info.height, info.width)
                frame_probabilities = None
                if state is None:
                    masks = np.zeros(size, dtype=bool) if keep_masks else None
                    frame_areas, presence = [0] * info.num_frames, np.zeros(info.num_frames, dtype=np.float32)
                    if return_probabilities:
                        frame_probabilities = np.zeros(size, dtype=np.float32)
                else:
                    masks = mask_logits[next_query] if keep_masks else None
                    frame_areas = areas[next_query].tolist()
                    presence = class_logits[next_query].softmax(-1)[:, 0].numpy()
                    if return_probabilities:
                        frame_probabilities = probabilities[next_query]
                    next_query += 1
                results.append(
                    OisaSegmentation(
                        expression_type=expression.type,
                        answer=parsed.text,
                        explanation=parsed.explanation,
                        has_seg=parsed.has_seg,
                        masks=masks,
                        presence_scores=presence,
                        mask_areas=frame_areas,
                        timestamps=list(info.timestamps),
                        probabilities=frame_probabilities,
                    )
                )
        return results[0] if single else results

    def encode_video(self, video: str | Path | VideoReader | np.ndarray | Sequence) -> OisaEncodedVideo:
        """
        Decodes and encodes a video (any form `__call__` takes) once; passing the result to `__call__` instead of the
        video reuses its frames and features for every later expression about it.
        """
        reader = self._reader(video)
        info = reader.info
        modes = self.processor.frame_token_modes(info.num_frames)
        visible = [index for index, mode in enumerate(modes) if mode > 0]
        with torch.no_grad():
            if info.num_frames <= self.max_cached_frames:
                frames = reader.read(range(info.num_frames))
                features = self.model.get_image_features(self._pixel_values(frames), chunk_size=self.chunk_size)
                return OisaEncodedVideo(
                    reader, modes, [frames[index] for index in visible], features.vision_embeds[visible], frames,
                    features.image_maps,
                )
            frames = reader.read(visible)
            return OisaEncodedVideo(reader, modes, frames, self.model.get_vision_embeddings(self._pixel_values(frames)))

    @staticmethod
    def _reader(video: str | Path | VideoReader | np.ndarray | Sequence) -> VideoReader:
        if isinstance(video, VideoReader):
            return video
        if isinstance(video, (str, Path)):
            return VideoReader(video)
        return VideoReader.from_frames(video)

    def _pixel_values(self, frames: list) -> torch.Tensor:
        video = self.processor.video_processor(frames, do_sample_frames=False, return_tensors="pt")
        return video["pixel_values_videos"][0].to(self.device)

    def _answer(self, frames, modes, vision_embeds, soundtrack, expression):
        """Generates the answer of one expression; returns it parsed and the hidden state for the mask head."""
        # the frames are already encoded (`vision_embeds`): only the referring image is transformed here. The
        # soundtrack is encoded again with each expression's clips, as the original batches one expression's clips
        encoding = self.processor(
            videos=frames, audio=soundtrack, expression=expression, frame_modes=modes, encode_frames=False
        ).to(self.device)
        model, config = self.model, self.model.config
        input_ids = encoding["input_ids"]
        positions = config.text_config.max_position_embeddings
        if input_ids.shape[1] + self.max_new_tokens > positions:
            words = f" (its text is {len(expression.text)} characters)" if expression.text is not None else ""
            raise OisaInputError(
                f"The prompt is {input_ids.shape[1]} tokens{words}: with {self.max_new_tokens} new tokens it passes "
                f"the {positions} positions the model takes; shorten the expression."
            )
        image_embeds = vision_embeds
        if expression.image is not None:
            image_embeds = torch.cat([vision_embeds, model.get_vision_embeddings(encoding["pixel_values"])])
        audio = model.get_audio_features(encoding["input_features"], encoding["audio_feature_lengths"])
        inputs_embeds = model.inject_multimodal_embeddings(
            input_ids,
            model.get_input_embeddings()(input_ids),
            image_embeds,
            encoding["image_token_modes"],
            audio,
            encoding["audio_token_modes"],
        )
        # a generated placeholder would have no embeddings to take at the next step: they are never generated.
        # As the original, the [SEG] state comes from generation's own hidden states: entry 0 holds the prompt's,
        # entry k >= 1 the state at the input token generated[k - 1]
        output = model.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=encoding["attention_mask"],
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            num_beams=1,
            suppress_tokens=[config.image_token_id, config.audio_token_id, config.sub_audio_token_id],
            output_hidden_states=True,
            return_dict_in_generate=True,
        )
        generated = output.sequences[0]
        seg_positions = torch.nonzero(generated == config.seg_token_id).flatten()
        parsed = parse_answer(self.processor.decode_answer(generated), has_seg=len(seg_positions) > 0)
        if not len(seg_positions):
            return parsed, None
        # the state of the token before the first [SEG] (release) predicted it at step seg; the state at [SEG] itself
        # is the next step's, which generation computed unless it stopped at [SEG]
        step = int(seg_positions[0]) + (config.seg_hidden_state_source != "before_seg")
        if step < len(output.hidden_states):
            return parsed, output.hidden_states[step][-1][0, -1][None]
        full_embeds = torch.cat([inputs_embeds, model.get_input_embeddings()(generated[None])], dim=1)
        hidden = model(inputs_embeds=full_embeds, logits_to_keep=1).last_hidden_state[0]
        return parsed, hidden[input_ids.shape[1] + step - 1][None]

    def _segment(
        self,
        reader: VideoReader,
        seg_states: torch.Tensor,
        cached_maps,
        progress,
        return_probabilities: bool,
        cached_frames: list | None,
        on_masks,
        keep_masks: bool,
    ):
        """
        Mask head over every frame in chunks, the queries of all expressions carried together. Returns the masks
        (expressions, T, H, W) when `keep_masks`, each mask's area, the presence logits and the probabilities.
        """
        model, config = self.model, self.model.config
        info = reader.info
        size = (info.height, info.width)
        num_queries = seg_states.shape[0]
        query_position, query_content = model.mask_head.query_decoder.initial_queries(seg_states)
        masks = np.zeros((num_queries, info.num_frames, *size), dtype=bool) if keep_masks else None
        areas = np.zeros((num_queries, info.num_frames), dtype=np.int64)
        probabilities = np.zeros((num_queries, info.num_frames, *size), dtype=np.float32) if return_probabilities else None
        class_logits = torch.zeros(num_queries, info.num_frames, 2)
        chunk, start = [], 0
        frame_source = enumerate(cached_frames) if cached_frames is not None else reader.iter_frames()
        for index, frame in frame_source:
            chunk.append(frame)
            if len(chunk) < self.chunk_size and index < info.num_frames - 1:
                continue
            if cached_maps is not None:
                maps = [level[start : start + len(chunk)] for level in cached_maps]
            else:
                maps = model.get_image_features(self._pixel_values(chunk)).image_maps
            mask_features, multi_scale = model.mask_head.decode_pixels(maps)
            decoded = model.mask_head.query_decoder(query_content, query_position, mask_features, multi_scale)
            query_content = decoded.query_content
            chunk_masks = self.processor.post_process_masks(
                decoded, size, mask_upsampling=config.mask_upsampling, presence_gating=config.use_presence_gating
            ).cpu().numpy()
            areas[:, start : start + len(chunk)] = chunk_masks.sum(axis=(2, 3))
            if keep_masks:
                masks[:, start : start + len(chunk)] = chunk_masks
            if on_masks is not None:
                on_masks(start, chunk, chunk_masks)
            if return_probabilities:
                chunk_probabilities = self.processor.post_process_masks(
                    decoded,
                    size,
                    mask_upsampling=config.mask_upsampling,
                    binarize=False,
                    presence_gating=config.use_presence_gating,
                )
                probabilities[:, start : start + len(chunk)] = chunk_probabilities.cpu().numpy()
            class_logits[:, start : start + len(chunk)] = decoded.class_logits.float().cpu()
            start += len(chunk)
            chunk = []
            if progress is not None:
                progress(start, info.num_frames)
        return masks, areas, class_logits, probabilities
