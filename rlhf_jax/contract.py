"""The contract every swappable part keeps, as a checker a fork runs on its own function.

    from rlhf_jax.contract import check_part
    check_part("policy", my_fork.losses.my_loss)          # raises AssertionError on a breach
    check_part("advantage", my_fork.estimators.my_est)
    check_part("reward_fn", my_fork.rewards.exact_match)

Losses: a finite scalar and flat slash-named scalar metrics; masked positions ignored (junk
written there changes nothing and gets zero gradient); jittable; finite gradients that reach
the real positions; the metrics the loops read back after training (`REQUIRED_METRICS`: a
reward loss's `rm/accuracy`, `rm/margin`, `rm/pairs`, a preference loss's `dpo/accuracy`).
Advantage estimators: [B, N] finite advantages, 0 on padding, unchanged by
junk on padding; returns present exactly when the estimator declares `needs_critic`; jittable.
Reward functions: one finite float32 number per completion, on a few tiny texts
(`check_reward_fn`). Every part: it reads only batch keys the library provides (and, when it
declares `reads`, only those). The same key check, and the check of what the part returns
(types, shapes, dtypes, required metrics: `check_returned`), runs on the configured parts when
a config is loaded (`dry_run`), so a loss that needs a key this run lacks, or returns a [B]
loss, fails with a one-line error naming it before anything is loaded.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import registry
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.types import LossOut

B, T, V, K = 4, 6, 7, 5
GROUP_IDS = np.array([0, 0, 1, 1], np.int32)  # two prompts, two samples each
LENGTHS = [6, 3, 1, 4]  # response lengths: unequal, one of a single token

# Batch keys the RL update hands a policy loss, beyond what every loss of that kind gets:
# these exist only with a reference model (a KL term) or a critic.
REFERENCE_KEYS = ("ref_logprobs",)
CRITIC_KEYS = ("old_values", "returns")
POLICY_KEYS = (
    "old_logprobs",
    "advantages",
    "response_mask",
    "group_ids",
    "scores",
    "rewards",
    "token_count",
    "sequence_count",
    "beta",
    "iteration",
)
ADVANTAGE_KEYS = ("rewards", "response_mask", "scores", "group_ids")
# What the critic's loss receives (with its `values` output), with or without a critic this run.
VALUE_KEYS = ("old_values", "returns", "response_mask", "token_count", *ADVANTAGE_KEYS)
# What the supervised stages hand their losses: SFT (`segment_ids` when rows are packed),
# the reward model's ranking batch, the pretraining batch of ptx.
SFT_KEYS = ("input_ids", "attention_mask", "loss_mask")
PACKED_SFT_KEYS = (*SFT_KEYS, "segment_ids")
REWARD_KEYS = ("input_ids", "attention_mask", "rank", "completion_mask", "completion_start")
PTX_KEYS = ("input_ids", "attention_mask")

# Metrics the loops read back from a loss after its stage has trained: `rlhf-jax rm` and the
# pipeline report the reward model's pairwise accuracy, margin and pair count; `rlhf-jax dpo`
# and `compare` the implicit-reward accuracy. Required by contract (checked by `check_part` and
# when the config is loaded), so no stage trains with a loss that would fail after training.
# Every other metric is optional: the loops log what a loss returns and read nothing else.
REQUIRED_METRICS = {
    "reward": ("rm/accuracy", "rm/margin", "rm/pairs"),
    "preference": ("dpo/accuracy",),
}

# Texts a reward function is called on by `check_part`: two prompts, one answered twice as in
# a group, and an empty completion (a response that is EOS at once decodes to "").
SAMPLE_PROMPTS = ("What is 2 + 3? Answer with a number.", "Name a colour.")
SAMPLE_COMPLETIONS = (" 5", "", " Red, I think.")


def _prefix(lengths, t):
    return (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.float32)


def _shifted_free(target_mask_BT):
    """Logits at t score token t + 1: position t is free when token t + 1 is not a target;
    the last position scores nothing."""
    free = np.ones_like(target_mask_BT, dtype=bool)
    free[:, :-1] = target_mask_BT[:, 1:] == 0
    return free


def sample_inputs(kind: str, seed: int = 0) -> tuple[dict, dict, dict]:
    """`(outputs, batch, free)` of small random inputs for a part of `kind`, with every batch
    key the library may provide; free[key] marks the output entries the part must ignore.
    For `advantage`, outputs is empty and free marks the batch entries on padding."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return rng.normal(size=shape).astype(np.float32)

    if kind in ("sft", "ptx"):
        ids = rng.integers(0, V, size=(3, T)).astype(np.int32)
        attn = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1] * 6], np.float32)
        outputs = {"logits": normal(3, T, V) * 2}
        batch = {"input_ids": ids, "attention_mask": attn}
        if kind == "sft":
            loss_mask = np.zeros((3, T), np.float32)
            loss_mask[0, 4:6] = loss_mask[1, 2:4] = loss_mask[2, 1:6] = 1.0
            batch["loss_mask"] = loss_mask
            free = _shifted_free(loss_mask)
        else:
            pairs = np.zeros((3, T), np.float32)
            pairs[:, 1:] = attn[:, :-1] * attn[:, 1:]  # token t is scored from a real context
            free = _shifted_free(pairs)
        return outputs, batch, {"logits": free[..., None].repeat(V, -1)}
    if kind == "reward":
        ks = [2, 5, 3]
        mask = _prefix(ks, K)
        rank = np.stack([np.concatenate([rng.permutation(k), np.zeros(K - k, int)]) for k in ks])
        rank[2, :3] = [0, 1, 1]  # a tie
        batch = {"rank": rank.astype(np.int32), "completion_mask": mask}
        return {"rewards": normal(3, K)}, batch, {"rewards": mask == 0}
    if kind == "preference":
        ks = [2, 5, 3]
        mask = _prefix(ks, K)
        rank = np.stack([np.concatenate([rng.permutation(k), np.zeros(K - k, int)]) for k in ks])
        rank[2, :3] = [0, 1, 1]  # a tie
        ref = -np.abs(normal(3, K)) * 8
        batch = {
            "rank": rank.astype(np.int32),
            "completion_mask": mask,
            "ref_logps": ref,
            "completion_tokens": rng.integers(1, 9, size=(3, K)).astype(np.float32) * mask,
        }
        return {"logps": ref + normal(3, K)}, batch, {"logps": mask == 0}
    mask = _prefix(LENGTHS, T)
    pad = mask == 0
    scores = normal(B)
    rewards = np.zeros((B, T), np.float32)
    rewards[np.arange(B), np.asarray(LENGTHS) - 1] = scores
    rewards -= 0.05 * np.abs(normal(B, T)) * mask
    common = {
        "response_mask": mask,
        "group_ids": GROUP_IDS,
        "scores": scores,
        "rewards": rewards * mask,
    }
    if kind == "advantage":
        batch = {**common, "values": normal(B, T) * mask}
        return {}, batch, {"rewards": pad, "values": pad}
    old = -np.abs(normal(B, T))
    if kind == "policy":
        outputs = {"logprobs": old + 0.2 * normal(B, T), "entropy": np.abs(normal(B, T))}
        batch = {
            **common,
            "old_logprobs": old,
            "advantages": normal(B, T) * mask,
            "ref_logprobs": old + 0.1 * normal(B, T),
            "old_values": normal(B, T),
            "returns": normal(B, T),
            "token_count": np.float32(mask.sum()),
            "sequence_count": np.float32(B),
            "beta": np.float32(0.05),
            "iteration": np.int32(3),
        }
        return outputs, batch, {"logprobs": pad, "entropy": pad}
    if kind == "value":
        old_values = normal(B, T)
        outputs = {"values": old_values + 0.3 * normal(B, T)}
        batch = {
            **common,
            "old_values": old_values,
            "returns": normal(B, T),
            "token_count": np.float32(mask.sum()),
        }
        return outputs, batch, {"values": pad}
    raise ValueError(f"no sample inputs for kind {kind!r}")


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


def _call(kind: str, fn: Callable, outputs: Mapping, batch: Mapping) -> Any:
    return fn(batch) if kind == "advantage" else fn(outputs, batch)


def dry_run(kind: str, fn: Callable, name: str, available: tuple[str, ...], why: str = "") -> set:
    """Call `fn` once on tiny inputs holding only the `available` batch keys; an RlhfJaxError
    names the key it read that this run does not have (`why` says when such keys exist), or
    what it returned that breaks the contract (`check_returned`). Returns the keys it read."""
    fn = _with_bound(kind, fn)
    outputs, batch, _ = sample_inputs(kind)
    batch = {**_stage_inputs(kind), **batch}
    recording = _Recording({k: v for k, v in batch.items() if k in available})
    noun = _noun(kind)
    try:
        out = _call(kind, fn, outputs, recording)
    except KeyError as e:
        key = e.args[0] if e.args else "?"
        raise RlhfJaxError(
            f"{noun} {name!r} reads batch key {key!r}, which this run does not provide"
            f"{'; ' + why if why else ''} (available: {', '.join(sorted(available))})"
        ) from None
    check_returned(kind, name, out, batch, registry.info(fn))
    return recording.read


def _noun(kind: str) -> str:
    return "advantage estimator" if kind == "advantage" else f"{kind} loss"


def _stage_inputs(kind: str) -> dict:
    """Batch keys a stage hands its loss beyond the contract's sample inputs (the tokens the
    model read), so that a loss reading them passes the load-time dry run."""
    rng = np.random.default_rng(2)
    if kind in ("reward", "preference"):  # the ranking batch: [3, K, L] rows, prompt lengths
        length = 8
        return {
            "input_ids": rng.integers(0, V, size=(3, K, length)).astype(np.int32),
            "attention_mask": np.ones((3, K, length), np.float32),
            "completion_start": np.array([2, 3, 4], np.int32),
        }
    if kind == "sft":  # packed rows: one sequence per row here
        return {"segment_ids": np.ones((3, T), np.int32)}
    return {}


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
    what = f"{_noun(kind)} {name!r}"
    if kind == "advantage":
        _check_advantage_returned(what, out, batch, facts or {})
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


def check_reward_fn(fn: Callable, name: str, prompts: Sequence[str] = SAMPLE_PROMPTS):
    """Call the reward function `fn` once on tiny texts: the first two of `prompts` (the run's
    own prompts at load, so that a function looking up its answers by prompt finds them),
    one answered twice, with `SAMPLE_COMPLETIONS` (one of them empty). RlhfJaxError, one line
    naming it, when it raises or does not return one finite float32 number per completion.
    Returns its float32 scores."""
    from rlhf_jax.rewards import score_texts  # (it imports the registry: no cycle at load)

    first, last = prompts[0], prompts[min(1, len(prompts) - 1)]
    return score_texts(fn, [first, first, last], list(SAMPLE_COMPLETIONS), name)


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


def _with_bound(kind: str, fn: Callable) -> Callable:
    """A preference loss always receives `beta` (from `dpo.beta`): bind one unless bound."""
    if kind == "preference" and "beta" not in getattr(fn, "keywords", {}):
        return functools.partial(fn, beta=0.5)
    return fn


def check_part(kind: str, fn: Callable) -> None:
    """Assert `fn` keeps the contract of parts of `kind` (see the module docstring)."""
    if kind == "reward_fn":
        _check_reward_fn_part(fn)
        return
    fn = _with_bound(kind, fn)
    outputs, batch, free = sample_inputs(kind)
    recording = _Recording(batch)
    out = _call(kind, fn, outputs, recording)
    _assert_returned(kind, fn, out, batch)
    declared = registry.info(fn).get("reads")
    if declared is not None:
        undeclared = recording.read - set(declared)
        assert not undeclared, f"reads undeclared batch keys {sorted(undeclared)}"
    if kind == "advantage":
        _check_advantage(fn, out, batch, free)
    else:
        _check_loss(fn, out, outputs, batch, free)


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


def _assert_returned(kind: str, fn: Callable, out: Any, batch: Mapping) -> None:
    """`check_returned` as an assertion, for `check_part`."""
    try:
        check_returned(kind, _name(fn), out, batch, registry.info(fn))
    except RlhfJaxError as e:
        raise AssertionError(str(e)) from None


def _check_reward_fn_part(fn: Callable) -> None:
    """A reward function's contract: one finite float32 number per completion of the sample
    texts (`check_reward_fn`), as an assertion."""
    try:
        check_reward_fn(fn, _name(fn))
    except RlhfJaxError as e:
        raise AssertionError(str(e)) from None


def _name(fn: Callable) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)
