"""Compare runs: a table with one row per setting (mean ± std and n over seeds) and a picture.

    python -m galaxydist.report SWEEP_OR_RUN_DIRS... [--out DIR]
    python -m galaxydist.report --row LABEL DIRS... [--row LABEL DIRS...]... [--out DIR]

Each folder is a run folder (it holds summary.json), a sweep folder (sweep.json lists its tasks,
with the failed ones), or any folder of run folders. A setting is what differs between the
runs' configs apart from seed, output_dir and tracking; runs of one setting are its seeds.
`--row` names the rows instead, for runs that differ in too much to be named by the keys (one
family against another): the runs of a row must share one setting, and are its seeds.
Writes report.md, report.csv and report.png (default: in the first folder given).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .atomic import atomic_path, check_can_create
from .errors import UserError, run_cli
from .metrics import balanced_accuracy
from .reports import Guard, plot_comparison
from .sweep import read_manifest

IGNORED = ("seed", "output_dir", "tracking.")
METRICS = (
    ("test_accuracy", "accuracy"),
    ("balanced_accuracy", "balanced"),
    ("winding", "winding"),
    ("epochs", "epochs"),
    ("seconds", "wall s"),
    ("img_per_s", "train img/s"),
)
WINDINGS = ("Clockwise spiral", "Anticlockwise spiral")  # Galaxy Zoo 1's chiral pair


@dataclass(frozen=True)
class Run:
    folder: Path
    config: dict[str, Any]  # flattened: dotted key → value
    values: dict[str, float]


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A config as dotted keys, as overrides name them: stages.0.lr, model.channels."""
    if isinstance(tree, dict) or (isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree)):
        out: dict[str, Any] = {}
        for key, value in tree.items() if isinstance(tree, dict) else enumerate(tree):
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.dumps(tree) if isinstance(tree, list) else tree}


def read_run(folder: Path) -> Run:
    summary = json.loads((folder / "summary.json").read_text())
    config = (
        yaml.safe_load((folder / "config.yaml").read_text()) if (folder / "config.yaml").is_file() else {}
    )
    metrics_path = folder / "metrics.jsonl"
    records = (
        [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        if metrics_path.is_file()
        else []
    )
    confusion = np.asarray(summary["test_confusion"])
    values = {
        "test_accuracy": float(summary["test_accuracy"]),
        "balanced_accuracy": balanced_accuracy(confusion),
        "winding": winding(confusion, summary.get("class_names", [])),
        "epochs": float(len(records)),
        "seconds": float(sum(r.get("seconds", 0.0) for r in records)),
        "img_per_s": float(np.mean([r["images_per_second"] for r in records])) if records else float("nan"),
    }
    return Run(folder, flatten(config), values)


def winding(confusion: np.ndarray, class_names: list[str]) -> float:
    """Of the spirals whose true and predicted classes are both a winding (clockwise or
    anticlockwise), the share with the right one; NaN where the classes have no such pair."""
    if not all(name in class_names for name in WINDINGS):
        return float("nan")
    a, b = (class_names.index(name) for name in WINDINGS)
    found = confusion[np.ix_([a, b], [a, b])]
    return float(np.trace(found) / found.sum()) if found.sum() else float("nan")


def collect(folders: list[Path]) -> tuple[list[Run], list[tuple[str, str]]]:
    """The finished runs under `folders`, and the failed or unfinished tasks of any sweep."""
    runs, failed = [], []
    for folder in folders:
        if not folder.is_dir():
            raise UserError(f"{folder}: not a folder")
        if (folder / "summary.json").is_file():
            runs.append(read_run(folder))
            continue
        manifest = read_manifest(folder)
        candidates = [folder / t["name"] for t in manifest["tasks"]] if manifest else sorted(folder.iterdir())
        for candidate in candidates:
            if (candidate / "summary.json").is_file():
                runs.append(read_run(candidate))
            elif manifest:
                status = next(t["status"] for t in manifest["tasks"] if t["name"] == candidate.name)
                failed.append((candidate.name, status if status != "completed" else "no summary.json"))
    if not runs:
        raise UserError(f"{', '.join(map(str, folders))}: no finished run (no summary.json) to report")
    return runs, failed


def varying_keys(runs: list[Run]) -> list[str]:
    """The config keys (apart from seed, output_dir and tracking) whose value differs between runs."""
    keys = sorted({k for r in runs for k in r.config if not k.startswith(IGNORED)})
    return [k for k in keys if len({json.dumps(r.config.get(k)) for r in runs}) > 1]


def by_setting(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs grouped by setting, each named by its values of the keys that vary."""
    varying = varying_keys(runs)
    groups: dict[str, list[Run]] = {}
    for run in runs:
        setting = ", ".join(f"{key}={run.config.get(key)}" for key in varying) or "(one setting)"
        groups.setdefault(setting, []).append(run)
    return groups


def check_one_setting(label: str, runs: list[Run]) -> None:
    """A named row's runs must be seeds of one setting: a mean over different recipes misleads."""
    differing = varying_keys(runs)
    if differing:
        key = differing[0]
        values = sorted({str(r.config.get(key)) for r in runs})
        raise UserError(
            f"--row {label!r}: its runs differ in config key '{key}' ({' vs '.join(values[:2])}); "
            "give each setting its own row"
        )


def compare(groups: dict[str, list[Run]]) -> list[dict[str, Any]]:
    """One row per group: n, and mean and std over its runs of every metric."""
    rows = []
    for setting, members in groups.items():
        row: dict[str, Any] = {
            "setting": setting,
            "n": len(members),
            "seeds": [m.config.get("seed") for m in members],
        }
        for metric, _ in METRICS:
            values = np.array([m.values[metric] for m in members])
            row[metric] = values.tolist()
            row[f"{metric}_mean"] = float(values.mean())
            row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def shown(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The metrics some run has (winding only where the classes have a chiral pair)."""
    return [m for m in METRICS if not all(np.isnan(row[f"{m[0]}_mean"]) for row in rows)]


def markdown(rows: list[dict[str, Any]], failed: list[tuple[str, str]]) -> str:
    metrics = shown(rows)
    head = "| setting | n | " + " | ".join(label for _, label in metrics) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(metrics)]
    for row in rows:
        cells = []
        for metric, _ in metrics:
            digits = 1 if metric in ("epochs", "seconds", "img_per_s") else 4
            cells.append(f"{row[f'{metric}_mean']:.{digits}f} ± {row[f'{metric}_std']:.{digits}f}")
        lines.append(f"| {row['setting']} | {row['n']} | " + " | ".join(cells) + " |")
    if failed:
        lines += ["", f"Failed or unfinished ({len(failed)}):"] + [f"- {name}: {why}" for name, why in failed]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    text = io.StringIO()
    columns = ["setting", "n"] + [f"{m}_{s}" for m, _ in shown(rows) for s in ("mean", "std")]
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([row[c] if not isinstance(row[c], float) else f"{row[c]:.6f}" for c in columns])
    return text.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m galaxydist.report", description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path, metavar="SWEEP_OR_RUN_DIR")
    parser.add_argument(
        "--row",
        nargs="+",
        action="append",
        default=[],
        metavar=("LABEL", "DIR"),
        help="a row named LABEL: the runs under the folders after it (repeat for each row)",
    )
    parser.add_argument("--out", type=Path, help="where report.md/.csv/.png go (default: the first folder)")
    args = parser.parse_args(argv)
    if bool(args.folders) == bool(args.row):
        raise UserError("give either folders, or --row LABEL DIR... once per row (not both)")
    for row in args.row:
        if len(row) < 2:
            raise UserError(f"--row {row[0]!r}: no folder after the label")
    groups: dict[str, list[Run]] = {}
    failed: list[tuple[str, str]] = []
    if args.folders:
        runs, failed = collect(args.folders)
        groups = by_setting(runs)
    seen: set[Path] = set()
    for label, *folders in args.row:
        if label in groups:
            raise UserError(f"two rows are labelled {label!r}; give each row its own label")
        runs, row_failed = collect([Path(f) for f in folders])
        check_one_setting(label, runs)
        for run in runs:
            folder = run.folder.resolve()
            if folder in seen:
                raise UserError(f"--row {label!r}: {run.folder} is in an earlier row too; give each run once")
            seen.add(folder)
        groups[label] = runs
        failed += [(f"{label}: {name}", why) for name, why in row_failed]
    out = args.out or (args.folders[0] if args.folders else Path(args.row[0][1]))
    check_can_create(out / "report.md")
    rows = compare(groups)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, failed)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(table)
    with atomic_path(out / "report.csv") as tmp:
        tmp.write_text(to_csv(rows))
    Guard("drawing report.png", "the tables are written regardless").run(
        plot_comparison,
        [r["setting"] for r in rows],
        [r["test_accuracy"] for r in rows],
        "test accuracy",
        out / "report.png",
    )
    print(table.rstrip())
    print(f"{sum(r['n'] for r in rows)} runs, {len(rows)} settings — report in {out}")
    return 0


def cli() -> None:
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    cli()
