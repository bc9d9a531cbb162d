"""`rlhf-jax eval` end to end on a tiny model folder: the report's shape and its agreement with
the reward function, and one-line errors (exit code 2) for each bad input, before any model
loads."""

import json

import pytest
from tiny import tiny_hf_checkpoint

from rlhf_jax.cli import main
from rlhf_jax.loops.eval_command import format_table

ROWS = [
    {"prompt": "the red fox", "answer": "5"},
    {"prompt": "a calm owl", "answer": 7},
    {"messages": [{"role": "user", "content": "the river"}], "answer": "1,000"},
]


def _data(tmp_path, rows, name="rows.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_hf_checkpoint(tmp_path_factory.mktemp("eval") / "model")[0]


def test_eval_writes_greedy_and_sampled_rates(model, tmp_path, capsys):
    out = tmp_path / "report.json"
    args = ["eval", "--model", str(model), "--data", str(_data(tmp_path, ROWS))]
    parts = {"parts": [{"name": "gsm8k_strict", "weight": 2.0}]}
    args += ["--reward", "weighted", "--reward-kwargs", json.dumps(parts)]
    args += ["--samples", "4", "--max-new-tokens", "4"]
    assert main([*args, "--batch-size", "4", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert printed.strip() == format_table(report)
    greedy, sampled = report["greedy"], report["sampled"]
    assert (greedy["n_prompts"], greedy["samples"], greedy["temperature"]) == (3, 1, 0.0)
    assert (sampled["samples"], sampled["temperature"]) == (4, 1.0)
    assert sorted(sampled["strict"]["pass@k"]) == ["1", "2", "4"]
    for result in (greedy, sampled):
        # gsm8k_strict scores 1 exactly where the strict answer is right, weighted doubles it
        assert result["reward_mean"] == pytest.approx(2 * result["strict"]["mean@n"])
        for block in (result["strict"], result["lenient"]):
            lo, hi = block["pass@1_ci"]
            assert 0.0 <= lo <= block["pass@1"] <= hi <= 1.0
        assert 0.0 <= result["format_rate"] <= 1.0
    assert [e["prompt"] for e in greedy["examples"]][2] == "user: the river\nassistant: "
    for line in ("greedy pass@1", "pass@4 (N=4, T=1)", "mean@4", "weighted (sampled)"):
        assert line in printed


@pytest.mark.parametrize(
    "rows,extra,message",
    [
        (
            [ROWS[0], {"prompt": "q"}],
            [],
            "rows.jsonl:2: field 'answer': missing (rlhf-jax eval needs each row's reference",
        ),
        (
            [{"prompt": "q", "answer": True}],
            [],
            "rows.jsonl:1: field 'answer': expected a string or a number, got boolean",
        ),
        (
            [{"prompt": "q", "answer": [5]}],
            [],
            "rows.jsonl:1: field 'answer': an extra field of a prompt row is a JSON string, "
            "number or boolean (got array)",
        ),
        (ROWS, ["--reward", "gsm8k_stric"], "unknown reward function 'gsm8k_stric'"),
        (ROWS, ["--samples", "4", "--temperature", "0"], "--samples 4 needs --temperature > 0"),
        (ROWS, ["--model", "MISSING"], "checkpoint folder not found"),
        (ROWS, ["--reward-kwargs", "{bad"], "--reward-kwargs: not JSON (Expecting property"),
        (ROWS, ["--reward-kwargs", "[1]"], "--reward-kwargs: expected a JSON object, got '[1]'"),
        (
            ROWS,
            ["--reward-kwargs", '{"scale": 2}'],
            "reward function 'gsm8k_strict' does not take scale",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(model, tmp_path, capsys, rows, extra, message):
    flags = {"--model": str(model), "--reward": "gsm8k_strict"}
    for flag, value in zip(extra[::2], extra[1::2]):
        flags[flag] = str(tmp_path / value) if value == "MISSING" else value
    args = ["eval", "--data", str(_data(tmp_path, rows))]
    code = main([*args, *[x for kv in flags.items() for x in kv]])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_eval_writes_its_report_to_a_bucket_url(model, tmp_path, fake_bucket, capsys):
    url = f"gs://eval-reports/{tmp_path.name}/report.json"
    args = ["eval", "--model", str(model), "--data", str(_data(tmp_path, ROWS))]
    args += ["--reward", "gsm8k_strict", "--max-new-tokens", "4", "--output", url]
    assert main(args) == 0
    written = fake_bucket / "eval-reports" / tmp_path.name / "report.json"
    assert json.loads(written.read_text())["greedy"]["n_prompts"] == 3
    assert not (tmp_path / "gs:").exists()  # not a local folder named like the URL
