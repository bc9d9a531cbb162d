"""The pod launcher installs the versions the tests passed with: launch/constraints.txt pins
exactly this environment's run-time packages (regenerate it with launch/pin_versions.py)."""

import importlib.util
from pathlib import Path

LAUNCH = Path(__file__).parents[1] / "launch"


def _pin_module():
    spec = importlib.util.spec_from_file_location("pin_versions", LAUNCH / "pin_versions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_constraints_pin_this_environments_run_time_packages():
    pins = _pin_module()
    lines = (LAUNCH / "constraints.txt").read_text().splitlines()
    pinned = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    tested = {k: v for k, v in pinned.items() if k not in pins.POD_ONLY}
    assert tested == {k: v for k, v in pins.runtime_closure().items() if k not in pins.POD_ONLY}, (
        "launch/constraints.txt is stale: run python launch/pin_versions.py"
    )
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers"):
        assert name in tested, name
    assert pinned["gcsfs"] == pinned["fsspec"]  # gcsfs requires its own release of fsspec


def test_the_pod_launcher_installs_with_the_constraints():
    script = (LAUNCH / "tpu_pod.sh").read_text()
    assert "pip install -q -c launch/constraints.txt -e '.[tpu]'" in script
    assert "pip install" not in script.replace("pip install -q -c launch/constraints.txt", "")
