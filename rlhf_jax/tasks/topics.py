"""The built-in "topics" task: write a short story about a colored animal.

A tiny world small enough for a laptop CPU, with the parts InstructGPT needs:
- generic text in the task's language (pretraining data, later the ptx data);
- prompts ("story about a red fox:") and mediocre demonstrations (the labelers' SFT data);
- a hidden *gold reward* standing in for human judgement: mention the prompt's animal and
  color, use kind words rather than unkind ones, no other animals, stay short.
  The pipeline never trains on it directly; simulated labelers rank sampled completions by
  gold reward plus noise, and the reward model learns from those rankings only.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

COLORS = ("red", "blue", "green", "yellow", "black", "white", "brown", "gray")
ANIMALS = ("fox", "cat", "dog", "owl", "bear", "frog", "horse", "mouse", "wolf", "duck")
PLACES = ("river", "forest", "hill", "town", "field", "lake", "garden", "road")
VERBS = ("runs", "sleeps", "jumps", "sings", "waits", "hides", "eats", "walks")
POSITIVE = ("happy", "kind", "brave", "calm", "bright", "gentle")
NEGATIVE = ("sad", "angry", "lazy", "rude", "dull", "grumpy")
PROMPT_TEMPLATES = ("story about a {c} {a}:", "tell me of the {c} {a}:", "write on a {c} {a}:")
MAX_WORDS = 12  # longer stories lose 0.1 gold reward per extra word
N_EVAL_PAIRS = 16  # (color, animal) pairs held out of every training stage

_PROMPT_RE = re.compile(r"(?:story about a|tell me of the|write on a) (\w+) (\w+):$")


def parse_prompt(prompt: str) -> tuple[str, str] | None:
    """(color, animal) of a task prompt, or None for a prompt from elsewhere."""
    m = _PROMPT_RE.search(prompt.strip())
    return (m.group(1), m.group(2)) if m else None


def gold_reward(prompt: str, completion: str) -> float:
    """The hidden judgement of a completion; ranges from about -3 to 3.

    +1 animal mentioned, +1 color mentioned, +0.5 per distinct kind word (at most 2),
    -0.5 per unkind word, -1 if another animal appears, -0.1 per word beyond MAX_WORDS.
    """
    topic = parse_prompt(prompt)
    if topic is None:
        return 0.0
    color, animal = topic
    words = re.findall(r"[a-z]+", completion.lower())
    score = float(animal in words) + float(color in words)
    score += 0.5 * min(2, len({w for w in words if w in POSITIVE}))
    score -= 0.5 * sum(w in NEGATIVE for w in words)
    score -= 1.0 * any(w in ANIMALS and w != animal for w in words)
    score -= 0.1 * max(0, len(words) - MAX_WORDS)
    return score


def _sentence(rng: np.random.Generator, animal: str, color: str | None, kind_p: float) -> str:
    adj = rng.choice(POSITIVE) if rng.random() < kind_p else rng.choice(NEGATIVE)
    subject = f"{adj} {color} {animal}" if color else f"{adj} {animal}"
    return f"the {subject} {rng.choice(VERBS)} near the {rng.choice(PLACES)}."


def pretrain_text(rng: np.random.Generator) -> str:
    """Generic text of the task's world (no prompt): the base model's pretraining data."""
    n = 1 + int(rng.random() < 0.4)
    parts = [
        _sentence(rng, rng.choice(ANIMALS), rng.choice(COLORS) if rng.random() < 0.6 else None, 0.5)
        for _ in range(n)
    ]
    return " ".join(parts)


def demonstration(rng: np.random.Generator, color: str, animal: str) -> str:
    """A mediocre labeler demonstration: often on topic, often not, kind half the time."""
    who = animal if rng.random() < 0.7 else rng.choice([a for a in ANIMALS if a != animal])
    text = " " + _sentence(rng, who, color if rng.random() < 0.4 else None, 0.5)
    if rng.random() < 0.3:
        adj = rng.choice(POSITIVE + NEGATIVE)
        text += f" it is {adj}."
    return text


def prompt_pairs(seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, eval) split of (color, animal) pairs; eval pairs are never trained on."""
    pairs = [(c, a) for c in COLORS for a in ANIMALS]
    order = np.random.default_rng(seed).permutation(len(pairs))
    pairs = [pairs[i] for i in order]
    return pairs[N_EVAL_PAIRS:], pairs[:N_EVAL_PAIRS]


def make_prompt(rng: np.random.Generator, pair: tuple[str, str]) -> str:
    return str(rng.choice(PROMPT_TEMPLATES)).format(c=pair[0], a=pair[1])


@dataclasses.dataclass
class TopicsData:
    """All generated rows of the task, as the JSONL records the data loaders read."""

    pretrain: list[dict]  # {"text"}: pretraining and ptx
    pretrain_heldout: list[dict]  # {"text"}: pretraining loss before/after PPO
    sft: list[dict]  # {"prompt", "completion"}
    rm_prompts: list[dict]  # {"prompt"}: sampled K times from SFT, then ranked
    ppo_prompts: list[dict]  # {"prompt"}
    eval_prompts: list[dict]  # {"prompt"} on held-out pairs


def generate_task(
    seed: int, n_pretrain: int, n_demos: int, n_rm_prompts: int, n_eval: int
) -> TopicsData:
    rng = np.random.default_rng(seed)
    train_pairs, eval_pairs = prompt_pairs(seed)

    def prompts(n: int, pairs) -> list[dict]:
        return [{"prompt": make_prompt(rng, pairs[rng.integers(len(pairs))])} for _ in range(n)]

    sft = []
    for _ in range(n_demos):
        pair = train_pairs[rng.integers(len(train_pairs))]
        sft.append({"prompt": make_prompt(rng, pair), "completion": demonstration(rng, *pair)})
    n_heldout = max(64, n_pretrain // 10)
    return TopicsData(
        pretrain=[{"text": pretrain_text(rng)} for _ in range(n_pretrain)],
        pretrain_heldout=[{"text": pretrain_text(rng)} for _ in range(n_heldout)],
        sft=sft,
        rm_prompts=prompts(n_rm_prompts, train_pairs),
        ppo_prompts=prompts(max(n_rm_prompts, 512), train_pairs),
        eval_prompts=prompts(n_eval, eval_pairs),
    )


def rank_by_labelers(
    rng: np.random.Generator, prompt: str, completions: list[str], noise: float
) -> list[int]:
    """Simulated labelers: completion indices ordered best first by gold reward + noise."""
    noisy = [gold_reward(prompt, c) + noise * rng.standard_normal() for c in completions]
    return [int(i) for i in np.argsort(noisy)[::-1]]
