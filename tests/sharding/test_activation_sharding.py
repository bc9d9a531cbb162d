"""Activations carry logical axes (issue 22): on an FSDP mesh at a fixed number of rows per
device, no compiled program (SFT, RM, DPO, RL experience with its decode loop, RL update)
moves a global-batch activation between devices, and the per-device peak does not rise from
4 to 8 to 16 devices. Read from the compiled HLO and XLA's memory analysis on virtual CPU
devices (`scaling_script.py`, one subprocess per device count), with a control: the same SFT
step compiled without the constraints all-gathers the global batch's logits. The evaluation
programs (held-out losses, scores, log-probs, sampling) are held to the same check; without
the constraints the held-out LM loss all-reduces the global batch's logits."""

import json
import sys
from contextlib import ExitStack
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from processes import Process, finish_all
from tiny import tiny_model

from rlhf_jax.config import MeshConfig
from rlhf_jax.config.schema import DEFAULT_RULES
from rlhf_jax.models import forward
from rlhf_jax.models.axes import constrain
from rlhf_jax.sharding import activation_rules, activation_sharding, make_mesh

HERE = Path(__file__).parent
COUNTS = (4, 8, 16)
PROGRAMS = {"sft/step", "rm/step", "dpo/step", "ppo/experience", "ppo/update"}
# The loops' evaluation programs (tests/sharding/eval_programs.py), compiled as on a mesh.
EVALS = {f"eval/{n}" for n in ("lm_loss", "rewards", "score", "dpo_logps", "sequence_logprob",
                               "sample")}  # fmt: skip


def _result(proc: Process) -> dict:
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, proc.stderr[-4000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.fixture(scope="module")
def compiled_facts() -> tuple[dict[int, dict], dict]:
    """{N: {program: facts}} and the unconstrained control at N = 4."""
    runs = [[str(n)] for n in COUNTS] + [["4", "unconstrained"]]
    with ExitStack() as stack:  # a failure leaves none of them running
        procs = [
            stack.enter_context(
                Process([sys.executable, str(HERE / "scaling_script.py"), str(HERE.parents[1]), *a])
            )
            for a in runs
        ]
        codes = finish_all(procs)
    for proc, code in zip(procs, codes):
        assert code == 0, proc.stderr[-4000:]
    facts = [_result(p) for p in procs]
    return dict(zip(COUNTS, facts)), facts[-1]


def test_no_collective_moves_a_global_batch_activation(compiled_facts):
    by_n, control = compiled_facts
    for n, programs in by_n.items():
        assert set(programs) == PROGRAMS | EVALS
        for name, facts in programs.items():
            assert facts["batch_collectives"] == [], (n, name)
    # The check sees the bug it guards against: without the constraints the partitioner
    # gathers f32 [global tokens, vocab] logits (3 rows x 4 devices x 48 tokens = 576).
    for name in ("sft/step", "eval/lm_loss"):
        assert any("[576, 1000]" in c for c in control[name]["batch_collectives"]), control


def test_per_device_memory_does_not_rise_with_devices(compiled_facts):
    by_n, _ = compiled_facts
    for name in PROGRAMS:
        peaks = [by_n[n][name]["peak"] for n in COUNTS]
        assert peaks == sorted(peaks, reverse=True), (name, peaks)
        largest = [by_n[n][name]["largest_collective"] for n in COUNTS]
        assert largest[-1] <= largest[0], (name, largest)


def test_constraints_leave_one_device_programs_unchanged():
    """On a one-device mesh the traced program is the unconstrained one, op for op."""
    cfg, params = tiny_model()
    ids = jnp.ones((2, 8), jnp.int32)
    plain = str(jax.make_jaxpr(lambda p: forward(cfg, p, ids, ids))(params))
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    with activation_sharding(mesh, activation_rules(DEFAULT_RULES)):
        under_rules = str(jax.make_jaxpr(lambda p: forward(cfg, p, ids, ids))(params))
    assert under_rules == plain
    x = np.zeros((2, 3))
    assert constrain(x, "batch", "embed") is x  # no rules active: the input itself


def test_activation_rules_keep_the_model_dimension_whole():
    rules = activation_rules(DEFAULT_RULES)
    assert rules["embed"] is None and rules["length"] is None
    assert rules["batch"] == DEFAULT_RULES["batch"] and rules["vocab"] == "tensor"
    assert activation_rules(DEFAULT_RULES, {"length": "tensor"})["length"] == "tensor"
