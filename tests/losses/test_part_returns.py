"""What a part returns is part of its contract, checked when the config is loaded: a one-line
error naming the part and what it returned, before any data or model is read. Fork parts come
from `custom_loss_module` (next to this file), as a fork's own package would."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import contract, registry
from rlhf_jax.advantages import AdvantageOut
from rlhf_jax.cli import main
from rlhf_jax.config import Config, load_config
from rlhf_jax.contract import check_part
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.steps import check_reward_fns, resolve_config_parts
from rlhf_jax.types import LossOut

FORK = "custom_loss_module"


def _load(*changes):
    return resolve_config_parts(load_config(Config, None, list(changes)))


def test_a_policy_loss_returning_shape_b_fails_at_load_naming_it():
    with pytest.raises(RlhfJaxError) as e:
        _load(f"ppo.policy_loss={FORK}:per_row_loss")
    assert str(e.value).startswith(
        f"policy loss '{FORK}:per_row_loss' returned a loss of shape (4,); a loss is a scalar"
    )


def test_the_cli_refuses_it_in_one_line_before_the_output_folder(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["ppo", "--output", str(out), f"ppo.policy_loss={FORK}:per_row_loss"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert err.count("\n") == 1 and "returned a loss of shape (4,)" in err, err


def test_a_preference_loss_without_the_accuracy_the_stage_reads_fails_at_load():
    with pytest.raises(RlhfJaxError, match="returns no metric 'dpo/accuracy', which the stage"):
        _load(f"dpo.loss={FORK}:dpo_without_accuracy")
    with pytest.raises(AssertionError, match="dpo/accuracy"):
        check_part("preference", registry.lookup("preference", f"{FORK}:dpo_without_accuracy"))


def test_a_reward_loss_without_the_metrics_the_stage_reads_fails_at_load():
    def ranking_loss(outputs, batch):
        r = outputs["rewards"] * batch["completion_mask"]
        return LossOut(jnp.mean(r), {"rm/loss": jnp.mean(r)})

    with pytest.raises(RlhfJaxError, match="returns no metric 'rm/accuracy', 'rm/margin', 'rm"):
        contract.dry_run("reward", ranking_loss, "mine", contract.REWARD_KEYS)


def test_a_reward_loss_may_read_the_whole_ranking_batch():
    """The tokens are in the stage's batch: a loss reading them is not refused at load."""

    def length_aware(outputs, batch):
        tokens = jnp.sum(batch["attention_mask"], axis=-1)  # [B, K]
        base = registry.lookup("reward", "default")(outputs, batch)
        return LossOut(base.loss + 0.0 * jnp.mean(tokens), base.metrics)

    contract.dry_run("reward", length_aware, "mine", contract.REWARD_KEYS)


def test_a_misspelt_compare_reward_function_fails_at_load_without_compare_runs():
    with pytest.raises(RlhfJaxError, match="unknown reward function 'topics_gld'"):
        _load("compare.reward_fn=topics_gld")


def test_a_misspelt_value_loss_fails_at_load_without_a_critic():
    grpo = ("ppo.advantage=grpo", "ppo.samples_per_prompt=4")
    with pytest.raises(RlhfJaxError, match="unknown value loss 'clipped_valu'"):
        _load(*grpo, "ppo.value_loss=clipped_valu")
    with pytest.raises(RlhfJaxError, match="value loss 'default' does not take clip;"):
        _load(*grpo, "ppo.value_loss_kwargs.clip=0.1")
    with pytest.raises(
        RlhfJaxError, match="returned metric 'custom/value_err' of shape \\(4, 6\\)"
    ):
        _load(*grpo, f"ppo.value_loss={FORK}:value_loss_per_token")


@pytest.mark.parametrize(
    "returned,message",
    [
        (lambda b: (b["rewards"], None, {}), "returned tuple; an estimator returns"),
        (
            lambda b: AdvantageOut(jnp.sum(b["rewards"], 1), None, {}),
            "returned advantages of shape (4,); they are [B, N] like the response mask, (4, 6)",
        ),
        (
            lambda b: AdvantageOut(b["rewards"], b["rewards"], {}),
            "returned returns (the critic's targets) but does not declare needs_critic",
        ),
        (
            lambda b: AdvantageOut(b["rewards"], None, {"mean": jnp.mean(b["rewards"])}),
            "returned metric name 'mean'; metric names have a slash",
        ),
    ],
)
def test_what_an_estimator_returns_is_checked_at_load(returned, message):
    with pytest.raises(RlhfJaxError) as e:
        contract.dry_run("advantage", returned, "est", contract.ADVANTAGE_KEYS)
    assert str(e.value).startswith("advantage estimator 'est' ") and message in str(e.value)


@pytest.mark.parametrize(
    "loss,message",
    [
        (lambda o, b: jnp.mean(o["logits"]), "returned ArrayImpl; a loss returns"),
        (
            lambda o, b: LossOut(jnp.int32(1), {"x/y": 1}),
            "a loss of dtype int32; a loss is a float",
        ),
        (lambda o, b: LossOut(jnp.mean(o["logits"]), {"x/y": "ok"}), "metric 'x/y' of type str"),
        (lambda o, b: LossOut(jnp.mean(o["logits"]), [1.0]), "returned metrics of type list"),
    ],
)
def test_what_a_loss_returns_is_checked_at_load(loss, message):
    with pytest.raises(RlhfJaxError) as e:
        contract.dry_run("ptx", loss, "lm", contract.PTX_KEYS)
    assert str(e.value).startswith("ptx loss 'lm' ") and message in str(e.value)


def test_every_registered_part_passes_the_load_time_checks():
    _load()  # the defaults
    for kind, keys in (
        ("sft", contract.PACKED_SFT_KEYS),
        ("reward", contract.REWARD_KEYS),
        ("ptx", contract.PTX_KEYS),
        ("value", contract.VALUE_KEYS),
    ):
        for name in registry.registered(kind):
            contract.dry_run(kind, registry.lookup(kind, name), name, keys)


# The worked fork example of docs/algorithms.md, built from rlhf_jax.losses.blocks.
def _naive_clip_negatives_only(logp, old, adv, mask, eps):
    """The fork's loss by hand: per token, -A r for A > 0, else PPO's max(-A r, -A clip(r))."""
    total, count = 0.0, 0
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if mask[b, t] == 0:
                continue
            r = np.exp(float(logp[b, t]) - float(old[b, t]))
            a = float(adv[b, t])
            clipped = min(max(r, 1 - eps), 1 + eps)
            total += -a * r if a > 0 else max(-a * r, -a * clipped)
            count += 1
    return total / count


def test_the_forks_loss_from_the_public_blocks_is_right_and_keeps_the_contract():
    fn = registry.lookup("policy", f"{FORK}:clip_negatives_only")
    check_part("policy", fn)
    outputs, batch, _ = contract.sample_inputs("policy")
    got = fn(outputs, batch, clip_eps=0.1)
    want = _naive_clip_negatives_only(
        outputs["logprobs"], batch["old_logprobs"], batch["advantages"],
        batch["response_mask"], 0.1,
    )  # fmt: skip
    np.testing.assert_allclose(float(got.loss), want, rtol=1e-5)
    assert set(got.metrics) == {
        "ppo/policy/loss",
        "ppo/policy/clipfrac",
        "ppo/policy/approxkl",
        "ppo/policy/entropy",
    }


def test_the_worked_example_in_the_docs_runs_and_is_this_function():
    """docs/algorithms.md's fork example, executed from the page: the same loss as above."""
    page = (Path(__file__).parents[2] / "docs" / "algorithms.md").read_text()
    section = page.split("### A new policy loss from the library's blocks", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace = {}
    exec(compile(code, "docs/algorithms.md", "exec"), namespace)
    documented = namespace["clip_negatives_only"]
    check_part("policy", documented)
    outputs, batch, _ = contract.sample_inputs("policy", seed=3)
    ours = registry.lookup("policy", f"{FORK}:clip_negatives_only")
    for kwargs in ({}, {"clip_eps": 0.05, "reduction": "seq_mean_token_mean"}):
        got, want = documented(outputs, batch, **kwargs), ours(outputs, batch, **kwargs)
        np.testing.assert_array_equal(got.loss, want.loss)


def test_the_forks_loss_is_configured_by_name():
    algo = _load(
        f"ppo.policy_loss={FORK}:clip_negatives_only",
        "ppo.policy_loss_kwargs.clip_eps=0.1",
        "ppo.loss_reduction=seq_mean_token_mean",
    )
    assert algo.policy_loss.keywords == {"clip_eps": 0.1, "reduction": "seq_mean_token_mean"}


# Reward functions.
def exact_answer(prompts, completions):
    """A verifiable reward that looks its answer up by prompt, as the data file wrote it."""
    answers = {"What is 2 + 2?": "4", "Name a prime.": "7"}
    return [float(answers[p] in c) for p, c in zip(prompts, completions)]


def first_word_length(prompts, completions):
    return [len(c.split()[0]) for c in completions]  # IndexError on an empty completion


def test_check_part_covers_reward_functions():
    check_part("reward_fn", registry.lookup("reward_fn", "topics_gold"))
    with pytest.raises(AssertionError, match="reward function 'first_word_length' raised Index"):
        check_part("reward_fn", first_word_length)
    with pytest.raises(AssertionError, match="must return one number per completion"):
        check_part("reward_fn", lambda p, c: [str(len(x)) for x in c])


def test_reward_functions_are_called_on_the_runs_prompts_before_any_model_loads():
    module = "test_part_returns"
    ok = load_config(Config, None, [f"ppo.reward_fn={module}:exact_answer"])
    check_reward_fns(ok, ["What is 2 + 2?", "Name a prime."])  # finds its answers
    bad = load_config(
        Config,
        None,
        [
            "compare.algorithms={grpo: {advantage: grpo, samples_per_prompt: 2}}",
            f"compare.reward_fn={module}:first_word_length",
        ],
    )
    with pytest.raises(RlhfJaxError) as e:
        check_reward_fns(bad, ["What is 2 + 2?"])
    message = str(e.value)
    assert message.startswith(
        f"reward function '{module}:first_word_length' raised IndexError: list index out of "
        "range (" + __file__
    )
    assert message.endswith("(a test call before any model loads, in compare.algorithms.grpo_gold)")
    assert "\n" not in message
