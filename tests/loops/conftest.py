"""The tiny pipeline run shared by the loop tests (built once per pytest run)."""

import pytest
from run_once import once_per_run
from test_pipeline import TINY

from rlhf_jax.cli import main


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """Read only: nine test files read it, from both xdist workers."""

    def build(out):
        args = ["pipeline", "--config", "configs/quickstart.yaml", "--output", str(out), *TINY]
        assert main(args) == 0

    return once_per_run(tmp_path_factory, "pipeline", build)
