"""Tasks, one file each, registered by type in kvx.registry.TASKS."""

from kvx.tasks import perplexity  # noqa: F401  (registration)
from kvx.tasks.base import RunContext, Task, TaskResult

__all__ = ["RunContext", "Task", "TaskResult"]
