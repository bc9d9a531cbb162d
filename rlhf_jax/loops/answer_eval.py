"""Exact-answer accuracy of a model on prompts with reference answers (GSM8K-style): the core
of `rlhf-jax eval`, also called by pipelines and comparisons.

`score_answers` is a pure function over texts: completions grouped per prompt (N each) against
one reference answer per prompt. It reports, for the strict (`#### N`) and the lenient (last
number) reading of the answer:
- `pass@1`: the share of correct completions, the mean over prompts of c_i / N. With N = 1
  (greedy decoding) each prompt is one independent pass/fail trial, and its interval is Wilson's
  (`intervals.wilson_interval`); with N > 1 a prompt's samples are not independent trials, and
  the interval is the percentile bootstrap over prompts of c_i / N.
- `pass@k` for k = 1, 2, 4, ... <= N: the unbiased estimator of Chen et al. (2021, "Evaluating
  Large Language Models Trained on Code", eq. 1), 1 - C(N - c, k) / C(N, k) averaged over
  prompts: the chance that at least one of k samples drawn without replacement is correct.
- `mean@n`: the mean correctness of all N samples of a prompt, averaged over prompts (equal
  to pass@1's estimate), with the bootstrap interval over prompts.
and `format_rate`: the share of completions with a strict `#### N` answer line at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from rlhf_jax.answers import lenient_answer, same_answer, strict_answer
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.intervals import wilson_interval
from rlhf_jax.loops.evaluate import bootstrap_mean_ci
from rlhf_jax.rewards.exact import reference_text

BOOTSTRAP_RESAMPLES = 2000


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al.'s unbiased pass@k of one prompt with `c` correct of `n` samples:
    1 - C(n - c, k) / C(n, k), computed as a product (no huge binomials)."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ValueError(f"need 0 < k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def ks_up_to(n: int) -> list[int]:
    """1, 2, 4, ... <= n."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    return ks


def rate_block(correct: np.ndarray, seed: int = 0) -> dict:
    """pass@1 (with its interval), pass@k and mean@n of a [prompts, N] correctness table."""
    p, n = correct.shape
    counts = correct.sum(axis=1).astype(int)
    per_prompt = counts / n
    mean_ci = bootstrap_mean_ci(per_prompt, BOOTSTRAP_RESAMPLES, seed)
    # One greedy answer per prompt: independent pass/fail trials (Wilson); else the bootstrap.
    ci = wilson_interval(int(counts.sum()), p) if n == 1 else mean_ci
    return {
        "pass@1": float(per_prompt.mean()),
        "pass@1_ci": [float(ci[0]), float(ci[1])],
        "pass@k": {
            str(k): float(np.mean([pass_at_k(n, int(c), k) for c in counts])) for k in ks_up_to(n)
        },
        "mean@n": float(per_prompt.mean()),
        "mean@n_ci": [float(mean_ci[0]), float(mean_ci[1])],
    }


def _table(
    completions: Sequence[Sequence[str]],
    references: Sequence[object],
    extract: Callable[[str], str | None],
) -> np.ndarray:
    return np.array(
        [
            [same_answer(extract(c), reference_text(r)) for c in group]
            for group, r in zip(completions, references)
        ],
        dtype=bool,
    )


def score_answers(completions: list[list[str]], references: list[str], *, seed: int = 0) -> dict:
    """Accuracy of `completions` (one list of N per prompt, N the same for all) against one
    reference answer per prompt: `{"n_prompts", "samples", "strict": {...}, "lenient": {...},
    "format_rate"}`, each block `{"pass@1", "pass@1_ci", "pass@k": {"1": .., "2": ..},
    "mean@n", "mean@n_ci"}` (see the module's docstring). `seed`: of the bootstrap."""
    if not completions or len(completions) != len(references):
        raise ValueError(
            f"need one reference per prompt and at least one prompt, got "
            f"{len(completions)} prompts and {len(references)} references"
        )
    sizes = {len(group) for group in completions}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"every prompt needs the same number (>= 1) of completions, got {sizes}")
    flat = [c for group in completions for c in group]
    return {
        "n_prompts": len(completions),
        "samples": sizes.pop(),
        "strict": rate_block(_table(completions, references, strict_answer), seed),
        "lenient": rate_block(_table(completions, references, lenient_answer), seed),
        "format_rate": float(np.mean([strict_answer(c) is not None for c in flat])),
    }


def evaluate_answers(
    model_cfg,
    params,
    tokenizer,
    prompt_texts: Sequence,
    references: Sequence[str],
    *,
    samples: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    batch_size: int,
    chat_template: bool = False,
) -> dict:
    """Sample `samples` completions of each prompt (greedy at temperature 0, which needs
    samples = 1) and score them (`score_answers`); the result also holds the texts,
    `"completions"` (one list per prompt). `prompt_texts`: strings, or `PromptExample`s (chat
    rows go through the tokenizer's chat template, as do plain ones with `chat_template`)."""
    import jax

    from rlhf_jax.data import PromptExample, encode_prompts, special_ids
    from rlhf_jax.loops.evaluate import decode_responses, sample_responses

    if samples < 1 or (samples > 1 and temperature <= 0):
        raise RlhfJaxError(
            f"{samples} samples per prompt need a temperature > 0 (greedy decoding gives the "
            f"same completion every time), got {temperature}"
        )
    budget = model_cfg.max_position_embeddings - max_new_tokens
    if budget < 1:
        raise RlhfJaxError(
            f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's "
            f"{model_cfg.max_position_embeddings} positions"
        )
    examples = [p if isinstance(p, PromptExample) else PromptExample(str(p)) for p in prompt_texts]
    enc = encode_prompts(examples, tokenizer, budget, chat_template=chat_template)
    first = int(np.argmax(enc["attention_mask"].any(axis=0)))  # left-padded: drop empty columns
    ids = np.repeat(enc["input_ids"][:, first:], samples, axis=0)
    mask = np.repeat(enc["attention_mask"][:, first:], samples, axis=0)
    eos, pad = special_ids(tokenizer)
    eos_ids = tuple(dict.fromkeys((eos, *model_cfg.eos_ids)))
    out = sample_responses(
        model_cfg,
        params,
        ids,
        mask,
        jax.random.key(seed),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        eos_ids=eos_ids,
        pad_id=pad,
        batch_size=batch_size,
    )
    texts = decode_responses(tokenizer, out)
    groups = [texts[i * samples : (i + 1) * samples] for i in range(len(examples))]
    return {**score_answers(groups, list(references), seed=seed), "completions": groups}
