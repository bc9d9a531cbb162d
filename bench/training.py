"""SFT, reward-model and DPO training throughput: rlhf_jax's jitted steps vs TRL's trainers.

Both sides train the same random GPT-2 checkpoint (vocabulary 8192, fp32, AdamW with
global-norm clipping 1.0, constant learning rate, dropout 0) on the same token ids:
- SFT: batch 8 x 256 tokens, next-token loss on every token;
- RM: batch 8 prompts x (chosen, rejected), each 64 prompt + 64 completion tokens
  (rlhf_jax: one [8, 2, 128] K-wise batch; TRL: 8 chosen + 8 rejected rows of 128);
- DPO: the RM's shapes (the completion's last token is EOS), reference log-probs computed
  before training on both sides (rlhf_jax always; TRL with `precompute_ref_log_probs=True`),
  so a step is one policy forward and backward over 2 x 8 sequences.

rlhf_jax: `make_sft_step` / `make_reward_step` with the registered default losses and
`make_optimizer`, under `jax.jit(step, donate_argnums=0)` (the state is updated in place).
TRL: the trainer is built as a user would build it (pre-tokenized dataset), then one step is
`trainer.training_step(model, batch)` (TRL's own forward, loss and backward) followed by what
`Trainer.train` does after it: gradient clipping, `optimizer.step()`, `lr_scheduler.step()` and
`zero_grad()`, on a batch taken once from the trainer's own dataloader. The two sides
alternate call by call.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np

from bench import trl_setup
from bench.common import Table, alternate, parser, publish, set_torch_threads
from bench.flops import matmul_peak, train_flops
from bench.models import GPT2_6L, GPT2_12L, TINY, Shape, build_checkpoint, load_jax, load_torch


@dataclasses.dataclass(frozen=True)
class Sizes:
    shapes: tuple[Shape, ...]
    sft_batch: int
    sft_len: int
    rm_batch: int
    rm_prompt: int
    rm_completion: int


SIZES = {
    "full": Sizes((GPT2_6L, GPT2_12L), 8, 256, 8, 64, 64),
    "tiny": Sizes((TINY,), 2, 32, 2, 8, 8),
}

LR = 1e-5


def _optimizer():
    from rlhf_jax.config import OptimConfig
    from rlhf_jax.steps import make_optimizer

    # The same update as TRL's default: AdamW, clip 1.0, constant lr, no weight decay.
    return make_optimizer(
        OptimConfig(lr=LR, schedule="constant", weight_decay=0.0, grad_clip=1.0), 1_000_000
    )


def _trl_runner(trainer, model, shape: tuple[int, int], what: str, needs: tuple[str, ...] = ()):
    """One TRL step as `Trainer.train` runs it, on a batch taken once from the trainer's own
    dataloader, after checking that the batch has the shape (and keys) compared against."""
    trl_setup.prepare(trainer)
    inputs = next(iter(trainer.get_train_dataloader()))
    if tuple(inputs["input_ids"].shape) != shape:
        raise RuntimeError(f"TRL {what} batch is {tuple(inputs['input_ids'].shape)}")
    missing = [k for k in needs if k not in inputs]
    if missing:
        raise RuntimeError(f"TRL {what} batch lacks {missing}")
    return trl_setup.step_runner(trainer, model, dict(inputs))


def _jax_runner(step, state, batch):
    """A callable that runs one donated step and waits for it; the state lives in a cell."""
    import jax

    cell = {"state": state}
    key = jax.random.key(0)

    def run():
        cell["state"], metrics = step(cell["state"], batch, key)
        return jax.block_until_ready((cell["state"], metrics))

    return run


# ----------------------------------------------------------------------------- SFT


def jax_sft_step(cfg, params, ids: np.ndarray):
    """(jitted step, state, batch) of the SFT comparison; `bench.cost` compiles the same."""
    import jax
    import jax.numpy as jnp

    from rlhf_jax.losses import get_loss
    from rlhf_jax.steps import TrainState, make_sft_step

    state = TrainState.create(params, _optimizer())
    step = jax.jit(make_sft_step(cfg, get_loss("sft")), donate_argnums=0)
    ones = jnp.ones(ids.shape, jnp.int32)
    batch = {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": ones, "loss_mask": ones}
    return step, state, batch


def jax_sft(folder: Path, ids: np.ndarray):
    return _jax_runner(*jax_sft_step(*load_jax(folder), ids))


def trl_sft(folder: Path, ids: np.ndarray, vocab: int):
    import datasets
    from trl import SFTConfig, SFTTrainer

    batch, seq = ids.shape
    model = load_torch(folder, for_training=True)
    args = SFTConfig(
        **trl_setup.common_args(
            per_device_train_batch_size=batch, max_length=seq, packing=False, padding_free=False
        )
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_dict({"input_ids": ids.tolist()}),
        processing_class=trl_setup.tokenizer(vocab),
    )
    return _trl_runner(trainer, model, (batch, seq), "SFT")


# ----------------------------------------------------------------------------- RM


def jax_rm_step(cfg, trunk, chosen: np.ndarray, rejected: np.ndarray):
    """(jitted step, state, batch) of the reward-model comparison; `bench.cost` compiles the
    same."""
    import jax
    import jax.numpy as jnp

    from rlhf_jax.losses import get_loss
    from rlhf_jax.models import init_scalar_head
    from rlhf_jax.steps import TrainState, make_reward_step

    params = {"trunk": trunk, "head": init_scalar_head(cfg, jax.random.key(1))}
    state = TrainState.create(params, _optimizer())
    step = jax.jit(make_reward_step(cfg, get_loss("reward")), donate_argnums=0)
    ids = np.stack([chosen, rejected], axis=1)  # [B, K=2, L]
    b = ids.shape[0]
    batch = {
        "input_ids": jnp.asarray(ids, jnp.int32),
        "attention_mask": jnp.ones(ids.shape, jnp.int32),
        "rank": jnp.tile(jnp.arange(2, dtype=jnp.int32), (b, 1)),
        "completion_mask": jnp.ones((b, 2), jnp.int32),
    }
    return step, state, batch


def jax_rm(folder: Path, chosen: np.ndarray, rejected: np.ndarray):
    return _jax_runner(*jax_rm_step(*load_jax(folder), chosen, rejected))


def trl_rm(folder: Path, chosen: np.ndarray, rejected: np.ndarray, vocab: int):
    import datasets
    import torch
    import transformers
    from trl import RewardConfig, RewardTrainer

    b, length = chosen.shape
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=1, dtype=torch.float32
    )
    model.train()
    args = RewardConfig(**trl_setup.common_args(per_device_train_batch_size=b, max_length=length))
    data = {"chosen_ids": chosen.tolist(), "rejected_ids": rejected.tolist()}
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_dict(data),
        processing_class=trl_setup.tokenizer(vocab),
    )
    return _trl_runner(trainer, model, (2 * b, length), "RM")


# ----------------------------------------------------------------------------- DPO


def jax_dpo(folder: Path, prompt: np.ndarray, chosen: np.ndarray, rejected: np.ndarray):
    import jax
    import jax.numpy as jnp

    from rlhf_jax.losses import get_loss
    from rlhf_jax.steps import TrainState
    from rlhf_jax.steps.preference import make_logps_fn, make_preference_step

    cfg, params = load_jax(folder)
    b, p = prompt.shape
    ids = np.stack([np.concatenate([prompt, chosen], 1), np.concatenate([prompt, rejected], 1)], 1)
    batch = {
        "input_ids": jnp.asarray(ids, jnp.int32),
        "attention_mask": jnp.ones(ids.shape, jnp.int32),
        "rank": jnp.tile(jnp.arange(2, dtype=jnp.int32), (b, 1)),
        "completion_mask": jnp.ones((b, 2), jnp.int32),
        "completion_start": jnp.full((b,), p, jnp.int32),
    }
    batch["ref_logps"] = jax.jit(make_logps_fn(cfg))(params, batch)  # before training, once
    state = TrainState.create(params, _optimizer())
    loss = get_loss("preference", "dpo", beta=0.1)
    step = jax.jit(make_preference_step(cfg, loss), donate_argnums=0)
    return _jax_runner(step, state, batch)


def trl_dpo(folder: Path, prompt: np.ndarray, chosen: np.ndarray, rejected: np.ndarray, vocab: int):
    import datasets
    from trl import DPOConfig, DPOTrainer

    b, p = prompt.shape
    length = p + chosen.shape[1]
    model = load_torch(folder, for_training=True)
    args = DPOConfig(
        **trl_setup.common_args(
            per_device_train_batch_size=b,
            max_length=length,
            beta=0.1,
            precompute_ref_log_probs=True,
        )
    )
    # The completions end in EOS already (the last token), so TRL adds none.
    data = {
        "prompt": [trl_setup.text_of(r) for r in prompt],
        "chosen": [" " + trl_setup.text_of(r[:-1]) + " <eos>" for r in chosen],
        "rejected": [" " + trl_setup.text_of(r[:-1]) + " <eos>" for r in rejected],
    }
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_dict(data),
        processing_class=trl_setup.tokenizer(vocab),
    )
    return _trl_runner(trainer, model, (2 * b, length), "DPO", needs=("ref_chosen_logps",))


# ----------------------------------------------------------------------------- main

COLUMNS = (
    "model",
    "rlhf_jax s/step",
    "TRL s/step",
    "rlhf_jax tokens/s",
    "TRL tokens/s",
    "speed-up vs TRL",
    "rlhf_jax MFU",
    "TRL MFU",
    "rlhf_jax first step (s)",
    "TRL first step (s)",
)


def _row(table: Table, shape: Shape, timings, tokens: int, flops: float, peak: float) -> dict:
    j, t = timings["rlhf_jax"], timings["trl"]
    row = dict(
        jax_s=j.median,
        trl_s=t.median,
        ratio=t.median / j.median,
        jax_mfu=flops / j.median / peak,
        trl_mfu=flops / t.median / peak,
        jax_first=j.first,
        trl_first=t.first,
    )
    table.add(
        shape.name,
        j.median,
        t.median,
        tokens / j.median,
        tokens / t.median,
        f"{row['ratio']:.2f}x",
        f"{100 * row['jax_mfu']:.0f}%",
        f"{100 * row['trl_mfu']:.0f}%",
        j.first,
        t.first,
    )
    return row


def main(argv=None) -> dict:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    sizes = SIZES[args.size]
    repeats = 1 if args.size == "tiny" else args.repeats
    warmup = 0 if args.size == "tiny" else args.warmup
    trl_setup.quiet()
    threads = set_torch_threads()
    peak = matmul_peak(
        n=512 if args.size == "tiny" else 2048, repeats=1 if args.size == "tiny" else 5
    )
    rng = np.random.default_rng(0)

    sft = Table(f"SFT step: batch {sizes.sft_batch} x {sizes.sft_len} tokens, fp32", COLUMNS)
    rm_len = sizes.rm_prompt + sizes.rm_completion
    rm = Table(
        f"Reward-model step: {sizes.rm_batch} prompts x (chosen, rejected) of "
        f"{sizes.rm_prompt} + {sizes.rm_completion} tokens, fp32",
        COLUMNS,
    )
    dpo = Table(
        f"DPO step: {sizes.rm_batch} prompts x (chosen, rejected) of "
        f"{sizes.rm_prompt} + {sizes.rm_completion} tokens, reference log-probs precomputed, fp32",
        COLUMNS,
    )
    results: dict = {"peak_flops": peak["peak"], "sft": {}, "rm": {}, "dpo": {}}
    for shape in sizes.shapes:
        folder = build_checkpoint(shape, Path(tempfile.mkdtemp(prefix="rlhf_jax_bench_")))
        # SFT
        ids = trl_setup.random_ids(rng, shape.vocab, sizes.sft_batch, sizes.sft_len)
        sides = {"rlhf_jax": jax_sft(folder, ids), "trl": trl_sft(folder, ids, shape.vocab)}
        timings = alternate(sides, warmup, repeats)
        del sides
        tokens = sizes.sft_batch * sizes.sft_len
        flops = train_flops(shape, sizes.sft_batch, sizes.sft_len, lm_head=True)
        results["sft"][shape.name] = _row(sft, shape, timings, tokens, flops, peak["peak"])
        # RM
        prompt = trl_setup.random_ids(rng, shape.vocab, sizes.rm_batch, sizes.rm_prompt)
        comp = trl_setup.random_ids(rng, shape.vocab, 2, sizes.rm_batch, sizes.rm_completion)
        chosen = np.concatenate([prompt, comp[0]], axis=1)
        rejected = np.concatenate([prompt, comp[1]], axis=1)
        sides = {
            "rlhf_jax": jax_rm(folder, chosen, rejected),
            "trl": trl_rm(folder, chosen, rejected, shape.vocab),
        }
        timings = alternate(sides, warmup, repeats)
        del sides
        tokens = 2 * sizes.rm_batch * rm_len
        flops = train_flops(shape, 2 * sizes.rm_batch, rm_len, lm_head=False)
        results["rm"][shape.name] = _row(rm, shape, timings, tokens, flops, peak["peak"])
        # DPO: the same sequences, the completions ending in EOS
        chosen_c, rejected_c = comp[0].copy(), comp[1].copy()
        chosen_c[:, -1] = rejected_c[:, -1] = trl_setup.EOS
        sides = {
            "rlhf_jax": jax_dpo(folder, prompt, chosen_c, rejected_c),
            "trl": trl_dpo(folder, prompt, chosen_c, rejected_c, shape.vocab),
        }
        timings = alternate(sides, warmup, repeats)
        del sides
        flops = train_flops(shape, 2 * sizes.rm_batch, rm_len, lm_head=True)
        results["dpo"][shape.name] = _row(dpo, shape, timings, tokens, flops, peak["peak"])

    peak_note = (
        f"MFU = model FLOPs of the step (forward + backward, `bench/flops.py`) / median time / "
        f"measured fp32 matmul peak {peak['peak'] / 1e9:.0f} GFLOP/s (JAX "
        f"{peak['jax'] / 1e9:.0f}, PyTorch {peak.get('torch', float('nan')) / 1e9:.0f})."
    )
    how = (
        f"Median of {repeats} timed steps per side after {warmup} discarded, sides alternating "
        f"step by step; speed-up = TRL time / rlhf_jax time; first step = the first call "
        f"(rlhf_jax: tracing + XLA compile + one step; TRL: one eager step). PyTorch threads: "
        f"{threads}. TRL step = `trainer.training_step(model, batch)` + grad clip + "
        f"`optimizer.step()` + `lr_scheduler.step()` + `zero_grad()` on a batch from the "
        f"trainer's dataloader (TRL's default optimizer, `adamw_torch_fused`), "
        f"i.e. the body of `Trainer.train`'s loop without data loading and logging."
    )
    sft.notes += [
        how,
        peak_note,
        "TRL's SFT loss runs with its fused (chunked) LM head (`fused_lm_head=True`), its "
        "default; rlhf_jax takes the loss on every token as TRL does for a pre-tokenized dataset.",
    ]
    rm.notes += [
        how,
        peak_note,
        "rlhf_jax: one [B, K=2, L] batch, all 2B sequences in one forward, the K-wise loss "
        "(for K = 2 the pairwise loss); TRL: `RewardTrainer`, 2B rows (chosen then rejected) "
        "through `AutoModelForSequenceClassification` (num_labels=1). MFU counts no LM head.",
    ]
    dpo.notes += [
        how,
        peak_note,
        "rlhf_jax: `make_preference_step` with the `dpo` loss (beta 0.1) on one [B, K=2, L] "
        "batch with `ref_logps` computed before the timing; TRL: `DPOTrainer` with "
        "`precompute_ref_log_probs=True` (its reference pass runs when the dataloader is "
        "built, outside the timing), loss `sigmoid`, beta 0.1, its fused LM head.",
    ]
    publish("training", [sft, rm, dpo], args.out)
    return results


if __name__ == "__main__":
    main()
