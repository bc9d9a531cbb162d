"""Where a reward is read, and which reward models may score a policy.

With pad == EOS transformers' `*ForSequenceClassification` reads the token before the EOS (the
rightmost token that is not the pad id); rlhf_jax reads there too, both when `rlhf-jax rm`
trains a reward model and when one scores (checked against transformers' PyTorch model).
A reward model whose tokenizer maps tokens to other ids than the policy's (the same vocabulary
size is not enough), or whose reading would differ from the one it was trained for, is
refused by `rlhf-jax ppo` before anything loads, naming both folders.
"""

import json

import jax
import numpy as np
import pytest
from tiny import tiny_config

from rlhf_jax.cli import main
from rlhf_jax.models import init_params, init_scalar_head, load_scalar_model, save_hf
from rlhf_jax.models.hf.io import save_scalar_model
from rlhf_jax.steps.reward import score_sequences
from rlhf_jax.tasks.tokenizer import train_tokenizer

TEXT = ["the red fox runs near the river.", "a calm owl sings by the lake."] * 20
RANKINGS = [
    {"prompt": "the red", "completions": [" fox runs.", " owl sings."], "ranking": [0, 1]},
    {"prompt": "a calm", "completions": [" owl sings.", " fox runs near"], "ranking": [1, 0]},
] * 4


def _tokenizer(pad_is_eos: bool, corpus=TEXT):
    tokenizer = train_tokenizer(corpus, vocab_size=300)
    if pad_is_eos:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _policy(path, tokenizer):
    config = tiny_config(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    save_hf(config, init_params(config, jax.random.key(0)), path, tokenizer)
    return config


def _torch_scores(folder, ids, mask):
    import torch
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)
        )
    return out.logits[:, 0].numpy()


def test_rm_trained_with_pad_equal_to_eos_reads_where_transformers_reads(tmp_path):
    """`rlhf-jax rm` with pad == EOS, then the saved folder in transformers' PyTorch model:
    the same scores as rlhf_jax's (less the bias transformers' head lacks), on right- and
    left-padded rows that end in EOS."""
    tokenizer = _tokenizer(pad_is_eos=True)
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos
    _policy(tmp_path / "base", tokenizer)
    data = tmp_path / "ranks.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RANKINGS))
    code = main(
        [
            "rm",
            "--output",
            str(tmp_path / "out"),
            "log.progress=false",
            "rm.steps=2",
            "rm.batch_size=4",
            f"rm.init={tmp_path / 'base'}",
            f"rm.data={data}",
        ]  # fmt: skip
    )
    assert code == 0
    folder = tmp_path / "out" / "rm"
    saved = json.loads((folder / "config.json").read_text())
    assert saved["pad_token_id"] == eos and saved["rlhf_jax_reward_read"] == "last_non_pad_token"
    rows = [tokenizer("the red fox runs.")["input_ids"], tokenizer("a calm owl")["input_ids"]]
    width = max(map(len, rows)) + 3
    ids = np.full((4, width), eos, np.int32)
    mask = np.zeros((4, width), np.float32)
    for i, r in enumerate(rows):
        seq = [*r, eos]
        ids[i, : len(seq)], mask[i, : len(seq)] = seq, 1  # right-padded
        ids[2 + i, width - len(seq) :], mask[2 + i, width - len(seq) :] = seq, 1  # left-padded
    config, params = load_scalar_model(folder)
    ours = np.asarray(score_sequences(config, params, ids, mask))
    bias = saved["rlhf_jax_reward_bias"]
    np.testing.assert_allclose(_torch_scores(folder, ids, mask) + bias, ours, atol=1e-4)
    # and that is the token before the EOS, not the EOS itself
    np.testing.assert_allclose(ours[:2], ours[2:], atol=1e-4)


@pytest.fixture
def ppo_files(tmp_path):
    tokenizer = _tokenizer(pad_is_eos=False)
    _policy(tmp_path / "policy", tokenizer)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["the red", "a calm"] * 8))
    return tmp_path, tokenizer


def _reward_model(path, tokenizer, **config_changes):
    config = tiny_config(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).replace(**config_changes)
    params = {
        "trunk": init_params(config, jax.random.key(1)),
        "head": init_scalar_head(config, jax.random.key(2)),
    }
    save_scalar_model(config, params, path, tokenizer)
    return path


def _ppo(root, rm):
    return main(
        [
            "ppo",
            "--output",
            str(root / "out"),
            "log.progress=false",
            "ppo.iterations=1",
            "ppo.rollout_batch=4",
            "ppo.minibatch_size=4",
            "ppo.max_new_tokens=4",
            "ptx.coef=0",
            f"ppo.policy={root / 'policy'}",
            f"ppo.reward_model={rm}",
            f"ppo.prompts={root / 'prompts.jsonl'}",
        ]  # fmt: skip
    )


def _swap_ids(folder, a: str, b: str) -> None:
    """Give tokens `a` and `b` each other's id in the folder's tokenizer.json: the same
    tokens and size, other ids."""
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(data))


def test_a_reward_model_with_another_tokenizer_of_the_same_size_is_refused(ppo_files, capsys):
    root, tokenizer = ppo_files
    rm = _reward_model(root / "rm_other", tokenizer)
    _swap_ids(rm, "a", "b")
    assert _ppo(root, rm) == 2
    err = capsys.readouterr().err
    ids = tokenizer.get_vocab()
    assert err == (
        f"error: reward model {rm} and policy {root / 'policy'} have different tokenizers "
        f"(policy vs reward model: 2 tokens with other ids, e.g. 'a': {ids['a']} vs "
        f"{ids['b']}): the reward model would score token ids that mean other text to it; "
        "train it from the policy's tokenizer\n"
    )
    assert not (root / "out").exists()


def test_a_reward_model_with_other_special_ids_is_refused(ppo_files, capsys):
    root, tokenizer = ppo_files
    other = _tokenizer(pad_is_eos=True)  # the same vocabulary, but pad = EOS
    rm = _reward_model(root / "rm_pad", other)
    assert _ppo(root, rm) == 2
    err = capsys.readouterr().err
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    assert f"(policy vs reward model: pad id {pad} vs {eos})" in err
    assert not (root / "out").exists()


def test_a_reward_model_read_another_way_than_it_was_trained_is_refused(tmp_path, capsys):
    """pad == EOS: an rlhf_jax RM saved before the reading rule (read at the EOS), and a
    folder without pad_token_id (where transformers cannot read a padded batch at all)."""
    tokenizer = _tokenizer(pad_is_eos=True)
    _policy(tmp_path / "policy", tokenizer)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["the red", "a calm"] * 8))
    eos = tokenizer.eos_token_id

    old = _reward_model(tmp_path / "old", tokenizer)
    raw = json.loads((old / "config.json").read_text())
    del raw["rlhf_jax_reward_read"]
    (old / "config.json").write_text(json.dumps(raw))
    assert _ppo(tmp_path, old) == 2
    assert capsys.readouterr().err == (
        f"error: {old}: saved by an earlier rlhf_jax, which read the reward at the EOS; its "
        f"tokenizer pads with its EOS (id {eos}), and the reward is now read at the token "
        "before the EOS, as transformers does: retrain the reward model with `rlhf-jax rm`\n"
    )

    unset = _reward_model(tmp_path / "unset", tokenizer, pad_token_id=None)
    assert _ppo(tmp_path, unset) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {unset}: config.json has no pad_token_id and its tokenizer ")
    assert f'set "pad_token_id": {eos} in its config.json' in err

    other = _reward_model(tmp_path / "other", tokenizer, pad_token_id=5)
    assert _ppo(tmp_path, other) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {other}: config.json has pad_token_id 5, but its tokenizer ")
    assert not (tmp_path / "out").exists()
