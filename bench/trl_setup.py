"""What the TRL side of the comparisons shares: a local tokenizer and quiet trainer settings.

No hub access is possible, so the tokenizer is a `tokenizers` WordLevel model over the
checkpoint's vocabulary: token i is the word `w{i}` (0 pad, 1 bos, 2 eos, 3 unk), words split on
whitespace, so text and ids round-trip exactly (GRPO/RLOO decode completions to text and the
reward model re-tokenizes them).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings

import numpy as np

PAD, BOS, EOS, UNK = 0, 1, 2, 3
FIRST_WORD = 4  # random token ids are drawn from [FIRST_WORD, vocab): never pad/eos


def tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": PAD, "<bos>": BOS, "<eos>": EOS, "<unk>": UNK}
    words.update({f"w{i}": i for i in range(FIRST_WORD, vocab)})
    tk = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )


def random_ids(rng: np.random.Generator, vocab: int, *shape: int) -> np.ndarray:
    return rng.integers(FIRST_WORD, vocab, size=shape, dtype=np.int64)


def text_of(ids) -> str:
    return " ".join(f"w{int(i)}" for i in ids)


def common_args(**changes) -> dict:
    """TrainingArguments shared by every TRL trainer here: CPU, fp32, no logging/saving."""
    args = dict(
        output_dir=tempfile.mkdtemp(prefix="rlhf_jax_bench_trl_"),
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        weight_decay=0.0,
        seed=0,
    )
    args.update(changes)
    return args


def quiet() -> None:
    """Silence the per-call warnings and logs of transformers/TRL/datasets."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    for name in ("transformers", "trl", "datasets", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.suppress(ImportError):
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    with contextlib.suppress(ImportError):
        import datasets

        datasets.disable_progress_bars()


def prepare(trainer, steps: int = 1_000_000) -> None:
    """Set up what `Trainer.train` sets up before its loop (optimizer, scheduler, the
    gradient-accumulation count that `training_step` divides by)."""
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps


def optimizer_step(trainer, model) -> None:
    """What `Trainer.train` does after each backward: clip, optimizer and scheduler step,
    zero the gradients."""
    if trainer.args.max_grad_norm:
        trainer.accelerator.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    model.zero_grad(set_to_none=True)


def step_runner(trainer, model, inputs, *extra):
    """A callable running one training step as `Trainer.train`'s loop body does:
    `training_step` (under autograd, whatever the caller's grad mode) and `optimizer_step`."""
    import torch

    def run():
        with torch.enable_grad():
            loss = trainer.training_step(model, inputs, *extra)
        optimizer_step(trainer, model)
        return float(loss)

    return run
