"""Every command of docs/byo.md, as written there, on a tiny local chat model: SFT on chat and
plain rows, a reward model on pairwise and K-wise rankings, PPO and GRPO on chat prompts, and
generation. Only sizes are added (appended after the documented overrides)."""

import json
import re
import shlex
from pathlib import Path

import jax
import pytest
from tiny import tiny_config

from rlhf_jax.cli import main
from rlhf_jax.models import init_params, save_hf
from rlhf_jax.tasks.tokenizer import train_tokenizer

DOC = Path(__file__).resolve().parents[2] / "docs" / "byo.md"
TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SIZES = [
    "dpo.steps=2",
    "dpo.batch_size=2",
    "dpo.max_prompt_len=48",
    "dpo.max_completion_len=16",
    "sft.steps=2",
    "sft.batch_size=4",
    "sft.max_len=96",
    "rm.steps=2",
    "rm.batch_size=2",
    "rm.optim.grad_accum=2",  # byo.yaml's 4 does not divide the tiny batch
    "rm.max_prompt_len=48",
    "rm.max_completion_len=16",
    "ppo.iterations=2",
    "ppo.rollout_batch=4",
    "ppo.minibatch_size=4",
    "ppo.max_prompt_len=48",
    "ppo.max_new_tokens=8",
    "checkpoint.save_every=0",
    "log.progress=false",
]
TOPICS = ["the red fox", "a calm owl", "the brave dog", "a green frog"]


def documented_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip().startswith("rlhf-jax ")]


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo")
    corpus = [f"{t} runs near the river. it is kind." for t in TOPICS] * 20
    tokenizer = train_tokenizer(corpus + [TEMPLATE] * 5, vocab_size=400)
    tokenizer.chat_template = TEMPLATE
    config = tiny_config(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=256,
    )
    model = root / "model"
    save_hf(config, init_params(config, jax.random.key(0)), model, tokenizer)
    data = root / "data"
    data.mkdir()
    user = [{"role": "user", "content": f"tell me of {t}"} for t in TOPICS]
    demos = [{"messages": [u, {"role": "assistant", "content": " it runs."}]} for u in user]
    demos += [{"prompt": f"story of {t}", "completion": " it is kind."} for t in TOPICS]
    _write(data / "demos.jsonl", demos)
    prefs = [{"prompt": f"story of {t}", "chosen": " kind", "rejected": " rude"} for t in TOPICS]
    prefs.append({"prompt": "a tale", "completions": [" a", " b", " c"], "ranking": [2, 0, 1]})
    _write(data / "prefs.jsonl", prefs)
    _write(data / "prompts.jsonl", [{"messages": [u]} for u in user] * 2)
    return {"$MODEL": str(model), "$DATA": str(data)}, root


def test_the_page_lists_the_stages_in_order():
    names = [shlex.split(c)[1] for c in documented_commands()]
    assert names == ["sft", "rm", "ppo", "ppo", "dpo", "generate"]


def test_every_documented_command_runs(setup, monkeypatch, capsys):
    paths, root = setup
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # configs/byo.yaml as documented
    for command in documented_commands():
        for name, value in paths.items():
            command = command.replace(name, value)
        args = shlex.split(command)[1:]
        args = [a.replace("runs/", f"{root}/runs/") for a in args]  # keep the checkout clean
        if args[0] == "generate":
            args += ["--max-new-tokens", "5"]
        else:
            args += SIZES
        assert main(args) == 0, command
    runs = root / "runs"
    for folder in ("me/sft", "me/policy", "grpo/policy", "dpo/policy"):
        assert (runs / folder / "model.safetensors").is_file(), folder
    rm_config = json.loads((runs / "me" / "rm" / "config.json").read_text())
    assert rm_config["architectures"] == ["LlamaForSequenceClassification"]
    rows = [json.loads(line) for line in (runs / "grpo" / "metrics.jsonl").open()]
    assert rows and not [k for r in rows for k in r if k.startswith("ppo/value")]
    saved = json.loads((runs / "me" / "run_config.json").read_text())
    assert saved["data"]["chat_template"] is True
    assert capsys.readouterr().out.strip()  # generate printed a completion
