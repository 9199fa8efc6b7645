"""Tables for the CLI's views that stay whole when piped.

rich lays a table out for 80 columns when stdout is not a terminal, which cut
IDs in half (``j-5f3a…``) in ``opensmc jobs > file`` or ``| grep``. Piped, the
console is wide instead, and ID columns never wrap nor shrink, so every ID is
printed whole on one line whatever the width.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

#: the width used when the output is not a terminal: wide enough for any row of our tables
PIPED_WIDTH = 400


def plain_console() -> Console:
    console = Console()
    if not console.is_terminal:
        console = Console(width=PIPED_WIDTH)
    return console


def id_columns(table: Table, *headers: str) -> None:
    """Keep the named columns whole: no wrapping, at least as wide as their longest cell."""
    for column in table.columns:
        if column.header in headers:
            longest = max((len(str(cell)) for cell in column.cells), default=0)
            column.no_wrap = True
            column.min_width = max(longest, len(str(column.header)))
