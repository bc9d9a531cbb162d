"""One RL iteration: rlhf_jax PPO and GRPO (experience + update) vs TRL's GRPOTrainer and
RLOOTrainer.

Every model is the same random GPT-2 checkpoint (6L/512d, vocabulary 8192, fp32): policy,
reference, reward model (a scalar head on the trunk; TRL: `AutoModelForSequenceClassification`
with num_labels=1 passed as `reward_funcs`) and, for PPO, the value model. One iteration:
8 prompts of 32 tokens x 4 sampled completions = 32 rollouts of exactly 64 new tokens
(rlhf_jax: no EOS id; TRL: `min_new_tokens` = `max_completion_length`), the KL penalty on
(reference log-probs taken), one gradient step on the whole batch:
- rlhf_jax PPO: `make_experience_fn` (sample, reward, reference log-probs, values, GAE) then
  `make_update_fn` with epochs=1 and minibatch = rollout batch (one policy + one value
  AdamW update); the rollout's own log-probs are the old policy's (no extra forward);
- rlhf_jax GRPO: the same with `advantage=grpo, samples_per_prompt=4, kl_penalty=loss` (k3,
  beta 0.05, token-mean loss as TRL's default `loss_type="dapo"`): no critic at all, like for
  like with TRL GRPO;
- TRL: `per_device_train_batch_size=32, num_generations=4, steps_per_generation=1,
  num_iterations=1, gradient_accumulation_steps=1`, beta=0.05, so each
  `trainer.training_step` generates, scores and takes one optimizer step.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np

from bench import trl_setup
from bench.common import Table, alternate, parser, publish, set_torch_threads, time_one
from bench.models import GPT2_6L, TINY, Shape, build_checkpoint, load_jax

BETA = 0.05
LR = 1e-6


@dataclasses.dataclass(frozen=True)
class Sizes:
    shape: Shape
    prompts: int
    completions: int
    prompt_len: int
    new_tokens: int


SIZES = {
    "full": Sizes(GPT2_6L, 8, 4, 32, 64),
    "tiny": Sizes(TINY, 2, 2, 8, 8),
}


# ----------------------------------------------------------------------------- rlhf_jax


def _rl_config(s: Sizes, algorithm: str):
    """PPO: 32 prompts (each of the 8 repeated 4 times), one sample each, a critic. GRPO: the
    8 prompts, 4 samples each (a group), no critic, the KL in the loss."""
    from rlhf_jax.config import OptimConfig, PPOConfig

    optim = OptimConfig(lr=LR, schedule="constant", grad_clip=1.0)
    n = s.prompts * s.completions
    common = dict(
        minibatch_size=n,
        epochs=1,
        max_prompt_len=s.prompt_len,
        max_new_tokens=s.new_tokens,
        temperature=1.0,
        beta=BETA,
        ema_decay=0.0,  # TRL keeps no EMA of the policy
        policy_optim=optim,
        value_optim=optim,
    )
    if algorithm == "grpo":
        return PPOConfig(
            rollout_batch=s.prompts,
            samples_per_prompt=s.completions,
            advantage="grpo",
            kl_penalty="loss",
            **common,
        )
    return PPOConfig(rollout_batch=n, **common)


class JaxRL:
    """The jitted experience and update functions of one algorithm, and the pieces of
    experience for the split. `cfg, params`: the model every role starts from (`load_jax`);
    `bench.cost` compiles the same functions."""

    def __init__(self, cfg, params, unique_prompts: np.ndarray, sizes: Sizes, algorithm: str):
        import jax
        import jax.numpy as jnp

        from rlhf_jax.models import init_scalar_head
        from rlhf_jax.steps import (
            Frozen,
            RLAlgorithm,
            init_rl_state,
            make_experience_fn,
            make_update_fn,
        )
        from rlhf_jax.steps.optim import make_optimizer

        self.cfg = cfg
        ppo = self.ppo = _rl_config(sizes, algorithm)
        algo = RLAlgorithm.from_config(ppo)
        rm = {"trunk": params, "head": init_scalar_head(cfg, jax.random.key(1))}
        critic = rm if algo.needs_critic else None
        critic_tx = make_optimizer(ppo.value_optim, 1_000_000) if algo.needs_critic else None
        self.state = init_rl_state(
            params, critic, make_optimizer(ppo.policy_optim, 1_000_000), critic_tx, ppo
        )
        self.frozen = Frozen(ref=params, reward=rm)
        # PPO samples each prompt once, so it gets every prompt K times; GRPO repeats inside.
        prompt_ids = unique_prompts
        if ppo.samples_per_prompt == 1:
            prompt_ids = np.repeat(unique_prompts, sizes.completions, axis=0)
        self.prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
        self.prompt_mask = jnp.ones(prompt_ids.shape, jnp.int32)
        self.experience = jax.jit(
            make_experience_fn(cfg, cfg if critic else None, cfg, ppo, algo, (), trl_setup.PAD)
        )
        self.update = jax.jit(
            make_update_fn(cfg, cfg if critic else None, ppo, algo), donate_argnums=0
        )
        self.key = jax.random.key(0)
        self.i = 0

    def iteration(self):
        """experience + update, blocked on the new state."""
        import jax

        self.i += 1
        k1, k2 = jax.random.split(jax.random.fold_in(self.key, self.i))
        exp, m1 = self.experience(self.state, self.frozen, self.prompt_ids, self.prompt_mask, k1)
        self.state, m2 = self.update(self.state, exp, None, k2)
        return jax.block_until_ready((self.state, m1, m2))

    def breakdown(self, warmup: int, repeats: int) -> dict:
        """Median seconds of each part, each jitted alone: generation, scoring (reference
        log-probs + values + reward, i.e. experience minus sampling), update."""
        import jax
        import jax.numpy as jnp

        from rlhf_jax.ops import token_logprobs
        from rlhf_jax.rollout import generate as rollout_generate
        from rlhf_jax.steps import response_logits, response_values
        from rlhf_jax.steps.reward import score_sequences

        cfg, ppo = self.cfg, self.ppo
        p = self.prompt_ids.shape[1]

        def generate(params, ids, mask, key):  # compiled inside (rollout.generate is jitted)
            return rollout_generate(
                cfg,
                params,
                ids,
                mask,
                key,
                ppo.max_new_tokens,
                temperature=ppo.temperature,
                pad_id=trl_setup.PAD,
            )

        @jax.jit
        def score(ref, value, reward, seq_ids, seq_mask, tokens):
            ref_logits = response_logits(cfg, ref, seq_ids, seq_mask, p)
            ref_logp = token_logprobs(ref_logits, tokens, ppo.temperature)
            values = response_values(cfg, value, seq_ids, seq_mask, p)
            return ref_logp, values, score_sequences(cfg, reward, seq_ids, seq_mask)

        gen = generate(self.state.policy.params, self.prompt_ids, self.prompt_mask, self.key)
        seq_ids = jnp.concatenate([self.prompt_ids, gen.tokens], axis=1)
        seq_mask = jnp.ones(seq_ids.shape, jnp.int32)
        exp, _ = self.experience(
            self.state, self.frozen, self.prompt_ids, self.prompt_mask, self.key
        )
        parts = {
            "generation": lambda: jax.block_until_ready(
                generate(self.state.policy.params, self.prompt_ids, self.prompt_mask, self.key)
            ),
            "scoring": lambda: jax.block_until_ready(
                score(
                    self.frozen.ref,
                    self.state.critic.params,
                    self.frozen.reward,
                    seq_ids,
                    seq_mask,
                    gen.tokens,
                )
            ),
            "experience (all)": lambda: jax.block_until_ready(
                self.experience(
                    self.state, self.frozen, self.prompt_ids, self.prompt_mask, self.key
                )
            ),
        }
        out = {name: time_one(fn, warmup, repeats) for name, fn in parts.items()}

        def update():
            self.state, m = self.update(self.state, exp, None, self.key)
            return jax.block_until_ready((self.state, m))

        out["update"] = time_one(update, warmup, repeats)
        return out


# ----------------------------------------------------------------------------- TRL


def trl_trainer(kind: str, folder: Path, prompts: list[str], s: Sizes):
    """A GRPO or RLOO trainer and a callable running one iteration (= one training step)."""
    import datasets
    import torch
    import transformers
    import trl

    tok = trl_setup.tokenizer(s.shape.vocab)
    reward = transformers.AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=1, dtype=torch.float32
    )
    reward.eval()
    n = s.prompts * s.completions
    config_cls = trl.GRPOConfig if kind == "grpo" else trl.RLOOConfig
    trainer_cls = trl.GRPOTrainer if kind == "grpo" else trl.RLOOTrainer
    args = config_cls(
        **trl_setup.common_args(
            learning_rate=LR,
            per_device_train_batch_size=n,
            gradient_accumulation_steps=1,
            num_generations=s.completions,
            steps_per_generation=1,
            num_iterations=1,
            max_completion_length=s.new_tokens,
            generation_kwargs={"min_new_tokens": s.new_tokens},
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            beta=BETA,
            model_init_kwargs={"dtype": "float32"},
            log_completions=False,
        )
    )
    trainer = trainer_cls(
        model=str(folder),
        reward_funcs=reward,
        args=args,
        train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
        processing_class=tok,
        reward_processing_classes=tok,
    )
    trl_setup.prepare(trainer)
    model = trainer.model
    batch = next(iter(trainer.get_train_dataloader()))
    if len(batch) != n:
        raise RuntimeError(f"TRL {kind} batch has {len(batch)} rows, expected {n}")

    return trainer, trl_setup.step_runner(trainer, model, batch, None)


# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    s = SIZES[args.size]
    tiny = args.size == "tiny"
    repeats = 1 if tiny else args.repeats
    warmup = 0 if tiny else args.warmup
    trl_setup.quiet()
    threads = set_torch_threads()
    rng = np.random.default_rng(0)
    folder = build_checkpoint(s.shape, Path(tempfile.mkdtemp(prefix="rlhf_jax_bench_")))

    unique = trl_setup.random_ids(rng, s.shape.vocab, s.prompts, s.prompt_len)
    jax_side = JaxRL(*load_jax(folder), unique, s, "ppo")
    jax_grpo = JaxRL(*load_jax(folder), unique, s, "grpo")
    # TRL repeats each prompt num_generations times itself; the dataset holds enough prompts
    # for one batch of `prompts` unique ones.
    texts = [trl_setup.text_of(row) for row in unique]
    sides = {"rlhf_jax PPO": jax_side.iteration, "rlhf_jax GRPO": jax_grpo.iteration}
    for kind in ("grpo", "rloo"):
        sides[f"TRL {kind.upper()}"] = trl_trainer(kind, folder, texts, s)[1]
    timings = alternate(sides, warmup, repeats)
    parts = jax_side.breakdown(warmup, repeats)

    n = s.prompts * s.completions
    ppo_t = timings["rlhf_jax PPO"].median
    grpo_t = timings["rlhf_jax GRPO"].median
    table = Table(
        f"One RL iteration: {s.prompts} prompts x {s.completions} completions, "
        f"{s.prompt_len}-token prompts, {s.new_tokens} new tokens, {s.shape.name}, fp32",
        (
            "method",
            "s/iteration",
            "samples/s",
            "new tokens/s",
            "PPO speed-up",
            "GRPO speed-up",
            "first iteration (s)",
        ),
    )
    results = {"iteration": {}, "parts": {}}
    for name, t in timings.items():
        table.add(
            name,
            t.median,
            n / t.median,
            n * s.new_tokens / t.median,
            f"{t.median / ppo_t:.2f}x",
            f"{t.median / grpo_t:.2f}x",
            t.first,
        )
        results["iteration"][name] = {"s": t.median, "first": t.first}

    split = Table(
        "rlhf_jax PPO iteration, part by part",
        ("part", "s", "share of experience + update"),
    )
    whole = parts["experience (all)"].median + parts["update"].median
    for name in ("generation", "scoring", "experience (all)", "update"):
        split.add(name, parts[name].median, f"{100 * parts[name].median / whole:.0f}%")
        results["parts"][name] = parts[name].median
    table.notes += [
        f"Median of {repeats} timed iterations per method after {warmup} discarded, methods "
        f"alternating iteration by iteration; PPO (GRPO) speed-up = method time / rlhf_jax "
        "PPO (GRPO) time (above 1: rlhf_jax is faster); first iteration = the first call "
        "(rlhf_jax: tracing + XLA compile of experience and update + one iteration). "
        f"PyTorch threads: {threads}.",
        "rlhf_jax PPO: `experience` (jitted) + `update` (jitted, state donated); epochs=1, "
        "minibatch = the whole rollout batch, so one policy and one value AdamW update per "
        f"iteration; beta={BETA}, no EMA, no ptx. 4 models: policy, reference, reward (scalar "
        "head), value (initialised from the RM).",
        "rlhf_jax GRPO: `ppo.advantage=grpo ppo.samples_per_prompt=4 ppo.kl_penalty=loss` "
        f"(k3, beta={BETA}, token-mean loss: TRL's default `loss_type=dapo`), same batch and "
        "one AdamW update; 3 models (policy, reference, reward), no critic: like for like with "
        "TRL GRPO.",
        "TRL: one `trainer.training_step(model, batch)` (generation with `model.generate`, "
        "reward-model and reference forwards, loss and backward) + grad clip + "
        "`optimizer.step()` + `lr_scheduler.step()` + `zero_grad()`, on a batch from the "
        "trainer's dataloader. `num_generations=4, per_device_train_batch_size=32, "
        "steps_per_generation=1, num_iterations=1` (so no separate old-log-prob forward), "
        f"beta={BETA} (reference model loaded), `min_new_tokens=max_completion_length`. "
        "No value model (GRPO/RLOO are critic-free), so PPO does one more forward + backward.",
    ]
    split.notes += [
        "Each part jitted and timed alone (same shapes): generation = prefill + "
        f"{s.new_tokens} decode steps; scoring = the reference, value and reward forwards "
        "over the full sequences; "
        "experience (all) = the whole jitted experience function (generation + scoring + GAE); "
        "update = the jitted update (policy + value forward/backward, two AdamW updates).",
    ]
    publish("rl_iteration", [table, split], args.out)
    return results


if __name__ == "__main__":
    main()
