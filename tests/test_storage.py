"""The path layer (rlhf_jax/storage.py) on fsspec's memory filesystem and the fake gs://
bucket (tests/fake_bucket.py): what is written where, what is downloaded when, and the
one-line errors for URLs this installation cannot use."""

import json
import os
from pathlib import Path

import fsspec
import pytest

from rlhf_jax import storage
from rlhf_jax.cli import main
from rlhf_jax.errors import RlhfJaxError


@pytest.fixture
def memory(tmp_path, monkeypatch):
    """An empty memory:// filesystem and a cache folder of this test's own."""
    monkeypatch.setenv("RLHF_JAX_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")
    yield fs
    fs.store.clear()


def test_local_paths_stay_pathlib_and_file_urls_are_local(tmp_path):
    assert storage.output_path(str(tmp_path)) == tmp_path
    assert storage.output_path(f"file://{tmp_path}/x") == tmp_path / "x"
    assert storage.local_copy(f"file://{tmp_path}") == tmp_path
    assert storage.url_scheme("gs://b/x") == "gs" and storage.url_scheme(tmp_path) is None
    assert not storage.is_url("relative/gs:/x") and not storage.is_url(f"file://{tmp_path}")
    assert storage.orbax_directory(tmp_path / "c") == str(tmp_path / "c")


@pytest.mark.parametrize(
    ("location", "output", "message"),
    [
        (
            "gs://b/run",
            True,
            "--output gs://b/run: gs:// needs gcsfs, which is not installed (pip install gcsfs)",
        ),
        (
            "s3://b/run",
            True,
            "--output s3://b/run: s3:// needs s3fs, which is not installed (pip install s3fs)",
        ),
        ("nope://b/run", True, "--output nope://b/run: no filesystem is known for nope://"),
        (
            "memory://run",
            True,
            "--output memory://run: checkpoints cannot be written to "
            "memory:// (orbax writes local folders, file://, gs://, s3://)",
        ),
        (
            "file://host/run",
            False,
            "--output file://host/run: a file:// URL must name an absolute local path",
        ),
    ],
)
def test_unusable_urls_are_one_line_errors(location, output, message):
    with pytest.raises(storage.StorageError) as e:
        storage.check_location(location, "--output", output=output)
    assert str(e.value) == message
    assert isinstance(e.value, RlhfJaxError)  # the CLI prints it alone, exit 2


def test_memory_urls_are_fine_inputs(memory):
    storage.check_location("memory://data/x.jsonl", "config key 'sft.data'")


def test_the_cli_refuses_an_uninstalled_scheme_before_anything_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["sft", "--output", "gs://bucket/run", "model.path=gs://bucket/model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: --output gs://bucket/run: gs:// needs gcsfs, which is not installed "
        "(pip install gcsfs)"
    ]
    assert main(["sft", "--output", str(tmp_path / "o"), "sft.data=s3://b/d.jsonl"]) == 2
    assert "config key 'sft.data' s3://b/d.jsonl: s3:// needs s3fs" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []  # nothing written, and no "gs:" folder


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["pipeline", "--output", "memory://run"],
            "error: --output memory://run: checkpoints "
            "cannot be written to memory:// (orbax writes local folders, file://, gs://, s3://)",
        ),
        (
            ["pipeline", "--output", "nope://b/run"],
            "error: --output nope://b/run: no filesystem is known for nope://",
        ),
        (
            ["pipeline", "--output", "file://host/run"],
            "error: --output file://host/run: a file:// URL must name an absolute local path",
        ),
    ],
)
def test_the_documented_url_errors(args, line, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    assert capsys.readouterr().err.strip().splitlines() == [line]
    assert os.listdir(tmp_path) == []


def test_tensorboard_needs_a_local_output(fake_bucket, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["pipeline", "--output", "gs://b/tb", "log.tensorboard=true"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: log.tensorboard=true writes local event files; --output gs://b/tb is a URL: "
        "set log.tensorboard=false or use a local --output"
    )


def test_inputs_are_downloaded_once_and_again_when_they_change(memory):
    memory.pipe("/models/m/config.json", b'{"a": 1}')
    memory.pipe("/models/m/sub/w.bin", b"123")
    first = storage.local_copy("memory://models/m", "model folder")
    assert first.name == "m" and json.loads((first / "config.json").read_text()) == {"a": 1}
    assert (first / "sub" / "w.bin").read_bytes() == b"123"
    assert storage.local_copy("memory://models/m") == first  # unchanged: the same copy
    memory.pipe("/models/m/sub/w.bin", b"12345")  # changed remotely: fetched again
    second = storage.local_copy("memory://models/m/")
    assert second != first and (second / "sub" / "w.bin").read_bytes() == b"12345"
    one = storage.local_copy("memory://models/m/config.json")
    assert one.name == "config.json" and one.read_bytes() == b'{"a": 1}'
    with pytest.raises(RlhfJaxError, match="data file memory://nothing.jsonl: no such file"):
        storage.local_copy("memory://nothing.jsonl", "data file")


def test_a_model_saved_to_a_url_is_uploaded_whole(memory):
    with storage.writable_folder("memory://out/sft") as folder:
        assert isinstance(folder, Path) and folder.is_dir()
        (folder / "config.json").write_text("{}")
        (folder / "tok").mkdir()
        (folder / "tok" / "t.json").write_text("[]")
    assert memory.cat("/out/sft/config.json") == b"{}"
    assert memory.cat("/out/sft/tok/t.json") == b"[]"
    assert not folder.exists()  # the temporary folder is gone


def test_metrics_at_a_url_are_rewritten_whole_and_kept_across_runs(fake_bucket):
    from rlhf_jax.loops.logging import MetricsLogger

    logger = MetricsLogger("gs://b/run", progress=False)
    logger.log("sft", 1, {"loss": 1.0})  # within the interval: not written yet
    file = fake_bucket / "b" / "run" / "metrics.jsonl"
    assert not file.exists()
    logger.sync()  # before a checkpoint: written now
    assert len(file.read_text().splitlines()) == 1
    logger.log("sft", 2, {"loss": 0.7})
    logger.close()  # written whole; the resumed run below logs step 2 again
    assert [json.loads(x)["step"] for x in file.read_text().splitlines()] == [1, 2]
    again = MetricsLogger("gs://b/run", progress=False)  # a resumed run appends
    again._file.INTERVAL_S = 0.0
    again.log("sft", 2, {"loss": 0.5})
    assert [json.loads(x)["step"] for x in file.read_text().splitlines()] == [1, 2, 2]
    again.close()
    with pytest.raises(RlhfJaxError, match="log.tensorboard=true writes local event files"):
        MetricsLogger("gs://b/run2", tensorboard=True, progress=False)


def test_a_url_output_is_not_locked_and_says_so(fake_bucket, capsys):
    from rlhf_jax.loops.output_lock import LOCK_FILE, lock_output, release_output_locks

    lock_output("gs://b/run")
    record = fake_bucket / "b" / "run" / LOCK_FILE
    assert json.loads(record.read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert "warning: output gs://b/run is a URL and cannot be locked against another run" in err
    assert "last holder record" not in err
    release_output_locks()
    assert not record.exists()
    record.write_text(json.dumps({"pid": 7, "host": "h", "command": "c", "started": "then"}))
    lock_output("gs://b/run")  # a record left behind (a preempted run): named, not blocking
    assert "its last holder record says pid 7 on host h" in capsys.readouterr().err
    release_output_locks()


def test_an_output_at_the_input_models_url_is_refused(fake_bucket):
    from rlhf_jax.loops.logging import prepare_output_dir

    with pytest.raises(RlhfJaxError, match="--output/sft is the folder of config key"):
        prepare_output_dir("gs://b/run", {"model.path": "gs://b/run/sft/"}, ("sft",))
    out = prepare_output_dir("gs://b/run", {"model.path": "gs://b/other"}, ("sft",))
    assert os.fspath(out) == "gs://b/run" and (fake_bucket / "b" / "run").is_dir()


def test_checkpoints_at_a_url_on_this_machines_disk_go_to_orbax_as_local_paths(fake_bucket):
    directory = storage.output_path("gs://b/run") / "checkpoints" / "sft"
    assert storage.orbax_directory(directory) == str(fake_bucket / "b" / "run/checkpoints/sft")
