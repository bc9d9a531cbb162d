"""Checks of the tokenizer and the data against the model, before anything is compiled: every
id the tokenizer can produce and every token id of the data inside the model's vocabulary,
every sequence inside its position table; a reward model that shares the policy's tokenizer
and is read at the token it was trained for.

Each failure is silent otherwise: an id past the embedding table reads garbage (NaN losses,
every update skipped), a position past a learned table is clamped (wrong logits), a reward
model with another tokenizer scores ids that mean other text to it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping

import numpy as np

from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.models import ModelConfig
from rlhf_jax.models.hf import is_reward_model
from rlhf_jax.models.hf.io import (
    REWARD_BIAS_KEY,
    REWARD_READ_KEY,
    REWARD_READ_RULE,
    SCALAR_HEAD_FILE,
)
from rlhf_jax.storage import local_copy


def language_models(cfg) -> dict[str, str]:
    """{config key: folder} of the set keys that name a language model (a policy or the
    trunk a reward model starts from)."""
    keys = {"model.path": cfg.model.path, "rm.init": cfg.rm.init, "ppo.policy": cfg.ppo.policy}
    keys["dpo.policy"] = cfg.dpo.policy
    return {k: v for k, v in keys.items() if v is not None}


def require_language_model(path: str, key: str) -> str:
    """`path`, unless it holds a reward model (a policy or trunk key given an RM folder by
    mistake: its trunk would load with a never-trained LM head). Reads config.json only, so
    every command (and `plan`) refuses it before creating or loading anything."""
    if is_reward_model(path):
        raise RlhfJaxError(
            f"config key '{key}': {path} holds a reward model (a sequence-classification "
            "head), not a language model; give the SFT policy's folder (e.g. OUTPUT/sft)"
        )
    return path


def check_token_ids(
    model_cfg: ModelConfig,
    model_name: str,
    arrays: Mapping[str, Mapping[str, np.ndarray]],
    special: Mapping[str, int | None],
) -> None:
    """RlhfJaxError unless every real token of `arrays` ({what: encoded arrays with
    input_ids and attention_mask}) and every special id ({name: id}) is below the model's
    vocabulary size."""
    vocab = model_cfg.vocab_size

    def refuse(what: str, token: int) -> RlhfJaxError:
        return RlhfJaxError(
            f"{model_name}: {what} holds token id {token}, but the model's vocabulary has "
            f"{vocab} entries (vocab_size in its config.json): the tokenizer does not belong "
            "to this model; use the tokenizer saved with it"
        )

    for name, token in special.items():
        if token is not None and not 0 <= token < vocab:
            raise refuse(f"the tokenizer's {name} token", token)
    for what, enc in arrays.items():
        ids, mask = np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"])
        real = ids[mask > 0]
        if real.size and int(real.max()) >= vocab:
            raise refuse(f"{what} (after tokenising)", int(real.max()))


def check_positions(
    model_cfg: ModelConfig, model_name: str, lengths: Mapping[str, int]
) -> list[str]:
    """Sequence lengths ({the config keys that set it: tokens}) against the model's position
    table. Learned positions (GPT-2) have no entry past the table: RlhfJaxError naming the keys.
    RoPE extrapolates past its trained length with lower quality: a warning (returned, and
    printed to stderr)."""
    table = model_cfg.max_position_embeddings
    over = {keys: n for keys, n in lengths.items() if n > table}
    if not over:
        return []
    which = "; ".join(f"{keys} = {n}" for keys, n in over.items())
    if model_cfg.position == "learned":
        raise RlhfJaxError(
            f"{model_name}: its learned position table has {table} positions "
            f"(n_positions / max_position_embeddings in config.json), but {which}: tokens past "
            "the table have no position; lower those keys"
        )
    warning = (
        f"warning: {model_name} was trained on {table} positions, but {which}: RoPE "
        "extrapolates past that, usually with lower quality"
    )
    print(warning, file=sys.stderr)
    return [warning]


def stage_lengths(cfg, stages: tuple[str, ...]) -> dict[str, int]:
    """The longest sequence each stage builds, keyed by the config keys that set it."""
    out = {}
    if "sft" in stages:
        out["sft.max_len"] = cfg.sft.max_len
    if "rm" in stages:
        out["rm.max_prompt_len + rm.max_completion_len + 1"] = (
            cfg.rm.max_prompt_len + cfg.rm.max_completion_len + 1
        )
    if "dpo" in stages:
        out["dpo.max_prompt_len + dpo.max_completion_len + 1"] = (
            cfg.dpo.max_prompt_len + cfg.dpo.max_completion_len + 1
        )
    if "ppo" in stages:
        out["ppo.max_prompt_len + ppo.max_new_tokens"] = (
            cfg.ppo.max_prompt_len + cfg.ppo.max_new_tokens
        )
        if cfg.ptx.coef > 0:
            out["ptx.max_len"] = cfg.ptx.max_len
    return out


def check_rows(rows: int, batch_size: int, key: str, what: str) -> None:
    """RlhfJaxError naming the config key and the file when the data has fewer rows than one
    batch (every batch has a fixed shape, so a stage could not take a single step)."""
    if rows < batch_size:
        raise RlhfJaxError(
            f"config key '{key}' is {batch_size}, but {what} has only {rows} usable "
            f"row{'s' if rows != 1 else ''}: "
            f"lower {key} to {rows} or less, or give more data"
        )


def check_tokenizer(model_cfg: ModelConfig, model_name: str, tokenizer) -> None:
    """RlhfJaxError unless the model has an embedding row for every id the tokenizer can
    produce (its `len`, added tokens included) and for each of its special ids. One check for
    every command that reads a model and a tokenizer (training, `generate`, a reward model):
    an id past the table reads garbage, silently. A model with more rows than the tokenizer
    has ids (a vocabulary padded to a multiple of 64) is fine."""
    vocab, n = model_cfg.vocab_size, len(tokenizer)
    special = {
        "EOS": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "BOS": tokenizer.bos_token_id,
    }
    over = {name: i for name, i in special.items() if i is not None and not 0 <= i < vocab}
    if n <= vocab and not over:
        return
    what = (
        f"the tokenizer has {n} tokens (ids up to {n - 1})"
        if n > vocab
        else "the tokenizer's " + ", ".join(f"{k} id {v}" for k, v in over.items())
    )
    raise RlhfJaxError(
        f"{model_name}: {what}, but the model's vocabulary has {vocab} entries (vocab_size in "
        "its config.json): the tokenizer does not belong to this model; use the tokenizer "
        "saved with it"
    )


def _special_ids(tokenizer) -> dict[str, int | None]:
    """The ids a reward model must share with the policy; pad falls back to EOS as in
    `data.special_ids`."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    return {"EOS": eos, "pad": eos if pad is None else pad, "BOS": tokenizer.bos_token_id}


def _vocab_differences(policy: dict[str, int], reward: dict[str, int]) -> list[str]:
    if policy == reward:  # the common case: one dict comparison, no sorting
        return []
    out = []
    if len(policy) != len(reward):
        out.append(f"{len(policy)} vs {len(reward)} tokens")
    moved = sorted(t for t in policy.keys() & reward.keys() if policy[t] != reward[t])
    if moved:
        t = moved[0]
        out.append(f"{len(moved)} tokens with other ids, e.g. {t!r}: {policy[t]} vs {reward[t]}")
    only = sorted(policy.keys() ^ reward.keys())
    if only:
        out.append(f"{len(only)} tokens in one vocabulary only, e.g. {only[0]!r}")
    return out


def check_reward_model_fits(
    policy: str, policy_cfg: ModelConfig, policy_tok, rm: str, rm_cfg: ModelConfig, rm_tok
) -> None:
    """RlhfJaxError unless the reward model at `rm` reads the policy's token ids as its own:
    the same token -> id map (compared entry by entry: the same vocabulary size with other ids
    is another tokenizer) and the same EOS, pad and BOS ids, and a vocabulary size equal to the
    policy's. Before any weight is loaded (also for the critic, which starts as this model)."""
    check_tokenizer(rm_cfg, rm, rm_tok)
    ours, theirs = _special_ids(policy_tok), _special_ids(rm_tok)
    diffs = [f"{k} id {ours[k]} vs {theirs[k]}" for k in ours if ours[k] != theirs[k]]
    diffs += _vocab_differences(policy_tok.get_vocab(), rm_tok.get_vocab())
    if diffs:
        raise RlhfJaxError(
            f"reward model {rm} and policy {policy} have different tokenizers (policy vs "
            f"reward model: {'; '.join(diffs)}): the reward model would score token ids that "
            "mean other text to it; train it from the policy's tokenizer"
        )
    if rm_cfg.vocab_size != policy_cfg.vocab_size:
        raise RlhfJaxError(
            f"{rm}: vocabulary size {rm_cfg.vocab_size} differs from the policy's "
            f"{policy_cfg.vocab_size} ({policy}); the RM must share the policy's tokenizer"
        )


def check_reward_reading(rm: str, rm_cfg: ModelConfig, tokenizer) -> None:
    """RlhfJaxError when the rule rlhf_jax reads a reward by (transformers': the last real token
    that is not the pad id, see `models.reward_token_index`) would read another token than
    the one the reward model at `rm` was trained to be read at. The two differ only when the
    tokenizer pads with its EOS (then the token before the EOS is read)."""
    ids = _special_ids(tokenizer)
    eos, pad = ids["EOS"], ids["pad"]
    if rm_cfg.pad_token_id is not None and rm_cfg.pad_token_id != pad:
        raise RlhfJaxError(
            f"{rm}: config.json has pad_token_id {rm_cfg.pad_token_id}, but its tokenizer pads "
            f"with id {pad}: transformers reads the reward at the last token that is not "
            f"{rm_cfg.pad_token_id}, which in a batch padded with {pad} is padding; set "
            f'"pad_token_id": {pad} in its config.json'
        )
    if pad != eos:
        return
    folder = local_copy(rm, "reward model folder")
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    ours = REWARD_BIAS_KEY in raw or (folder / SCALAR_HEAD_FILE).is_file()
    if ours and raw.get(REWARD_READ_KEY) != REWARD_READ_RULE:
        raise RlhfJaxError(
            f"{rm}: saved by an earlier rlhf_jax, which read the reward at the EOS; its "
            f"tokenizer pads with its EOS (id {eos}), and the reward is now read at the token "
            "before the EOS, as transformers does: retrain the reward model with `rlhf-jax rm`"
        )
    if rm_cfg.pad_token_id is None:
        raise RlhfJaxError(
            f"{rm}: config.json has no pad_token_id and its tokenizer pads with its EOS (id "
            f"{eos}), so where it was trained to read the reward is unknown; rlhf_jax reads the "
            "token before the EOS, as transformers does with pad_token_id = EOS (TRL sets it): "
            f'if it was trained that way, set "pad_token_id": {eos} in its config.json'
        )
