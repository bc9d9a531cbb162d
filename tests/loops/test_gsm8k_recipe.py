"""Every command of docs/recipes.md (the GSM8K recipe), as written there, on a tiny random
Qwen2-shaped checkpoint with a chat template and a few GSM8K-layout rows: the recipe's own
configs, with only sizes added (the plan at the tiny shape, never the real one)."""

import json
import re
import shlex
from pathlib import Path

import jax
from tiny import tiny_config

from rlhf_jax.cli import main
from rlhf_jax.models import init_params, load_tokenizer, save_hf
from rlhf_jax.models.config import FAMILY_SWITCHES
from rlhf_jax.tasks import gsm8k
from rlhf_jax.tasks.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "recipes.md"
TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SIZES = [
    "sft.steps=2",
    "sft.batch_size=4",
    "sft.optim.grad_accum=1",
    "sft.max_len=128",
    "ppo.iterations=1",
    "ppo.rollout_batch=2",
    "ppo.minibatch_size=2",
    "ppo.policy_optim.grad_accum=1",
    "ppo.experience_micro_batch=0",
    "ppo.max_prompt_len=96",
    "ppo.max_new_tokens=8",
    "checkpoint.save_every=0",
    "log.progress=false",
]
# per config: GRPO's LoRA rank and groups of 2; PPO's critic optimizer
OWN_SIZES = {
    "gsm8k-grpo": ["lora.rank=4", "ppo.samples_per_prompt=2", "ppo.minibatch_size=4"],
    "gsm8k-ppo": ["ppo.value_optim.grad_accum=1"],
}


def gsm8k_rows(n: int) -> list[dict]:
    """GSM8K-layout rows: a question and a worked solution ending in `#### N`."""
    rows = []
    for i in range(n):
        a, b = 3 + i, 4 + 2 * i
        rows.append(
            {
                "question": f"Tom has {a} apples and buys {b} more. How many apples now?",
                "answer": f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b}",
            }
        )
    return rows


def documented_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    starts = ("rlhf-jax ", "python -m rlhf_jax.")
    return [line.strip() for line in text.splitlines() if line.strip().startswith(starts)]


def _tiny_qwen2(folder: Path) -> Path:
    corpus = [json.dumps(r) for r in gsm8k_rows(12)] + [gsm8k.INSTRUCTION] * 5
    tokenizer = train_tokenizer(corpus + [TEMPLATE] * 5, vocab_size=400)
    tokenizer.chat_template = TEMPLATE
    # saved once to learn the vocabulary as a qwen2 folder loads it (transformers' Qwen2
    # tokenizer class adds its own special token), then for real with that size
    for _ in range(2):
        config = tiny_config(  # Qwen2.5-0.5B's family switches, its tied embeddings too
            model_type="qwen2",
            **FAMILY_SWITCHES["qwen2"],
            tie_embeddings=True,
            vocab_size=max(tokenizer.get_vocab().values()) + 1,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            max_position_embeddings=256,
        )
        save_hf(config, init_params(config, jax.random.key(0)), folder, tokenizer)
        tokenizer = load_tokenizer(folder)
    return folder


def test_the_page_lists_the_recipe_in_order():
    heads = [" ".join(shlex.split(c)[:3]) for c in documented_commands()]
    assert heads == [
        "python -m rlhf_jax.tasks.gsm8k",
        "python -m rlhf_jax.tasks.gsm8k",
        "rlhf-jax sft --config",
        "rlhf-jax ppo --config",
        "rlhf-jax ppo --config",
        "rlhf-jax eval --model",
        "rlhf-jax eval --model",
        "rlhf-jax eval --model",
        "rlhf-jax plan --config",
    ]


def _run(command: str, root: Path, paths: dict[str, str]) -> int:
    for name, value in paths.items():
        command = command.replace(name, value)
    args = shlex.split(command)
    # outputs and converted data under tmp, not in the checkout
    args = [re.sub(r"^(runs|data)/", f"{root}/\\1/", a) for a in args]
    args = [re.sub(r"=(runs|data)/", f"={root}/\\1/", a) for a in args]
    if args[0] == "python":
        return gsm8k.main(args[3:])
    args = args[1:]
    if args[0] == "plan":  # the tiny shape in place of Qwen2.5-0.5B's
        args = [a.replace("configs/shapes/qwen2.5-0.5b", paths["$MODEL"]) for a in args]
    if args[0] in ("sft", "ppo", "plan"):
        args += SIZES + next(v for k, v in OWN_SIZES.items() if k in command)
    if args[0] == "eval":
        args += [
            "--max-new-tokens",
            "8",
            "--output",
            f"{root}/eval{len(list(root.glob('eval*')))}.json",
        ]
    return main(args)


def test_every_recipe_command_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # configs/ as documented
    src = tmp_path / "gsm8k"
    src.mkdir()
    for split, n in (("train", 8), ("test", 4)):
        (src / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm8k_rows(n)))
    paths = {"$MODEL": str(_tiny_qwen2(tmp_path / "model")), "$GSM8K": str(src)}
    for command in documented_commands():
        assert _run(command, tmp_path, paths) == 0, command
    prompts = [json.loads(x) for x in (tmp_path / "data/gsm8k/test/prompts.jsonl").open()]
    assert [p["answer"] for p in prompts] == ["7", "10", "13", "16"]
    runs = tmp_path / "runs"
    assert (runs / "gsm8k-sft" / "sft" / "model.safetensors").is_file()
    for name in ("grpo", "ppo"):
        assert (runs / f"gsm8k-{name}" / "policy" / "model.safetensors").is_file(), name
        rows = [json.loads(x) for x in (runs / f"gsm8k-{name}" / "metrics.jsonl").open()]
        scores = [r["objective/scores"] for r in rows if "objective/scores" in r]
        assert scores and all(0.0 <= s <= 1.0 for s in scores), name  # gsm8k_strict: 0 or 1
    reports = [json.loads((tmp_path / f"eval{i}.json").read_text()) for i in range(3)]
    for r in reports:  # gsm8k_strict's mean is the strict pass@1: both read "#### N"
        assert r["greedy"]["n_prompts"] == 4
        assert r["greedy"]["reward_mean"] == r["greedy"]["strict"]["pass@1"]
