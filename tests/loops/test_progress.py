"""Progress off a terminal (a log file, a scheduler): whole lines at each tenth of the work and
every `every_seconds`, with rate and time left, and a last line; a tqdm bar on a terminal."""

import io
import os
import subprocess
import sys
import textwrap

from rlhf_jax.loops.progress import PlainProgress, progress_bar


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def run(total, seconds_per_update, initial=0, stop_at=None, every=30.0):
    out, clock = io.StringIO(), Clock()
    with PlainProgress(total, "sft", initial, out, every_seconds=every, clock=clock) as bar:
        for i in range(initial, stop_at or total):
            clock.now += seconds_per_update
            bar.update(1)
            if i == initial:
                bar.set_postfix({"loss": "2.31"})
    return out.getvalue()


def test_a_line_at_each_tenth_then_done():
    text = run(1000, 0.1)
    lines = text.splitlines()
    assert "\r" not in text
    assert len(lines) == 10  # 10%, ..., 90%, then done
    # 100 steps in 10 s: 10 it/s, 900 left at 0.1 s each = 90 s
    assert lines[0] == "sft: 100/1000 (10%) 10 it/s, 01:30 left, loss=2.31"
    assert lines[-1] == "sft: done 1000/1000 in 01:40 (10 it/s), loss=2.31"


def test_a_slow_run_prints_every_interval_and_stays_bounded():
    text = run(20, 7.0)  # 140 s: a line each 30 s (every 5th step: 35 s) and at each tenth
    lines = text.splitlines()
    assert len(lines) <= 10 + 140 // 30 + 1, lines
    assert lines[0] == "sft: 2/20 (10%) 7 s/it, 02:06 left, loss=2.31"
    assert lines[-1] == "sft: done 20/20 in 02:20 (7 s/it), loss=2.31"


def test_resumed_steps_count_in_the_position_not_in_the_rate():
    lines = run(100, 2.0, initial=50).splitlines()
    # 60/100 after 10 steps of this process in 20 s: 2 s/it, 40 left = 80 s
    assert lines[0] == "sft: 60/100 (60%) 2 s/it, 01:20 left, loss=2.31"


def test_work_that_ends_early_says_where_it_stopped():
    last = run(100, 1.0, stop_at=30).splitlines()[-1]
    assert last == "sft: stopped at 30/100 after 00:30 (1 s/it), loss=2.31"


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_bars_on_a_terminal_lines_elsewhere_nothing_when_disabled():
    assert isinstance(progress_bar(10, "sft", stream=io.StringIO()), PlainProgress)
    assert not isinstance(progress_bar(10, "sft", stream=Terminal()), PlainProgress)
    quiet = io.StringIO()
    with progress_bar(10, "sft", enabled=False, stream=quiet) as bar:
        bar.update(10)
    assert quiet.getvalue() == ""


def test_stderr_to_a_file_gets_plain_lines(tmp_path):
    # A real process whose stderr is a file, as under a scheduler: the default stream.
    code = textwrap.dedent(
        """
        from rlhf_jax.loops.progress import progress_bar
        with progress_bar(50, "rm") as bar:
            for _ in range(50):
                bar.update(1)
        """
    )
    log = tmp_path / "log.txt"
    with open(log, "w") as err:
        subprocess.run([sys.executable, "-c", code], stderr=err, check=True, env=os.environ)
    text = log.read_text()
    assert "\r" not in text
    assert 1 <= len(text.splitlines()) <= 10, text
    assert text.splitlines()[-1].startswith("rm: done 50/50 in ")


def test_the_training_loops_bar_off_a_terminal(tmp_path, capsys):
    from rlhf_jax.loops.logging import MetricsLogger

    logger = MetricsLogger(tmp_path, progress=True)
    with logger.bar(40, "sft", initial=10) as bar:
        for _ in range(30):
            bar.update(1)
    logger.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    assert len(err.splitlines()) <= 10, err
    assert err.splitlines()[-1].startswith("sft: done 40/40 in ")
