"""Scoring a rollout with a reward function over text, on the host: each process decodes and
scores only the responses its devices hold. Used by the plain RL experience and by the
rollout stages of a run with filters."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from rlhf_jax.rewards import score_texts
from rlhf_jax.sharding import host_local_rows
from rlhf_jax.steps.algorithm import RLAlgorithm


def host_scorer(algo: RLAlgorithm, tokenizer, samples_per_prompt: int) -> Callable:
    """`scores(rollout, prompts) -> (rows, [rows] float32)`: decode the responses this
    process's devices hold (`rows` of the global rollout; all of them on one process) and
    score them with the reward function, next to their prompts as the data file wrote them
    (`prompts`: one per prompt row of the global batch; the rollout answers each
    `samples_per_prompt` times, consecutively), not the ids decoded back: a chat template's
    markup, a tokenizer's normalisation or a truncation never reach the reward function.
    Each host scores only its own rows; nothing of the rollout crosses hosts."""

    def scores(rollout, prompts: list[str]) -> tuple[slice, np.ndarray]:
        rows, tokens = host_local_rows(rollout.response_ids)
        _, mask = host_local_rows(rollout.response_mask)  # split like the ids (jit_sample)
        decode = tokenizer.decode
        texts = [decode(t[k > 0], skip_special_tokens=True) for t, k in zip(tokens, mask)]
        ours = [prompts[r // samples_per_prompt] for r in range(rows.start, rows.stop)]
        return rows, score_texts(algo.reward_fn, ours, texts, algo.reward_fn_name)

    return scores
