"""
dtype="auto" through the Python API: `OisaVideoSegmenter.from_pretrained(..., dtype="auto")` picks bfloat16 on a CPU
with bfloat16 matrix units and float32 on one without (the detection mocked), saying so once in the log; the pipeline
keeps transformers' meaning of `dtype="auto"` (the checkpoint's own dtype) and takes the CPU-aware choice as
`dtype=resolve_dtype("auto", device)`.
"""

import logging
from unittest import mock

import pytest
import torch
from transformers import AutoModel, AutoProcessor, pipeline

import processing_oisa  # noqa: F401  (registers the processor and the pipeline)
from modeling_oisa import OisaCheckpointError, precision
from modeling_oisa.precision import resolve_dtype
from oisa_cli.main import main as oisa_main
from processing_oisa import OisaExpression, OisaInputError, OisaVideoSegmenter, write_video
from processing_oisa.data.synthetic_clips import make_shapes_clip


TASK = "referring-audio-visual-segmentation"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny random model saved in float32, and the same weights saved in bfloat16."""
    folder = tmp_path_factory.mktemp("tiny")
    assert oisa_main(["tiny-random", str(folder / "float32")]) == 0
    AutoModel.from_pretrained(folder / "float32", dtype=torch.bfloat16).save_pretrained(folder / "bfloat16")
    AutoProcessor.from_pretrained(folder / "float32").save_pretrained(folder / "bfloat16")
    return folder


@pytest.fixture
def fresh_log():
    """Forgets the logged choices, so that this test sees its own."""
    precision._log_choice.cache_clear()
    yield
    precision._log_choice.cache_clear()


def cpu_bf16(present: bool):
    return mock.patch("modeling_oisa.precision.cpu_has_bf16_matmul", return_value=present)


@pytest.mark.parametrize("has_bf16, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_segmenter_auto_follows_the_cpu(checkpoint, fresh_log, caplog, has_bf16, expected):
    with cpu_bf16(has_bf16), caplog.at_level(logging.INFO, logger=precision.__name__):
        segmenters = [
            OisaVideoSegmenter.from_pretrained(checkpoint / "float32", device="cpu"),
            OisaVideoSegmenter.from_pretrained(checkpoint / "bfloat16", device="cpu", dtype="auto", chunk_size=3),
        ]
    assert [segmenter.model.dtype for segmenter in segmenters] == [expected, expected]
    assert all(segmenter.device == torch.device("cpu") and not segmenter.model.training for segmenter in segmenters)
    assert segmenters[1].chunk_size == 3
    # the float32 blocks stay float32 in a bfloat16 model
    pixel_decoder = segmenters[0].model.mask_head.pixel_decoder
    assert {param.dtype for param in pixel_decoder.parameters()} == {torch.float32}
    # said once for the two loads
    reason = "a CPU with bfloat16 matrix units" if has_bf16 else "a CPU without bfloat16 matrix units"
    messages = [record.getMessage() for record in caplog.records if record.name == precision.__name__]
    assert messages == [f"dtype='auto' on cpu: {str(expected).removeprefix('torch.')} ({reason})."]


@pytest.mark.parametrize("dtype, expected", [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                             (torch.bfloat16, torch.bfloat16)])
def test_segmenter_explicit_dtype_overrides_auto(checkpoint, dtype, expected):
    for has_bf16 in (True, False):
        with cpu_bf16(has_bf16):
            segmenter = OisaVideoSegmenter.from_pretrained(checkpoint / "float32", device="cpu", dtype=dtype)
        assert segmenter.model.dtype == expected


def test_segmenter_from_pretrained_bad_input(checkpoint, tmp_path):
    with pytest.raises(OisaInputError, match="dtype: dtype must be 'auto'.*'int8'"):
        OisaVideoSegmenter.from_pretrained(checkpoint / "float32", device="cpu", dtype="int8")
    with pytest.raises(OisaCheckpointError, match="no such model folder"):
        OisaVideoSegmenter.from_pretrained(tmp_path / "absent", device="cpu")


def test_segmenter_from_pretrained_segments(checkpoint, tmp_path):
    clip = make_shapes_clip(num_frames=3, height=48, width=64, seed=1)
    write_video(tmp_path / "clip.mp4", clip.frames, 1.0)
    with cpu_bf16(False):
        segmenter = OisaVideoSegmenter.from_pretrained(checkpoint / "float32", device="cpu", max_new_tokens=3)
    result = segmenter(tmp_path / "clip.mp4", OisaExpression(text="the red circle"))
    assert segmenter.max_new_tokens == 3 and result.masks.shape == (3, 48, 64)


@pytest.mark.parametrize("has_bf16", [True, False])
def test_pipeline_auto_is_the_checkpoints_dtype(checkpoint, has_bf16):
    # transformers' meaning, whatever the CPU: "auto" (the default) is the dtype the checkpoint was saved in
    with cpu_bf16(has_bf16):
        for saved in ("float32", "bfloat16"):
            for kwargs in ({}, {"dtype": "auto"}):
                pipe = pipeline(TASK, model=str(checkpoint / saved), device="cpu", **kwargs)
                assert pipe.model.dtype == getattr(torch, saved), (saved, kwargs)


@pytest.mark.parametrize("has_bf16, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_pipeline_takes_the_cpu_aware_choice(checkpoint, has_bf16, expected):
    with cpu_bf16(has_bf16):
        for saved in ("float32", "bfloat16"):
            pipe = pipeline(TASK, model=str(checkpoint / saved), device="cpu", dtype=resolve_dtype("auto", "cpu"))
            assert pipe.model.dtype == expected, saved
