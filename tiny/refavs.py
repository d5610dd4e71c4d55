"""A tiny EEMC (`modeling_refavs`) configuration with the full architecture, for tests, examples and benchmarks."""

from modeling_refavs import RefAvsConfig


# Mask2Former on a 4-stage Swin whose last stage is 128 wide (the fusion width), for 64x64 frames
TINY_MASK2FORMER = {
    "backbone_config": {
        "model_type": "swin",
        "embed_dim": 16,
        "depths": [1, 1, 1, 2],
        "num_heads": [1, 2, 2, 4],
        "window_size": 2,
        "image_size": 64,
        "out_features": ["stage1", "stage2", "stage3", "stage4"],
    },
    "num_labels": 3,
    "num_queries": 8,
    "hidden_dim": 32,
    "feature_size": 32,
    "mask_feature_size": 32,
    "num_attention_heads": 4,
    "encoder_layers": 1,
    "decoder_layers": 3,
    "encoder_feedforward_dim": 32,
    "dim_feedforward": 32,
}
# a one-layer RoBERTa over a 40-token vocabulary
TINY_TEXT = {
    "model_type": "roberta",
    "vocab_size": 40,
    "hidden_size": 24,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 40,
    "type_vocab_size": 1,
    "pad_token_id": 1,
}
# VGGish's layout (1, 1, 2, 2 convolutions in four pooled stages, two hidden layers) at test widths; it takes the real
# 96 x 64 log-mel examples, so the front end is the same as for the released model
TINY_VGGISH = {
    "conv_channels": [[4], [8], [8, 8], [16, 16]],
    "hidden_sizes": [32, 32],
    "embedding_size": 12,
}


def tiny_refavs_config(profile: str = "release", with_vggish: bool = True, **overrides) -> RefAvsConfig:
    """
    A tiny EEMC: 64x64 frames, a 40-token vocabulary, 12-wide audio features and, with `with_vggish`, a tiny VGGish that
    computes them from log-mel examples. `overrides` replace any `RefAvsConfig` argument.
    """
    values = {
        "mask2former_config": TINY_MASK2FORMER,
        "text_config": TINY_TEXT,
        "audio_config": TINY_VGGISH if with_vggish else None,
        "audio_feature_dim": TINY_VGGISH["embedding_size"],
        "fusion_dim": 128,
        "projection_hidden_dim": 48,
        "fusion_num_heads": 4,
        "prompt_num_heads": 4,
        "adapter_hidden_dim": 8,
        "mask_size": 32,
        "profile": profile,
    }
    values.update(overrides)
    return RefAvsConfig(**values)
