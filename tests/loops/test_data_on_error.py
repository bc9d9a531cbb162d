"""`data.on_error`: the default stops on the first bad row (file, line, field; exit 2) before
anything is compiled; `skip` leaves bad rows out and accounts for every one in summary.json."""

import json

from rlhf_jax.cli import main

BAD_ROWS = [
    b'{"prompt": "a", "completion": }',  # malformed JSON
    b'{"prompt": "tell me of the red mouse:"}',  # missing field
    b'{"prompt": 3, "completion": " x"}',  # wrong type
    b'{"prompt": "caf\xe9", "completion": " x"}',  # not UTF-8
    b'{"prompt": "", "completion": " x"}',  # empty string
]


def _sft_file(run_dir, tmp_path):
    good = (run_dir / "data" / "sft.jsonl").read_bytes().splitlines()[:40]
    rows = good[:10] + BAD_ROWS + good[10:]
    path = tmp_path / "sft_with_bad_rows.jsonl"
    path.write_bytes(b"\n".join(rows) + b"\n")
    return path


def _sft(run_dir, data, out, *extra):
    return main(
        [
            "sft",
            "--output",
            str(out),
            "log.progress=false",
            "sft.steps=2",
            f"model.path={run_dir / 'sft'}",
            f"sft.data={data}",
            *extra,
        ]
    )


def test_default_stops_at_the_first_bad_row(run_dir, tmp_path, capsys):
    data = _sft_file(run_dir, tmp_path)
    assert _sft(run_dir, data, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {data}:11:") and "Traceback" not in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # stopped before training


def test_skip_counts_every_bad_row_in_the_summary(run_dir, tmp_path, capsys):
    data = _sft_file(run_dir, tmp_path)
    out = tmp_path / "out"
    assert _sft(run_dir, data, out, "data.on_error=skip") == 0
    summary = json.loads((out / "summary.json").read_text())
    (report,) = summary["data"]
    assert report["rows"] == 40 and report["skipped"] == len(BAD_ROWS)
    assert [r["line"] for r in report["skipped_rows"]] == [11, 12, 13, 14, 15]
    reasons = " | ".join(r["reason"] for r in report["skipped_rows"])
    for word in ("JSON", "completion", "prompt", "UTF-8", "empty"):
        assert word in reasons, (word, reasons)
    assert summary["skipped_updates"] == {"sft": {"train/skipped_updates": 0}}
    assert "40 rows, 5 skipped (line 11:" in capsys.readouterr().out
