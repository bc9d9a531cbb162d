"""A fork's rollout filter and a stateful advantage estimator, registered from this one file
(no library edit) and chosen from config by their registered names once it is imported, or
as `fork_rollout_parts:<function>`."""

import jax.numpy as jnp
import numpy as np

from rlhf_jax.advantages import AdvantageOut, register_advantage, sequence_returns
from rlhf_jax.config.schema import FRACTION
from rlhf_jax.filters import register_filter

# What the recording filter saw, call by call (the test reads it back in-process).
SEEN: list[dict] = []


@register_filter("fork_short_or_recorded", reads=("scores", "response_mask"))
def short_responses(batch, max_tokens: int = 10_000):
    """Keep responses of at most `max_tokens` tokens; records every batch it is shown."""
    SEEN.append({k: np.asarray(batch[k]) for k in ("scores", "response_mask")})
    return jnp.sum(jnp.asarray(batch["response_mask"]), axis=1) <= max_tokens


def _initial_baseline():
    return {"baseline": jnp.zeros((), jnp.float32), "seen": jnp.zeros((), jnp.int32)}


@register_advantage(
    "fork_moving_baseline",
    reads=("rewards", "response_mask", "response_ids", "advantage_state"),
    ranges={"decay": FRACTION},
    state=_initial_baseline,
)
def moving_baseline(batch, decay: float = 0.5):
    """REINFORCE with a baseline that is a moving average of the batch's mean return over
    iterations (the first batch's mean at first): `A_i = R_i - b`, then
    `b <- decay * b + (1 - decay) * mean_i R_i`. Also counts the response tokens that are
    not token 0, to show that an estimator reads `response_ids`."""
    state, mask = batch["advantage_state"], jnp.asarray(batch["response_mask"], jnp.float32)
    r_B = sequence_returns(batch)
    mean = jnp.mean(r_B)
    baseline = jnp.where(state["seen"] > 0, state["baseline"], mean)
    adv_BN = (r_B - baseline)[:, None] * mask
    nonzero = jnp.sum((jnp.asarray(batch["response_ids"]) != 0) * mask)
    metrics = {"fork/baseline": baseline, "fork/nonzero_tokens": nonzero}
    following = {"baseline": decay * baseline + (1 - decay) * mean, "seen": state["seen"] + 1}
    return AdvantageOut(adv_BN, None, metrics, following)
