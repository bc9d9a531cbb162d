"""The batch keys the SFT, reward-model and DPO losses receive in real tiny `rlhf-jax sft`,
`rm` and `dpo` runs are exactly those `contract.keys.BATCH_KEYS` declares (recorded by the
parts of tests/fork_key_probes.py)."""

import fork_key_probes as probes
import pytest
from test_part_keys import _received

from rlhf_jax.cli import main
from rlhf_jax.contract import batch_keys

COMMON = ["log.progress=false", "lora.rank=0"]


@pytest.fixture(autouse=True)
def _fresh():
    probes.SEEN.clear()
    yield
    probes.SEEN.clear()


@pytest.mark.parametrize("pack", [False, True])
def test_sft(run_dir, tmp_path, pack):
    data = run_dir / "data" / "sft.jsonl"
    args = ["sft", "--output", str(tmp_path / "sft"), *COMMON, "sft.steps=1", "sft.batch_size=8",
            f"model.path={run_dir / 'sft'}", f"sft.data={data}", "sft.loss=fork_key_probes:sft",
            f"sft.pack={str(pack).lower()}"]  # fmt: skip
    assert main(args) == 0
    assert _received("sft") == set(batch_keys("sft", packed=pack))


def test_reward_model_and_dpo(run_dir, tmp_path):
    rankings = run_dir / "data" / "rankings.jsonl"
    rm = ["rm", "--output", str(tmp_path / "rm"), *COMMON, "rm.steps=1", "rm.batch_size=8",
          f"rm.init={run_dir / 'sft'}", f"rm.data={rankings}",
          "rm.loss=fork_key_probes:reward"]  # fmt: skip
    assert main(rm) == 0
    assert _received("reward") == set(batch_keys("reward"))
    dpo = ["dpo", "--output", str(tmp_path / "dpo"), *COMMON, "dpo.steps=1", "dpo.batch_size=8",
           f"dpo.policy={run_dir / 'sft'}", f"dpo.data={rankings}",
           "dpo.loss=fork_key_probes:preference"]  # fmt: skip
    assert main(dpo) == 0
    assert _received("preference") == set(batch_keys("preference"))
