"""Small sample inputs of every part kind, and the batch keys each stage hands its parts:
what the contract checks (`rlhf_jax.contract`) call parts on."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import numpy as np

from rlhf_jax import registry
from rlhf_jax.contract.keys import BATCH_KEYS, batch_keys
from rlhf_jax.losses import accumulation

B, T, V, K = 4, 6, 7, 5


GROUP_IDS = np.array([0, 0, 1, 1], np.int32)  # two prompts, two samples each


# Response lengths: unequal, one of a single token; rows (0, 2) and (1, 3), the two strided
# micro-batches of the accumulation check, hold 11 and 3 tokens.
LENGTHS = [6, 1, 5, 2]


ROWS = 4  # rows of every sample batch: split into 2 and 4 micro-batches by the accumulation check


T_LM = 10  # positions of the sft and ptx samples


# The batch keys of each kind as the loops hand them (declared once, in `contract.keys`).
REFERENCE_KEYS = BATCH_KEYS["policy"].when["reference"][0]  # only with a KL term
CRITIC_KEYS = BATCH_KEYS["policy"].when["critic"][0]  # only with a critic
POLICY_KEYS = batch_keys("policy")
VALUE_KEYS = batch_keys("value")
ADVANTAGE_KEYS = batch_keys("advantage")
STATE_KEY = BATCH_KEYS["advantage"].when["state"][0][0]  # an estimator's declared state
FILTER_KEYS = batch_keys("rollout_filter")
SFT_KEYS = batch_keys("sft")
PACKED_SFT_KEYS = batch_keys("sft", packed=True)
REWARD_KEYS = batch_keys("reward")
PTX_KEYS = batch_keys("ptx")
PREFERENCE_KEYS = batch_keys("preference")


# Texts a reward function is called on by `check_part`: two prompts, one answered twice as in
# a group, and an empty completion (a response that is EOS at once decodes to "").
SAMPLE_PROMPTS = ("What is 2 + 3? Answer with a number.", "Name a colour.")


SAMPLE_COMPLETIONS = (" 5", "", " Red, I think.")


SAMPLE_FIELD_VALUE = "5"  # each row field a reward function needs (`answer`), on SAMPLE_PROMPTS


def _prefix(lengths, t):
    return (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.float32)


def _shifted_free(target_mask_BT):
    """Logits at t score token t + 1: position t is free when token t + 1 is not a target;
    the last position scores nothing."""
    free = np.ones_like(target_mask_BT, dtype=bool)
    free[:, :-1] = target_mask_BT[:, 1:] == 0
    return free


def _counts(kind: str, batch: Mapping) -> dict[str, np.ndarray]:
    """The whole sample batch's counts of `kind`, as the steps pass them."""
    return {k: np.asarray(v) for k, v in accumulation.KIND_COUNTS[kind](batch).items()}


def sample_inputs(kind: str, seed: int = 0) -> tuple[dict, dict, dict]:
    """`(outputs, batch, free)` of small random inputs for a part of `kind`, with every batch
    key the library may provide; free[key] marks the output entries the part must ignore.
    For `advantage`, outputs is empty and free marks the batch entries on padding."""
    rng = np.random.default_rng(seed)
    if kind in ("sft", "ptx"):
        return _lm_inputs(kind, rng)
    if kind in ("reward", "preference"):
        return _ranking_inputs(kind, rng)
    return _rl_inputs(kind, rng)


def _normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.normal(size=shape).astype(np.float32)


def _lm_inputs(kind: str, rng: np.random.Generator) -> tuple[dict, dict, dict]:
    """The sft and ptx samples: token ids and logits of [ROWS, T_LM]."""
    ids = rng.integers(0, V, size=(ROWS, T_LM)).astype(np.int32)
    # Left padding, right padding, none, and a row of one real token (nothing to score).
    attn = _prefix([T_LM, 7, T_LM, 1], T_LM)
    attn[2, :2] = 0
    outputs = {"logits": _normal(rng, ROWS, T_LM, V) * 2}
    batch = {"input_ids": ids, "attention_mask": attn}
    if kind == "sft":
        # 9, 3, 8 and 0 target tokens: micro-batches of 17 and 3 (or 9, 3, 8, 0).
        loss_mask = np.zeros((ROWS, T_LM), np.float32)
        loss_mask[0, 1:] = loss_mask[1, 4:7] = loss_mask[2, 2:] = 1.0
        batch["loss_mask"] = loss_mask
        free = _shifted_free(loss_mask)
    else:
        pairs = np.zeros((ROWS, T_LM), np.float32)
        pairs[:, 1:] = attn[:, :-1] * attn[:, 1:]  # token t is scored from a real context
        free = _shifted_free(pairs)
    batch.update(_counts(kind, batch))
    return outputs, batch, {"logits": free[..., None].repeat(V, -1)}


def _ranking_inputs(kind: str, rng: np.random.Generator) -> tuple[dict, dict, dict]:
    """The reward and preference samples: K ranked completions of each of ROWS prompts."""
    # 10, 0 (a tie), 2 and 2 ranked pairs: micro-batches of 12 and 2 pairs (or 10, 0, 2, 2).
    ks = [5, 2, 3, 3]
    mask = _prefix(ks, K)
    rank = np.stack([np.concatenate([rng.permutation(k), np.zeros(K - k, int)]) for k in ks])
    rank[1, :2] = 0
    rank[2, :3] = rank[3, :3] = [0, 1, 1]
    batch = {"rank": rank.astype(np.int32), "completion_mask": mask}
    if kind == "reward":
        batch.update(_counts(kind, batch))
        return {"rewards": _normal(rng, ROWS, K)}, batch, {"rewards": mask == 0}
    ref = -np.abs(_normal(rng, ROWS, K)) * 8
    batch["ref_logps"] = ref
    batch["completion_tokens"] = rng.integers(1, 9, size=(ROWS, K)).astype(np.float32) * mask
    batch.update(_counts(kind, batch))
    return {"logps": ref + _normal(rng, ROWS, K)}, batch, {"logps": mask == 0}


def _rl_inputs(kind: str, rng: np.random.Generator) -> tuple[dict, dict, dict]:
    """The RL samples: B responses of T tokens (LENGTHS long) in two groups."""
    mask = _prefix(LENGTHS, T)
    pad = mask == 0
    scores = _normal(rng, B)
    rewards = np.zeros((B, T), np.float32)
    rewards[np.arange(B), np.asarray(LENGTHS) - 1] = scores
    rewards -= 0.05 * np.abs(_normal(rng, B, T)) * mask
    common = {
        "response_mask": mask,
        "group_ids": GROUP_IDS,
        "scores": scores,
        "rewards": rewards * mask,
    }
    if kind == "advantage":
        ids = rng.integers(0, V, size=(B, T)).astype(np.int32) * (mask > 0)
        batch = {**common, "values": _normal(rng, B, T) * mask, "response_ids": ids}
        return {}, batch, {"rewards": pad, "values": pad, "response_ids": pad}
    if kind == "rollout_filter":
        scores[3] = scores[2]  # group 1's scores all agree, group 0's do not
        ids = rng.integers(0, V, size=(B, T)).astype(np.int32)
        batch = {k: common[k] for k in ("scores", "group_ids", "response_mask")}
        return {}, {**batch, "response_ids": ids * (mask > 0)}, {"response_ids": pad}
    old = -np.abs(_normal(rng, B, T))
    outputs, batch, free = _policy_inputs(rng, common, old, pad)
    if kind == "policy":
        return outputs, batch, free
    if kind == "value":  # the same minibatch (`contract.keys`), with the critic's values
        values = {"values": batch["old_values"] + 0.3 * _normal(rng, B, T)}
        return values, {**batch, **_counts(kind, common)}, {"values": pad}
    raise ValueError(f"no sample inputs for kind {kind!r}")


def _policy_inputs(
    rng: np.random.Generator, common: dict, old: np.ndarray, pad: np.ndarray
) -> tuple[dict, dict, dict]:
    """The policy loss's sample: log-probs near the rollout's `old` ones."""
    outputs = {"logprobs": old + 0.2 * _normal(rng, B, T), "entropy": np.abs(_normal(rng, B, T))}
    batch = {
        **common,
        "old_logprobs": old,
        "advantages": _normal(rng, B, T) * common["response_mask"],
        "ref_logprobs": old + 0.1 * _normal(rng, B, T),
        "old_values": _normal(rng, B, T),
        "returns": _normal(rng, B, T),
        "beta": np.float32(0.05),
        "iteration": np.int32(3),
        **_counts("policy", common),
    }
    return outputs, batch, {"logprobs": pad, "entropy": pad}


def stage_inputs(kind: str) -> dict:
    """Batch keys a stage hands its loss beyond the contract's sample inputs (the tokens the
    model read), so that a loss reading them passes the load-time dry run."""
    rng = np.random.default_rng(2)
    if kind in ("reward", "preference"):  # the ranking batch: [ROWS, K, L], prompt lengths
        length = 8
        return {
            "input_ids": rng.integers(0, V, size=(ROWS, K, length)).astype(np.int32),
            "attention_mask": np.ones((ROWS, K, length), np.float32),
            "completion_start": np.array([2, 3, 4, 2], np.int32),
        }
    if kind == "sft":  # packed rows: one sequence per row here
        return {"segment_ids": np.ones((ROWS, T_LM), np.int32)}
    return {}


def with_declared_state(kind: str, fn: Callable, batch: Mapping) -> dict:
    """`batch` with the initial state an estimator declares (`state=`) under STATE_KEY."""
    init = registry.info(fn).get("state") if kind == "advantage" else None
    return dict(batch) if init is None else {**batch, STATE_KEY: init()}


def with_bound_beta(kind: str, fn: Callable) -> Callable:
    """A preference loss always receives `beta` (from `dpo.beta`): bind one unless bound."""
    if kind == "preference" and "beta" not in getattr(fn, "keywords", {}):
        return functools.partial(fn, beta=0.5)
    return fn


def part_name(fn: Callable) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)
