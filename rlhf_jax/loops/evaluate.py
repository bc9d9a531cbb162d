"""Evaluation helpers: sampling text from a policy, LM loss, KL to a reference, statistics."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data.shard import HeldRows
from rlhf_jax.loops.batched import activations_of, compiled, map_batches
from rlhf_jax.loops.runtime import Runtime
from rlhf_jax.models import ModelConfig, forward
from rlhf_jax.ops import token_logprobs
from rlhf_jax.rollout import generate

EVAL_BATCH = 128  # rows per sampling batch of the gold evaluation


def sample_responses(
    cfg: ModelConfig,
    params,
    prompt_ids: np.ndarray | None,
    prompt_mask: np.ndarray | None,
    key: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float,
    eos_ids: tuple[int, ...],
    pad_id: int,
    batch_size: int,
    top_k: int | None = None,
    top_p: float | None = None,
    runtime: Runtime | None = None,
    held: HeldRows | None = None,
) -> dict[str, np.ndarray]:
    """Generate for every prompt row in batches of `batch_size` (the last one padded); batch
    j's key is `fold_in(key, first row of batch j)`. With a mesh `runtime` each batch is
    split over its batch axes and decoded under its activation rules (loops/batched.py).
    `held` (prompt_ids / prompt_mask None): only this process's prompt rows, each standing
    `held.repeat` times (`process_rows.encode_ordered`); the samples are the same as from
    every row, and every process gets them all, prompts included."""

    def sample(batch, start):
        with activations_of(runtime):
            gen = _generate(batch, start)
        out = {k: v for k, v in gen._asdict().items() if v is not None}  # no support asked
        if held is not None:  # the prompts come back gathered with the samples
            out["prompt_ids"], out["prompt_mask"] = batch["input_ids"], batch["attention_mask"]
        return out

    def _generate(batch, start):
        return generate(
            cfg,
            params,
            jnp.asarray(batch["input_ids"]),
            jnp.asarray(batch["attention_mask"]),
            jax.random.fold_in(key, start),
            max_new_tokens,
            temperature=float(temperature),
            top_k=top_k,
            top_p=top_p,
            eos_id=tuple(eos_ids),
            pad_id=int(pad_id),
        )

    if held is not None:
        return map_batches(sample, held, batch_size, with_offset=True, runtime=runtime)
    prompts = {"input_ids": prompt_ids, "attention_mask": prompt_mask}
    merged = map_batches(sample, prompts, batch_size, with_offset=True, runtime=runtime)
    merged["prompt_ids"], merged["prompt_mask"] = prompt_ids, prompt_mask
    return merged


def decode_responses(tokenizer, samples: dict[str, np.ndarray]) -> list[str]:
    """Text of each response up to and including its EOS (special tokens dropped)."""
    return [
        tokenizer.decode(tokens[mask > 0], skip_special_tokens=True)
        for tokens, mask in zip(samples["tokens"], samples["mask"])
    ]


@functools.lru_cache(maxsize=8)  # one compile per model, however many policies are scored
def make_sequence_logprob_fn(cfg: ModelConfig, temperature: float) -> Callable:
    """`fn(params, batch) -> [B]` summed response log-probs of a batch of `prompt_ids,
    prompt_mask, tokens, mask` (compiled by `loops.batched.compiled`)."""

    def fn(params, batch):
        prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
        tokens, mask = batch["tokens"], batch["mask"]
        p = prompt_ids.shape[1]
        seq = jnp.concatenate([prompt_ids, tokens], axis=1)
        seq_mask = jnp.concatenate([prompt_mask.astype(mask.dtype), mask], axis=1)
        logits = forward(cfg, params, seq, seq_mask)[:, p - 1 : -1]
        return jnp.sum(token_logprobs(logits, tokens, temperature) * mask, axis=1)

    return fn


def kl_to_reference(
    cfg: ModelConfig,
    policy_params,
    ref_params,
    samples: dict[str, np.ndarray],
    temperature: float,
    batch_size: int,
    runtime: Runtime | None = None,
) -> np.ndarray:
    """Per-sample log pi(y|x) - log pi_ref(y|x) on the policy's own samples (a KL estimate)."""
    fn = compiled(make_sequence_logprob_fn(cfg, temperature), runtime)

    def kl(b):
        return fn(policy_params, b) - fn(ref_params, b)

    keys = ("prompt_ids", "prompt_mask", "tokens", "mask")
    return map_batches(kl, {k: samples[k] for k in keys}, batch_size, runtime=runtime)


def bootstrap_mean_ci(
    values: np.ndarray, n_resamples: int, seed: int, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_resamples, len(values)))
    means = values[idx].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def win_rate(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of paired samples where a beats b, ties counted as half."""
    a, b = np.asarray(a), np.asarray(b)
    return float(np.mean(a > b) + 0.5 * np.mean(a == b))


@dataclasses.dataclass
class GoldEval:
    """A policy's samples on the evaluation prompts (each answered n times) and their gold
    rewards: `gold` per sample [P * n] (prompt-major), `per_prompt` the mean of each prompt's n."""

    samples: dict[str, np.ndarray]
    texts: list[str]
    gold: np.ndarray
    per_prompt: np.ndarray


def evaluate_gold(
    cfg: ModelConfig,
    params,
    tokenizer,
    prompts: Sequence[str],
    arrays: dict[str, np.ndarray] | HeldRows,
    key: jax.Array,
    gold_fn: Callable[[str, str], float],
    *,
    max_new_tokens: int,
    temperature: float,
    eos_ids: tuple[int, ...],
    pad_id: int,
    n_samples: int = 1,
    batch_size: int = EVAL_BATCH,
    runtime: Runtime | None = None,
) -> GoldEval:
    """Sample `n_samples` responses per evaluation prompt and score each with `gold_fn` (on
    `runtime`'s mesh, see `sample_responses`). `arrays`: every prompt, or this process's
    (`HeldRows` encoded for `n_samples` per prompt)."""
    opts = dict(max_new_tokens=max_new_tokens, temperature=temperature, eos_ids=eos_ids,
                pad_id=pad_id, batch_size=batch_size, runtime=runtime)  # fmt: skip
    if isinstance(arrays, HeldRows):
        if arrays.repeat != n_samples:
            raise ValueError(f"prompts encoded for {arrays.repeat} samples each, not {n_samples}")
        samples = sample_responses(cfg, params, None, None, key, held=arrays, **opts)
    else:
        ids = np.repeat(arrays["input_ids"], n_samples, axis=0)
        mask = np.repeat(arrays["attention_mask"], n_samples, axis=0)
        samples = sample_responses(cfg, params, ids, mask, key, **opts)
    texts = decode_responses(tokenizer, samples)
    repeated = [p for p in prompts for _ in range(n_samples)]
    gold = np.array([gold_fn(p, c) for p, c in zip(repeated, texts)])
    return GoldEval(samples, texts, gold, gold.reshape(len(prompts), n_samples).mean(axis=1))


def compare_to_reference(
    policy: GoldEval, reference: GoldEval, kl: np.ndarray, n_resamples: int, seed: int
) -> dict[str, float | tuple[float, float]]:
    """A policy's gold reward against the reference policy's on the same prompts: the mean
    with its bootstrap 95% interval over prompts, the paired gain, the win rate (ties half)
    and the mean KL estimate per response."""
    gain = policy.per_prompt - reference.per_prompt
    return {
        "gold_reward": float(policy.gold.mean()),
        "gold_reward_ci": bootstrap_mean_ci(policy.per_prompt, n_resamples, seed),
        "gold_gain": float(gain.mean()),
        "gold_gain_ci": bootstrap_mean_ci(gain, n_resamples, seed),
        "win_rate_vs_sft": win_rate(policy.gold, reference.gold),
        "kl_to_sft": float(np.mean(kl)),
    }
