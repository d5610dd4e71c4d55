"""One call from a video and omnimodal expressions to an answer and one mask per frame."""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .media import OisaInputError, VideoReader, decode_audio, silent_soundtrack
from .processing_oisa import AudioInput, OisaExpression, OisaProcessor
from .prompts import parse_answer


logger = logging.getLogger(__name__)


@dataclass
class OisaSegmentation:
    """
    The result for one expression: the answer text (special tokens dropped), its explanation ("" when none), one
    boolean mask (height, width) per frame at the frame's own size, the per-frame probability that the object is
    present, the frame times in seconds and, when asked for, per-frame foreground probabilities (T, H, W).
    """

    expression_type: str
    answer: str
    explanation: str
    has_seg: bool
    masks: np.ndarray
    presence_scores: np.ndarray
    timestamps: list[float] = field(default_factory=list)
    probabilities: np.ndarray | None = None

    @property
    def mask_areas(self) -> list[int]:
        return [int(mask.sum()) for mask in self.masks]


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
        self.model = model
        self.processor = processor
        self.chunk_size = chunk_size
        self.max_new_tokens = max_new_tokens
        self.max_cached_frames = max_cached_frames

    @property
    def device(self) -> torch.device:
        return self.model.device

    def __call__(
        self,
        video: str | Path | VideoReader,
        expressions: OisaExpression | Sequence[OisaExpression],
        soundtrack: AudioInput | None = None,
        progress: Callable[[int, int], None] | None = None,
        return_probabilities: bool = False,
    ) -> OisaSegmentation | list[OisaSegmentation]:
        """
        video: a video file or a folder of frames; soundtrack: a separate audio file or waveform (by default the
        video's own; silence, with a warning, when it has none). `progress(done, total)` is called per chunk.
        `return_probabilities` also returns per-frame foreground probabilities at the frame size (Ref-AVS's metrics
        need scores, not masks).
        """
        single = isinstance(expressions, OisaExpression)
        expressions = [expressions] if single else list(expressions)
        if not expressions:
            raise OisaInputError("No expression was given.")
        reader = video if isinstance(video, VideoReader) else VideoReader(video)
        info = reader.info
        if isinstance(soundtrack, (str, Path)):
            soundtrack = decode_audio(soundtrack, what="Soundtrack")
        elif soundtrack is None:
            soundtrack = reader.soundtrack()
        if soundtrack is None:
            logger.warning("Video %s has no audio track; a silent soundtrack is used.", reader.path)
            soundtrack = silent_soundtrack(info.duration)

        modes = self.processor.frame_token_modes(info.num_frames)
        visible = [index for index, mode in enumerate(modes) if mode > 0]
        cache_all = info.num_frames <= self.max_cached_frames
        with torch.no_grad():
            if cache_all:
                frames = reader.read(range(info.num_frames))
                features = self.model.get_image_features(
                    self._pixel_values(frames), chunk_size=self.chunk_size
                )
                vision_embeds = features.vision_embeds[visible]
                cached_maps = features.image_maps
            else:
                frames = reader.read(visible)
                vision_embeds = self.model.get_vision_embeddings(self._pixel_values(frames))
                cached_maps = None
            visible_frames = [frames[index] for index in visible] if cache_all else frames
            answers = [
                self._answer(visible_frames, [modes[index] for index in visible], vision_embeds, soundtrack, expression)
                for expression in expressions
            ]
            seg_states = [state for _, state in answers if state is not None]
            if seg_states:
                mask_logits, class_logits, probabilities = self._segment(
                    reader, torch.cat(seg_states), cached_maps, progress, return_probabilities
                )
            results, next_query = [], 0
            for expression, (parsed, state) in zip(expressions, answers):
                size = (info.num_frames, info.height, info.width)
                frame_probabilities = None
                if state is None:
                    masks, presence = np.zeros(size, dtype=bool), np.zeros(info.num_frames, dtype=np.float32)
                    if return_probabilities:
                        frame_probabilities = np.zeros(size, dtype=np.float32)
                else:
                    masks, presence = mask_logits[next_query], class_logits[next_query].softmax(-1)[:, 0].numpy()
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
                        timestamps=list(info.timestamps),
                        probabilities=frame_probabilities,
                    )
                )
        return results[0] if single else results

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
        # a generated placeholder would have no embeddings to take at the next step: they are never generated
        generated = model.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=encoding["attention_mask"],
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            num_beams=1,
            suppress_tokens=[config.image_token_id, config.audio_token_id, config.sub_audio_token_id],
        )[0]
        seg_positions = torch.nonzero(generated == config.seg_token_id).flatten()
        parsed = parse_answer(self.processor.decode_answer(generated), has_seg=len(seg_positions) > 0)
        if not len(seg_positions):
            return parsed, None
        # teacher-forced pass over prompt + answer for the hidden state of the first [SEG] (or of the token before it)
        full_embeds = torch.cat([inputs_embeds, model.get_input_embeddings()(generated[None])], dim=1)
        hidden = model(inputs_embeds=full_embeds).last_hidden_state[0]
        seg_position = input_ids.shape[1] + int(seg_positions[0])
        if config.seg_hidden_state_source == "before_seg":
            seg_position -= 1
        return parsed, hidden[seg_position][None]

    def _segment(self, reader: VideoReader, seg_states: torch.Tensor, cached_maps, progress, return_probabilities):
        """Mask head over every frame in chunks, the queries of all expressions carried together."""
        model, config = self.model, self.model.config
        info = reader.info
        size = (info.height, info.width)
        query_position, query_content = model.mask_head.query_decoder.initial_queries(seg_states)
        masks = np.zeros((seg_states.shape[0], info.num_frames, info.height, info.width), dtype=bool)
        probabilities = np.zeros(masks.shape, dtype=np.float32) if return_probabilities else None
        class_logits = torch.zeros(seg_states.shape[0], info.num_frames, 2)
        chunk, start = [], 0
        frame_source = ((index, None) for index in range(info.num_frames)) if cached_maps is not None else reader.iter_frames()
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
            )
            masks[:, start : start + len(chunk)] = chunk_masks.cpu().numpy()
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
        return masks, class_logits, probabilities
