"""Rollout filters as parts: DAPO's dynamic sampling against a plain loop over groups, the
part contract of a filter, and one-line errors at config load naming a bad one."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import registry
from rlhf_jax.config import PPOConfig, RolloutFilterSpec
from rlhf_jax.contract import check_part
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.filters import dynamic_sampling
from rlhf_jax.steps import RLAlgorithm


def _naive_dynamic_sampling(scores, group_ids, min_spread=0.0):
    keep = np.zeros(len(scores), bool)
    for g in set(group_ids.tolist()):
        rows = [i for i in range(len(scores)) if group_ids[i] == g]
        values = [scores[i] for i in rows]
        for i in rows:
            keep[i] = max(values) - min(values) > min_spread
    return keep


@pytest.mark.parametrize("seed,min_spread", list(itertools.product(range(4), [0.0, 0.5])))
def test_dynamic_sampling_keeps_exactly_the_groups_whose_scores_disagree(seed, min_spread):
    rng = np.random.default_rng(seed)
    g = 2
    # Few distinct rewards (as DAPO's accuracy) make all-equal groups common; spreads of 0.3,
    # 0.7 and 1 on either side of min_spread; a group's rows not adjacent.
    scores = rng.choice(np.float32([0.0, 0.7, 1.0]), 32)
    ids = rng.permutation(np.arange(32) // g).astype(np.int32)
    keep = np.asarray(dynamic_sampling({"scores": scores, "group_ids": ids}, min_spread))
    np.testing.assert_array_equal(keep, _naive_dynamic_sampling(scores, ids, min_spread))
    assert 0 < keep.sum() < 32  # both kinds of group occur


def test_every_registered_filter_keeps_the_contract():
    for name in registry.registered("rollout_filter"):
        check_part("rollout_filter", registry.lookup("rollout_filter", name))


def _load(fn, samples=2):
    spec = RolloutFilterSpec(f"{__name__}:{fn.__name__}")
    ppo = PPOConfig(
        advantage="grpo", samples_per_prompt=samples, kl_penalty="loss", rollout_filters=(spec,)
    )
    return RLAlgorithm.from_config(ppo)


def per_group(batch):  # [B / G] instead of [B]
    return jnp.ones(batch["scores"].shape[0] // 2, bool)


def as_floats(batch):
    return jnp.ones(batch["scores"].shape, jnp.float32)


def reads_values(batch):
    return batch["values"] > 0


@pytest.mark.parametrize(
    "fn,message",
    [
        (
            per_group,
            "returned keep of shape (2,); a filter returns one bool per response, shape (4,)",
        ),
        (as_floats, "returned keep of dtype float32; it is bool"),
        (reads_values, "reads batch key 'values', which this run does not provide"),
    ],
)
def test_a_bad_filter_is_one_line_at_load_naming_it(fn, message):
    with pytest.raises(RlhfJaxError) as e:
        _load(fn)
    text = str(e.value)
    assert text.startswith(f"config key 'ppo.rollout_filters[0]': rollout filter '{__name__}:")
    assert message in text and "\n" not in text


def test_a_filter_that_compares_samples_needs_groups():
    with pytest.raises(RlhfJaxError, match=r"needs ppo.samples_per_prompt >= 2, got 1"):
        RLAlgorithm.from_config(PPOConfig(rollout_filters=(RolloutFilterSpec("dynamic_sampling"),)))
