"""Exactness under gradient accumulation: a loss over 2 and 4 micro-batches of unequal
counts, each given the whole batch's counts, summed, equals the whole batch's
(`losses.accumulation`)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.contract.samples import sample_inputs, with_bound_beta
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.losses import accumulation


def _rows(tree: Mapping, rows: int) -> tuple[dict, dict]:
    """`(per_row, other)`: the entries with `rows` leading rows, and the rest (scalars)."""
    per_row = {k: v for k, v in tree.items() if np.ndim(v) >= 1 and np.shape(v)[0] == rows}
    return per_row, {k: v for k, v in tree.items() if k not in per_row}


def require_exact_accumulation(kind: str, fn: Callable, name: str, setting: str) -> None:
    """When a config loads with `setting` (a `grad_accum` key) above 1: a fork's loss (one
    defined outside this library) must pass `check_accumulation`, or the run would silently
    train on another loss than with grad_accum=1. An RlhfJaxError says why, in one line."""
    fn = with_bound_beta(kind, fn)
    inner = fn
    while isinstance(inner, functools.partial):
        inner = inner.func
    if getattr(inner, "__module__", "").split(".")[0] == "rlhf_jax":
        return  # the library's own losses: checked by its test suite
    outputs, batch, _ = sample_inputs(kind)
    try:
        check_accumulation(kind, fn, outputs, batch)
    except AssertionError as e:
        raise RlhfJaxError(
            f"{kind} loss {name!r} is not exact under gradient accumulation ({setting} > 1): "
            f"{e}; or set {setting}=1"
        ) from None


def _n_rows(outputs: Mapping) -> int:
    return np.shape(next(iter(outputs.values())))[0]


def _accumulated(kind: str, fn: Callable, n: int, batch: Mapping) -> Callable:
    """`f(outputs) -> (loss, metrics)` summed over `n` strided micro-batches, each given the
    whole batch's counts: what a step with `grad_accum = n` computes."""
    counts = accumulation.batch_counts(kind, fn, batch)

    def f(outputs):
        per_row, other = _rows(batch, _n_rows(outputs))
        micro_out = accumulation.micro_batches(dict(outputs), n)
        micro_in = accumulation.micro_batches(per_row, n)
        loss, metrics = 0.0, None
        for j in range(n):
            mb = {k: v[j] for k, v in micro_in.items()} | other | counts
            out = fn({k: v[j] for k, v in micro_out.items()}, mb)
            loss = loss + out.loss
            if metrics is None:
                metrics = out.metrics
            else:
                metrics = accumulation.combine_metrics(metrics, out.metrics)
        return loss, metrics

    return f


def check_accumulation(kind: str, fn: Callable, outputs: Mapping, batch: Mapping) -> None:
    """Assert that `fn` (a loss of `kind`) gives the same loss, gradient and metrics whether the
    batch is taken whole or as 2 or 4 micro-batches of unequal counts, each given the whole
    batch's counts, their results summed (`losses.accumulation`)."""
    outputs = jax.tree.map(jnp.asarray, dict(outputs))
    whole = _accumulated(kind, fn, 1, batch)
    (loss, metrics), grads = jax.value_and_grad(whole, has_aux=True)(outputs)
    per_row, _ = _rows(batch, _n_rows(outputs))
    for n in (2, 4):
        (acc_loss, acc_metrics), acc_grads = jax.value_and_grad(
            _accumulated(kind, fn, n, batch), has_aux=True
        )(outputs)
        micro = accumulation.micro_batches(per_row, n)
        sizes = [
            accumulation.KIND_COUNTS[kind]({k: v[j] for k, v in micro.items()}) for j in range(n)
        ]
        where = f"over {n} micro-batches ({_describe(sizes)})"
        hint = (
            "divide by the whole batch's counts the step puts in the batch ("
            + ", ".join(sorted(accumulation.batch_counts(kind, fn, batch)))
            + "), never by a count of the micro-batch at hand (docs/losses.md)"
        )
        _assert_close(acc_loss, loss, f"the loss summed {where}", hint)
        for key, value in metrics.items():
            how = "maximised" if key.endswith("_max") else "summed"
            _assert_close(acc_metrics[key], value, f"metric {key!r} {how} {where}", hint)
        for key in grads:
            _assert_close(
                acc_grads[key], grads[key], f"the gradient of {key!r} summed {where}", hint
            )


def _describe(sizes: list[dict]) -> str:
    keys = sorted(sizes[0])
    return "; ".join(f"{k} " + ", ".join(f"{float(s[k]):g}" for s in sizes) for k in keys)


def _assert_close(got, want, what: str, hint: str) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(float(np.max(np.abs(want), initial=0.0)), 1e-3)
    off = float(np.max(np.abs(got - want), initial=0.0)) / scale
    assert off <= 1e-5 + 1e-6 / scale, f"{what} is {off:.1%} off the whole batch's; {hint}"
