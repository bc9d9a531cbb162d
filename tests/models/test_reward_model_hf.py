"""Reward models in and out as transformers sequence-classification models: a transformers RM
scores the same in rlhf_jax, and an rlhf_jax RM loads in transformers with the same scores
(up to the documented bias, written to config.json)."""

import json

import jax
import numpy as np
import pytest
from hf_fixtures import FAMILIES, VOCAB, _hf_config

from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.models import (
    init_scalar_head,
    load_hf,
    load_scalar_model,
    save_scalar_model,
    scalar_forward,
    value_at_last_token,
)

PAD = 0


def _torch_rm(family: str, seed: int = 0):
    import torch
    import transformers

    config = _hf_config(family)
    config.num_labels = 1
    config.pad_token_id = PAD
    torch.manual_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    with torch.no_grad():  # the score head starts near zero; make the rewards clearly differ
        model.score.weight.normal_(0.0, 0.5)
    return model.float().eval()


def _batch(seed: int = 0):
    """Right-padded rows of unequal length; no real token is the pad id."""
    rng = np.random.default_rng(seed)
    lengths = [9, 5, 12, 3]
    ids = np.full((len(lengths), 12), PAD, np.int32)
    mask = np.zeros_like(ids, dtype=np.float32)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(3, VOCAB, n)
        mask[i, :n] = 1
    return ids, mask


def _torch_scores(model, ids, mask) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)
        )
    return out.logits[:, 0].numpy()


def _jax_scores(config, params, ids, mask) -> np.ndarray:
    values = scalar_forward(config, params, ids, mask)
    return np.asarray(value_at_last_token(values, mask))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_transformers_reward_model_scores_the_same_in_rlhf_jax(family, tmp_path):
    model = _torch_rm(family)
    model.save_pretrained(str(tmp_path))
    config, params = load_scalar_model(tmp_path)
    ids, mask = _batch()
    np.testing.assert_allclose(
        _jax_scores(config, params, ids, mask),
        _torch_scores(model, ids, mask),
        atol=1e-4,
        rtol=1e-4,
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_an_rlhf_jax_reward_model_loads_in_transformers(family, tmp_path):
    """Trunk and head out through `save_scalar_model`, in through transformers' Auto class:
    the same scores, once the bias written to config.json is added."""
    import transformers

    source = tmp_path / "source"
    _torch_rm(family, seed=1).save_pretrained(str(source))
    config, params = load_scalar_model(source)
    params = {"trunk": params["trunk"], "head": init_scalar_head(config, jax.random.key(3))}
    params["head"]["bias"] = params["head"]["bias"] + 0.75  # a demonstration-mean shift
    out = tmp_path / "saved"
    save_scalar_model(config, params, out)
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"][0].endswith("ForSequenceClassification")
    assert saved["num_labels"] == 1 and saved["rlhf_jax_reward_bias"] == pytest.approx(0.75)
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    ids, mask = _batch(1)
    ours = _jax_scores(config, params, ids, mask)
    np.testing.assert_allclose(_torch_scores(loaded, ids, mask) + 0.75, ours, atol=1e-4, rtol=1e-4)
    back_config, back = load_scalar_model(out)  # and back into rlhf_jax, bias included
    np.testing.assert_allclose(_jax_scores(back_config, back, ids, mask), ours, atol=1e-5)


def test_a_reward_model_is_not_a_language_model_and_back(hf_checkpoint, tmp_path):
    _torch_rm("llama").save_pretrained(str(tmp_path))
    with pytest.raises(RlhfJaxError, match="holds a sequence-classification"):
        load_hf(tmp_path)
    with pytest.raises(RlhfJaxError, match="not a reward model: no score.weight"):
        load_scalar_model(hf_checkpoint("llama"))


def test_a_multi_label_classifier_is_not_a_reward_model(tmp_path):
    import torch
    import transformers

    config = _hf_config("qwen2")
    config.num_labels, config.pad_token_id = 3, PAD
    transformers.AutoModelForSequenceClassification.from_config(
        config, dtype=torch.float32
    ).save_pretrained(str(tmp_path))
    with pytest.raises(RlhfJaxError, match=r"score.weight has shape \[3, 64\]; a reward model"):
        load_scalar_model(tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_pad_equal_to_eos_reads_the_token_transformers_reads(family, tmp_path):
    """A tiny checkpoint with pad_token_id == eos_token_id (GPT-2 style, as TRL sets it):
    transformers reads the rightmost token that is not the pad id, the one before the EOS;
    `score_sequences` reads the same one, for right- and left-padded rows."""
    from rlhf_jax.steps.reward import score_sequences

    eos = 2
    model = _torch_rm(family)
    model.config.pad_token_id = eos
    model.save_pretrained(str(tmp_path))
    config, params = load_scalar_model(tmp_path)
    assert config.pad_token_id == eos
    rng = np.random.default_rng(5)
    rows = [rng.integers(3, VOCAB, n).tolist() + [eos] for n in (6, 3, 9)]
    width = 12
    # Left-padded rows too, except for GPT-2: transformers' GPT-2 numbers padding positions
    # too (its positions do not come from the mask), so its left-padded logits differ anyway.
    sides = ("right",) if family == "gpt2" else ("right", "left")
    ids = np.full((len(sides) * len(rows), width), eos, np.int32)
    mask = np.zeros(ids.shape, np.float32)
    for i, seq in enumerate(rows):
        ids[i, : len(seq)], mask[i, : len(seq)] = seq, 1
        if "left" in sides:
            j = len(rows) + i
            ids[j, width - len(seq) :], mask[j, width - len(seq) :] = seq, 1
    ours = np.asarray(score_sequences(config, params, ids, mask))
    np.testing.assert_allclose(ours, _torch_scores(model, ids, mask), atol=1e-4, rtol=1e-4)
    # ... which is not the EOS's own score (what the mask's last real token would give)
    at_eos = _jax_scores(config, params, ids[: len(rows)], mask[: len(rows)])
    assert np.all(np.abs(at_eos - ours[: len(rows)]) > 1e-3)
