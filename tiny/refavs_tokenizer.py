"""An offline tiny RoBERTa tokenizer (byte-level BPE, RoBERTa's special tokens), for tiny EEMC models and tests."""

import json
from collections.abc import Sequence

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import RobertaTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode


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
    byte_symbols = list(bytes_to_unicode().values())
    trainer = trainers.BpeTrainer(
        vocab_size=len(byte_symbols) + num_merges,
        initial_alphabet=byte_symbols,
        show_progress=False,
        special_tokens=[],
    )
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    learner.train_from_iterator((_TINY_REFAVS_CORPUS + list(extra_corpus)) * 8, trainer=trainer)
    learned = json.loads(learner.to_str())["model"]["merges"]
    merges = [tuple(pair.split(" ")) if isinstance(pair, str) else tuple(pair) for pair in learned][:num_merges]

    vocab = {token: index for index, token in enumerate(ROBERTA_SPECIAL_TOKENS)}
    for symbol in byte_symbols:
        vocab[symbol] = len(vocab)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab["<mask>"] = len(vocab)
    return RobertaTokenizer(vocab=vocab, merges=merges)


__all__ = ["ROBERTA_SPECIAL_TOKENS", "build_tiny_refavs_tokenizer"]
