"""The task types a suite may name, each in its own module; `TASKS` maps the suite's `type` to its class."""

from __future__ import annotations

from eval.tasks.aro import AroAttributionTask, AroOrderTask, AroRelationTask
from eval.tasks.base import Task
from eval.tasks.counting import CountingTask
from eval.tasks.retrieval import RetrievalTask
from eval.tasks.sugarcrepe import SugarCrepeTask
from eval.tasks.winoground import WinogroundTask
from eval.tasks.zeroshot import ZeroShotTask

TASKS: dict[str, type[Task]] = {
    cls.type: cls
    for cls in (
        ZeroShotTask,
        RetrievalTask,
        CountingTask,
        SugarCrepeTask,
        AroRelationTask,
        AroAttributionTask,
        AroOrderTask,
        WinogroundTask,
    )
}

__all__ = ["TASKS", "Task"]
