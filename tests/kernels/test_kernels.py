"""The compiled multi-scale deformable attention (`oisa_kernels`) against transformers' PyTorch implementation."""

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention

import oisa_kernels
from oisa_kernels import backend


def make_inputs(
    batch: int,
    queries: int,
    heads: int,
    shapes: list[tuple[int, int]],
    points: int,
    channels: int,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Value, sampling locations (some outside [0, 1]) and softmaxed attention weights."""
    generator = torch.Generator().manual_seed(seed)
    values = sum(height * width for height, width in shapes)
    value = torch.randn(batch, values, heads, channels, generator=generator, dtype=torch.float64)
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=generator, dtype=torch.float64)
    locations = locations * 1.3 - 0.15
    weights = torch.randn(batch, queries, heads, len(shapes) * points, generator=generator, dtype=torch.float64)
    weights = weights.softmax(-1).view(batch, queries, heads, len(shapes), points)
    return tuple(tensor.to(device=device, dtype=dtype) for tensor in (value, locations, weights))


def gradients(function, value, locations, weights, grad_output) -> list[torch.Tensor]:
    inputs = [tensor.detach().clone().requires_grad_() for tensor in (value, locations, weights)]
    function(*inputs).backward(grad_output)
    return [tensor.grad for tensor in inputs]


def ours(shapes):
    return lambda value, locations, weights: oisa_kernels.ms_deform_attn(value, shapes, None, locations, weights)


def reference(shapes):
    return lambda value, locations, weights: multi_scale_deformable_attention(value, shapes, locations, weights)


@pytest.fixture
def cpu_backend(monkeypatch):
    """Forces the compiled CPU kernels (the test fails if they do not build)."""
    monkeypatch.setenv(backend.ENV_VAR, "cpu")
    assert oisa_kernels.load_extension("cpu"), backend.load_failure("cpu")


@pytest.mark.parametrize(
    "batch, queries, heads, shapes, points, channels",
    [
        (2, 7, 3, [(6, 5), (3, 4)], 2, 5),
        (3, 11, 2, [(8, 8), (4, 4), (2, 2)], 4, 16),
        (1, 5, 1, [(5, 7)], 1, 32),
        (2, 4, 4, [(4, 6), (2, 3), (3, 3), (1, 2)], 3, 64),
    ],
)
def test_forward_and_backward_float64(cpu_backend, batch, queries, heads, shapes, points, channels):
    value, locations, weights = make_inputs(batch, queries, heads, shapes, points, channels)
    output = oisa_kernels.ms_deform_attn(value, shapes, None, locations, weights)
    assert oisa_kernels.last_backend() == "cpu"
    assert output.shape == (batch, queries, heads * channels)
    torch.testing.assert_close(output, multi_scale_deformable_attention(value, shapes, locations, weights))
    grad_output = torch.randn_like(output)
    for got, expected in zip(
        gradients(ours(shapes), value, locations, weights, grad_output),
        gradients(reference(shapes), value, locations, weights, grad_output),
    ):
        torch.testing.assert_close(got, expected)


def test_gradcheck(cpu_backend):
    shapes = [(4, 5), (2, 3)]
    inputs = [tensor.requires_grad_() for tensor in make_inputs(2, 3, 2, shapes, 2, 3, seed=1)]
    spatial_shapes = torch.tensor(shapes)
    level_start_index = torch.tensor([0, 20])
    assert torch.autograd.gradcheck(
        lambda value, locations, weights: oisa_kernels.ms_deform_attn(
            value, spatial_shapes, level_start_index, locations, weights
        ),
        inputs,
    )


def test_float32_pixel_decoder_shape(cpu_backend):
    # the pixel decoder's shape with 2 of the 10 frames, to keep the suite fast
    shapes = [(14, 14), (28, 28), (56, 56)]
    value, locations, weights = make_inputs(2, 4116, 8, shapes, 4, 32, dtype=torch.float32)
    output = oisa_kernels.ms_deform_attn(value, shapes, None, locations, weights)
    expected = multi_scale_deformable_attention(value, shapes, locations, weights)
    assert (output - expected).abs().max().item() <= 1e-5
    grad_output = torch.randn_like(output)
    for got, wanted in zip(
        gradients(ours(shapes), value, locations, weights, grad_output),
        gradients(reference(shapes), value, locations, weights, grad_output),
    ):
        # location gradients reach ~1e3 (they scale with the level size): compare against each gradient's scale
        assert (got - wanted).abs().max().item() <= 1e-5 * wanted.abs().max().item()


def test_points_on_borders_and_outside(cpu_backend):
    # level 4x8: y = -0.125 is pixel row -1 exactly, y = 1.125 row 4 = H; x likewise at -0.0625 and 1.0625
    shapes = [(4, 8)]
    edges_x = [-1.0, -0.0625, -0.03, 0.0, 0.0625, 0.5, 0.9375, 1.0, 1.0625, 1.2, 2.0]
    edges_y = [-1.0, -0.125, -0.05, 0.0, 0.125, 0.5, 0.875, 1.0, 1.125, 1.3, 2.0]
    grid = torch.tensor([(x, y) for x in edges_x for y in edges_y], dtype=torch.float64)
    value, _, _ = make_inputs(2, grid.shape[0], 2, shapes, 1, 4)
    locations = grid.view(1, -1, 1, 1, 1, 2).expand(2, -1, 2, 1, 1, 2).contiguous()
    weights = torch.rand(2, grid.shape[0], 2, 1, 1, dtype=torch.float64)
    output = oisa_kernels.ms_deform_attn(value, shapes, None, locations, weights)
    torch.testing.assert_close(output, multi_scale_deformable_attention(value, shapes, locations, weights))
    grad_output = torch.randn_like(output)
    got = gradients(ours(shapes), value, locations, weights, grad_output)
    expected = gradients(reference(shapes), value, locations, weights, grad_output)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[2], expected[2])
    # at exactly one pixel before the first row or column the sample is skipped (as in Deformable DETR's kernel) and
    # its location gradient is the one-sided one from outside (0), where grid_sample takes the inside slope
    pixel_minus_one = ((grid[:, 0] == -0.0625) | (grid[:, 1] == -0.125)).view(1, -1, 1, 1, 1, 1)
    torch.testing.assert_close(got[1].masked_fill(pixel_minus_one, 0), expected[1].masked_fill(pixel_minus_one, 0))


def test_single_pixel_levels(cpu_backend):
    shapes = [(1, 1), (1, 3), (3, 1), (2, 2)]
    value, locations, weights = make_inputs(2, 9, 2, shapes, 3, 6)
    torch.testing.assert_close(
        oisa_kernels.ms_deform_attn(value, shapes, None, locations, weights),
        multi_scale_deformable_attention(value, shapes, locations, weights),
    )
    grad_output = torch.randn(2, 9, 12, dtype=torch.float64)
    for got, expected in zip(
        gradients(ours(shapes), value, locations, weights, grad_output),
        gradients(reference(shapes), value, locations, weights, grad_output),
    ):
        torch.testing.assert_close(got, expected)


def test_non_contiguous_inputs(cpu_backend):
    shapes = [(5, 6), (3, 3)]
    value, locations, weights = make_inputs(3, 8, 2, shapes, 2, 4)
    value_t = value.transpose(0, 1).contiguous().transpose(0, 1)
    locations_t = locations.permute(5, 0, 1, 2, 3, 4).contiguous().permute(1, 2, 3, 4, 5, 0)
    weights_t = torch.cat([weights, weights], dim=-1)[..., :2]
    spatial_shapes = torch.tensor([[5, 3], [6, 3]]).t()
    assert not (value_t.is_contiguous() or locations_t.is_contiguous() or weights_t.is_contiguous())
    assert not spatial_shapes.is_contiguous()
    torch.testing.assert_close(
        oisa_kernels.ms_deform_attn(value_t, spatial_shapes, None, locations_t, weights_t),
        multi_scale_deformable_attention(value, shapes, locations, weights),
    )
    grad_output = torch.randn(3, 8, 8, dtype=torch.float64).transpose(0, 1).contiguous().transpose(0, 1)
    for got, expected in zip(
        gradients(ours(shapes), value_t, locations_t, weights_t, grad_output),
        gradients(reference(shapes), value, locations, weights, grad_output),
    ):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("batch, heads", [(1, 3), (5, 3), (7, 1), (13, 2)])
def test_batches_and_heads_not_divisible_by_any_chunk(cpu_backend, batch, heads):
    shapes = [(3, 4), (2, 2)]
    value, locations, weights = make_inputs(batch, 3, heads, shapes, 2, 3)
    torch.testing.assert_close(
        oisa_kernels.ms_deform_attn(value, shapes, None, locations, weights),
        multi_scale_deformable_attention(value, shapes, locations, weights),
    )
    grad_output = torch.randn(batch, 3, heads * 3, dtype=torch.float64)
    for got, expected in zip(
        gradients(ours(shapes), value, locations, weights, grad_output),
        gradients(reference(shapes), value, locations, weights, grad_output),
    ):
        torch.testing.assert_close(got, expected)


# the two shapes of OISA-1B (2 of a clip's 10 frames): the pixel decoder (8 heads, three levels, 32 channels per head)
# and the ViT-Adapter's extractor (16 heads, the 32x32 ViT grid, 16 channels per head), 4116 queries, 4 points
OISA_SHAPES = {
    "pixel decoder": dict(heads=8, shapes=[(14, 14), (28, 28), (56, 56)], channels=32),
    "adapter extractor": dict(heads=16, shapes=[(32, 32)], channels=16),
}


def half_precision_inputs(heads, shapes, channels, dtype):
    """Inputs of one OISA shape rounded to `dtype`, with the same inputs in float32 (exactly the rounded values)."""
    low = [tensor.to(dtype) for tensor in make_inputs(2, 4116, heads, shapes, 4, channels, torch.float32)]
    return low, [tensor.float() for tensor in low]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", OISA_SHAPES, ids=str)
def test_half_precision_matches_float32_to_its_rounding(cpu_backend, shape, dtype):
    """
    bfloat16 and float16 inputs are read as stored and summed in float32: the output, and the value gradient, are the
    float32 op's on the same (rounded) inputs, rounded once: within half a unit in the last place, i.e. 2**-8 (bfloat16;
    2**-11 float16) relative, or one step of the subnormals. Measured in bfloat16 on both shapes: at most 0.5 ulp. The
    location and weight gradients subtract nearly equal products, where float32 summation order shows: measured in
    bfloat16 at most 0.0034 of each gradient's largest value (4e-6 of the elements more than 1 ulp off); bound 0.01.
    """
    (value, locations, weights), float32_inputs = half_precision_inputs(**OISA_SHAPES[shape], dtype=dtype)
    levels = OISA_SHAPES[shape]["shapes"]
    rtol = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    # float16 results below 6e-5 are subnormal, with a fixed spacing of 6e-8
    atol = torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    output = oisa_kernels.ms_deform_attn(value, levels, None, locations, weights)
    expected = oisa_kernels.ms_deform_attn(*float32_inputs[:1], levels, None, *float32_inputs[1:])
    assert output.dtype == dtype
    torch.testing.assert_close(output.float(), expected, rtol=rtol, atol=atol)

    grad_output = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = gradients(ours(levels), value, locations, weights, grad_output)
    expected_grads = gradients(ours(levels), *float32_inputs, grad_output.float())
    assert all(grad.dtype == dtype for grad in grads)
    torch.testing.assert_close(grads[0].float(), expected_grads[0], rtol=rtol, atol=atol)
    for got, wanted in zip(grads[1:], expected_grads[1:]):
        torch.testing.assert_close(got.float(), wanted, rtol=rtol, atol=0.01 * wanted.abs().max().item())


def conversions_inside(function) -> list[str]:
    """The dtype conversions (`aten::_to_copy`) that run during `function()`, the op's own included."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        function()
    return [event.name for event in profile.events() if event.name == "aten::_to_copy"]


def test_bfloat16_inputs_are_not_converted_as_a_whole(cpu_backend):
    """No float32 copy of the value, locations, weights or output gradient: forward and backward read bfloat16."""
    (value, locations, weights), _ = half_precision_inputs(**OISA_SHAPES["pixel decoder"], dtype=torch.bfloat16)
    levels = OISA_SHAPES["pixel decoder"]["shapes"]
    leaves = [tensor.clone().requires_grad_() for tensor in (value, locations, weights)]
    output = oisa_kernels.ms_deform_attn(*leaves[:1], levels, None, *leaves[1:])
    grad_output = torch.ones_like(output)
    assert conversions_inside(lambda: oisa_kernels.ms_deform_attn(value, levels, None, locations, weights)) == []
    assert conversions_inside(lambda: output.backward(grad_output)) == []
    assert [leaf.grad.dtype for leaf in leaves] == [torch.bfloat16] * 3


def test_float32_locations_with_bfloat16_values_keep_their_precision(cpu_backend):
    """Locations and weights in float32 beside bfloat16 values are used as they are, not rounded to bfloat16."""
    levels = OISA_SHAPES["pixel decoder"]["shapes"]
    value, locations, weights = make_inputs(2, 300, 8, levels, 4, 32, torch.float32)
    value = value.bfloat16()
    output = oisa_kernels.ms_deform_attn(value, levels, None, locations, weights)
    expected = oisa_kernels.ms_deform_attn(value.float(), levels, None, locations, weights)
    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output.float(), expected, rtol=2.0**-8, atol=0)
    assert conversions_inside(lambda: oisa_kernels.ms_deform_attn(value, levels, None, locations, weights)) == []
    grads = gradients(ours(levels), value, locations, weights, torch.ones_like(output))
    assert [grad.dtype for grad in grads] == [torch.bfloat16, torch.float32, torch.float32]


def test_bfloat16_near_pixel_edges_and_outside(cpu_backend):
    shapes = [(8, 8), (4, 4)]
    value, _, weights = make_inputs(2, 16, 2, shapes, 4, 8, dtype=torch.bfloat16)
    # quarter-pixel locations are exact in bfloat16 and keep away from pixel edges, where the location gradient jumps
    generator = torch.Generator().manual_seed(2)
    sizes = torch.tensor([[width, height] for height, width in shapes]).view(1, 1, 1, 2, 1, 2)
    # pixel -1 to size: one pixel outside on either side
    pixels = torch.floor(torch.rand(2, 16, 2, 2, 4, 2, generator=generator) * (sizes + 2)) - 1
    quarter = torch.randint(0, 2, (2, 16, 2, 2, 4, 2), generator=generator) * 0.5 - 0.25
    locations = ((pixels + 0.5 + quarter) / sizes).to(torch.bfloat16)
    output = oisa_kernels.ms_deform_attn(value, shapes, None, locations, weights)
    assert output.dtype == torch.bfloat16
    expected = multi_scale_deformable_attention(value.float(), shapes, locations.float(), weights.float())
    torch.testing.assert_close(output, expected.to(torch.bfloat16))
    grads = gradients(ours(shapes), value, locations, weights, torch.ones_like(output))
    expected_grads = gradients(
        reference(shapes), value.float(), locations.float(), weights.float(), torch.ones_like(expected)
    )
    for got, wanted in zip(grads, expected_grads):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, wanted.to(torch.bfloat16), rtol=1e-2, atol=1e-2)


def test_meta_and_fake_tensors(cpu_backend):
    shapes = [(6, 5), (3, 4)]
    value, locations, weights = make_inputs(2, 7, 3, shapes, 2, 4, device="meta")
    output = oisa_kernels.ms_deform_attn(value, shapes, None, locations, weights)
    assert output.device.type == "meta" and output.shape == (2, 7, 12)
    assert oisa_kernels.last_backend() == "meta"
    inputs = make_inputs(2, 7, 3, shapes, 2, 4)
    args = (inputs[0], torch.tensor(shapes), torch.tensor([0, 30]), inputs[1], inputs[2])
    # schema, fake kernel, autograd registration and AOT dispatch of the registered operator
    torch.library.opcheck(torch.ops.oisa_kernels.ms_deform_attn.default, args)


def test_torch_compile(cpu_backend):
    shapes = [(6, 5), (3, 4)]
    value, locations, weights = make_inputs(2, 7, 3, shapes, 2, 4, dtype=torch.float32)
    # aot_eager traces through the fake kernels and autograd formula like inductor, without a C++ compile per graph
    compiled = torch.compile(ours(shapes), fullgraph=True)
    grad_output = torch.randn(2, 7, 12)
    for got, expected in zip(
        gradients(compiled, value, locations, weights, grad_output),
        gradients(reference(shapes), value, locations, weights, grad_output),
    ):
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(
        compiled(value, locations, weights), multi_scale_deformable_attention(value, shapes, locations, weights)
    )


def test_source_checkout_does_not_shadow_the_kernels_package():
    """From the repository root (the first entry of `sys.path` for `python train.py`), `import kernels` must not find
    our folder: transformers imports the PyPI package `kernels` at start-up."""
    root = Path(__file__).resolve().parents[2]
    code = "import kernels, transformers.activations; print(getattr(kernels, '__file__', None))"
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    found = result.stdout.strip()
    assert found == "None" or not Path(found).resolve().is_relative_to(root / "kernels"), found


def test_build_cache_is_keyed_by_the_sources_folder(monkeypatch, tmp_path):
    """Two checkouts on one machine build into their own folders, so neither rebuilds over the other's library."""
    monkeypatch.setenv("OISA_KERNELS_CACHE", str(tmp_path))
    here = backend.build_directory("cpu")
    assert here.parent == tmp_path and backend.build_directory("cpu") == here
    monkeypatch.setattr(backend, "_CSRC", tmp_path / "other-checkout" / "csrc")
    elsewhere = backend.build_directory("cpu")
    assert elsewhere.parent == tmp_path and elsewhere != here
    assert backend.build_directory("cuda") not in (here, elsewhere)


def test_backend_environment_variable(monkeypatch):
    shapes = [(4, 4)]
    value, locations, weights = make_inputs(1, 3, 2, shapes, 2, 4)
    expected = multi_scale_deformable_attention(value, shapes, locations, weights)
    for requested, used in (("torch", "torch"), ("cpu", "cpu"), ("auto", "cpu")):
        monkeypatch.setenv(backend.ENV_VAR, requested)
        torch.testing.assert_close(oisa_kernels.ms_deform_attn(value, shapes, None, locations, weights), expected)
        assert oisa_kernels.last_backend() == used
    assert "cpu" in oisa_kernels.available_backends()
    monkeypatch.setenv(backend.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="cannot run on cpu tensors"):
        oisa_kernels.ms_deform_attn(value, shapes, None, locations, weights)
    monkeypatch.setenv(backend.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="is not one of"):
        oisa_kernels.ms_deform_attn(value, shapes, None, locations, weights)


def test_auto_falls_back_with_one_warning(monkeypatch, caplog):
    monkeypatch.setenv(backend.ENV_VAR, "auto")
    monkeypatch.setattr(backend, "_LOADED", {})
    monkeypatch.setattr(backend, "_FAILURES", {})
    monkeypatch.setattr(backend, "_WARNED", set())
    monkeypatch.setattr(backend, "_missing_tool", lambda kind: "no C++ compiler (c++) was found")
    shapes = [(4, 4)]
    value, locations, weights = make_inputs(1, 3, 2, shapes, 2, 4)
    with caplog.at_level(logging.WARNING, logger=backend.__name__):
        for _ in range(3):
            output = oisa_kernels.ms_deform_attn(value, shapes, None, locations, weights)
    assert oisa_kernels.last_backend() == "torch"
    torch.testing.assert_close(output, multi_scale_deformable_attention(value, shapes, locations, weights))
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0].getMessage()
    monkeypatch.setenv(backend.ENV_VAR, "cpu")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        oisa_kernels.ms_deform_attn(value, shapes, None, locations, weights)


def test_oisa_image_features_match_the_pytorch_path(monkeypatch):
    from modeling_oisa import OisaForReferringSegmentation
    from oisa_tiny import tiny_oisa_config

    torch.manual_seed(0)
    model = OisaForReferringSegmentation(tiny_oisa_config()).eval()
    pixel_values = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    maps = {}
    for requested in ("torch", "cpu"):
        monkeypatch.setenv(backend.ENV_VAR, requested)
        with torch.no_grad():
            maps[requested] = model.get_image_features(pixel_values).image_maps
        assert oisa_kernels.last_backend() == requested
    for from_torch, from_kernel in zip(maps["torch"], maps["cpu"]):
        assert (from_torch - from_kernel).abs().max().item() <= 1e-5


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available: the CUDA kernels are untested")


@pytest.fixture
def cuda_backend(monkeypatch):
    """Forces the CUDA kernels: where CUDA is available, a build failure (a broken .cu) fails the test, not a skip."""
    monkeypatch.setenv(backend.ENV_VAR, "cuda")
    assert oisa_kernels.load_extension("cuda"), f"the CUDA kernels did not build: {backend.load_failure('cuda')}"


@cuda
@pytest.mark.parametrize("channels", [5, 16, 32, 64])
def test_cuda_float64_forward_and_backward(cuda_backend, channels):
    shapes = [(8, 6), (4, 3), (1, 1)]
    value, locations, weights = make_inputs(3, 17, 3, shapes, 4, channels, device="cuda")
    output = oisa_kernels.ms_deform_attn(value, shapes, None, locations, weights)
    assert oisa_kernels.last_backend() == "cuda"
    torch.testing.assert_close(output, multi_scale_deformable_attention(value, shapes, locations, weights))
    grad_output = torch.randn_like(output)
    for got, expected in zip(
        gradients(ours(shapes), value, locations, weights, grad_output),
        gradients(reference(shapes), value, locations, weights, grad_output),
    ):
        torch.testing.assert_close(got, expected)


@cuda
def test_cuda_gradcheck(cuda_backend):
    shapes = [(4, 5), (2, 3)]
    inputs = [tensor.requires_grad_() for tensor in make_inputs(2, 3, 2, shapes, 2, 3, device="cuda", seed=1)]
    assert torch.autograd.gradcheck(ours(shapes), inputs)


@cuda
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
def test_cuda_pixel_decoder_shape(cuda_backend, dtype, tolerance):
    shapes = [(14, 14), (28, 28), (56, 56)]
    value, locations, weights = make_inputs(10, 4116, 8, shapes, 4, 32, dtype=dtype, device="cuda")
    output = oisa_kernels.ms_deform_attn(value, shapes, None, locations, weights)
    assert output.dtype == dtype
    expected = multi_scale_deformable_attention(value.float(), shapes, locations.float(), weights.float())
    assert (output.float() - expected).abs().max().item() <= tolerance
    # the same (rounded) output gradient for both, so that only accumulation order and the final rounding differ
    grad_output = torch.randn(expected.shape, device="cuda").to(dtype)
    for got, wanted in zip(
        gradients(ours(shapes), value, locations, weights, grad_output),
        gradients(reference(shapes), value.float(), locations.float(), weights.float(), grad_output.float()),
    ):
        assert got.dtype == dtype
        assert (got.float() - wanted).abs().max().item() <= tolerance * wanted.abs().max().item()
