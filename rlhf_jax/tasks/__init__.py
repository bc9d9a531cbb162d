"""Built-in tasks by the name `task.name` gives: each module generates its data
(`generate_task`), ranks like its labelers (`rank_by_labelers`) and scores with its hidden
gold reward (`gold_reward`)."""

from rlhf_jax.tasks import topics

TASKS = {"topics": topics}

__all__ = ["TASKS", "topics"]
