"""The batch keys each kind of part receives, declared once.

`BATCH_KEYS[kind]` is what the loops hand a part of that kind: the keys it always gets and
those it gets only under a condition of the run (a KL term, a critic, packed rows, an
estimator's declared state). Everything else reads this table: the load-time dry run
(`contract.dry_run`, called by `steps.algorithm`) offers a part exactly `batch_keys(kind,
**the run's conditions)`, `tests/loops/test_part_keys*.py` capture the batch registered parts
receive in real tiny runs and compare it with the table, and `tests/test_doc_keys.py` checks
the key lists of docs/losses.md and docs/algorithms.md against it.
"""

from __future__ import annotations

import dataclasses

_LM_COUNTS = ("token_count", "sequence_count")
_RANKING_COUNTS = ("pair_count", "prompt_count")


@dataclasses.dataclass(frozen=True)
class PartKeys:
    """`always`: the keys every part of the kind receives; `when`: {condition: (keys, what
    the condition is in words)}, keys received only when the run has the condition."""

    always: tuple[str, ...]
    when: dict[str, tuple[tuple[str, ...], str]] = dataclasses.field(default_factory=dict)

    def keys(self, **conditions: bool) -> tuple[str, ...]:
        unknown = set(conditions) - set(self.when)
        if unknown:
            raise ValueError(f"no condition {sorted(unknown)}; known: {sorted(self.when)}")
        extra = (k for c, (keys, _) in self.when.items() if conditions.get(c) for k in keys)
        return (*self.always, *extra)

    def every_key(self) -> tuple[str, ...]:
        """Under every condition at once."""
        return self.keys(**dict.fromkeys(self.when, True))


_REFERENCE = (("ref_logprobs",), "with a KL term (ppo.kl_penalty reward or loss)")
_CRITIC = (("old_values", "returns"), "with a critic (an estimator that needs one)")
# The RL minibatch a policy loss and the critic's loss both receive (`steps/rl_loss.loss_batch`).
_RL_MINIBATCH = PartKeys(
    (
        "old_logprobs",
        "advantages",
        "response_mask",
        "rewards",
        "scores",
        "group_ids",
        *_LM_COUNTS,
        "beta",
        "iteration",
    ),
    {"reference": _REFERENCE, "critic": _CRITIC},
)

BATCH_KEYS: dict[str, PartKeys] = {
    "sft": PartKeys(
        ("input_ids", "attention_mask", "loss_mask", *_LM_COUNTS),
        {"packed": (("segment_ids",), "with packed rows (sft.pack)")},
    ),
    "reward": PartKeys(
        (
            "input_ids",
            "attention_mask",
            "rank",
            "completion_mask",
            "completion_start",
            *_RANKING_COUNTS,
        )  # fmt: skip
    ),
    "ptx": PartKeys(("input_ids", "attention_mask", *_LM_COUNTS)),
    "policy": _RL_MINIBATCH,
    # The same minibatch: the critic's loss only exists with a critic.
    "value": PartKeys(_RL_MINIBATCH.keys(critic=True), {"reference": _REFERENCE}),
    "advantage": PartKeys(
        ("rewards", "response_mask", "scores", "group_ids", "response_ids"),
        {
            "critic": (("values",), "with a critic"),
            "state": (("advantage_state",), "when the estimator declares a state"),
        },
    ),
    "rollout_filter": PartKeys(("scores", "group_ids", "response_ids", "response_mask")),
    "preference": PartKeys(
        (
            "input_ids",
            "attention_mask",
            "rank",
            "completion_mask",
            "completion_start",
            "ref_logps",
            "completion_tokens",
            *_RANKING_COUNTS,
        )  # fmt: skip
    ),
}


def batch_keys(kind: str, **conditions: bool) -> tuple[str, ...]:
    """The keys a part of `kind` receives in a run with `conditions` (e.g. `reference=True,
    critic=False`; an unnamed condition is false)."""
    return BATCH_KEYS[kind].keys(**conditions)


def _ticked(keys: tuple[str, ...]) -> str:
    return ", ".join(f"`{k}`" for k in keys)


def markdown_table() -> str:
    """docs/losses.md's table of the keys each kind receives, written from `BATCH_KEYS`
    (tests/test_doc_keys.py checks the page holds exactly this)."""
    lines = ["| kind | always | only |", "|---|---|---|"]
    for kind, part in BATCH_KEYS.items():
        only = "; ".join(f"{_ticked(keys)} {words}" for keys, words in part.when.values())
        lines.append(f"| `{kind}` | {_ticked(part.always)} | {only or '-'} |")
    return "\n".join(lines)
