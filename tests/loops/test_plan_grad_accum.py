"""`rlhf-jax plan`'s advice on more micro-batches per update against planning again with it:
what a micro-batch's rows cost is read off the compiled backward, not estimated from the
model's shape (which, at long lengths, missed most of a recomputing backward)."""

import json
import re

from plan_shapes import CONFIG, MODEL

from rlhf_jax.cli import main


def _sft(capsys, *args: str) -> dict:
    assert main(["plan", "--config", CONFIG, *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)["stages"]["sft"]


def test_the_grad_accum_estimate_matches_planning_again(capsys):
    import jax

    dp = jax.device_count()  # the suite's workers run JAX on 1, 4 or 8 CPU devices
    # Long rows and remat: the backward's temporaries (per micro-batch) set the peak; 2 MB of
    # memory: nothing fits, so the advice offers the most micro-batches the batch allows.
    base = [
        *MODEL,
        "ppo.iterations=0",
        "model.remat=true",
        f"sft.batch_size={8 * dp}",
        "sft.max_len=256",
        "sft.optim.grad_accum=1",
        "--device-memory",
        "2MB",
    ]
    first = _sft(capsys, *base)
    assert first["largest"] == "activations"
    offered = {
        s["switch"]: s["peak_bytes_per_device"]
        for s in first["suggestions"]
        if s["switch"].startswith("sft.optim.grad_accum=")
    }
    (switch, estimate), *_ = offered.items()
    again = _sft(capsys, *base, switch)
    assert again["peak_bytes_per_device"] < first["peak_bytes_per_device"]
    assert abs(estimate - again["peak_bytes_per_device"]) < 0.1 * again["peak_bytes_per_device"]
    assert int(re.sub(r".*=", "", switch)) == 8  # 8 x 1 row per device: nothing fits 2 MB
