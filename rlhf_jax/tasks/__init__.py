"""Built-in tasks by the name `task.name` gives: each module generates its data
(`generate_task`), ranks like its labelers (`rank_by_labelers`) and scores with its hidden
gold reward (`gold_reward`); a task with settings beyond the common sizes reads them
from `task_options(task_cfg)`."""

from rlhf_jax.tasks import sums, topics

TASKS = {"topics": topics, "sums": sums}
# Tasks scored by a verifiable reward function: the pipeline trains no reward model for them
# and runs RLVR (loops/rlvr.py) instead of the InstructGPT RL stage.
VERIFIABLE = frozenset({"sums"})

__all__ = ["TASKS", "VERIFIABLE", "sums", "topics"]
