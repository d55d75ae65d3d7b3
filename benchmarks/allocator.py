"""Host allocator: training steps per second and page faults per step, glibc's defaults against
galaxydist.allocator.keep_freed_memory (what the train, evaluate and predict commands call first).

Each round runs both settings in fresh processes (order alternating), for the demo model at 48²
(batch 64) and the baseline model at 128² (batch 64), on random tensors: warm-up steps, then
timed steps. Reports medians over the rounds.

    .venv/bin/python benchmarks/allocator.py              # ~1.5 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import common

MODELS = {"demo": ([16, 32, 64, 96, 128], 48, 20), "baseline": ([32, 64, 128, 256, 512], 128, 4)}

STEPS = """
import json, resource, sys, time, torch
from galaxydist.allocator import keep_freed_memory
from galaxydist.models.cnn import GalaxyCNN
tuned, channels, size, steps = sys.argv[1] == "tuned", json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if tuned:
    applied = keep_freed_memory()
    assert applied, "glibc refused the settings, or the environment already chose an allocator"
torch.manual_seed(0)
model = GalaxyCNN(channels, 10, 0.4).to(memory_format=torch.channels_last)
optimizer = torch.optim.Adam(model.parameters())
x = torch.randn(64, 3, size, size).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 10, (64,))
def step():
    loss = torch.nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
for _ in range(3):
    step()
faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
for _ in range(steps):
    step()
seconds = time.perf_counter() - start
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"steps_per_s": steps / seconds, "faults_per_step": faults / steps, "peak_rss_mib": peak_mib}))
"""


def run(setting: str, channels: list[int], size: int, steps: int) -> dict[str, float]:
    argv = [sys.executable, "-c", STEPS, setting, json.dumps(channels), str(size), str(steps)]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=common.ROOT, check=True)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON (default: benchmarks/results/allocator.json)"
    )
    args = parser.parse_args()
    info = common.machine()
    results: dict[str, Any] = {}
    for name, (channels, size, steps) in MODELS.items():
        runs: dict[str, list[dict[str, float]]] = {"glibc default": [], "keep_freed_memory": []}
        for r in range(args.rounds):
            order = list(runs) if r % 2 == 0 else list(reversed(runs))
            for setting in order:
                runs[setting].append(
                    run("tuned" if setting == "keep_freed_memory" else "plain", channels, size, steps)
                )
        results[name] = {
            setting: {key: common.median([m[key] for m in measured]) for key in measured[0]}
            | {"runs": measured}
            for setting, measured in runs.items()
        }
    info = common.finish_machine(info)
    print(f"machine: {common.describe(info)}\n")
    rows = [
        [
            name,
            setting,
            f"{m['steps_per_s'] * 64:,.0f}",
            f"{m['faults_per_step']:,.0f}",
            f"{m['peak_rss_mib']:.0f}",
        ]
        for name, settings in results.items()
        for setting, m in settings.items()
    ]
    headers = ["model", "allocator", "img/s (median)", "page faults / step", "peak RSS MiB"]
    print(common.markdown_table(headers, rows))
    out = common.write_result(
        "allocator", {"machine": info, "args": vars(args), "results": results}, args.out
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
