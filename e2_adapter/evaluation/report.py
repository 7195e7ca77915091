"""Turning evaluation results into markdown tables and JSON files."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..files import atomic_write_json
from .retrieval import METRIC_KEYS


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _default_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Retrieval metrics in their usual order when present, else every numeric key."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    metrics = [k for k in METRIC_KEYS if k in keys]
    if metrics:
        return metrics
    return [k for k in keys if any(_is_number(row.get(k)) for row in rows)]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):
        return str(int(v))
    if _is_number(v):
        return "nan" if math.isnan(v) else f"{float(v):.1f}"
    return str(v)


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def results_to_markdown(
    rows: Mapping[str, Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    name_header: str = "model",
) -> str:
    """One row per model/method, one column per metric; floats to 1 decimal.

    ``columns`` defaults to the retrieval metrics (t2i_R1 ... SumR) when the
    rows have them, otherwise to every numeric key. Missing cells show "-".
    """
    if not rows:
        raise ValueError("results_to_markdown needs at least one row")
    cols = list(columns) if columns is not None else _default_columns(list(rows.values()))
    body = [[name] + [_fmt(row.get(c)) for c in cols] for name, row in rows.items()]
    return _table([name_header, *cols], body)


def mean_std_table(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    columns: Sequence[str] | None = None,
    name_header: str = "model",
) -> str:
    """Mean ± standard deviation across runs (seeds) of each cell.

    The std is the sample standard deviation (ddof=1), 0 for a single run.
    A column ``n`` gives the number of runs behind each row.
    """
    if not runs:
        raise ValueError("mean_std_table needs at least one model")
    for name, seeds in runs.items():
        if not seeds:
            raise ValueError(f"model {name!r} has no runs")
    all_rows = [row for seeds in runs.values() for row in seeds]
    cols = list(columns) if columns is not None else _default_columns(all_rows)
    body = []
    for name, seeds in runs.items():
        cells = [name, str(len(seeds))]
        for c in cols:
            values = [float(r[c]) for r in seeds if _is_number(r.get(c))]
            if not values:
                cells.append("-")
                continue
            std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            cells.append(f"{np.mean(values):.1f} ± {std:.1f}")
        body.append(cells)
    return _table([name_header, "n", *cols], body)


def _to_jsonable(obj: Any) -> Any:
    """json.dump fallback for numpy / torch values."""
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, "tolist"):  # numpy arrays and torch tensors
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def save_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically: a reader (or a crash) never
    sees a half-written file, because the data goes to a temporary file in
    the same directory that then replaces ``path`` in one rename."""
    atomic_write_json(path, obj, default=_to_jsonable)
    return Path(path)
