"""
dtype="auto" (`modeling_oisa.precision`), and the float32 blocks of a bfloat16 or float16 model: the extractors'
deformable attention and the pixel decoder keep float32 weights however the model gets its dtype, so that a call only
casts its activations.
"""

import copy
import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModel
from transformers.models.mask2former.modeling_mask2former import Mask2FormerPixelDecoder

from modeling_oisa import OisaForReferringSegmentation, OisaMultiscaleDeformableAttention, precision
from modeling_oisa.vision_adapter import OisaExtractorAttention

from ..conftest import make_sample


X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile
"""
X86_WITHOUT_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"
ARM_CPUINFO = "processor\t: 0\nFeatures\t: fp asimd sve i8mm bf16 svebf16\nCPU implementer\t: 0x41\n"


@pytest.fixture
def fresh_detection():
    """Forgets the detected CPU and the logged choices, before the test and after it (the test may patch them)."""
    cached = (precision.cpu_has_bf16_matmul, precision._log_choice)
    for function in cached:
        function.cache_clear()
    yield
    for function in cached:
        function.cache_clear()


@pytest.mark.parametrize(
    "cpuinfo, expected",
    [
        (X86_CPUINFO, {"fpu", "sse2", "avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
        (ARM_CPUINFO, {"fp", "asimd", "sve", "i8mm", "bf16", "svebf16"}),
        ("processor\t: 0\n", set()),
    ],
)
def test_cpuinfo_flags(cpuinfo, expected):
    assert precision.parse_cpuinfo_flags(cpuinfo) == expected


@pytest.mark.parametrize(
    "cpuinfo, has_bf16", [(X86_CPUINFO, True), (X86_WITHOUT_BF16, False), (ARM_CPUINFO, True), ("", False)]
)
def test_bf16_detection_reads_proc_cpuinfo_without_torch_capabilities(
    monkeypatch, tmp_path, fresh_detection, cpuinfo, has_bf16
):
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    monkeypatch.setattr(precision.sys, "platform", "linux")
    (tmp_path / "cpuinfo").write_text(cpuinfo)
    monkeypatch.setattr(precision, "_CPUINFO", tmp_path / "cpuinfo")
    assert precision.cpu_has_bf16_matmul() is has_bf16


def test_bf16_detection_without_any_source_is_false(monkeypatch, tmp_path, fresh_detection):
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    monkeypatch.setattr(precision, "_CPUINFO", tmp_path / "absent")
    assert precision.cpu_features() == set()
    assert precision.cpu_has_bf16_matmul() is False


@pytest.mark.parametrize(
    "capabilities, has_bf16",
    [
        ({"architecture": "x86_64", "avx512_bf16": True, "amx_bf16": False, "l2_cache_size": 2097152}, True),
        ({"architecture": "x86_64", "avx512_bf16": False, "amx_bf16": True}, True),
        ({"architecture": "x86_64", "avx2": True, "avx512_f": True, "avx512_bf16": False, "amx_bf16": False}, False),
        ({"architecture": "arm64", "neon": True, "bf16": True}, True),
        ({"architecture": "arm64", "neon": True, "bf16": False}, False),
    ],
)
def test_bf16_detection_uses_torch_capabilities(monkeypatch, fresh_detection, capabilities, has_bf16):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities, raising=False)
    monkeypatch.setattr(precision.sys, "platform", "linux")
    assert precision.cpu_has_bf16_matmul() is has_bf16


def test_no_bf16_on_macos(monkeypatch, fresh_detection):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"architecture": "arm64", "bf16": True}, raising=False)
    monkeypatch.setattr(precision.sys, "platform", "darwin")
    assert precision.cpu_has_bf16_matmul() is False


@pytest.mark.parametrize("has_bf16, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_cpu_follows_bf16_support(monkeypatch, fresh_detection, caplog, has_bf16, expected):
    monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: has_bf16)
    with caplog.at_level(logging.INFO, logger=precision.__name__):
        assert precision.resolve_dtype("auto", "cpu") == expected
        assert precision.resolve_dtype("auto", torch.device("cpu")) == expected
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1 and str(expected).removeprefix("torch.") in messages[0], messages


@pytest.mark.parametrize("has_bf16", [True, False])
def test_auto_elsewhere(monkeypatch, fresh_detection, has_bf16):
    monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: has_bf16)
    assert precision.resolve_dtype("auto", "cuda:1") == torch.bfloat16
    assert precision.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert precision.resolve_dtype("auto", "mps") == torch.float32


@pytest.mark.parametrize("has_bf16", [True, False])
def test_explicit_dtypes_pass_through(monkeypatch, has_bf16):
    monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: has_bf16)
    for device in ("cpu", "cuda"):
        assert precision.resolve_dtype("float32", device) == torch.float32
        assert precision.resolve_dtype("bfloat16", device) == torch.bfloat16
        assert precision.resolve_dtype("float16", device) == torch.float16
        assert precision.resolve_dtype(torch.float32, device) == torch.float32
        assert precision.resolve_dtype(torch.bfloat16, device) == torch.bfloat16


@pytest.mark.parametrize("dtype", ["int8", "fp32", "tensor", "", None, 3])
def test_unknown_dtypes_are_refused(dtype):
    with pytest.raises(ValueError, match="dtype must be"):
        precision.resolve_dtype(dtype, "cpu")


FLOAT32_BLOCKS = (OisaExtractorAttention, Mask2FormerPixelDecoder)


def float32_parameters(model: OisaForReferringSegmentation) -> dict[str, torch.Tensor]:
    """The parameters of the blocks that run in float32 (the extractors' deformable attention, the pixel decoder)."""
    names = [name for name, module in model.named_modules() if isinstance(module, FLOAT32_BLOCKS)]
    return {
        f"{block}.{name}": param for block in names for name, param in model.get_submodule(block).named_parameters()
    }


def assert_dtypes(model: OisaForReferringSegmentation, low: torch.dtype) -> None:
    kept = float32_parameters(model)
    assert kept and all(param.dtype == torch.float32 for param in kept.values())
    others = {name: param.dtype for name, param in model.named_parameters() if name not in kept}
    assert set(others.values()) == {low}
    assert model.dtype == low


@pytest.fixture(scope="module")
def float32_model(tiny_config):
    torch.manual_seed(0)
    return OisaForReferringSegmentation(tiny_config).eval()


def test_float32_blocks_are_listed_for_loading(float32_model):
    assert sorted(float32_model._keep_in_fp32_modules_strict) == [
        "mask_head.pixel_decoder",
        *[f"vision_adapter.extra_extractors.{index}.attention" for index in range(2)],
        *[f"vision_adapter.extractors.{index}.attention" for index in range(4)],
    ]


@pytest.mark.parametrize(
    "cast, low",
    [
        (lambda model: model.to(torch.bfloat16), torch.bfloat16),
        (lambda model: model.to("cpu", torch.bfloat16), torch.bfloat16),
        (lambda model: model.bfloat16(), torch.bfloat16),
        (lambda model: model.half(), torch.float16),
    ],
)
def test_casting_keeps_the_float32_blocks_exact(float32_model, cast, low):
    model = OisaForReferringSegmentation(float32_model.config).eval()
    model.load_state_dict(float32_model.state_dict())
    expected = {name: param.detach().clone() for name, param in float32_parameters(model).items()}
    assert cast(model) is model
    assert_dtypes(model, low)
    for name, param in float32_parameters(model).items():
        assert torch.equal(param, expected[name]), name
    model.float()
    assert {param.dtype for param in model.parameters()} == {torch.float32}


def test_casting_keeps_gradients_of_the_float32_blocks(float32_model):
    model = OisaForReferringSegmentation(float32_model.config)
    weight = model.mask_head.pixel_decoder.mask_projection.weight
    weight.grad = torch.ones_like(weight)
    model.to(torch.bfloat16)
    assert weight.dtype == weight.grad.dtype == torch.float32


def test_loading_in_bfloat16_keeps_the_float32_blocks_exact(float32_model, tmp_path):
    float32_model.save_pretrained(tmp_path)
    model = AutoModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert_dtypes(model, torch.bfloat16)
    saved = float32_parameters(float32_model)
    for name, param in float32_parameters(model).items():
        assert torch.equal(param, saved[name]), name
    # saved from bfloat16 (float32 blocks included) and loaded again, in either dtype
    model.save_pretrained(tmp_path / "bf16")
    assert_dtypes(AutoModel.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16), torch.bfloat16)
    reloaded = AutoModel.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    assert {param.dtype for param in reloaded.parameters()} == {torch.float32}


def test_built_under_a_bfloat16_default_dtype(tiny_config):
    tiny_config = copy.deepcopy(tiny_config)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = OisaForReferringSegmentation(tiny_config)
    finally:
        torch.set_default_dtype(default)
    assert_dtypes(model, torch.bfloat16)
    assert_dtypes(OisaForReferringSegmentation._from_config(tiny_config, dtype=torch.bfloat16), torch.bfloat16)


def test_without_deformable_attention_fp32_everything_is_cast(tiny_config):
    config = copy.deepcopy(tiny_config)
    config.deformable_attention_fp32 = False
    model = OisaForReferringSegmentation(config).to(torch.bfloat16)
    assert not model._keep_in_fp32_modules_strict
    assert {param.dtype for param in model.parameters()} == {torch.bfloat16}


def test_without_deformable_attention_fp32_a_bfloat16_model_runs(float32_model):
    """With the islands off, everything computes in bfloat16, the pixel decoder included (the adapter's maps are
    float32 and are cast for it), and the masks stay close to the float32 model's."""
    config = copy.deepcopy(float32_model.config)
    config.deformable_attention_fp32 = False
    model = OisaForReferringSegmentation(config).eval()
    model.load_state_dict(float32_model.state_dict())
    model.to(torch.bfloat16)
    sample = {name: value for name, value in make_sample().items() if name != "labels"}
    with torch.no_grad():
        output = model(**sample)
        expected = float32_model(**sample)
    mask_logits, expected_logits = output.mask_logits[0].float(), expected.mask_logits[0]
    assert output.mask_logits[0].dtype == torch.bfloat16 and torch.isfinite(mask_logits).all()
    assert (mask_logits - expected_logits).norm() / expected_logits.norm() < 0.05


def test_bfloat16_maps_go_through_the_float32_pixel_decoder(float32_model):
    """`decode_pixels` casts a list of bfloat16 maps (as a caller holding bfloat16 features passes) to float32."""
    sample = make_sample()
    with torch.no_grad():
        maps = [level.bfloat16() for level in float32_model.get_image_features(sample["pixel_values"]).image_maps]
        mask_features, multi_scale = float32_model.mask_head.decode_pixels(maps)
        expected, _ = float32_model.mask_head.decode_pixels([level.float() for level in maps])
    assert mask_features.dtype == torch.float32 and all(level.dtype == torch.float32 for level in multi_scale)
    torch.testing.assert_close(mask_features, expected, rtol=0, atol=0)


def test_bfloat16_forward_casts_activations_only(float32_model, monkeypatch):
    """
    The float32 blocks of a bfloat16 model run on their own float32 weights: no per-call copy of them (the functional
    call of float32 copies is what a block holding bfloat16 weights needs), and the same outputs as the float32 model's
    blocks on the same inputs.
    """
    model = OisaForReferringSegmentation(float32_model.config).eval()
    model.load_state_dict(float32_model.state_dict())
    model.to(torch.bfloat16)

    def no_copies(*args, **kwargs):
        raise AssertionError("a float32 block ran on per-call float32 copies of its weights")

    monkeypatch.setattr(torch.func, "functional_call", no_copies)
    calls = []
    hooks = [
        module.register_forward_hook(lambda module, args, output, name=name: calls.append((name, args, output)))
        for name, module in model.named_modules()
        if isinstance(module, (*FLOAT32_BLOCKS, OisaMultiscaleDeformableAttention))
    ]
    sample = make_sample()
    with torch.no_grad():
        output = model(**{name: value for name, value in sample.items() if name != "labels"})
    for hook in hooks:
        hook.remove()
    assert output.logits.dtype == torch.bfloat16 and torch.isfinite(output.mask_logits[0]).all()
    reference = dict(float32_model.named_modules())
    watched = (*FLOAT32_BLOCKS, OisaMultiscaleDeformableAttention)
    assert {name for name, *_ in calls} == {name for name, module in reference.items() if isinstance(module, watched)}
    for name, args, result in calls:
        if isinstance(reference[name], OisaExtractorAttention):
            assert result.dtype == torch.float32, name
            with torch.no_grad():
                torch.testing.assert_close(result, reference[name](*args), rtol=0, atol=0, msg=name)


def test_float32_blocks_ignore_autocast(float32_model):
    """As CUDA autocast with dtype=float32 in the original: the blocks compute in float32 inside a bfloat16 autocast."""
    sample = make_sample()
    with torch.no_grad():
        maps = float32_model.get_image_features(sample["pixel_values"]).image_maps
        expected = float32_model.mask_head.decode_pixels(maps)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mask_features, multi_scale = float32_model.mask_head.decode_pixels(maps)
    assert mask_features.dtype == torch.float32 and all(level.dtype == torch.float32 for level in multi_scale)
    torch.testing.assert_close(mask_features, expected[0], rtol=0, atol=0)


class FrameCopies(TorchDispatchMode):
    """Counts the copies made of one frame's mask features, of shape (C, H, W) or a view of it, while active."""

    def __init__(self, channels: int, height: int, width: int):
        super().__init__()
        self.shapes = {(channels, height, width), (1, channels, height, width), (1, channels, height * width),
                       (channels, height * width)}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        copies = (torch.ops.aten.copy_.default, torch.ops.aten.clone.default, torch.ops.aten._to_copy.default)
        if func in copies and isinstance(result, torch.Tensor) and tuple(result.shape) in self.shapes:
            self.count += 1
        return result


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_query_decoder_copies_no_frame_per_prediction(float32_model, dtype):
    """
    The mask features come out of the adapter and pixel decoder channels-last; the query decoder's 1 + layers mask
    predictions per frame must not each copy the frame (in bfloat16 that made the query decoder 3.7x slower than in
    float32 on OISA-1B): same logits as with contiguous features, and no per-frame copy.
    """
    model = OisaForReferringSegmentation(float32_model.config).eval()
    model.load_state_dict(float32_model.state_dict())
    model.to(dtype)
    sample = make_sample()
    with torch.no_grad():
        maps = model.get_image_features(sample["pixel_values"].to(dtype)).image_maps
        mask_features, multi_scale = model.mask_head.decode_pixels(maps)
        mask_features = mask_features.contiguous(memory_format=torch.channels_last)
        query_position, query_content = model.mask_head.query_decoder.initial_queries(
            torch.randn(2, model.config.text_config.hidden_size, dtype=dtype)
        )
        expected = model.mask_head.query_decoder(query_content, query_position, mask_features.contiguous(), multi_scale)
        counter = FrameCopies(*mask_features.shape[1:])
        with counter:
            output = model.mask_head.query_decoder(query_content, query_position, mask_features, multi_scale)
    torch.testing.assert_close(output.mask_logits, expected.mask_logits, rtol=0, atol=0)
    assert counter.count == 0
