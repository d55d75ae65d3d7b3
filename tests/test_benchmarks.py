"""The GPU benchmark's code paths, at toy sizes on the CPU: it runs on a scarcely lent device,
where a broken path would cost the measurement (its numbers here mean nothing and are not read)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_gpu_benchmark_dry_run_fills_every_section(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--dry-run", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    cells = report["grid"]
    assert len(cells) == 9 and all("images_per_s" in c for c in cells), [c.get("error") for c in cells]
    assert {(c["compiled"], c["bf16"], c["layout"]) for c in cells if not c["host_sync"]} == {
        (compiled, bf16, layout)
        for compiled in (False, True)
        for bf16 in (False, True)
        for layout in ("nchw", "channels_last")
    }
    assert len(report["data_path"]) == 3
    (profiled,) = report["profile"]["rows"]
    assert profiled["batch"] == 4 and profiled["busy_ms_per_step"] > 0
    assert any("conv" in op["name"] for op in profiled["top"]), profiled["top"]
    assert "Self CPU" in (tmp_path / "gpu_profile.txt").read_text()  # torch's own table
    (run,) = report["recipe"]["runs"]
    assert run["epochs"] == 2 and 0 <= run["test_accuracy"] <= 1
    outside = run["outside_epochs"]  # from the epoch lines' arrival times
    assert 0 < outside["startup_and_first_validation_s"] < run["train_s"]
    assert 0 < outside["between_epochs_sum_s"] < run["train_s"] - run["train_epoch_seconds_sum"]
    assert 0 < outside["after_last_epoch_s"] < run["train_s"]
    logs = tmp_path / "gpu_logs"
    assert sorted(p.name for p in logs.iterdir()) == ["prepare.log", "synthetic.log", "train.log"]
    assert "test accuracy" in (logs / "train.log").read_text()
