"""benchmarks/bench_device.py runs end to end (--small, on this CPU) and writes its rows."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import xla_flags

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_device_benchmark_small_run_writes_every_row(tmp_path):
    out = tmp_path / "rows.jsonl"
    script = REPO / "benchmarks" / "bench_device.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--small", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        # One CPU device, as on an accelerator host with one chip.
        env={**os.environ, "XLA_FLAGS": xla_flags()},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    meta = rows[0]
    assert meta["kind"] == "meta" and meta["device"].startswith("cpu")
    assert meta["jax"] and meta["jaxlib"] and meta["copy_gbps"] > 0
    assert meta["auto"] in ("native", "adjoint")
    measured = [r for r in rows if r["kind"] == "row"]
    paths = {r["path"] for r in measured}
    # Every path runs here (pallas in the interpreter), plus the projections alone.
    assert {"adjoint", "pallas", "chunked", "associative", "sequential"} <= paths
    assert "projections-only" in paths
    for r in measured:
        assert r["error"] is None, r
        assert r["ms"] > 0 and r["compile_s"] >= 0
        if r["path"] != "projections-only":
            assert r["rel_err_vs_adjoint"] < 1e-4, r
        if r["what"].startswith("recurrence"):
            assert r["pct_copy"] > 0
    whats = {r["what"] for r in measured if r["path"] == "pallas"}
    assert whats == {"recurrence fwd", "recurrence fwd+bwd", "layer fwd+bwd"}
    assert rows[-1]["kind"] == "summary" and "| pallas |" in rows[-1]["markdown"]
    assert "copy bandwidth" in proc.stdout
