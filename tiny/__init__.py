"""
Tiny OISA models for tests, examples, benchmarks and `oisa tiny-random`: configs with the full architecture at test
size, an offline tokenizer carrying OISA's special tokens, and the writer of a random-weight checkpoint.
"""

from .checkpoint import write_tiny_random
from .models import init_tiny_synthetic_weights, tiny_oisa_config, tiny_synthetic_config
from .tokenizer import build_tiny_tokenizer


__all__ = [
    "build_tiny_tokenizer",
    "init_tiny_synthetic_weights",
    "tiny_oisa_config",
    "tiny_synthetic_config",
    "write_tiny_random",
]
