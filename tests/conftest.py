import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# Let tests import the helper modules beside them (tiny.py, hf_fixtures.py).
sys.path.insert(0, str(Path(__file__).parent))

# One persistent XLA compilation cache per pytest run, shared by the xdist workers and by every
# `rlhf-jax` / python subprocess the tests start (they inherit the environment). On CPU nearly
# all of the suite's time is XLA compilation, and many tests compile the same tiny programs:
# jax 0.10 caches CPU executables (compilation_cache.is_cache_used lists "cpu"), and a hit
# loads the very executable a fresh compile made, so results are bitwise the same
# (tests/test_compile_cache.py checks both). The key covers the program, XLA_FLAGS, the
# devices and jax's version, so a test's fake device count never gets another's program.
# Fresh per run: a stale cache from an older jax or library can neither hide nor cause a
# failure.
XLA_CACHE_ENV = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",  # tiny programs compile fast, each counts
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    # No size limit: with one, jax locks the folder and scans every entry on each write
    # (lru_cache.py), quadratic in the suite's thousands of programs. Unlocked, a read that
    # races a write of the same entry fails to decode and jax compiles instead (with a warning).
}

# Every multi-process test's processes share this machine's two cores with the other xdist
# worker: a healthy process can go without CPU for longer than JAX's 100 s heartbeat timeout,
# and the coordinator then stops the run (seen under a loaded suite). Subprocesses inherit it.
os.environ.setdefault("RLHF_JAX_HEARTBEAT_TIMEOUT_S", "600")


def pytest_configure(config):
    """The controller (or a run without xdist) makes the cache folder before the workers start;
    they inherit it, so xdist's workers and their subprocesses share one folder per run."""
    if hasattr(config, "workerinput"):  # an xdist worker: the controller has set it up
        return
    folder = tempfile.mkdtemp(prefix="rlhf-jax-test-xla-cache-")
    config._rlhf_jax_xla_cache = folder
    os.environ.update(XLA_CACHE_ENV, JAX_COMPILATION_CACHE_DIR=folder)
    if "jax" in sys.modules:  # a plugin imported jax before us: its config read the env already
        import jax

        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_unconfigure(config):
    folder = getattr(config, "_rlhf_jax_xla_cache", None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


# Keep this file light: no jax / torch / transformers imports at module level, so that a test
# module may still set XLA flags before jax is first imported. Heavy imports happen inside
# the fixtures, the first time one is used.


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """`hf_checkpoint(family, variant="plain") -> Path` of a tiny random HF checkpoint.

    Variants: "plain" (model.safetensors), "sharded" (several files + index json),
    "old_rope" (config.json in the transformers 4.x rope_theta / rope_scaling style).
    All variants of a family hold the same weights (same seed). Each checkpoint is built once
    per session (per xdist worker), on first use.
    """
    built: dict[tuple[str, str], Path] = {}

    def get(family: str, variant: str = "plain") -> Path:
        key = (family, variant)
        if key not in built:
            from hf_fixtures import make_tiny_checkpoint

            if variant not in ("plain", "sharded", "old_rope"):
                raise ValueError(f"unknown checkpoint variant {variant!r}")
            path = tmp_path_factory.mktemp(f"ckpt-{family}-{variant}")
            built[key] = make_tiny_checkpoint(
                family,
                path,
                seed=0,
                sharded=variant == "sharded",
                old_rope_style=variant == "old_rope",
            )
        return built[key]

    return get


@pytest.fixture(scope="session")
def hf_torch_model():
    """`hf_torch_model(path)`: transformers' float32 eager model of a folder, cached per path."""
    loaded: dict[Path, object] = {}

    def get(path) -> object:
        path = Path(path)
        if path not in loaded:
            from hf_fixtures import load_hf_torch

            loaded[path] = load_hf_torch(path)
        return loaded[path]

    return get


@pytest.fixture(scope="session")
def bucket_root(tmp_path_factory):
    """The local folder behind the fake `gs://` (tests/fake_bucket.py), one per pytest run,
    shared by the xdist workers (the pipeline run of tests/loops/conftest.py lives in it)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this run's temporary folder, shared by its workers
    (root / "bucket").mkdir(exist_ok=True)
    return root / "bucket"


@pytest.fixture
def fake_bucket(bucket_root, tmp_path, monkeypatch):
    """`gs://BUCKET/...` served from `bucket_root/BUCKET/...` for one test (yields the root);
    URL inputs are downloaded into this test's own cache folder."""
    import fake_bucket as fb

    monkeypatch.setenv("RLHF_JAX_CACHE", str(tmp_path / "url-cache"))
    fb.install(str(bucket_root))
    yield bucket_root
    fb.uninstall()
