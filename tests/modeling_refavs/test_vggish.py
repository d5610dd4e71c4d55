"""
EEMC's VGGish audio encoder: the network against a torchvggish-layout reference written here, the post-processing on
hand-computed numbers, the torchvggish state-dict conversion (strict, and bit-identical both ways), the frozen encoder
inside the model, and `audio_input_features` against precomputed `audio_features`.
"""

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModel

from modeling_refavs import RefAvsForReferringSegmentation, VggishAudioEncoder, VggishConfig, VggishPostprocessor
from modeling_refavs.conversion_vggish import (
    AUDIO_ENCODER_PREFIX,
    convert_torchvggish_state_dict,
    torchvggish_state_dict_from_ours,
)
from oisa_tiny.refavs import TINY_VGGISH, tiny_refavs_config


class TorchvggishLayout(nn.Module):
    """VGGish as torchvggish lays it out: `features` (conv, ReLU)... with max-pools, `embeddings` (linear, ReLU)..."""

    def __init__(self, config: VggishConfig):
        super().__init__()
        layers, in_channels = [], 1
        for stage in config.conv_channels:
            for channels in stage:
                layers += [nn.Conv2d(in_channels, channels, 3, padding=1), nn.ReLU()]
                in_channels = channels
            layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        widths = [config.flattened_size, *config.hidden_sizes, config.embedding_size]
        linear = []
        for in_width, out_width in zip(widths, widths[1:]):
            linear += [nn.Linear(in_width, out_width), nn.ReLU()]
        self.embeddings = nn.Sequential(*linear)

    def forward(self, examples: torch.Tensor, final_relu: bool) -> torch.Tensor:
        # (n, 1, 96, 64) -> (n, C, 6, 4) -> channel-last, as torchvggish's two transposes
        maps = self.features(examples).transpose(1, 3).transpose(1, 2).contiguous()
        flat = maps.view(maps.shape[0], -1)
        return self.embeddings(flat) if final_relu else self.embeddings[:-1](flat)


def random_pca(embedding_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """PCA parameters as torchvggish's file may hold them: NumPy arrays, the means a vector."""
    rng = np.random.default_rng(seed)
    return {
        "pca_eigen_vectors": rng.standard_normal((embedding_size, embedding_size)).astype(np.float32),
        "pca_means": rng.standard_normal(embedding_size).astype(np.float32),
    }


def load_audio_encoder(encoder: VggishAudioEncoder, converted: dict[str, torch.Tensor]) -> None:
    encoder.load_state_dict({key.removeprefix(AUDIO_ENCODER_PREFIX): value for key, value in converted.items()})


@pytest.fixture(scope="module")
def real_size_reference():
    torch.manual_seed(0)
    return TorchvggishLayout(VggishConfig()).eval()


def test_real_vggish_size_and_shapes():
    config = VggishConfig()
    with torch.device("meta"):
        encoder = VggishAudioEncoder(config)
        output = encoder(torch.empty(2, 10, 96, 64))
    assert output.shape == (2, 10, 128)
    # torchvggish's VGG: 72,141,184 parameters; 512 x 6 x 4 = 12288 inputs to the first linear layer
    assert sum(parameter.numel() for parameter in encoder.parameters()) == 72_141_184
    assert encoder.hidden_layers[0].in_features == config.flattened_size == 12288
    with pytest.raises(ValueError, match=r"\(\.\.\., 96, 64\)"):
        encoder(torch.empty(2, 10, 64, 96, device="meta"))
    with pytest.raises(ValueError, match="multiples of 16"):
        VggishConfig(num_frames=100)


@pytest.mark.parametrize("final_relu", [False, True])
def test_converted_weights_reproduce_the_torchvggish_layout(real_size_reference, final_relu):
    # towhee's VGG (the original's) ends without the ReLU, torchvggish's with it
    encoder = VggishAudioEncoder(VggishConfig(final_relu=final_relu)).eval()
    load_audio_encoder(encoder, convert_torchvggish_state_dict(real_size_reference.state_dict()))
    examples = 3 * torch.randn(2, 3, 96, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = real_size_reference(examples.flatten(0, 1)[:, None], final_relu).view(2, 3, 128)
        ours = encoder(examples)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    assert (ours < 0).any() != final_relu


def test_postprocessor_on_hand_computed_numbers():
    postprocessor = VggishPostprocessor(3)
    postprocessor.pca_eigen_vectors.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 0.0]]))
    postprocessor.pca_means.copy_(torch.tensor([0.5, 0.0, -1.0]))
    embeddings = torch.tensor([[0.5, 0.25, 1.0], [3.0, -2.0, -1.0]])
    # centred: [0, 0.25, 2] and [2.5, -2, 0]; PCA: [0, 0.5, 0.25] and [2.5, -4, 0.5]; clipped to [-2, 2];
    # (v + 2) * 255 / 4 = [127.5, 159.375, 143.4375] and [255, 0, 159.375], rounded
    expected = torch.tensor([[128.0, 159.0, 143.0], [255.0, 0.0, 159.0]])
    torch.testing.assert_close(postprocessor(embeddings), expected, rtol=0, atol=0)


def test_encoder_with_torchvggish_post_processing():
    config = VggishConfig(**TINY_VGGISH, final_relu=True, postprocess=True)
    torch.manual_seed(0)
    reference = TorchvggishLayout(config).eval()
    pca = random_pca(config.embedding_size)
    encoder = VggishAudioEncoder(config).eval()
    load_audio_encoder(encoder, convert_torchvggish_state_dict(reference.state_dict(), pca, config))
    examples = torch.randn(4, 96, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        embeddings = reference(examples[:, None], final_relu=True)
        ours = encoder(examples)
    whitened = (embeddings - torch.from_numpy(pca["pca_means"])) @ torch.from_numpy(pca["pca_eigen_vectors"]).T
    expected = torch.round((whitened.clamp(-2, 2) + 2) * 255 / 4)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    assert ours.min() >= 0 and ours.max() <= 255 and torch.equal(ours, ours.round())


@pytest.mark.parametrize("size", ["real", "tiny"])
def test_conversion_round_trip_is_bit_identical(real_size_reference, size):
    sizes = {} if size == "real" else TINY_VGGISH
    config = VggishConfig(**sizes)
    reference = real_size_reference if size == "real" else TorchvggishLayout(config)
    original = reference.state_dict()
    pca = {key: torch.from_numpy(value) for key, value in random_pca(config.embedding_size).items()}
    converted = convert_torchvggish_state_dict(original, pca, config)
    assert len(converted) == len(original) + 2
    assert all(key.startswith(AUDIO_ENCODER_PREFIX) for key in converted)
    network, pca_back = torchvggish_state_dict_from_ours(converted, config)
    assert network.keys() == original.keys() and pca_back.keys() == pca.keys()
    assert all(torch.equal(network[key], original[key]) for key in original)
    assert all(torch.equal(pca_back[key], pca[key]) for key in pca)
    # and the encoder loads it strictly
    encoder = VggishAudioEncoder(VggishConfig(**sizes, postprocess=True))
    load_audio_encoder(encoder, converted)


def test_conversion_takes_torchvggish_module_state_dicts_and_is_strict():
    config = VggishConfig(**TINY_VGGISH)
    original = TorchvggishLayout(config).state_dict()
    pca = random_pca(config.embedding_size)
    # torchvggish's VGGish module holds the PCA as `pproc.*`, the means as a column
    module_state = {
        **original,
        "pproc.pca_eigen_vectors": torch.from_numpy(pca["pca_eigen_vectors"]),
        "pproc.pca_means": torch.from_numpy(pca["pca_means"])[:, None],
    }
    from_module = convert_torchvggish_state_dict(module_state, config=config)
    from_file = convert_torchvggish_state_dict(original, pca, config)
    assert from_module.keys() == from_file.keys()
    assert all(torch.equal(from_module[key], from_file[key]) for key in from_file)
    with pytest.raises(ValueError, match="give one"):
        convert_torchvggish_state_dict(module_state, pca, config)

    missing = {key: value for key, value in original.items() if key != "features.13.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['features\.13\.bias'\]"):
        convert_torchvggish_state_dict(missing, config=config)
    with pytest.raises(ValueError, match=r"unknown keys \['features\.16\.weight'\]"):
        convert_torchvggish_state_dict({**original, "features.16.weight": torch.zeros(1)}, config=config)
    with pytest.raises(ValueError, match=r"embeddings\.4\.weight \(13, 32\) \(expected \(12, 32\)\)"):
        convert_torchvggish_state_dict({**original, "embeddings.4.weight": torch.zeros(13, 32)}, config=config)
    # the tiny file against the real VGGish's sizes (the default)
    with pytest.raises(ValueError, match="wrong shape"):
        convert_torchvggish_state_dict(original)
    misnamed = {"pca_eigen_vectors": pca["pca_eigen_vectors"], "pca_mean": pca["pca_means"]}
    with pytest.raises(ValueError, match=r"unknown keys \['pca_mean'\], missing keys \['pca_means'\]"):
        convert_torchvggish_state_dict(original, misnamed, config)


def make_inputs(batch_size: int = 2, num_frames: int = 3, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(batch_size, num_frames, 3, 64, 64, generator=generator),
        "input_ids": torch.randint(3, 40, (batch_size, 6), generator=generator),
        "labels": (torch.rand(batch_size, num_frames, 32, 32, generator=generator) > 0.5).float(),
    }


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return RefAvsForReferringSegmentation(tiny_refavs_config()).eval()


def test_log_mel_examples_in_equal_their_vggish_features(tiny_model):
    examples = 3 * torch.randn(2, 3, 96, 64, generator=torch.Generator().manual_seed(3))
    inputs = make_inputs()
    with torch.no_grad():
        features = tiny_model.audio_encoder(examples)
        from_examples = tiny_model(**inputs, audio_input_features=examples)
        from_features = tiny_model(**inputs, audio_features=features)
    assert features.shape == (2, 3, 12)
    assert torch.equal(from_examples.logits, from_features.logits)
    assert torch.equal(from_examples.audio_embeds, from_features.audio_embeds)


def test_audio_inputs_are_checked(tiny_model):
    inputs = make_inputs()
    examples = torch.randn(2, 3, 96, 64)
    with pytest.raises(ValueError, match="exactly one"):
        tiny_model(**inputs)
    with pytest.raises(ValueError, match="exactly one"):
        tiny_model(**inputs, audio_features=torch.randn(2, 3, 12), audio_input_features=examples)
    with pytest.raises(ValueError, match=r"\(\.\.\., 96, 64\)"):
        tiny_model(**inputs, audio_input_features=torch.randn(2, 3, 64, 96))
    without_vggish = RefAvsForReferringSegmentation(tiny_refavs_config(with_vggish=False)).eval()
    assert without_vggish.audio_encoder is None
    with pytest.raises(ValueError, match="no audio encoder"):
        without_vggish(**inputs, audio_input_features=examples)
    with pytest.raises(ValueError, match="embedding_size"):
        tiny_refavs_config(audio_feature_dim=16)


def test_vggish_is_frozen_and_never_trained(tmp_path):
    torch.manual_seed(0)
    model = RefAvsForReferringSegmentation(tiny_refavs_config(audio_config=TINY_VGGISH | {"postprocess": True}))
    assert not any(parameter.requires_grad for parameter in model.audio_encoder.parameters())
    assert torch.equal(model.audio_encoder.postprocessor.pca_eigen_vectors, torch.eye(12))
    model.audio_encoder.postprocessor.pca_means.fill_(0.25)
    model.save_pretrained(tmp_path)
    # from_pretrained hands back parameters that require grad; VGGish still gets none
    reloaded = AutoModel.from_pretrained(tmp_path)
    assert torch.equal(reloaded.audio_encoder.postprocessor.pca_means, torch.full((12,), 0.25))
    reloaded.requires_grad_(True)
    output = reloaded(**make_inputs(), audio_input_features=torch.randn(2, 3, 96, 64))
    output.loss.backward()
    assert all(parameter.grad is None for parameter in reloaded.audio_encoder.parameters())
    assert reloaded.audio_projection[0].weight.grad is not None
