"""What a part must return (types, shapes, dtypes, the metrics the loops read back), as
one-line errors that name the part: the load-time half of the contract."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.contract.samples import SAMPLE_COMPLETIONS, SAMPLE_FIELD_VALUE, SAMPLE_PROMPTS
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.types import LossOut

# Metrics the loops read back from a loss after its stage has trained: `rlhf-jax rm` and the
# pipeline report the reward model's pairwise accuracy, margin and pair count; `rlhf-jax dpo`
# and `compare` the implicit-reward accuracy. Required by contract (checked by `check_part` and
# when the config is loaded), so no stage trains with a loss that would fail after training.
# Every other metric is optional: the loops log what a loss returns and read nothing else.
REQUIRED_METRICS = {
    "reward": ("rm/accuracy", "rm/margin", "rm/pairs"),
    "preference": ("dpo/accuracy",),
}


def part_noun(kind: str) -> str:
    if kind == "advantage":
        return "advantage estimator"
    return "rollout filter" if kind == "rollout_filter" else f"{kind} loss"


def _shape(x: Any) -> tuple | None:
    try:
        return tuple(jnp.shape(x))
    except TypeError:
        return None


def _is_float(x: Any) -> bool:
    try:
        return bool(jnp.issubdtype(jnp.result_type(x), jnp.floating))
    except TypeError:
        return False


def _check_metrics(what: str, kind: str, metrics: Any) -> None:
    if not isinstance(metrics, Mapping):
        raise RlhfJaxError(
            f"{what} returned metrics of type {type(metrics).__name__}; metrics are a dict of "
            "scalars with slash names"
        )
    for key, value in metrics.items():
        if not isinstance(key, str) or "/" not in key:
            raise RlhfJaxError(
                f"{what} returned metric name {key!r}; metric names have a slash "
                "('section/name', e.g. 'ppo/policy/clipfrac')"
            )
        try:
            dtype = jnp.result_type(value)
        except TypeError:
            dtype = None
        if dtype is None or not (jnp.issubdtype(dtype, jnp.number) or dtype == jnp.bool_):
            raise RlhfJaxError(
                f"{what} returned metric {key!r} of type {type(value).__name__}; a metric is "
                "a number"
            )
        if _shape(value) != ():
            raise RlhfJaxError(
                f"{what} returned metric {key!r} of shape {_shape(value)}; a metric is a "
                "scalar (reduce it over the batch)"
            )
    missing = [m for m in REQUIRED_METRICS.get(kind, ()) if m not in metrics]
    if missing:
        raise RlhfJaxError(
            f"{what} returns no metric {', '.join(map(repr, missing))}, which the stage reads "
            f"after training (its accuracy in summary.json and the report); return "
            f"{', '.join(REQUIRED_METRICS[kind])} (see docs/losses.md)"
        )


def check_returned(
    kind: str, name: str, out: Any, batch: Mapping, facts: Mapping | None = None
) -> None:
    """RlhfJaxError, one line naming the part, unless `out` (what the part of `kind` returned
    on `batch`) has the contract's types, shapes and dtypes: a loss `LossOut` with a float
    scalar loss and slash-named scalar metrics including `REQUIRED_METRICS[kind]`; an estimator
    `AdvantageOut` with float [B, N] advantages and [B, N] returns exactly when it declares
    `needs_critic` (`facts`, from `registry.info`)."""
    what = f"{part_noun(kind)} {name!r}"
    if kind == "advantage":
        _check_advantage_returned(what, out, batch, facts or {})
        return
    if kind == "rollout_filter":
        check_filter_returned(what, out, batch)
        return
    if not isinstance(out, LossOut):
        raise RlhfJaxError(
            f"{what} returned {type(out).__name__}; a loss returns "
            "rlhf_jax.types.LossOut(loss, metrics)"
        )
    if _shape(out.loss) != ():
        raise RlhfJaxError(
            f"{what} returned a loss of shape {_shape(out.loss)}; a loss is a scalar (reduce "
            "it over the batch, e.g. with rlhf_jax.ops.reduce_tokens)"
        )
    if not _is_float(out.loss):
        raise RlhfJaxError(
            f"{what} returned a loss of dtype {jnp.result_type(out.loss)}; a loss is a float "
            "(gradients are taken of it)"
        )
    _check_metrics(what, kind, out.metrics)


def _check_advantage_returned(what: str, out: Any, batch: Mapping, facts: Mapping) -> None:
    from rlhf_jax.advantages import AdvantageOut  # (it imports the registry: no cycle at load)

    if not isinstance(out, AdvantageOut):
        raise RlhfJaxError(
            f"{what} returned {type(out).__name__}; an estimator returns "
            "rlhf_jax.advantages.AdvantageOut(advantages, returns, metrics)"
        )
    want = tuple(np.shape(batch["response_mask"]))
    for field in ("advantages", "returns"):
        value = getattr(out, field)
        if value is None:
            continue
        if _shape(value) != want:
            raise RlhfJaxError(
                f"{what} returned {field} of shape {_shape(value)}; they are [B, N] like the "
                f"response mask, {want}"
            )
        if not _is_float(value):
            raise RlhfJaxError(
                f"{what} returned {field} of dtype {jnp.result_type(value)}; they are floats"
            )
    needs_critic = bool(facts.get("needs_critic", False))
    if needs_critic and out.returns is None:
        raise RlhfJaxError(
            f"{what} declares needs_critic but returned no returns (the critic's targets)"
        )
    if not needs_critic and out.returns is not None:
        raise RlhfJaxError(
            f"{what} returned returns (the critic's targets) but does not declare "
            "needs_critic=True, so no critic would train on them"
        )
    _check_metrics(what, "advantage", out.metrics)
    _check_state_returned(what, out.state, batch.get("advantage_state"))


def _check_state_returned(what: str, state: Any, initial: Any) -> None:
    """The next state of an estimator declaring `state=` has its initial state's structure,
    shapes and dtypes (it is carried in the compiled RL state); None for any other."""
    if initial is None:
        if state is not None:
            raise RlhfJaxError(
                f"{what} returned a state but declares none; declare its initial state with "
                "register_advantage(..., state=init) so the RL state carries it"
            )
        return
    want = jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), initial)
    try:
        got = jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), state)
    except TypeError:
        got = None
    if got != want or jax.tree.structure(state) != jax.tree.structure(initial):
        raise RlhfJaxError(
            f"{what} returned state {_one_line_tree(got)}; it must match its declared initial "
            f"state {_one_line_tree(want)} (structure, shapes, dtypes)"
        )


def _one_line_tree(tree: Any) -> str:
    return " ".join(str(tree).split())[:200]


def check_filter_returned(what: str, out: Any, batch: Mapping) -> None:
    """A rollout filter returns one bool per response: [B] like the scores."""
    want = tuple(np.shape(batch["scores"]))
    if _shape(out) != want:
        raise RlhfJaxError(
            f"{what} returned keep of shape {_shape(out)}; a filter returns "
            f"one bool per response, shape {want} like the scores"
        )
    if jnp.result_type(out) != jnp.bool_:
        raise RlhfJaxError(
            f"{what} returned keep of dtype {jnp.result_type(out)}; it is bool (True: the "
            "response may train)"
        )


def check_reward_fn(fn: Callable, name: str, prompts: Sequence[str] = SAMPLE_PROMPTS):
    """Call the reward function `fn` once on tiny texts: the first two of `prompts` (the run's
    own prompts at load, so that a function looking up its answers by prompt finds them),
    one answered twice, with `SAMPLE_COMPLETIONS` (one of them empty); a row field the function
    needs (`answer`) is `SAMPLE_FIELD_VALUE` where the prompts are made up. RlhfJaxError, one line
    naming it, when it raises or does not return one finite float32 number per completion.
    Returns its float32 scores."""
    from rlhf_jax.rewards import reward_fields, score_texts  # (imports the registry: no cycle)

    first, last = prompts[0], prompts[min(1, len(prompts) - 1)]
    chosen = [first, first, last]
    fields = None  # the fields the run's prompt rows carry
    if not any(hasattr(p, "fields") for p in chosen):  # made-up prompts: made-up fields
        fields = {f: [SAMPLE_FIELD_VALUE] * len(chosen) for f in reward_fields(fn)}
    return score_texts(fn, chosen, list(SAMPLE_COMPLETIONS), name, fields)
