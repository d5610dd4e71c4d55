"""A transformers pipeline for referring audio-visual segmentation: `pipeline("referring-audio-visual-segmentation")`."""

from typing import Any

from transformers import AutoModel, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .auto_segmenter import video_segmenter
from .processing_oisa import OisaExpression


TASK = "referring-audio-visual-segmentation"


class OisaReferringSegmentationPipeline(Pipeline):
    """
    `pipe({"video": path, "text": "the dog that barks"})` or with `speech`, `sound`, `image`, `explain`: returns the
    answer, the explanation, one boolean mask per frame at the frame's size and the per-frame presence scores.

    An EEMC model (`refavs_eemc`) takes text only and runs through [`RefAvsVideoSegmenter`]: the answer is "", and the
    output also holds `frame_sources` (the sampled frame each mask comes from, EEMC seeing one frame a second) and
    `batch` (each video runs alone; under the release profile results depend on the batch). Segmenter options go as
    call arguments: `chunk_size` for both families, `max_new_tokens` for OISA, `clip_seconds` for EEMC.

    `pipeline(..., dtype=...)` keeps its transformers meaning: "auto", the default, loads the checkpoint's own dtype
    (float32 for OISA-tiny-synthetic, bfloat16 for a converted OISA-1B) whatever the processor. The choice of
    `oisa segment --dtype auto` (bfloat16 on GPUs and on CPUs with bfloat16 matrix units, float32 elsewhere) is
    `dtype=modeling_oisa.precision.resolve_dtype("auto", device)`, or `OisaVideoSegmenter.from_pretrained(name)`.
    """

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def _sanitize_parameters(self, soundtrack=None, chunk_size=None, max_new_tokens=None, clip_seconds=None, **kwargs):
        options = {"chunk_size": chunk_size, "max_new_tokens": max_new_tokens, "clip_seconds": clip_seconds}
        forward_kwargs = {
            "soundtrack": soundtrack,
            **{name: value for name, value in options.items() if value is not None},
        }
        return {}, forward_kwargs, {}

    def preprocess(self, inputs: dict[str, Any]) -> dict[str, Any]:
        expression = OisaExpression(
            text=inputs.get("text"),
            speech=inputs.get("speech"),
            sound=inputs.get("sound"),
            image=inputs.get("image"),
            explain=bool(inputs.get("explain", False)),
        )
        return {"video": inputs["video"], "expression": expression}

    def _forward(self, model_inputs: dict[str, Any], soundtrack=None, **segmenter_options):
        segmenter = video_segmenter(self.model, self.processor, **segmenter_options)
        return segmenter(model_inputs["video"], model_inputs["expression"], soundtrack=soundtrack)

    def postprocess(self, result) -> dict[str, Any]:
        output = {
            "expression_type": result.expression_type,
            "answer": result.answer,
            "explanation": result.explanation,
            "masks": result.masks,
            "presence_scores": result.presence_scores,
            "timestamps": result.timestamps,
        }
        if result.frame_sources is not None:
            output.update(frame_sources=result.frame_sources, batch=result.batch)
        return output


def register_pipeline() -> None:
    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=OisaReferringSegmentationPipeline, pt_model=AutoModel, type="multimodal"
    )
