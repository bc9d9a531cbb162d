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
from rlhf_jax.losses import accumulation
from rlhf_jax.types import LossOut

B, T, V, K = 4, 6, 7, 5
GROUP_IDS = np.array([0, 0, 1, 1], np.int32)  # two prompts, two samples each
# Response lengths: unequal, one of a single token; rows (0, 2) and (1, 3), the two strided
# micro-batches of the accumulation check, hold 11 and 3 tokens.
LENGTHS = [6, 1, 5, 2]
ROWS = 4  # rows of every sample batch: split into 2 and 4 micro-batches by the accumulation check
T_LM = 10  # positions of the sft and ptx samples

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


def _counts(kind: str, batch: Mapping) -> dict[str, np.ndarray]:
    """The whole sample batch's counts of `kind`, as the steps pass them."""
    return {k: np.asarray(v) for k, v in accumulation.KIND_COUNTS[kind](batch).items()}


def sample_inputs(kind: str, seed: int = 0) -> tuple[dict, dict, dict]:
    """`(outputs, batch, free)` of small random inputs for a part of `kind`, with every batch
    key the library may provide; free[key] marks the output entries the part must ignore.
    For `advantage`, outputs is empty and free marks the batch entries on padding."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return rng.normal(size=shape).astype(np.float32)

    if kind in ("sft", "ptx"):
        ids = rng.integers(0, V, size=(ROWS, T_LM)).astype(np.int32)
        # Left padding, right padding, none, and a row of one real token (nothing to score).
        attn = _prefix([T_LM, 7, T_LM, 1], T_LM)
        attn[2, :2] = 0
        outputs = {"logits": normal(ROWS, T_LM, V) * 2}
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
    if kind in ("reward", "preference"):
        # 10, 0 (a tie), 2 and 2 ranked pairs: micro-batches of 12 and 2 pairs (or 10, 0, 2, 2).
        ks = [5, 2, 3, 3]
        mask = _prefix(ks, K)
        rank = np.stack([np.concatenate([rng.permutation(k), np.zeros(K - k, int)]) for k in ks])
        rank[1, :2] = 0
        rank[2, :3] = rank[3, :3] = [0, 1, 1]
        batch = {"rank": rank.astype(np.int32), "completion_mask": mask}
        if kind == "reward":
            batch.update(_counts(kind, batch))
            return {"rewards": normal(ROWS, K)}, batch, {"rewards": mask == 0}
        ref = -np.abs(normal(ROWS, K)) * 8
        batch["ref_logps"] = ref
        batch["completion_tokens"] = rng.integers(1, 9, size=(ROWS, K)).astype(np.float32) * mask
        batch.update(_counts(kind, batch))
        return {"logps": ref + normal(ROWS, K)}, batch, {"logps": mask == 0}
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
            "beta": np.float32(0.05),
            "iteration": np.int32(3),
            **_counts(kind, common),
        }
        return outputs, batch, {"logprobs": pad, "entropy": pad}
    if kind == "value":
        old_values = normal(B, T)
        outputs = {"values": old_values + 0.3 * normal(B, T)}
        batch = {
            **common,
            "old_values": old_values,
            "returns": normal(B, T),
            **_counts(kind, common),
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


def _declared_counts(kind: str, fn: Callable, batch: Mapping) -> dict:
    """The whole sample batch's counts a loss declares (`@declare(counts=fn)`), as the steps
    compute them; {} for an estimator or a loss that declares none."""
    if kind == "advantage" or registry.info(fn).get("counts") is None:
        return {}
    counts = accumulation.batch_counts(kind, fn, batch)
    return {k: np.asarray(v) for k, v in counts.items() if k not in batch}


def _call(kind: str, fn: Callable, outputs: Mapping, batch: Mapping) -> Any:
    return fn(batch) if kind == "advantage" else fn(outputs, batch)


def dry_run(kind: str, fn: Callable, name: str, available: tuple[str, ...], why: str = "") -> set:
    """Call `fn` once on tiny inputs holding only the `available` batch keys; an RlhfJaxError
    names the key it read that this run does not have (`why` says when such keys exist), or
    what it returned that breaks the contract (`check_returned`). Returns the keys it read."""
    fn = _with_bound(kind, fn)
    outputs, batch, _ = sample_inputs(kind)
    batch = {**_stage_inputs(kind), **batch}
    declared = _declared_counts(kind, fn, batch)  # the step computes these for the loss too
    # Every loss of a kind also gets its kind's whole-batch counts (`losses.accumulation`).
    available = (*available, *accumulation.KIND_COUNT_KEYS.get(kind, ()), *declared)
    recording = _Recording({k: v for k, v in {**batch, **declared}.items() if k in available})
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
    batch = {**batch, **_declared_counts(kind, fn, batch)}
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


def _rows(tree: Mapping, rows: int) -> tuple[dict, dict]:
    """`(per_row, other)`: the entries with `rows` leading rows, and the rest (scalars)."""
    per_row = {k: v for k, v in tree.items() if np.ndim(v) >= 1 and np.shape(v)[0] == rows}
    return per_row, {k: v for k, v in tree.items() if k not in per_row}


def require_exact_accumulation(kind: str, fn: Callable, name: str, setting: str) -> None:
    """When a config loads with `setting` (a `grad_accum` key) above 1: a fork's loss (one
    defined outside this library) must pass `check_accumulation`, or the run would silently
    train on another loss than with grad_accum=1. An RlhfJaxError says why, in one line."""
    fn = _with_bound(kind, fn)
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
