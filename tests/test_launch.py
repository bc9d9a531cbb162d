"""The tests run on pinned versions and the pod launcher installs the same ones:
launch/tested-versions.txt pins exactly this environment's run-time and test packages (the
README's test command installs with it), launch/constraints.txt is those plus the pod-only packages
(regenerate both with launch/pin_versions.py)."""

import importlib.util
from pathlib import Path

LAUNCH = Path(__file__).parents[1] / "launch"


def _pin_module():
    spec = importlib.util.spec_from_file_location("pin_versions", LAUNCH / "pin_versions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pins(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    return dict(line.split("==") for line in lines if line and not line.startswith(("#", "-c")))


def test_constraints_pin_this_environments_run_time_and_test_packages():
    pins = _pin_module()
    tested = _pins(LAUNCH / "tested-versions.txt")
    closure = pins.runtime_closure(extras=("test",))
    closure = {k: v for k, v in closure.items() if k not in pins.POD_ONLY}
    assert tested == closure, (
        "launch/tested-versions.txt is stale: run python launch/pin_versions.py"
    )
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers"):
        assert name in tested, name
    # the test tools too: a new release of one must not change CI's verdict
    for name in ("pytest", "pytest-xdist", "ruff", "torch", "trl", "wandb", "peft", "scipy"):
        assert name in tested, name
    # the run-time closure alone is a part of it (extras like etils[epath] are followed)
    runtime = pins.runtime_closure()
    assert set(runtime) - set(pins.POD_ONLY) <= set(tested)
    pod = (LAUNCH / "constraints.txt").read_text().splitlines()
    assert "-c tested-versions.txt" in pod  # the pod installs what the tests ran on
    pod_only = _pins(LAUNCH / "constraints.txt")
    assert pod_only == pins.POD_ONLY
    assert pod_only["gcsfs"] == pod_only["fsspec"]  # gcsfs requires its own release of fsspec


def test_the_readme_test_command_installs_the_tested_versions():
    readme = (LAUNCH.parent / "README.md").read_text().splitlines()
    command = readme[readme.index("<!-- test-command -->") + 2]
    assert command.startswith("pip install -c launch/tested-versions.txt -e '.[test]'"), command


def test_the_pod_launcher_installs_with_the_constraints():
    script = (LAUNCH / "tpu_pod.sh").read_text()
    assert "pip install -q -c launch/constraints.txt -e '.[tpu]'" in script
    assert "pip install" not in script.replace("pip install -q -c launch/constraints.txt", "")
