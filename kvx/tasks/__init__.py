"""Tasks, one file each, registered by type in kvx.registry.TASKS."""

# the imports register each task (harness also registers the "kvx" model with lm-eval)
from kvx.tasks import harness, longbench, needle, perplexity, pot_ppl, rolling_ppl, summarization  # noqa: F401
from kvx.tasks.base import RunContext, Task, TaskResult

__all__ = ["RunContext", "Task", "TaskResult"]
