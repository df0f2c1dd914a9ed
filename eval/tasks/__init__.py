"""The task types a suite may name, each in its own module; `TASKS` maps the suite's `type` to its class."""

from __future__ import annotations

from vlp.eval.tasks.aro import AroAttributionTask, AroOrderTask, AroRelationTask
from vlp.eval.tasks.base import Task
from vlp.eval.tasks.counting import CountingTask
from vlp.eval.tasks.retrieval import RetrievalTask
from vlp.eval.tasks.sugarcrepe import SugarCrepeTask
from vlp.eval.tasks.winoground import WinogroundTask
from vlp.eval.tasks.zeroshot import ZeroShotTask

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
