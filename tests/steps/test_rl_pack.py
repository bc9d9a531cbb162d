"""`ppo.pack_update`: the RL update's trunk on packed rows equals the update on the padded
rows (PPO with a separate critic, PPO with a shared-trunk critic, GRPO with the KL in the
loss and micro-batches; with and without trimming), the placement against a naive first
fit, and the host's row count against what the update needs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_rl import OPTIM, setup
from test_rl_trim import _padded_experience, _sgd_state

from rlhf_jax.config import DEFAULT_RULES, MeshConfig
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.loops.packed_update import OVERFLOW, PackedUpdate, pack_layout
from rlhf_jax.loops.trimmed_update import TrimmedUpdate
from rlhf_jax.models import init_scalar_head
from rlhf_jax.sharding import jit_update, make_mesh, state_shardings
from rlhf_jax.steps import init_rl_state, make_optimizer, make_update_fn
from rlhf_jax.steps.rl_pack import PackLayout, first_fit, pack_rows, row_spans

PROMPT_LENS = [3, 1, 2, 3, 1, 2, 3, 2]
RESPONSE_LENS = [3, 1, 2, 0, 3, 1, 2, 3]


def naive_first_fit(lengths, capacity):
    """Longest first (ties in row order), each into the first bin with room."""
    bins, where = [], {}
    for m in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, fill in enumerate(bins):
            if fill + lengths[m] <= capacity:
                where[m] = (b, fill)
                bins[b] += lengths[m]
                break
        else:
            where[m] = (len(bins), 0)
            bins.append(lengths[m])
    return where, sum(1 for f in bins if f > 0)


@pytest.mark.parametrize("seed", range(5))
def test_first_fit_places_rows_as_the_naive_loop(seed):
    rng = np.random.default_rng(seed)
    m, capacity = 12, 16
    lengths = rng.integers(1, capacity + 1, m)
    want, used = naive_first_fit(list(lengths), capacity)
    got = first_fit(jnp.asarray(lengths), capacity, m)
    assert int(got.used) == used and int(got.overflow) == 0
    assert [(int(b), int(o)) for b, o in zip(got.bin, got.offset)] == [want[i] for i in range(m)]
    # Too few rows: the rows that fit nowhere are counted, never silently overlapped.
    if used > 1:
        short = first_fit(jnp.asarray(lengths), capacity, used - 1)
        assert int(short.overflow) > 0
        assert int(jnp.sum(short.fitted)) == m - int(short.overflow)


def test_packed_rows_hold_every_real_token_once():
    b, p, n = 8, 6, 8
    algo = setup()[2]
    exp = _padded_experience(algo, b, p, n, PROMPT_LENS, RESPONSE_LENS)
    rows = first_fit(
        jnp.asarray([pl + rl for pl, rl in zip(PROMPT_LENS, RESPONSE_LENS)]), p + n, b
    ).used
    g = pack_rows(exp.sequence_ids, exp.sequence_mask, int(rows))
    assert g.ids.shape == (int(rows), p + n) and int(rows) < b
    start, end = (np.asarray(x) for x in row_spans(exp.sequence_mask))
    seq, seg = np.asarray(exp.sequence_ids), np.asarray(g.segment_ids)
    flat_ids = np.asarray(g.ids).reshape(-1)
    for m in range(b):
        at = np.flatnonzero(seg.reshape(-1) == m + 1)
        assert len(at) == end[m] - start[m] == PROMPT_LENS[m] + RESPONSE_LENS[m]
        assert np.all(np.diff(at) == 1) and at[0] == int(g.to_packed[m])  # one span
        np.testing.assert_array_equal(flat_ids[at], seq[m, start[m] : end[m]])
    assert int(np.sum(np.asarray(g.mask))) == int(np.sum(end - start))


def _check_same(got, want, got_state, want_state, state, algo):
    assert set(got) == set(want) and OVERFLOW not in got
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for name in ("policy", "critic") if state.critic is not None else ("policy",):
        before = getattr(state, name).params
        new_want, new_got = getattr(want_state, name).params, getattr(got_state, name).params
        assert max(float(jnp.max(jnp.abs(a - w))) for a, w in zip(
            jax.tree.leaves(new_want), jax.tree.leaves(before))) > 1e-4  # fmt: skip
        jax.tree.map(
            lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6),
            new_got,
            new_want,
        )


@pytest.mark.parametrize(
    "changes, trim",
    [
        ({"epochs": 2, "minibatch_size": 4}, False),  # PPO with a separate critic, GAE
        ({"epochs": 2, "minibatch_size": 8, "critic": "shared_trunk"}, False),
        # a recorded top-k support, read in the response slots (padding's words all zero)
        ({"minibatch_size": 4, "kl_penalty": "loss", "top_k": 5}, False),
        ({"advantage": "grpo", "samples_per_prompt": 2, "rollout_batch": 4,
          "kl_penalty": "loss", "kl_estimator": "k3", "buckets_per_doubling": 2,
          "policy_optim": OPTIM.__class__(lr=1e-2, grad_accum=2)}, True),
    ],
)  # fmt: skip
def test_the_packed_update_equals_the_padded_one(changes, trim):
    """Through `PackedUpdate` (the loop's program) against the plain update on the whole
    padded experience: every metric and the new weights to rtol 1e-5 (atol 1e-6 for weights
    near zero: other matmul shapes round differently)."""
    config, ppo, algo, state, _, _, _ = setup(pack_update=True, trim_update=trim, **changes)
    if algo.shared_critic:  # the value head on the policy's trunk, no separate critic
        policy = {**state.policy.params, "value_head": init_scalar_head(config, jax.random.key(1))}
        tx = make_optimizer(ppo.policy_optim, 4)
        state = init_rl_state(policy, None, tx, None, ppo)
    state = _sgd_state(state)
    exp = _padded_experience(algo, ppo.episodes, 6, 8, PROMPT_LENS, RESPONSE_LENS)
    if ppo.top_k:
        words = np.random.default_rng(7).integers(
            0, 2**32, (*exp.response_ids.shape, -(-config.vocab_size // 32)), dtype=np.uint32
        )
        exp = exp._replace(
            support=jnp.asarray(words * (np.asarray(exp.response_mask) > 0)[..., None], jnp.uint32)
        )
    critic_cfg = config if algo.needs_critic and not algo.shared_critic else None
    grad_accum = ppo.policy_optim.grad_accum
    fn = make_update_fn(config, critic_cfg, ppo, algo, grad_accum=grad_accum)
    key = jax.random.key(3)
    want_state, want = jax.jit(fn)(state, exp, None, key)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    shardings = state_shardings(state, mesh)

    def jitted_for(layout):
        packed = make_update_fn(config, critic_cfg, ppo, algo, grad_accum=grad_accum, pack=layout)
        return jit_update(packed, shardings, mesh, DEFAULT_RULES, donate=False)

    per_doubling = ppo.buckets_per_doubling
    cut = TrimmedUpdate(None, mesh, DEFAULT_RULES, per_doubling=per_doubling) if trim else None
    update = PackedUpdate(jitted_for, ppo, mesh, DEFAULT_RULES, trim=cut)
    largest = pack_layout(ppo, mesh, DEFAULT_RULES)
    per_group = ppo.minibatch_size // grad_accum
    assert largest == PackLayout(1, per_group, per_group * ppo.max_new_tokens)
    layout = update.layout(cut.cut(exp) if trim else exp, key)
    assert 1 <= layout.rows <= largest.rows and 1 <= layout.tokens <= largest.tokens
    if not trim:  # 14 columns: every minibatch's tokens fit in fewer rows than it has,
        # and its real response tokens in fewer slots than its rows x 8 response columns
        assert layout.rows < largest.rows and layout.tokens < per_group * 8
    got_state, got = update(jax.device_put(state, shardings), exp, None, key)
    assert [k[2:] for k in update.programs] == [layout[1:]] and update.peak_bytes() > 0
    if trim:  # the longest prompt and response, 3 tokens each: a bucket at 2 per doubling
        assert per_doubling == 2 and [shape[:2] for shape in update.programs] == [(3, 3)]
    _check_same(got, want, got_state, want_state, state, algo)


def test_the_host_counts_the_rows_and_slots_the_update_needs():
    """One packed row, or one response slot, fewer than the host's counts overflows (the
    update counts it, the loop refuses it); the host's counts themselves never do. The
    counts are the update's own: its shuffles, micro-batches and placements, checked
    against a naive loop over them."""
    config, ppo, algo, state, _, _, _ = setup(
        pack_update=True, epochs=3, minibatch_size=4, advantage="grpo",
        samples_per_prompt=2, rollout_batch=4, kl_penalty="none",
    )  # fmt: skip
    exp = _padded_experience(algo, ppo.episodes, 6, 8, PROMPT_LENS, RESPONSE_LENS)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    key = jax.random.key(5)
    update = PackedUpdate(lambda layout: None, ppo, mesh, DEFAULT_RULES)
    rows, tokens = (
        int(x) for x in np.asarray(update._needed(exp.sequence_mask, key, response_len=8))
    )
    assert (rows, tokens) == _naive_needs(exp, key, ppo)
    assert 1 < rows < 4 and 1 < tokens < 4 * 8
    enough = PackLayout(1, rows, tokens)
    for layout, overflows in (
        (enough, False), (enough._replace(rows=rows - 1), True),
        (enough._replace(tokens=tokens - 1), True),
    ):  # fmt: skip
        fn = make_update_fn(config, None, ppo, algo, pack=layout)
        _, metrics = jax.jit(fn)(state, exp, None, key)
        assert (float(metrics[OVERFLOW]) > 0) == overflows, layout

    def too_small(layout):
        small = make_update_fn(config, None, ppo, algo, pack=layout._replace(tokens=tokens - 1))
        return jit_update(small, state_shardings(state, mesh), mesh, DEFAULT_RULES, donate=False)

    refusing = PackedUpdate(too_small, ppo, mesh, DEFAULT_RULES)
    with pytest.raises(RlhfJaxError, match="did not fit"):
        refusing(state, exp, None, key)


def _naive_needs(exp, key, ppo):
    """(rows, response tokens) the update needs, from its shuffles written out as loops: per
    epoch a permutation of the rows (`rl_update.update`'s keys), minibatches in order, each
    split into `grad_accum` micro-batches of rows j, j + n, ...; first fit as the naive loop."""
    mask = np.asarray(exp.sequence_mask)
    n = exp.response_ids.shape[1]
    start, end = (np.asarray(x) for x in row_spans(exp.sequence_mask))
    rows = tokens = 0
    for k in jax.random.split(key, ppo.epochs):
        order = np.asarray(jax.random.permutation(k, mask.shape[0]))
        for i in range(0, len(order), ppo.minibatch_size):
            mb = order[i : i + ppo.minibatch_size]
            accum = ppo.policy_optim.grad_accum
            for j in range(accum):
                micro = mb[j::accum]
                rows = max(rows, naive_first_fit(list(end[micro] - start[micro]), mask.shape[1])[1])
                tokens = max(tokens, int((mask[micro, -n:] != 0).sum()))
    return rows, tokens
