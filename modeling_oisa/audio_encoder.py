"""OISA's Whisper encoder: crops the padded mel to the batch's longest clip, masks padding, then pools by two."""

import torch
from torch import nn
from transformers import WhisperConfig
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.whisper.modeling_whisper import WhisperEncoder


def audio_lengths_after_conv(mel_lengths: torch.Tensor) -> torch.Tensor:
    """Frames after Whisper's stride-2 convolution: ceil(mel_length / 2)."""
    return (mel_lengths - 1) // 2 + 1


def audio_token_counts(mel_lengths: torch.Tensor) -> torch.Tensor:
    """LLM tokens of each clip after the stride-2 pooling: about 25 per second, 750 for 30 s."""
    return (audio_lengths_after_conv(mel_lengths) - 2) // 2 + 1


class OisaAudioEncoder(WhisperEncoder):
    """
    The Whisper-large-v3 encoder as OISA runs it (same weights as `WhisperEncoder`). Unlike the stock encoder it takes
    clips shorter than 30 s: the mel is cropped to twice the longest clip's post-convolution length, positions past a
    clip's end are zeroed and masked as keys in every layer, and the output is layer-normed then average-pooled by 2.
    """

    def __init__(self, config: WhisperConfig):
        super().__init__(config)
        self.avg_pooler = nn.AvgPool1d(kernel_size=2, stride=2)

    def forward(
        self, input_features: torch.Tensor, feature_lengths: torch.Tensor | None = None, **kwargs
    ) -> BaseModelOutput:
        """
        input_features (B, mel_bins, frames) log-mel features padded to 30 s; feature_lengths (B,) the number of real
        mel frames of each clip (all frames when omitted). Returns `last_hidden_state` (B, L // 2, d_model) where L is
        the longest clip's post-convolution length; rows past `audio_token_counts(feature_lengths)` are padding.
        """
        if feature_lengths is None:
            feature_lengths = torch.full(
                (input_features.shape[0],), input_features.shape[-1], dtype=torch.long, device=input_features.device
            )
        lengths = audio_lengths_after_conv(feature_lengths.to(input_features.device))
        max_length = int(lengths.max())
        if max_length > self.config.max_source_positions:
            raise ValueError(
                f"Audio of {int(feature_lengths.max())} mel frames exceeds the encoder's "
                f"{2 * self.config.max_source_positions} frames (30 s)."
            )
        input_features = input_features[..., : 2 * max_length].to(self.conv1.weight.dtype)

        hidden_states = nn.functional.gelu(self.conv1(input_features))
        hidden_states = nn.functional.gelu(self.conv2(hidden_states)).permute(0, 2, 1)
        hidden_states = hidden_states + self.embed_positions.weight[: hidden_states.shape[1]]

        # (B, L) with True at real positions; padded positions are zeroed and hidden from every key
        valid = torch.arange(hidden_states.shape[1], device=hidden_states.device)[None, :] < lengths[:, None]
        hidden_states = hidden_states * valid[..., None].to(hidden_states.dtype)
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        attention_mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=hidden_states, attention_mask=valid.long()
        )
        for encoder_layer in self.layers:
            hidden_states = encoder_layer(hidden_states, attention_mask, **kwargs)

        hidden_states = self.layer_norm(hidden_states)
        hidden_states = self.avg_pooler(hidden_states.permute(0, 2, 1)).permute(0, 2, 1)
        return BaseModelOutput(last_hidden_state=hidden_states)
