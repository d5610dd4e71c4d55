"""
VGGish (Hershey et al., "CNN Architectures for Large-Scale Audio Classification", ICASSP 2017), the audio encoder
whose features EEMC takes, with the output the original gets from it.

The original runs VGGish inside its dataset through towhee: `ops.audio_decode.ffmpeg()` then
`ops.audio_embedding.vggish()` (GeWu-Lab/Ref-AVS, datasets/dataset_refavs.py, f0fbef3). What that gives:

* The network is towhee's `VGG` (towhee-io/towhee, towhee/models/vggish/torch_vggish.py at tag 1.1.3, 8df87d6, the
  `towhee.models` the original pins; the file is unchanged from c665ef8 to fe85630): torchvggish's layout (3x3
  convolutions 64 | 128 | 256, 256 | 512, 512 with ReLUs, a 2x2 max-pool after each group, the map flattened
  channel-last, then linear layers 12288 -> 4096 -> 4096 -> 128 with ReLUs between them) with the ReLU after the last
  linear layer commented out. torchvggish (harritaylor/torchvggish f3f9096, torchvggish/vggish.py) keeps that ReLU.
* No post-processing: the operator's published README (towhee.io/audio-embedding/vggish, README.md on branch main)
  shows its (10, 128) float32 result for a 10 s clip starting -0.4931737, -0.40068552, -0.032327592: negative
  values, so neither a final ReLU nor AudioSet's PCA + 8-bit quantisation (torchvggish's `Postprocessor`, values
  0..255) is applied. (The operator's own code, on the towhee hub, could not be read from here.)
* Weights: towhee's `VGG` has the state-dict keys of torchvggish's, so torchvggish's `vggish-10086976.pth` loads into
  it, and `conversion_vggish` converts that file. The operator ships its own `vggish.pth` on the towhee hub, which
  could not be read from here: that it holds the same numbers is not verified.

`VggishConfig(final_relu=True, postprocess=True)` gives torchvggish's default output instead (PCA parameters from
torchvggish's `vggish_pca_params-970ea276.pth`).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_refavs import VggishConfig


# AudioSet's quantisation range for the PCA-whitened embedding (vggish_params.QUANTIZE_MIN_VAL / QUANTIZE_MAX_VAL)
QUANTIZE_MIN = -2.0
QUANTIZE_MAX = 2.0


class VggishConvStage(nn.Module):
    """3x3 convolutions with padding 1, each followed by a ReLU, then a 2x2 max-pool."""

    def __init__(self, in_channels: int, channels: list[int]):
        super().__init__()
        widths = [in_channels, *channels]
        self.convs = nn.ModuleList(nn.Conv2d(c_in, c_out, 3, padding=1) for c_in, c_out in zip(widths, widths[1:]))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            hidden_states = F.relu(conv(hidden_states))
        return F.max_pool2d(hidden_states, 2)


class VggishPostprocessor(nn.Module):
    """
    AudioSet's post-processing of VGGish embeddings (torchvggish's `Postprocessor`): PCA with whitening, clipping to
    [-2, 2] and 8-bit quantisation; the result holds the integers 0..255 as floats.
    """

    def __init__(self, embedding_size: int):
        super().__init__()
        # (output_dims, input_dims) and (input_dims,); the identity and zeros until real parameters are loaded
        self.register_buffer("pca_eigen_vectors", torch.eye(embedding_size))
        self.register_buffer("pca_means", torch.zeros(embedding_size))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        whitened = (embeddings - self.pca_means) @ self.pca_eigen_vectors.T
        clipped = whitened.clamp(QUANTIZE_MIN, QUANTIZE_MAX)
        return torch.round((clipped - QUANTIZE_MIN) * (255.0 / (QUANTIZE_MAX - QUANTIZE_MIN)))


class VggishAudioEncoder(nn.Module):
    """VGGish: log-mel examples (..., num_frames, num_mel_bins) -> one embedding per example (..., embedding_size)."""

    def __init__(self, config: VggishConfig):
        super().__init__()
        self.num_frames = config.num_frames
        self.num_mel_bins = config.num_mel_bins
        self.final_relu = config.final_relu
        in_channels = [1] + [channels[-1] for channels in config.conv_channels[:-1]]
        self.stages = nn.ModuleList(
            VggishConvStage(c_in, channels) for c_in, channels in zip(in_channels, config.conv_channels)
        )
        widths = [config.flattened_size, *config.hidden_sizes]
        self.hidden_layers = nn.ModuleList(nn.Linear(c_in, c_out) for c_in, c_out in zip(widths, widths[1:]))
        self.embedding = nn.Linear(widths[-1], config.embedding_size)
        self.postprocessor = VggishPostprocessor(config.embedding_size) if config.postprocess else None

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        if input_features.dim() < 3 or tuple(input_features.shape[-2:]) != (self.num_frames, self.num_mel_bins):
            raise ValueError(
                f"VGGish takes log-mel examples of shape (..., {self.num_frames}, {self.num_mel_bins}); got "
                f"{tuple(input_features.shape)}."
            )
        leading = input_features.shape[:-2]
        hidden_states = input_features.reshape(-1, 1, self.num_frames, self.num_mel_bins)
        hidden_states = hidden_states.to(self.embedding.weight.dtype)
        for stage in self.stages:
            hidden_states = stage(hidden_states)
        # (n, C, h, w) -> (n, h, w, C) -> (n, h*w*C): flattened channel-last, as the TensorFlow original
        hidden_states = hidden_states.permute(0, 2, 3, 1).flatten(1)
        for layer in self.hidden_layers:
            hidden_states = F.relu(layer(hidden_states))
        embeddings = self.embedding(hidden_states)
        if self.final_relu:
            embeddings = F.relu(embeddings)
        if self.postprocessor is not None:
            embeddings = self.postprocessor(embeddings)
        return embeddings.reshape(*leading, -1)
