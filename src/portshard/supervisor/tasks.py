"""Procedures that take time, as generators stepped by the loop, and the scope that cancels them.

A procedure yields :class:`Until` (a condition and an optional deadline) and is sent True when
the condition holds, False when the deadline passed. It runs in a :class:`CancelScope`:
cancelling the scope throws :class:`Cancelled` into the procedure at the ``yield`` where it
waits (trio's shape), so no wait has to re-check a "stopping" flag; the procedure catches it
where it has something to undo. One thread; nothing here blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field

__all__ = ["CancelScope", "Cancelled", "Scheduler", "Task", "Until"]


@dataclass
class Until:
    """Wait until ``cond()`` is true (sends True) or ``deadline`` passes (sends False)."""

    cond: Callable[[], bool]
    deadline: float | None = None


Task = Generator[Until, bool, None]


class Cancelled(Exception):
    """Thrown into a procedure whose scope was cancelled; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class CancelScope:
    cancelled: bool = False
    reason: str = ""

    def cancel(self, reason: str) -> None:
        if not self.cancelled:
            self.cancelled, self.reason = True, reason


OnError = Callable[[Exception], None]


@dataclass
class _Running:
    task: Task
    until: Until
    scope: CancelScope | None
    on_error: OnError | None
    thrown: bool = False


@dataclass
class Scheduler:
    """The running procedures; :meth:`step` advances every one whose wait is over."""

    clock: Callable[[], float]
    running: list[_Running] = field(default_factory=list)

    def start(
        self, task: Task, scope: CancelScope | None = None, on_error: OnError | None = None
    ) -> None:
        """Run ``task`` to its first wait now (so its first actions happen at once). An
        exception that escapes it ends it and goes to ``on_error`` (else it is raised)."""
        try:
            until = next(task)
        except StopIteration:
            return
        except Exception as exc:
            if on_error is None:
                raise
            on_error(exc)
            return
        self.running.append(_Running(task, until, scope, on_error))

    def __bool__(self) -> bool:
        return bool(self.running)

    def sleep(self, seconds: float) -> Until:
        return Until(lambda: False, self.clock() + seconds)

    def step(self) -> None:
        for run in list(self.running):
            while True:
                try:
                    if run.scope is not None and run.scope.cancelled and not run.thrown:
                        run.thrown = True
                        run.until = run.task.throw(Cancelled(run.scope.reason))
                        continue
                    if run.until.cond():
                        value = True
                    elif run.until.deadline is not None and self.clock() >= run.until.deadline:
                        value = False
                    else:
                        break
                    run.until = run.task.send(value)
                except StopIteration:
                    self.running.remove(run)
                    break
                except Cancelled:
                    self.running.remove(run)  # it did not catch it: it is over
                    break
                except Exception as exc:  # a bug or an OS error: this procedure is over
                    self.running.remove(run)
                    if run.on_error is None:
                        raise
                    run.on_error(exc)
                    break
