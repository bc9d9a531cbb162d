"""The tiny pipeline run shared by the loop tests (built once per session)."""

import pytest
from test_pipeline import TINY

from rlhf_jax.cli import main


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    assert (
        main(["pipeline", "--config", "configs/quickstart.yaml", "--output", str(out), *TINY]) == 0
    )
    return out
