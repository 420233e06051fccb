"""Long-context evaluation harness: generated tasks (needle in a haystack, RULER-style, ∞-Bench-style),
scorers, a resumable runner comparing full / retrieval / streaming attention, and reports.

Importing this package is light (stdlib only); the runner loads torch and the model when it runs.
"""

from .scoring import SCORERS, normalize_output, same_output
from .tasks import DEFAULT_TASKS, TASKS, Haystack, LengthTooSmall, Sample, Task, make_task, register_task

__all__ = [
    "DEFAULT_TASKS",
    "SCORERS",
    "TASKS",
    "EvalSettings",
    "Haystack",
    "LengthTooSmall",
    "Sample",
    "Task",
    "make_task",
    "normalize_output",
    "register_task",
    "run_eval",
    "same_output",
]


def __getattr__(name):  # lazy: the runner imports the generation stack when used
    if name in ("run_eval", "EvalSettings"):
        from . import runner

        return getattr(runner, name)
    raise AttributeError(name)
