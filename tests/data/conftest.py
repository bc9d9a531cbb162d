import pytest

CORPUS = ["the red fox runs near the river. a calm owl sings at night."] * 30
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _train():
    from rlhf_jax.tasks.tokenizer import train_tokenizer

    return train_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture(scope="session")
def tok():
    """The built-in byte-level BPE: pad 0, eos 1, bos 2, no special tokens added, no template."""
    return _train()


@pytest.fixture(scope="session")
def bos_tok():
    """Like `tok`, but encoding with special tokens gives `<bos> text <eos>` (Llama-like)."""
    from tokenizers import processors

    t = _train()
    t.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 1)]
    )
    return t


@pytest.fixture(scope="session")
def chat_tok():
    t = _train()
    t.chat_template = CHAT_TEMPLATE
    return t


@pytest.fixture(scope="session")
def nopad_tok():
    t = _train()
    t.pad_token = None
    return t
