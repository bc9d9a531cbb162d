"""The batch keys each RL part receives in real tiny `rlhf-jax ppo` runs are exactly the ones
`contract.keys.BATCH_KEYS` declares for the run's conditions (a KL term, a critic): parts of
every kind from tests/fork_key_probes.py record what they are handed. (The run without a
critic or a KL term is tests/loops/test_rollout_stages.py's, which shares its probes.)"""

import fork_key_probes as probes
import pytest

from rlhf_jax.cli import main
from rlhf_jax.contract import batch_keys
from rlhf_jax.steps import RLAlgorithm


def _ppo(run_dir, out, *extra):
    data = run_dir / "data"
    return ["ppo", "--output", str(out), "log.progress=false", "ppo.iterations=1",
            "ppo.epochs=1", "ppo.max_new_tokens=4", "ppo.rollout_batch=8",
            "ppo.minibatch_size=8", f"ppo.policy={run_dir / 'sft'}",
            f"ppo.prompts={data / 'ppo_prompts.jsonl'}", "ppo.policy_loss=fork_key_probes:policy",
            "ppo.rollout_filters=[{name: 'fork_key_probes:rollout_filter'}]", *extra]  # fmt: skip


def _received(kind: str) -> set:
    """The keys of the one batch shape `kind`'s part was handed, checking a real run's step
    (not only the load-time dry run) handed it one."""
    seen = probes.SEEN.pop(kind)
    assert any(traced for _, traced in seen), f"{kind}: never called by the run itself"
    shapes = {keys for keys, _ in seen}
    assert len(shapes) == 1, f"{kind}: batches of different keys {shapes}"
    return set(shapes.pop())


@pytest.fixture(autouse=True)
def _fresh():
    probes.SEEN.clear()
    yield
    probes.SEEN.clear()


def test_with_a_critic_a_kl_term_and_ptx(run_dir, tmp_path, monkeypatch):
    """Also: the run resolves its algorithm once (every RLAlgorithm.from_config call counted):
    the CLI resolves it when the config loads and hands it along."""
    calls = []
    resolve = RLAlgorithm.from_config.__func__

    def counted(cls, ppo):
        calls.append(ppo.advantage)
        return resolve(cls, ppo)

    monkeypatch.setattr(RLAlgorithm, "from_config", classmethod(counted))
    args = _ppo(run_dir, tmp_path / "a", f"ppo.reward_model={run_dir / 'rm'}",
                "ppo.advantage=fork_key_probes:advantage", "ppo.value_loss=fork_key_probes:value",
                "ppo.kl_penalty=reward", "ptx.coef=0.5", "ptx.batch_size=8",
                "ptx.loss=fork_key_probes:ptx",
                f"ptx.data={run_dir / 'data' / 'pretrain.jsonl'}")  # fmt: skip
    assert main(args) == 0
    assert calls == ["fork_key_probes:advantage"]
    assert _received("policy") == set(batch_keys("policy", reference=True, critic=True))
    assert _received("value") == set(batch_keys("value", reference=True))
    assert _received("advantage") == set(batch_keys("advantage", critic=True))
    assert _received("rollout_filter") == set(batch_keys("rollout_filter"))
    assert _received("ptx") == set(batch_keys("ptx"))
