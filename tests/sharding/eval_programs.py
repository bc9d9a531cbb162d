"""The evaluation programs (held-out LM loss, reward accuracy, scores, DPO log-probs, the KL's
sequence log-probs, sampling), compiled as the loops compile them on a mesh
(`loops.batched.compiled`, i.e. `sharding.jit_eval`) on abstract weights and batches of
`rows` rows: for `scaling_script.py`, which reads their HLO."""

import jax
import jax.numpy as jnp

from rlhf_jax.loops import evaluate, preference, stages
from rlhf_jax.loops.batched import compiled
from rlhf_jax.models import init_params, init_scalar_head, scalar_trunk
from rlhf_jax.plan.abstract import base_model
from rlhf_jax.rollout import generate
from rlhf_jax.sharding import batch_sharding


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                        shardings)  # fmt: skip


def _weights(model_cfg, runtime, scalar: bool):
    def make(key):
        params = init_params(model_cfg, key)
        if not scalar:
            return params
        return {"trunk": scalar_trunk(params), "head": init_scalar_head(model_cfg, key)}

    shapes = jax.eval_shape(make, jax.random.key(0))
    return _abstract(shapes, runtime.param_shardings(model_cfg, scalar=scalar))


def _batch(runtime, **shapes):
    rows = batch_sharding(runtime.mesh, runtime.rules, 1)
    dtype = {"completion_start": jnp.int32, "input_ids": jnp.int32, "prompt_ids": jnp.int32,
             "tokens": jnp.int32}  # fmt: skip
    return {
        k: jax.ShapeDtypeStruct(s, dtype.get(k, jnp.float32), sharding=rows)
        for k, s in shapes.items()
    }


def _sample_fn(model_cfg, new_tokens):
    def fn(params, batch):
        ids, mask, key = batch["input_ids"], batch["attention_mask"], jax.random.key(0)
        out = generate(model_cfg, params, ids, mask, key, new_tokens, eos_id=(1,), pad_id=0)
        return out.tokens

    return fn


def eval_programs(cfg, runtime, rows: int) -> dict:
    """{name: (compiled-able jitted fn, abstract args, global row counts, lengths)}."""
    model = base_model(cfg, None)
    policy, reward = _weights(model, runtime, False), _weights(model, runtime, True)
    lm = (rows, cfg.sft.max_len)
    rank = (rows, 2, cfg.rm.max_prompt_len + cfg.rm.max_completion_len + 1)
    prompt, response = (rows, cfg.ppo.max_prompt_len), (rows, cfg.ppo.max_new_tokens)
    specs = {
        "lm_loss": (stages._row_nll(model), policy,
                    _batch(runtime, input_ids=lm, attention_mask=lm, loss_mask=lm)),
        "rewards": (stages._rewards_fn(model), reward,
                    _batch(runtime, input_ids=rank, attention_mask=rank)),
        "score": (stages._score_fn(model), reward,
                  _batch(runtime, input_ids=rank[::2], attention_mask=rank[::2])),
        "dpo_logps": (preference._logps_fn(model), policy,
                      _batch(runtime, input_ids=rank, attention_mask=rank,
                             completion_start=(rows,))),
        "sequence_logprob": (evaluate.make_sequence_logprob_fn(model, 1.0), policy,
                             _batch(runtime, prompt_ids=prompt, prompt_mask=prompt,
                                    tokens=response, mask=response)),
        "sample": (_sample_fn(model, cfg.ppo.max_new_tokens), policy,
                   _batch(runtime, input_ids=prompt, attention_mask=prompt)),
    }  # fmt: skip
    lengths = {lm[1], rank[2], prompt[1], response[1], prompt[1] + response[1]}
    return {
        f"eval/{name}": (compiled(fn, runtime), (weights, batch), {rows, 2 * rows}, lengths)
        for name, (fn, weights, batch) in specs.items()
    }
