"""A tiny OISA configuration with the full architecture, for tests, examples and benchmarks."""

from typing import TYPE_CHECKING

import torch
from torch import nn

from modeling_oisa.configuration_oisa import OisaConfig


if TYPE_CHECKING:
    from modeling_oisa.modeling_oisa import OisaForReferringSegmentation


# the InternViT of the tiny models, 4 layers 64 wide; each sets its own image and patch size
TINY_VISION = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "attention_bias": True,
    "use_qk_norm": False,
    "norm_type": "layer_norm",
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu",
    "use_mean_pooling": True,
}
# std of the LLM's query and key projections in OISA-tiny-synthetic before training (initializer_range is 0.02)
SYNTHETIC_ATTENTION_INIT_STD = 0.1
# factor on the initial weights of the [SEG] projection's last layer
SYNTHETIC_SEG_PROJECTION_GAIN = 16.0
# channels of the adapter's convolutional stem in OISA-tiny-synthetic, as in OISA-1B: trained from scratch on still
# images whose shapes share one colour, its masks of named shapes reach a mean IoU of 0.76 after 1000 steps, against
# 0.61 with 16 channels
ADAPTER_CONV_INPLANE = 64


def _tiny_qwen2_config(
    vocab_size: int,
    bos_token_id: int,
    eos_token_id: int,
    hidden_size: int,
    num_layers: int,
    max_positions: int,
    rope_theta: float,
) -> dict:
    """The Qwen2 `text_config` of a tiny OISA: 4 heads over 2 key-value heads, an MLP twice the width, untied head."""
    return {
        "model_type": "qwen2",
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 2 * hidden_size,
        "hidden_act": "silu",
        "vocab_size": vocab_size,
        "max_position_embeddings": max_positions,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"},
        "tie_word_embeddings": False,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
    }


def tiny_oisa_config(
    vocab_size: int = 400,
    image_token_id: int = 384,
    audio_token_id: int = 393,
    seg_token_id: int = 396,
    sub_audio_token_id: int = 399,
    bos_token_id: int = 379,
    eos_token_id: int = 381,
    **overrides,
) -> OisaConfig:
    """
    OISA at the sizes of the original's tiny reference model: 224-pixel frames, a 4-layer 64-wide InternViT, a
    2-layer 64-wide Qwen2 and Whisper encoder, one pixel-decoder layer and three query-decoder layers. The mask head
    keeps its real widths (256), which the `[SEG]` projection requires. Token ids default to those of the tiny
    tokenizer that `processing_oisa` builds.
    """
    config = {
        "vision_config": {**TINY_VISION, "image_size": 224, "patch_size": 14},
        "text_config": _tiny_qwen2_config(
            vocab_size, bos_token_id, eos_token_id, hidden_size=64, num_layers=2, max_positions=32768, rope_theta=1e6
        ),
        "audio_config": {
            "model_type": "whisper",
            "d_model": 64,
            "encoder_layers": 2,
            "encoder_attention_heads": 4,
            "encoder_ffn_dim": 128,
            "num_mel_bins": 128,
            "max_source_positions": 1500,
            "activation_function": "gelu",
            "encoder_layerdrop": 0.0,
        },
        "adapter_conv_inplane": 16,
        "adapter_interaction_indexes": [[0, 0], [1, 1], [2, 2], [3, 3]],
        "pixel_decoder_layers": 1,
        "pixel_decoder_ffn_dim": 64,
        "query_decoder_layers": 3,
        "query_decoder_ffn_dim": 64,
        "image_token_id": image_token_id,
        "audio_token_id": audio_token_id,
        "seg_token_id": seg_token_id,
        "sub_audio_token_id": sub_audio_token_id,
    }
    config.update(overrides)
    return OisaConfig(**config)


def tiny_synthetic_config(
    vocab_size: int,
    image_token_id: int,
    audio_token_id: int,
    seg_token_id: int,
    sub_audio_token_id: int,
    bos_token_id: int,
    eos_token_id: int,
) -> OisaConfig:
    """
    OISA-tiny-synthetic: the full architecture at a few million parameters, sized to be trained on CPU on the synthetic
    moving-shapes task (128-pixel frames in 16-pixel patches, a 3-layer 128-wide Qwen2, a 64-wide mask head, the
    adapter's convolutional stem 64 channels wide), under the `fixed` profile. The token ids are those of the
    synthetic tokenizer.
    """
    text = _tiny_qwen2_config(
        vocab_size, bos_token_id, eos_token_id, hidden_size=128, num_layers=3, max_positions=4096, rope_theta=1e4
    )
    return tiny_oisa_config(
        vocab_size=vocab_size,
        image_token_id=image_token_id,
        audio_token_id=audio_token_id,
        seg_token_id=seg_token_id,
        sub_audio_token_id=sub_audio_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        vision_config={**TINY_VISION, "image_size": 128, "patch_size": 16},
        text_config=text,
        mask_hidden_dim=64,
        mask_feature_dim=64,
        mask_num_heads=4,
        seg_token_projection_dim=128,
        pixel_decoder_ffn_dim=128,
        query_decoder_ffn_dim=128,
        adapter_deform_num_heads=4,
        adapter_conv_inplane=ADAPTER_CONV_INPLANE,
        profile="fixed",
    )


@torch.no_grad()
def init_tiny_synthetic_weights(model: "OisaForReferringSegmentation") -> None:
    """
    Re-draws two parts of a freshly initialised OISA-tiny-synthetic; without them, training from scratch stalls on
    masks that cover every object whatever the expression:

    - the LLM's query and key projections with std 0.1 instead of `initializer_range`: at 0.02 the attention logits
      are near zero, the `[SEG]` position averages the whole prompt evenly and its state barely depends on the
      expression (states of different expressions differ by 0.1% of their norm); at 0.3 the softmax saturates on one
      token and training finds a single feature (the word "triangle") that it cannot leave; at 0.1 (logits of std
      about 1) the `[SEG]` state learns to follow the colour word or the shape word, depending on the draw;
    - the `[SEG]` projection's last layer scaled up so that the query it gives the mask decoder is as large as the
      image memory the decoder adds to it (its level embeddings have std 1); a small query is erased by the
      decoder's first post-norm residual and no mask depends on it.
    """
    for module in model.language_model.modules():
        for name in ("q_proj", "k_proj"):
            projection = getattr(module, name, None)
            if isinstance(projection, nn.Linear):
                projection.weight.normal_(0.0, SYNTHETIC_ATTENTION_INIT_STD)
    last_linear = model.mask_head.query_decoder.seg_token_projection.layers[-1].layers[0]
    last_linear.weight.mul_(SYNTHETIC_SEG_PROJECTION_GAIN)
