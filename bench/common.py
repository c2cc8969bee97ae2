"""Shared benchmark plumbing: percentiles, results files, BENCHMARKS.md sections."""

from __future__ import annotations

import json
import platform
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"


def percentiles_us(samples_ns: Sequence[int]) -> tuple[float, float]:
    p50, p99 = np.percentile(np.asarray(samples_ns, dtype=np.float64) / 1e3, [50, 99])
    return round(float(p50), 2), round(float(p99), 2)


def machine() -> dict[str, Any]:
    import os

    return {"python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_results(name: str, rows: list[dict[str, Any]], extra: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **extra, "rows": rows}, indent=2) + "\n")
    return path


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def update_section(name: str, body: str) -> None:
    """Replace the text between this benchmark's markers in BENCHMARKS.md."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    block = f"{start}\n{body}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else f"{text}\n{block}\n"
    BENCHMARKS_MD.write_text(text)


def print_table(title: str, columns: list[str], cells: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in cells:
        table.add_row(*map(str, row))
    Console().print(table)


def edge_cnn(out: Path) -> Path:
    """A MobileNet-sized CNN on 96x96x3 (random weights): a realistic size and speed."""
    from edgefleet.converter._tf import keras

    k = keras()
    k.utils.set_random_seed(0)
    layers: list[Any] = [k.Input((96, 96, 3), name="image")]
    for filters in (32, 64, 128, 128, 256):
        layers += [k.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu"),
                   k.layers.Conv2D(filters, 1, activation="relu")]
    layers += [k.layers.GlobalAveragePooling2D(), k.layers.Dense(10, activation="softmax")]
    model = k.Sequential(layers)
    path = out / "edge_cnn.keras"
    model.save(path)
    return path
