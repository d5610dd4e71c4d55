"""Everything between raw files and OISA's tensors: tokenizer, media, prompts, processors, data, metrics."""

from .tokenization_oisa import OISA_SPECIAL_TOKENS, build_tiny_tokenizer


__all__ = ["OISA_SPECIAL_TOKENS", "build_tiny_tokenizer"]
