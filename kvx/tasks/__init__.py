"""Tasks, one file each, registered by type in kvx.registry.TASKS."""

import kvx.tasks.harness  # noqa: F401  (registration; also registers the "kvx" model with lm-eval)
import kvx.tasks.longbench  # noqa: F401  (registration)
import kvx.tasks.needle  # noqa: F401  (registration)
import kvx.tasks.summarization  # noqa: F401  (registration)
from kvx.tasks import perplexity  # noqa: F401  (registration)
from kvx.tasks import pot_ppl  # noqa: F401  (registration)
from kvx.tasks.base import RunContext, Task, TaskResult

__all__ = ["RunContext", "Task", "TaskResult"]
