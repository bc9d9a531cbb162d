"""The tiny pipeline run shared by the loop tests (built once per pytest run, see
tests/run_once.py), written to a fake `gs://` bucket (tests/fake_bucket.py) from an empty
working folder: every loop test reads what went through the URL path layer, and the run must
leave no local folder named like the URL."""

import os
from pathlib import Path

import fake_bucket as fb
import pytest
from run_once import once_per_run
from test_pipeline import TINY

from rlhf_jax.cli import main

CONFIG = str(Path(__file__).parents[2] / "configs" / "quickstart.yaml")


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, bucket_root):
    """Read only: nine test files read it, from both xdist workers."""

    def build(_marker):
        cwd, empty = os.getcwd(), tmp_path_factory.mktemp("empty_cwd")
        old_cache = os.environ.get("RLHF_JAX_CACHE")
        os.environ["RLHF_JAX_CACHE"] = str(tmp_path_factory.mktemp("url-cache"))
        fb.install(str(bucket_root))
        os.chdir(empty)
        try:
            args = ["pipeline", "--config", CONFIG, "--output", "gs://rlhf-test/run", *TINY]
            assert main(args) == 0
            assert os.listdir(empty) == []  # no "gs:" folder (pathlib would make gs:/rlhf-test/run)
        finally:
            os.chdir(cwd)
            fb.uninstall()
            if old_cache is None:
                os.environ.pop("RLHF_JAX_CACHE")
            else:
                os.environ["RLHF_JAX_CACHE"] = old_cache

    once_per_run(tmp_path_factory, "pipeline", build)
    return bucket_root / "rlhf-test" / "run"
