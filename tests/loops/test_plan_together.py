"""`rlhf-jax plan`: when no single switch makes a stage fit, the plan names switches that do
together; planning again with them applied compiles to a peak that fits."""

import json

from plan_shapes import CONFIG, MODEL

from rlhf_jax.cli import main

TINY = [*MODEL, "ppo.iterations=0", "sft.max_len=128"]  # SFT alone
MEMORY = 80 * 2**20


def _plan(capsys, *args: str) -> dict:
    cmd = ["plan", "--config", CONFIG, *TINY, *args, "--device-memory", "80MiB", "--json"]
    assert main(cmd) == 0
    return json.loads(capsys.readouterr().out)["stages"]["sft"]


def test_switches_named_together_fit_when_planned_again(capsys):
    import jax

    # 70 rows on each of the worker's devices: 2 micro-batches of 35 divide them, 4 do not, so
    # more micro-batches alone cannot make the stage fit
    rows = 70 * jax.device_count()
    sft = _plan(capsys, "model.remat=false", f"sft.batch_size={rows}")
    assert sft["peak_bytes_per_device"] > MEMORY
    singles = sft["suggestions"]
    assert singles and not any(s["fits"] for s in singles), singles  # none fits alone
    together = sft["together"]
    assert together["fits"] and together["peak_bytes_per_device"] <= MEMORY
    switches = together["switch"].split()
    assert len(switches) >= 2 and set(switches) <= {s["switch"] for s in singles}

    again = _plan(capsys, f"sft.batch_size={rows}", *switches)
    assert again["peak_bytes_per_device"] <= MEMORY and again["together"] is None
    # the estimate is arithmetic on the first plan: within 25% of the compiled peak
    ratio = together["peak_bytes_per_device"] / again["peak_bytes_per_device"]
    assert 0.75 <= ratio <= 1.25, ratio
