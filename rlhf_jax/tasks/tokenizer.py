"""A real `tokenizer.json` for the built-in task, trained locally (no hub download).

Byte-level BPE, so any text round-trips (users may type anything into `rlhf-jax generate`),
with a pad token distinct from EOS (N-implementation-details #2).
"""

from __future__ import annotations

from collections.abc import Iterable

PAD, EOS, BOS = "<pad>", "<eos>", "<bos>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """Train a byte-level BPE tokenizer; returns a `transformers.PreTrainedTokenizerFast`.

    Special ids are fixed: <pad> = 0, <eos> = 1, <bos> = 2.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS, BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        padding_side="left",
    )
