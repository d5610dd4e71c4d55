"""An offline tiny Qwen2 tokenizer that carries all of OISA's special tokens, for tiny models and tests."""

import json
from collections.abc import Sequence

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import Qwen2Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from processing_oisa.tokenization_oisa import CHAT_SPECIAL_TOKENS, NAMED_SPECIAL_TOKENS, OISA_SPECIAL_TOKENS


# Text the tiny tokenizer learns its merges from: the template, prompts and answers OISA uses.
_TINY_CORPUS = [
    "You are a helpful assistant. Please segment the object this sentence describes in this video: ",
    "the red circle the blue square the green triangle that makes a sound, referring audio is, referring image is",
    "Sure, it is . Explanation: No target matches this expression. and explain why. Frame1: Frame2: Frame3:",
    "the person who is speaking the dog that barks the instrument playing the loudest sound on the left right",
]


def learn_byte_level_merges(corpus: Sequence[str], num_merges: int) -> tuple[list[str], list[tuple[str, str]]]:
    """The 256 byte symbols in GPT-2 order and up to `num_merges` byte-level BPE merges learned from `corpus`."""
    byte_symbols = list(bytes_to_unicode().values())
    trainer = trainers.BpeTrainer(
        vocab_size=len(byte_symbols) + num_merges,
        initial_alphabet=byte_symbols,
        show_progress=False,
        special_tokens=[],
    )
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    learner.train_from_iterator(list(corpus) * 8, trainer=trainer)
    learned = json.loads(learner.to_str())["model"]["merges"]
    merges = [tuple(pair.split(" ")) if isinstance(pair, str) else tuple(pair) for pair in learned]
    return byte_symbols, merges[:num_merges]


def build_tiny_tokenizer(num_merges: int = 123, extra_corpus: Sequence[str] = ()) -> Qwen2Tokenizer:
    """
    A byte-level BPE Qwen2 tokenizer built offline: the 256 byte symbols in GPT-2 order (space = 220, as in Qwen2),
    `num_merges` merges learned from OISA's prompt strings (and `extra_corpus`), then the chat tokens and OISA's 18
    special tokens. With the defaults the special-token ids equal those of the original's tiny reference tokenizer.
    """
    byte_symbols, merges = learn_byte_level_merges(_TINY_CORPUS + list(extra_corpus), num_merges)

    vocab = {symbol: index for index, symbol in enumerate(byte_symbols)}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for token in CHAT_SPECIAL_TOKENS + OISA_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=NAMED_SPECIAL_TOKENS,
    )
    tokenizer.add_tokens(CHAT_SPECIAL_TOKENS + OISA_SPECIAL_TOKENS, special_tokens=True)
    return tokenizer
