"""Sweeps: a grid of config overrides, one run folder per task under one sweep folder, and a
manifest (`sweep.json`) the report reads (which settings ran, which failed).

    --sweep seed=0,1,2 --sweep stages.0.lr=1e-3,3e-4   →   6 tasks, each its own run folder

Every task's config is checked before anything is submitted: an unknown key, a wrong type or
an empty list is one line naming it.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .atomic import atomic_path
from .config import load_config
from .errors import UserError

MANIFEST = "sweep.json"


@dataclass(frozen=True)
class Task:
    name: str  # the run folder's name inside the sweep folder
    point: dict[str, Any]  # swept key → value
    overrides: list[str]  # key=value, the sweep's on top of the user's


def split_values(text: str) -> list[str]:
    """`a,b,[1,2]` → ['a', 'b', '[1,2]']: commas inside brackets or braces belong to a value."""
    values, depth, current = [], 0, ""
    for char in text:
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    values.append(current)
    return [v.strip() for v in values]


def parse_sweeps(specs: list[str]) -> dict[str, list[Any]]:
    """['seed=0,1', ...] → {'seed': [0, 1], ...}, in the order given."""
    axes: dict[str, list[Any]] = {}
    for spec in specs:
        key, sep, raw = spec.partition("=")
        if not sep or not key:
            raise UserError(f"--sweep {spec!r}: expected key=value1,value2,...")
        values = [v for v in split_values(raw) if v != ""]
        if not values:
            raise UserError(f"--sweep {key}: an empty list of values")
        if key in axes:
            raise UserError(f"--sweep {key}: given twice")
        axes[key] = [yaml.safe_load(v) for v in values]
    return axes


def task_name(point: dict[str, Any]) -> str:
    """A folder name that says the setting: seed=0,stages.0.lr=0.001 (a mapping value by its keys)."""

    def items(key: str, value: Any) -> list[str]:
        if isinstance(value, dict):
            return [item for k, v in value.items() for item in items(f"{key}.{k}", v)]
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        return [f"{key}={text}"]

    text = ",".join(item for key, value in point.items() for item in items(key, value))
    return re.sub(r"[^\w.,=+\[\]-]", "_", text)


def plan(config_path: str | None, overrides: list[str], specs: list[str], sweep_dir: Path) -> list[Task]:
    """The grid's tasks, each config checked (errors name the --sweep key)."""
    axes = parse_sweeps(specs)
    base = [o for o in overrides if not o.startswith("output_dir=")]
    group = [] if any(o.startswith("tracking.group=") for o in base) else [f"tracking.group={sweep_dir.name}"]
    tasks = []
    for values in itertools.product(*axes.values()):
        point = dict(zip(axes, values, strict=True))
        name = task_name(point)
        swept = [f"{k}={json.dumps(v)}" for k, v in point.items()]
        task_overrides = [*base, *group, *swept, f"output_dir={sweep_dir / name}"]
        try:
            load_config(config_path, task_overrides)
        except UserError as err:
            raise UserError(f"--sweep {', '.join(swept)}: {err}") from None
        tasks.append(Task(name, point, task_overrides))
    return tasks


def write_manifest(sweep_dir: Path, tasks: list[Task], status: dict[str, str] | None = None) -> None:
    record = {
        "keys": list(tasks[0].point) if tasks else [],
        "tasks": [
            {"name": t.name, "point": t.point, "status": (status or {}).get(t.name, "submitted")}
            for t in tasks
        ],
    }
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(sweep_dir / MANIFEST) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def grid_table(tasks: list[Task]) -> str:
    keys = list(tasks[0].point) if tasks else []
    lines = ["| task | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    lines += [f"| {t.name} | " + " | ".join(str(t.point[k]) for k in keys) + " |" for t in tasks]
    return "\n".join(lines)
