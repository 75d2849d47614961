"""Numbers into tables: medians, formatting, markdown (and rich on a terminal). Pure."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Column", "Table", "fmt", "fmt_completeness", "fmt_int", "fmt_ms", "fmt_ratio", "fmt_us", "median",
    "median_rows", "render_markdown", "render_rich",
]

Cell = float | int | str | None


def median(values: Iterable[float | int | None]) -> float | None:
    """Median of the values that are numbers; None when there is none (n/a stays n/a)."""
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    if not numbers:
        return None
    return float(statistics.median(numbers))


@dataclass(frozen=True)
class Column:
    title: str
    key: str
    fmt: Callable[[Cell], str] = field(default=lambda v: fmt(v))
    align: str = "right"


def fmt(value: Cell) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.1f}"


def fmt_ratio(value: Cell) -> str:
    return "n/a" if not isinstance(value, (int, float)) or math.isnan(value) else f"{100 * value:.1f}%"


def fmt_completeness(value: Cell) -> str:
    """Four significant decimals of a percent: 99.99% must be told apart from 100%."""
    if not isinstance(value, (int, float)) or math.isnan(value):
        return "n/a"
    return f"{100 * value:.2f}%" if value < 0.99 else f"{100 * value:.3f}%"


def fmt_int(value: Cell) -> str:
    return "n/a" if not isinstance(value, (int, float)) or math.isnan(value) else f"{round(value):,}"


def fmt_us(value: Cell) -> str:
    if not isinstance(value, (int, float)) or math.isnan(value):
        return "n/a"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def fmt_ms(value: Cell) -> str:
    if not isinstance(value, (int, float)) or math.isnan(value):
        return "n/a"
    return f"{1000 * value:.3f} ms"


@dataclass
class Table:
    title: str
    columns: Sequence[Column]
    rows: list[dict[str, Cell]] = field(default_factory=list)
    note: str = ""

    def cells(self) -> list[list[str]]:
        return [[col.fmt(row.get(col.key)) for col in self.columns] for row in self.rows]


def median_rows(rows: Sequence[dict[str, Cell]], group_key: str,
                numeric_keys: Sequence[str]) -> list[dict[str, Cell]]:
    """One row per group (in first-seen order), each numeric column the median over that group.

    Column-wise medians: each cell is the median of its own column, so a median row need
    not be any single run.
    """
    groups: dict[Any, list[dict[str, Cell]]] = {}
    for row in rows:
        groups.setdefault(row[group_key], []).append(row)
    out = []
    for members in groups.values():
        merged: dict[str, Cell] = dict(members[0])
        merged["runs"] = len(members)
        for key in numeric_keys:
            values = [m.get(key) for m in members]
            merged[key] = median(v for v in values if isinstance(v, (int, float)))
        out.append(merged)
    return out


def render_markdown(table: Table) -> str:
    titles = [c.title for c in table.columns]
    cells = table.cells()
    widths = [max(len(t), *(len(r[i]) for r in cells)) if cells else len(t) for i, t in enumerate(titles)]

    def line(values: Sequence[str]) -> str:
        padded = [v.rjust(w) if c.align == "right" else v.ljust(w)
                  for v, w, c in zip(values, widths, table.columns, strict=True)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if c.align == "right" else ("-" * (w + 2))
                          for w, c in zip(widths, table.columns, strict=True)) + "|"
    out = [f"**{table.title}**", "", line(titles), rule, *(line(r) for r in cells)]
    if table.note:
        out += ["", table.note]
    return "\n".join(out)


def render_rich(table: Table) -> Any:
    from rich.table import Table as RichTable

    rich_table = RichTable(title=table.title, caption=table.note or None)
    for col in table.columns:
        rich_table.add_column(col.title, justify="right" if col.align == "right" else "left")
    for row in table.cells():
        rich_table.add_row(*row)
    return rich_table
