"""Reference answers reach the reward function in a real (tiny) `rlhf-jax ppo` run: prompt rows
carry an `answer` field, `weighted` sums `gsm8k_strict` and a recording part, and every
sampled response is scored next to its own row's answer; a row without it fails at load."""

import json
import textwrap

from tiny import tiny_hf_checkpoint

from rlhf_jax.cli import main

RECORDER = '''
import json
import os


def record(prompts, completions, *, answer):
    """Write what it was given (one JSON line per call); score nothing."""
    with open(os.environ["ANSWER_LOG"], "a") as f:
        f.write(json.dumps({"prompts": list(prompts), "answer": list(answer)}) + "\\n")
    return [0.0] * len(completions)
'''

ROWS = [
    {"prompt": "What is 2 + 3?", "answer": "5"},
    {"prompt": "What is 10 - 4?", "answer": 6},  # a JSON number
    {"messages": [{"role": "user", "content": "What is 3 * 3?"}], "answer": "9", "id": 3},
    {"prompt": "What is 1,000 + 1?", "answer": "1,001"},
]

RUN = [
    "log.every=1",
    "log.progress=false",
    "ppo.iterations=2",
    "ppo.epochs=1",
    "ppo.max_new_tokens=6",
    "ppo.max_prompt_len=32",
    "ptx.coef=0",
    "ppo.advantage=grpo",
    "ppo.samples_per_prompt=2",
    "ppo.kl_penalty=none",
    "ppo.rollout_batch=2",
    "ppo.minibatch_size=4",
    "ppo.reward_fn=weighted",
]


def _write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_row_answers_reach_the_reward_function_in_a_ppo_run(tmp_path, monkeypatch):
    model, _ = tiny_hf_checkpoint(tmp_path / "model")
    prompts = _write_rows(tmp_path / "prompts.jsonl", ROWS)
    (tmp_path / "answer_recorder.py").write_text(textwrap.dedent(RECORDER))
    monkeypatch.syspath_prepend(str(tmp_path))
    log = tmp_path / "seen.jsonl"
    monkeypatch.setenv("ANSWER_LOG", str(log))
    parts = [{"name": "gsm8k_strict"}, {"name": "answer_recorder:record", "weight": 0.0}]
    args = [
        "ppo",
        "--output",
        str(tmp_path / "out"),
        f"ppo.policy={model}",
        f"ppo.prompts={prompts}",
        *RUN,
        f"ppo.reward_fn_kwargs={json.dumps({'parts': parts})}",
    ]
    assert main(args) == 0
    calls = [json.loads(line) for line in log.open()]
    # the load-time test call (the run's own first prompts), then one call per iteration
    assert len(calls) == 3
    want = {
        "What is 2 + 3?": "5",
        "What is 10 - 4?": 6,
        "user: What is 3 * 3?\nassistant: ": "9",
        "What is 1,000 + 1?": "1,001",
    }
    for call in calls:
        assert [want[p] for p in call["prompts"]] == call["answer"]
    for call in calls[1:]:  # 2 prompts x 2 samples, each prompt's samples consecutive
        assert len(call["prompts"]) == 4 and call["prompts"][0] == call["prompts"][1]
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2]


def test_a_row_without_the_needed_field_fails_at_load(tmp_path, capsys):
    model, _ = tiny_hf_checkpoint(tmp_path / "model")
    rows = [*ROWS[:2], {"prompt": "What is 7 + 1?"}, ROWS[3]]
    prompts = _write_rows(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "out"
    args = ["ppo", "--output", str(out), f"ppo.policy={model}", f"ppo.prompts={prompts}"]
    code = main([*args, *RUN[:-1], "ppo.reward_fn=gsm8k_strict"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == (
        f"error: {prompts}:3: field 'answer': missing (reward function 'gsm8k_strict' needs it)"
    )
