"""Benchmark tasks: one module per task, each registering a :class:`Task` subclass.

Adding a task: drop a module ``tasks/<name>.py`` here whose class subclasses
:class:`~torchsven.bench.tasks.base.Task` and is decorated with
:func:`register`. Every module in this package (except those starting with
``_`` and ``base``) is imported on first use, so no list needs editing.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import SIZES, Batch, Task, TaskData, seeded_model, to_device

__all__ = [
    "SIZES",
    "TASKS",
    "Batch",
    "Task",
    "TaskData",
    "get_task",
    "register",
    "seeded_model",
    "select_tasks",
    "to_device",
]

#: name -> Task subclass, in registration order.
TASKS: dict[str, type[Task]] = {}
_loaded = False


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: add a Task subclass to :data:`TASKS` under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TypeError(f"register expects a Task subclass, got {cls!r}")
    if not cls.name:
        raise ValueError(f"{cls.__name__} must set a non-empty class attribute 'name'")
    if cls.name in TASKS and TASKS[cls.name] is not cls:
        raise ValueError(f"task name {cls.name!r} is already registered by {TASKS[cls.name]}")
    TASKS[cls.name] = cls
    return cls


def load_all() -> dict[str, type[Task]]:
    """Import every task module of this package once; returns :data:`TASKS`."""
    global _loaded
    if not _loaded:
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
            if not info.name.startswith("_") and info.name != "base":
                importlib.import_module(f"{__name__}.{info.name}")
        ordered = sorted(TASKS.items(), key=lambda kv: (kv[1].order, kv[0]))
        TASKS.clear()
        TASKS.update(ordered)
        _loaded = True
    return TASKS


def get_task(name: str, size: str = "full") -> Task:
    """An instance of the task called ``name`` at ``size``."""
    tasks = load_all()
    if name not in tasks:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(tasks)}")
    return tasks[name](size)


def select_tasks(patterns: list[str] | None, size: str) -> list[str]:
    """Task names for ``--tasks``: names or shell patterns (``mgh-*``) or family names
    (``mgh``), in registry order; None: every task whose ``suites`` include ``size``."""
    import fnmatch

    tasks = load_all()
    if patterns is None:
        return [name for name, cls in tasks.items() if size in cls.suites]
    chosen: list[str] = []
    for pattern in patterns:
        hits = [
            name
            for name, cls in tasks.items()
            if fnmatch.fnmatchcase(name, pattern) or cls.family == pattern
        ]
        if not hits:
            raise ValueError(f"unknown task {pattern!r}; known tasks: {', '.join(tasks)}")
        chosen += [h for h in hits if h not in chosen]
    return chosen
