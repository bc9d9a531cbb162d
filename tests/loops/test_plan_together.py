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
    sft = _plan(capsys, "model.remat=false", f"sft.batch_size={rows}", "--check")
    assert sft["peak_bytes_per_device"] > MEMORY
    singles = sft["suggestions"]
    assert singles and not any(s["fits"] for s in singles), singles  # none fits alone
    together = sft["together"]
    assert together["fits"] and together["peak_bytes_per_device"] <= MEMORY
    switches = together["switch"].split()
    assert len(switches) >= 2 and set(switches) <= {s["switch"] for s in singles}

    again = _plan(capsys, f"sft.batch_size={rows}", *switches, "--check")
    assert again["peak_bytes_per_device"] <= MEMORY and again["together"] is None
    # --check compiled what planning again compiles; a stage that fits has nothing to check
    (checked,) = sft["checked"]
    assert checked["switch"] == together["switch"] and checked["error"] is None
    assert checked["peak_bytes_per_device"] == again["peak_bytes_per_device"]
    assert checked["estimated_peak_bytes_per_device"] == together["peak_bytes_per_device"]
    assert checked["fits"] and again["checked"] == []
    # the estimate is arithmetic on the first plan: within 25% of the compiled peak
    ratio = together["peak_bytes_per_device"] / again["peak_bytes_per_device"]
    assert 0.75 <= ratio <= 1.25, ratio


def test_check_reports_a_switch_it_could_not_plan_and_prints_each_result(monkeypatch):
    """A switch whose re-plan fails (say, a batch it no longer divides) is reported with the
    reason, not raised; the table prints the compiled peak beside the estimate."""
    from types import SimpleNamespace

    from rlhf_jax.errors import RlhfJaxError
    from rlhf_jax.plan import check
    from rlhf_jax.plan.report import _check_line

    named = {"a": [("x=1", 100), ("y=2", 90)], "b": []}
    monkeypatch.setattr(check, "switches_to_check", lambda stage, ctx: named[stage.name])

    def replan(name, switches):
        if switches == ["y=2"]:
            raise RlhfJaxError("sft.batch_size 70 is not divisible by 4 micro-batches")
        return SimpleNamespace(peak=120)

    stages = [SimpleNamespace(name="a"), SimpleNamespace(name="b")]
    got = check.check_switches(stages, SimpleNamespace(device_memory=110), replan)
    assert list(got) == ["a"]  # a stage with nothing named has no entry
    compiled, failed = got["a"]
    assert (compiled.peak, compiled.fits, compiled.error) == (120, False, None)
    assert failed.peak is None and "not divisible" in failed.error and not failed.fits
    line = _check_line(compiled, 110)
    assert line == "    x=1: 120 B compiled (est. 100 B), DOES NOT FIT (10 B over)"
    assert _check_line(failed, 110).endswith("could not be planned: " + failed.error)
