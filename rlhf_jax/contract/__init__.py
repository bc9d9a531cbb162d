"""The contract every swappable part keeps, as a checker a fork runs on its own function.

    from rlhf_jax.contract import check_part
    check_part("policy", my_fork.losses.my_loss)          # raises AssertionError on a breach
    check_part("advantage", my_fork.estimators.my_est)
    check_part("reward_fn", my_fork.rewards.exact_match)

Losses: a finite scalar and flat slash-named scalar metrics; masked positions ignored (junk
written there changes nothing and gets zero gradient); jittable; finite gradients that reach
the real positions; the metrics the loops read back after training (`REQUIRED_METRICS`: a
reward loss's `rm/accuracy`, `rm/margin`, `rm/pairs`, a preference loss's `dpo/accuracy`);
exact under gradient accumulation (`check_accumulation`: over 2 and 4 micro-batches of unequal
counts, each given the whole batch's counts, the summed loss, gradient and metrics are the
whole batch's; `losses.accumulation`). When a config loads with a `grad_accum` above 1, a
fork's loss gets the same check (`require_exact_accumulation`).
Advantage estimators: [B, N] finite advantages, 0 on padding, unchanged by
junk on padding; returns present exactly when the estimator declares `needs_critic`; a next
state exactly when it declares `state`, shaped like its initial one; jittable.
Rollout filters: one bool per response, unchanged by junk tokens on padding; jittable.
Reward functions: one finite float32 number per completion, on a few tiny texts
(`check_reward_fn`). Every part: it reads only batch keys the library provides (and, when it
declares `reads`, only those). The same key check, and the check of what the part returns
(types, shapes, dtypes, required metrics: `check_returned`), runs on the configured parts when
a config is loaded (`dry_run`), so a loss that needs a key this run lacks, or returns a [B]
loss, fails with a one-line error naming it before anything is loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import registry
from rlhf_jax.contract.accumulation import check_accumulation, require_exact_accumulation
from rlhf_jax.contract.keys import BATCH_KEYS, batch_keys
from rlhf_jax.contract.returns import REQUIRED_METRICS, check_returned, check_reward_fn, part_noun
from rlhf_jax.contract.samples import (
    ADVANTAGE_KEYS,
    CRITIC_KEYS,
    FILTER_KEYS,
    GROUP_IDS,
    LENGTHS,
    PACKED_SFT_KEYS,
    POLICY_KEYS,
    PREFERENCE_KEYS,
    PTX_KEYS,
    REFERENCE_KEYS,
    REWARD_KEYS,
    ROWS,
    SAMPLE_COMPLETIONS,
    SAMPLE_PROMPTS,
    SFT_KEYS,
    STATE_KEY,
    T_LM,
    VALUE_KEYS,
    B,
    K,
    T,
    V,
    part_name,
    sample_inputs,
    stage_inputs,
    with_bound_beta,
    with_declared_state,
)
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.losses import accumulation
from rlhf_jax.types import LossOut

__all__ = [
    "BATCH_KEYS",
    "batch_keys",
    "ADVANTAGE_KEYS",
    "B",
    "CRITIC_KEYS",
    "FILTER_KEYS",
    "GROUP_IDS",
    "K",
    "LENGTHS",
    "PACKED_SFT_KEYS",
    "POLICY_KEYS",
    "PREFERENCE_KEYS",
    "PTX_KEYS",
    "REFERENCE_KEYS",
    "REQUIRED_METRICS",
    "REWARD_KEYS",
    "ROWS",
    "SAMPLE_COMPLETIONS",
    "SAMPLE_PROMPTS",
    "SFT_KEYS",
    "STATE_KEY",
    "T",
    "T_LM",
    "V",
    "VALUE_KEYS",
    "check_accumulation",
    "check_part",
    "check_returned",
    "check_reward_fn",
    "dry_run",
    "require_exact_accumulation",
    "sample_inputs",
]


class _Recording(Mapping):
    """A read-only batch that records which keys a part reads and refuses those not given."""

    def __init__(self, data: Mapping[str, Any]):
        self._data, self.read = dict(data), set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return self._data[key]

    def __contains__(self, key: object) -> bool:
        self.read.add(key)
        return key in self._data

    def __iter__(self) -> Iterator[str]:
        self.read.update(self._data)  # iterating reads everything
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def _declared_counts(kind: str, fn: Callable, batch: Mapping) -> dict:
    """The whole sample batch's counts a loss declares (`@declare(counts=fn)`), as the steps
    compute them; {} for an estimator or a loss that declares none."""
    if kind in ("advantage", "rollout_filter") or registry.info(fn).get("counts") is None:
        return {}
    counts = accumulation.batch_counts(kind, fn, batch)
    return {k: np.asarray(v) for k, v in counts.items() if k not in batch}


def _call(kind: str, fn: Callable, outputs: Mapping, batch: Mapping) -> Any:
    return fn(batch) if kind in ("advantage", "rollout_filter") else fn(outputs, batch)


def dry_run(kind: str, fn: Callable, name: str, available: tuple[str, ...], why: str = "") -> set:
    """Call `fn` once on tiny inputs holding only the `available` batch keys; an RlhfJaxError
    names the key it read that this run does not have (`why` says when such keys exist), or
    what it returned that breaks the contract (`check_returned`). Returns the keys it read."""
    fn = with_bound_beta(kind, fn)
    outputs, batch, _ = sample_inputs(kind)
    batch = with_declared_state(kind, fn, {**stage_inputs(kind), **batch})
    declared = _declared_counts(kind, fn, batch)  # the step computes these for the loss too
    # Every loss of a kind also gets its kind's whole-batch counts (`losses.accumulation`).
    available = (*available, *accumulation.KIND_COUNT_KEYS.get(kind, ()), *declared)
    recording = _Recording({k: v for k, v in {**batch, **declared}.items() if k in available})
    noun = part_noun(kind)
    try:
        out = _call(kind, fn, outputs, recording)
    except KeyError as e:
        key = e.args[0] if e.args else "?"
        raise RlhfJaxError(
            f"{noun} {name!r} reads batch key {key!r}, which this run does not provide"
            f"{'; ' + why if why else ''} (available: {', '.join(sorted(set(available)))})"
        ) from None
    check_returned(kind, name, out, batch, registry.info(fn))
    return recording.read


def _assert_loss_out(out: Any) -> None:
    assert isinstance(out, LossOut), f"a loss returns LossOut, got {type(out).__name__}"
    assert jnp.shape(out.loss) == (), f"the loss is a scalar, got shape {jnp.shape(out.loss)}"
    assert np.isfinite(out.loss), "the loss is finite"
    assert out.metrics, "a loss reports at least its own value"
    for key, value in out.metrics.items():
        assert "/" in key, f"metric names have a slash: {key!r}"
        assert jnp.shape(value) == () and np.isfinite(value), f"metric {key!r}: finite scalar"


def _junk(values: Mapping, free: Mapping, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    return {
        k: np.where(free[k], rng.normal(size=np.shape(v)) * 1e3, v).astype(np.asarray(v).dtype)
        if k in free
        else v
        for k, v in values.items()
    }


def check_part(kind: str, fn: Callable) -> None:
    """Assert `fn` keeps the contract of parts of `kind` (see the module docstring)."""
    if kind == "reward_fn":
        _check_reward_fn_part(fn)
        return
    fn = with_bound_beta(kind, fn)
    outputs, batch, free = sample_inputs(kind)
    batch = with_declared_state(kind, fn, {**batch, **_declared_counts(kind, fn, batch)})
    recording = _Recording(batch)
    out = _call(kind, fn, outputs, recording)
    _assert_returned(kind, fn, out, batch)
    declared = registry.info(fn).get("reads")
    if declared is not None:
        undeclared = recording.read - set(declared)
        assert not undeclared, f"reads undeclared batch keys {sorted(undeclared)}"
    if kind == "advantage":
        _check_advantage(fn, out, batch, free)
    elif kind == "rollout_filter":
        _check_filter(fn, out, batch, free)
    else:
        _check_loss(fn, out, outputs, batch, free)
        check_accumulation(kind, fn, outputs, batch)


def _check_loss(fn, out, outputs, batch, free) -> None:
    _assert_loss_out(out)
    junk = _junk(outputs, free)
    assert any(np.any(f) for f in free.values())
    junk_out = fn(junk, batch)
    np.testing.assert_allclose(junk_out.loss, out.loss, rtol=1e-6, atol=1e-6)
    for key in out.metrics:
        np.testing.assert_allclose(junk_out.metrics[key], out.metrics[key], rtol=1e-6, atol=1e-6)
    jitted = jax.jit(fn)(outputs, batch)
    np.testing.assert_allclose(jitted.loss, out.loss, rtol=1e-5, atol=1e-6)
    # Finite gradients that never reach masked entries, even when those hold junk.
    grad_fn = jax.grad(lambda o: fn(o, batch).loss)
    for point in (outputs, junk):
        grads = grad_fn(jax.tree.map(jnp.asarray, point))
        for key, g in grads.items():
            g = np.asarray(g)
            assert np.all(np.isfinite(g)), f"{key}: non-finite gradient"
            if key in free:
                assert np.all(g[free[key]] == 0), f"{key}: gradient leaks into masked entries"
        assert any(np.any(np.asarray(g) != 0) for g in grads.values()), "no gradient at all"


def _check_advantage(fn, out, batch, free) -> None:
    adv = np.asarray(out.advantages)
    mask = batch["response_mask"] != 0
    assert adv.shape == mask.shape, f"advantages are [B, N], got {adv.shape}"
    assert np.all(np.isfinite(adv)), "advantages are finite"
    assert np.all(adv[~mask] == 0), "advantages are 0 on padding"
    needs_critic = bool(registry.info(fn).get("needs_critic", False))
    assert (out.returns is not None) == needs_critic, (
        "returns (the critic's targets) are given exactly when the estimator needs a critic"
    )
    for key, value in out.metrics.items():
        assert "/" in key and jnp.shape(value) == (), f"metric {key!r}: slash-named scalar"
    junk_out = fn(_junk(batch, free))
    np.testing.assert_allclose(junk_out.advantages, adv, rtol=1e-5, atol=1e-5)
    jitted = jax.jit(fn)(batch)
    np.testing.assert_allclose(jitted.advantages, adv, rtol=1e-5, atol=1e-5)


def _check_filter(fn, out, batch, free) -> None:
    keep = np.asarray(out)
    junk = {**batch, "response_ids": np.where(free["response_ids"], 5, batch["response_ids"])}
    np.testing.assert_array_equal(np.asarray(fn(junk)), keep, "junk tokens on padding")
    # Not jitted: a filter runs on the host over gathered NumPy arrays (loops/rollout_stages),
    # so it may use NumPy, record what it saw, or call out.


def _assert_returned(kind: str, fn: Callable, out: Any, batch: Mapping) -> None:
    """`check_returned` as an assertion, for `check_part`."""
    try:
        check_returned(kind, part_name(fn), out, batch, registry.info(fn))
    except RlhfJaxError as e:
        raise AssertionError(str(e)) from None


def _check_reward_fn_part(fn: Callable) -> None:
    """A reward function's contract: one finite float32 number per completion of the sample
    texts (`check_reward_fn`), as an assertion."""
    try:
        check_reward_fn(fn, part_name(fn))
    except RlhfJaxError as e:
        raise AssertionError(str(e)) from None
