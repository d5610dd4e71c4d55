"""An offline tiny RoBERTa tokenizer (byte-level BPE, RoBERTa's special tokens), for tiny EEMC models and tests."""

from collections.abc import Sequence

from transformers import RobertaTokenizer

from .tokenizer import learn_byte_level_merges


# RoBERTa's special tokens at DistilRoBERTa's ids: <s> = 0, <pad> = 1, </s> = 2, <unk> = 3 (<mask> comes last)
ROBERTA_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
# Text the tiny tokenizer learns its merges from: Ref-AVS-style expressions (audio, visual and temporal cues)
_TINY_REFAVS_CORPUS = [
    "The sounding object. The first object to make a sound. The last object to make a sound.",
    "The object making the loudest sound. The object making a continuous sound with a faster rhythm.",
    "The man playing the guitar on the left. The dog that barks. The woman who is singing on the right.",
    "The red circle. The blue square. The green triangle that makes a sound.",
]


def build_tiny_refavs_tokenizer(num_merges: int = 64, extra_corpus: Sequence[str] = ()) -> RobertaTokenizer:
    """
    A byte-level BPE tokenizer with RoBERTa's conventions, built offline: the 4 special tokens at DistilRoBERTa's ids
    (`<s>` = 0, `<pad>` = 1, `</s>` = 2, `<unk>` = 3), the 256 byte symbols in GPT-2 order, `num_merges` merges learned
    from Ref-AVS-style expressions (and `extra_corpus`), then `<mask>`. Its vocabulary is
    `4 + 256 + num_merges + 1` tokens at most (fewer when a merge repeats a symbol).
    """
    byte_symbols, merges = learn_byte_level_merges(_TINY_REFAVS_CORPUS + list(extra_corpus), num_merges)

    vocab = {token: index for index, token in enumerate(ROBERTA_SPECIAL_TOKENS)}
    for symbol in byte_symbols:
        vocab[symbol] = len(vocab)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab["<mask>"] = len(vocab)
    return RobertaTokenizer(vocab=vocab, merges=merges)


__all__ = ["ROBERTA_SPECIAL_TOKENS", "build_tiny_refavs_tokenizer"]
