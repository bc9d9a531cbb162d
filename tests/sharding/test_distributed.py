"""`initialize` decides whether the run spans processes, and refuses half a configuration.

Nothing here starts a distributed runtime: every case either returns before
`jax.distributed.initialize` or raises on the configuration first.
"""

import pytest

from rlhf_jax.config import DistributedConfig
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.sharding import distributed
from rlhf_jax.sharding.distributed import initialize, resolve

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV + distributed._TPU_POD_ENV + (distributed.HEARTBEAT_ENV,):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "_on_cloud_tpu", lambda: False)
    calls = []
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    return calls


def test_single_process_runs_start_nothing(clean_env):
    assert initialize(DistributedConfig()) is False
    cfg = DistributedConfig(coordinator_address="h:1", num_processes=1, process_id=0)
    assert initialize(cfg) is False
    assert clean_env == []


def test_config_wins_over_environment_field_by_field(clean_env, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "env:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert resolve(DistributedConfig(process_id=1)) == ("env:1", 4, 1)
    assert initialize(DistributedConfig(coordinator_address="cfg:2")) is True
    assert clean_env == [dict(coordinator_address="cfg:2", num_processes=4, process_id=3)]


def test_tpu_pods_discover_themselves(clean_env, monkeypatch):
    monkeypatch.setattr(distributed, "_on_cloud_tpu", lambda: True)
    assert initialize(DistributedConfig()) is True
    assert clean_env == [{}]


def test_partial_or_bad_settings_are_named(clean_env, monkeypatch):
    with pytest.raises(RlhfJaxError, match=r"missing num_processes.*process_id"):
        initialize(DistributedConfig(coordinator_address="h:1"))
    with pytest.raises(RlhfJaxError, match="process_id=2 must be in 0..num_processes-1"):
        initialize(DistributedConfig(coordinator_address="h:1", num_processes=2, process_id=2))
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(RlhfJaxError, match="JAX_NUM_PROCESSES: 'two'"):
        initialize(DistributedConfig())
    assert clean_env == []


def test_the_heartbeat_timeout_comes_from_the_config_else_the_environment(clean_env, monkeypatch):
    base = dict(coordinator_address="h:1", num_processes=2, process_id=0)
    assert initialize(DistributedConfig(**base, heartbeat_timeout_s=250)) is True
    monkeypatch.setenv(distributed.HEARTBEAT_ENV, "600")
    assert resolve(DistributedConfig(**base)) == ("h:1", 2, 0)
    assert distributed.heartbeat_setting(DistributedConfig(**base)) == {
        "heartbeat_timeout_seconds": 600
    }
    assert distributed.heartbeat_setting(DistributedConfig(heartbeat_timeout_s=30)) == {
        "heartbeat_timeout_seconds": 30
    }
    assert clean_env == [dict(base, heartbeat_timeout_seconds=250)]


def test_a_bad_heartbeat_timeout_is_named(clean_env, monkeypatch):
    base = dict(coordinator_address="h:1", num_processes=2, process_id=0)
    with pytest.raises(RlhfJaxError, match="heartbeat_timeout_s must be >= 1 second, got 0"):
        initialize(DistributedConfig(**base, heartbeat_timeout_s=0))
    monkeypatch.setenv(distributed.HEARTBEAT_ENV, "soon")
    with pytest.raises(RlhfJaxError, match="RLHF_JAX_HEARTBEAT_TIMEOUT_S: 'soon'"):
        initialize(DistributedConfig(**base))
    assert clean_env == []
