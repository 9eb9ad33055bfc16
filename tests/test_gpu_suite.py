"""benchmarks/gpu_suite.py on tiny models on CPU: every row's code runs and reports what the GPU run will, so the
one device call a lent GPU allows does not fail on a typo."""

import json
import subprocess
import sys

from conftest import REPO


def test_the_gpu_suite_dry_run_fills_every_row(tmp_path):
    # one row of each kind (the other memory and step rows are the same code with other settings)
    rows = ["step_sd15", "memory_flux_swap", "fp16_scaler", "bf16_vs_fp32", "compile", "selftest_fp16"]
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--tiny", "--out", str(tmp_path),
                           "--rows", *rows], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert [r["row"] for r in report["rows"]] == rows and all(r["ok"] for r in report["rows"])
    by = {r["row"]: r for r in report["rows"]}
    assert set(by["step_sd15"]["variants"]) == {"reference", "ours_defaults"}  # the GPU run has all four
    assert all(by[r]["estimate_gb"] > 0 for r in rows if r.startswith("memory_"))
    assert by["memory_flux_swap"]["config"]["offload"] == "blocks:4"
    assert by["fp16_scaler"]["finite_losses"] == by["fp16_scaler"]["steps"] == 3
    assert by["bf16_vs_fp32"]["cosine"] > 0.999  # fp32 twice here: the same run
    assert by["selftest_fp16"]["verified"] and not by["selftest_fp16"]["preview_black"]
    table = (tmp_path / "gpu_suite.md").read_text()
    assert table.count("\n| ") == len(rows) + 1 and "FAILED" not in table


def test_the_cpu_allocation_peak_is_what_a_run_holds_at_once():
    """benchmarks/estimate_vs_cpu.py's measurement: the CPU allocator's events as the profiler reports them."""
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from estimate_vs_cpu import allocation_peak

    mib = 2**20
    held = torch.empty(5 * mib, dtype=torch.uint8)  # allocated before: not part of the run's peak

    def run():
        a = torch.empty(mib, dtype=torch.uint8)
        b = torch.empty(3 * mib, dtype=torch.uint8)  # 4 MiB at once
        del a
        c = torch.empty(mib // 2, dtype=torch.uint8)  # 3.5 MiB
        return b, c

    peak, kept = allocation_peak(run)
    assert peak == 4 * mib and len(kept) == 2 and held.numel() == 5 * mib
