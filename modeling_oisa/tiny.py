"""A tiny OISA configuration with the full architecture, for tests, examples and benchmarks."""

from .configuration_oisa import OisaConfig


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
        "vision_config": {
            "hidden_size": 64,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "attention_bias": True,
            "use_qk_norm": False,
            "norm_type": "layer_norm",
            "layer_norm_eps": 1e-6,
            "hidden_act": "gelu",
            "image_size": 224,
            "patch_size": 14,
            "use_mean_pooling": True,
        },
        "text_config": {
            "model_type": "qwen2",
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 128,
            "hidden_act": "silu",
            "vocab_size": vocab_size,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
            "tie_word_embeddings": False,
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
        },
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
