"""One look for every progress bar of the package (training, pretraining, evaluation,
phantom generation): ``title  [bar]  done/total  [field value ...]  elapsed  [ETA left]``,
drawn on stderr (stdout is for results) unless a console is given.

rich loads when a bar is made, not when this module is imported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, ProgressColumn

__all__ = ["progress_bar"]


def progress_bar(title: str | None = None, *, fields: Sequence[str] = (), eta: bool = False,
                 enabled: bool = True, transient: bool = False,
                 console: Console | None = None) -> Progress:
    """A rich :class:`~rich.progress.Progress` (use it as a context manager).

    ``title`` is shown in bold before the bar (None: each task's description instead);
    each name in ``fields`` is shown as ``name value``, from the task's field of that name
    (give it in ``add_task`` and ``update``); ``eta`` adds the estimated time left;
    ``enabled=False`` draws nothing; ``transient`` clears the bar when the block ends;
    ``console`` defaults to one on stderr.
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    head = (TextColumn(f"[bold]{escape(title)}") if title is not None
            else TextColumn("[progress.description]{task.description}"))
    columns: list[ProgressColumn | str] = [head, BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn(f"{escape(name)} {{task.fields[{name}]}}") for name in fields]
    columns.append(TimeElapsedColumn())
    if eta:
        columns += [TextColumn("ETA"), TimeRemainingColumn()]
    return Progress(*columns, console=console or Console(stderr=True), transient=transient,
                    disable=not enabled)
