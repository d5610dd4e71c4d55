"""A transformers pipeline for referring audio-visual segmentation: `pipeline("referring-audio-visual-segmentation")`."""

from typing import Any

from transformers import AutoModel, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .processing_oisa import OisaExpression
from .segmenter import OisaVideoSegmenter


TASK = "referring-audio-visual-segmentation"


class OisaReferringSegmentationPipeline(Pipeline):
    """
    `pipe({"video": path, "text": "the dog that barks"})` or with `speech`, `sound`, `image`, `explain`: returns the
    answer, the explanation, one boolean mask per frame at the frame's size and the per-frame presence scores.
    """

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def _sanitize_parameters(self, soundtrack=None, chunk_size=None, max_new_tokens=None, **kwargs):
        forward_kwargs = {"soundtrack": soundtrack}
        if chunk_size is not None:
            forward_kwargs["chunk_size"] = chunk_size
        if max_new_tokens is not None:
            forward_kwargs["max_new_tokens"] = max_new_tokens
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

    def _forward(self, model_inputs: dict[str, Any], soundtrack=None, chunk_size: int = 8, max_new_tokens: int = 100):
        segmenter = OisaVideoSegmenter(self.model, self.processor, chunk_size=chunk_size, max_new_tokens=max_new_tokens)
        return segmenter(model_inputs["video"], model_inputs["expression"], soundtrack=soundtrack)

    def postprocess(self, result) -> dict[str, Any]:
        return {
            "expression_type": result.expression_type,
            "answer": result.answer,
            "explanation": result.explanation,
            "masks": result.masks,
            "presence_scores": result.presence_scores,
            "timestamps": result.timestamps,
        }


def register_pipeline() -> None:
    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=OisaReferringSegmentationPipeline, pt_model=AutoModel, type="multimodal"
    )
