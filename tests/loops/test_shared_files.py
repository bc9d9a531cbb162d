"""The generated-data protocol of a multi-process run: only the writer writes, a reader never
sees a partly written file, and a reader returns only once the file is complete. Two threads
stand in for two processes (a threading barrier for JAX's); the writer is held halfway
through its rows until the reader has looked at the file."""

import json
import threading

from rlhf_jax.loops.shared_files import write_jsonl_once

ROWS = [{"text": f"row {i} " + "x" * 1000} for i in range(50)]
WAIT_S = 60  # only reached when the protocol is broken (a thread never arrives)


def _held_rows(halfway: threading.Event, looked: threading.Event):
    for i, row in enumerate(ROWS):
        if i == len(ROWS) // 2:
            halfway.set()
            assert looked.wait(WAIT_S)
        yield row


def _run_pair(path, reader_saw: dict):
    halfway, looked = threading.Event(), threading.Event()
    barrier = threading.Barrier(2, timeout=WAIT_S)
    errors = []

    def writer():
        try:
            write_jsonl_once(
                path, _held_rows(halfway, looked), is_writer=True, barrier=lambda _: barrier.wait()
            )
        except Exception as e:  # noqa: BLE001 (reported by the test below)
            errors.append(e)

    def reader():
        try:
            assert halfway.wait(WAIT_S)
            reader_saw["mid_write"] = path.read_text() if path.exists() else None
            looked.set()
            got = write_jsonl_once(path, [], is_writer=False, barrier=lambda _: barrier.wait())
            reader_saw["after"] = got.read_text()
        except Exception as e:  # noqa: BLE001
            errors.append(e)
            looked.set()

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert not errors, errors


def test_reader_never_sees_a_partial_file(tmp_path):
    path = tmp_path / "data" / "pretrain.jsonl"
    saw = {}
    _run_pair(path, saw)
    assert saw["mid_write"] is None  # nothing at the path until the file is complete
    assert [json.loads(line) for line in saw["after"].splitlines()] == ROWS
    assert [p.name for p in path.parent.iterdir()] == ["pretrain.jsonl"]  # no temporary left


def test_old_file_is_replaced_whole(tmp_path):
    """A rerun into the same folder: the previous file stays readable until the new one is
    complete, never a mix of the two."""
    path = tmp_path / "pretrain.jsonl"
    path.write_text('{"text": "old"}\n')
    saw = {}
    _run_pair(path, saw)
    assert saw["mid_write"] == '{"text": "old"}\n'
    assert [json.loads(line) for line in saw["after"].splitlines()] == ROWS


def test_a_reader_writes_nothing(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl_once(path, ROWS, is_writer=False, barrier=lambda _: None)
    assert not path.exists()
