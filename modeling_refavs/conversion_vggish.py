"""
torchvggish's VGGish state dict to our audio encoder's (`RefAvsForReferringSegmentation.audio_encoder`) and back.

torchvggish (harritaylor/torchvggish f3f9096, `hubconf.py`) publishes two files with its v0.1 release, named by
torch.hub's convention with the first 8 hex digits of their SHA-256:

* `vggish-10086976.pth`: the network, `features.{i}.weight|bias` for the convolutions of an `nn.Sequential` of
  (conv, ReLU) pairs with a max-pool after each stage (indices 0, 3, 6, 8, 11, 13) and `embeddings.{i}.weight|bias`
  for the linear layers (0, 2, 4);
* `vggish_pca_params-970ea276.pth`: AudioSet's PCA, `pca_eigen_vectors` (128, 128) and `pca_means` (128,), possibly
  as NumPy arrays (torchvggish casts them to float32 and reshapes the means to a column when it loads them).

The map is strict: a key of neither file, a missing key or a wrong shape is an error naming them. torchvggish's whole
`VGGish` module (built with `postprocess=True`) holds the PCA parameters as `pproc.pca_eigen_vectors` and
`pproc.pca_means` (means as a (128, 1) column); they are accepted in the network's state dict as well.
"""

from collections.abc import Mapping

import numpy as np
import torch

from .configuration_refavs import VggishConfig


# where the audio encoder sits in RefAvsForReferringSegmentation
AUDIO_ENCODER_PREFIX = "audio_encoder."
PCA_KEYS = ("pca_eigen_vectors", "pca_means")
# torchvggish's `VGGish` module holds its `Postprocessor` under this name
TORCHVGGISH_POSTPROCESSOR_PREFIX = "pproc."


def torchvggish_key_map(config: VggishConfig) -> dict[str, str]:
    """torchvggish's network keys -> ours (with `AUDIO_ENCODER_PREFIX`) for the VGGish of `config`."""
    mapping = {}
    index = 0  # position in torchvggish's `features` Sequential
    for stage, channels in enumerate(config.conv_channels):
        for conv in range(len(channels)):
            for name in ("weight", "bias"):
                mapping[f"features.{index}.{name}"] = f"{AUDIO_ENCODER_PREFIX}stages.{stage}.convs.{conv}.{name}"
            index += 2  # the convolution and its ReLU
        index += 1  # the stage's max-pool
    linear_layers = [f"hidden_layers.{layer}" for layer in range(len(config.hidden_sizes))] + ["embedding"]
    for position, layer in enumerate(linear_layers):
        for name in ("weight", "bias"):
            # each linear layer is followed by a ReLU in torchvggish's `embeddings` Sequential
            mapping[f"embeddings.{2 * position}.{name}"] = f"{AUDIO_ENCODER_PREFIX}{layer}.{name}"
    return mapping


def torchvggish_shapes(config: VggishConfig) -> dict[str, tuple[int, ...]]:
    """The shape of each of torchvggish's network keys for the VGGish of `config`."""
    shapes = {}
    index, in_channels = 0, 1
    for channels in config.conv_channels:
        for out_channels in channels:
            shapes[f"features.{index}.weight"] = (out_channels, in_channels, 3, 3)
            shapes[f"features.{index}.bias"] = (out_channels,)
            index, in_channels = index + 2, out_channels
        index += 1
    widths = [config.flattened_size, *config.hidden_sizes, config.embedding_size]
    for position, (in_width, out_width) in enumerate(zip(widths, widths[1:])):
        shapes[f"embeddings.{2 * position}.weight"] = (out_width, in_width)
        shapes[f"embeddings.{2 * position}.bias"] = (out_width,)
    return shapes


def _check_keys(found: set[str], expected: set[str], what: str) -> None:
    unknown, missing = sorted(found - expected), sorted(expected - found)
    if unknown or missing:
        raise ValueError(
            f"{what} does not match the VGGish layout: unknown keys {unknown[:6]}"
            f"{f' and {len(unknown) - 6} more' if len(unknown) > 6 else ''}, missing keys {missing[:6]}"
            f"{f' and {len(missing) - 6} more' if len(missing) > 6 else ''}."
        )


def _check_shapes(tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]], what: str) -> None:
    wrong = [
        f"{key} {tuple(tensor.shape)} (expected {shapes[key]})"
        for key, tensor in tensors.items()
        if tuple(tensor.shape) != shapes[key]
    ]
    if wrong:
        raise ValueError(f"{what} has tensors of the wrong shape: {'; '.join(wrong[:4])}.")


def _pca_tensors(pca_params: Mapping[str, torch.Tensor | np.ndarray], embedding_size: int) -> dict[str, torch.Tensor]:
    """torchvggish's PCA parameters as float32 tensors, the means as a vector; checked against `embedding_size`."""
    _check_keys(set(pca_params), set(PCA_KEYS), "The PCA parameters")
    tensors = {key: torch.as_tensor(pca_params[key], dtype=torch.float32) for key in PCA_KEYS}
    means = tensors["pca_means"]
    if means.dim() == 2 and means.shape[1] == 1:
        tensors["pca_means"] = means[:, 0]
    _check_shapes(
        tensors,
        {"pca_eigen_vectors": (embedding_size, embedding_size), "pca_means": (embedding_size,)},
        "The PCA parameters",
    )
    return tensors


def convert_torchvggish_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    pca_params: Mapping[str, torch.Tensor | np.ndarray] | None = None,
    config: VggishConfig | None = None,
) -> dict[str, torch.Tensor]:
    """
    torchvggish's state dict (`vggish-10086976.pth`; also its `VGGish` module's, `pproc.*` included) and optionally its
    PCA parameters (`vggish_pca_params-970ea276.pth`) -> our keys, `audio_encoder.*` as in
    `RefAvsForReferringSegmentation`. `config` gives the sizes to check against (default: the real VGGish). The PCA
    parameters (`audio_encoder.postprocessor.*`) need a model whose `audio_config` has `postprocess=True`.
    """
    config = config if config is not None else VggishConfig()
    network = {key: value for key, value in state_dict.items() if not key.startswith(TORCHVGGISH_POSTPROCESSOR_PREFIX)}
    postprocessor = {
        key.removeprefix(TORCHVGGISH_POSTPROCESSOR_PREFIX): value
        for key, value in state_dict.items()
        if key.startswith(TORCHVGGISH_POSTPROCESSOR_PREFIX)
    }
    if postprocessor and pca_params is not None:
        raise ValueError("The state dict holds PCA parameters (pproc.*) and `pca_params` gives them again; give one.")
    mapping, shapes = torchvggish_key_map(config), torchvggish_shapes(config)
    _check_keys(set(network), set(mapping), "The torchvggish state dict")
    network = {key: torch.as_tensor(value) for key, value in network.items()}
    _check_shapes(network, shapes, "The torchvggish state dict")
    converted = {mapping[key]: tensor for key, tensor in network.items()}
    pca_params = postprocessor or pca_params
    if pca_params is not None:
        for key, tensor in _pca_tensors(pca_params, config.embedding_size).items():
            converted[f"{AUDIO_ENCODER_PREFIX}postprocessor.{key}"] = tensor
    return converted


def torchvggish_state_dict_from_ours(
    state_dict: Mapping[str, torch.Tensor], config: VggishConfig | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """
    The inverse of `convert_torchvggish_state_dict`: the `audio_encoder.*` keys of `state_dict` (others are ignored)
    -> (torchvggish's network state dict, its PCA parameters or None when the encoder has no post-processor).
    """
    config = config if config is not None else VggishConfig()
    ours_to_torchvggish = {ours: theirs for theirs, ours in torchvggish_key_map(config).items()}
    pca_keys = {f"{AUDIO_ENCODER_PREFIX}postprocessor.{key}": key for key in PCA_KEYS}
    audio = {key: value for key, value in state_dict.items() if key.startswith(AUDIO_ENCODER_PREFIX)}
    has_pca = any(key in pca_keys for key in audio)
    _check_keys(set(audio), set(ours_to_torchvggish) | (set(pca_keys) if has_pca else set()), "Our audio encoder")
    network = {ours_to_torchvggish[key]: value for key, value in audio.items() if key in ours_to_torchvggish}
    _check_shapes(network, torchvggish_shapes(config), "Our audio encoder")
    if not has_pca:
        return network, None
    return network, {pca_keys[key]: value for key, value in audio.items() if key in pca_keys}
