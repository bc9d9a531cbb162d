"""Checks of the data against the model, before anything is compiled: every token id inside the
model's vocabulary, every sequence inside its position table.

Both failures are silent otherwise: an id past the embedding table reads garbage (NaN losses,
every update skipped), a position past a learned table is clamped (wrong logits).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

import numpy as np

from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.models import ModelConfig
from rlhf_jax.models.hf import is_reward_model


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
