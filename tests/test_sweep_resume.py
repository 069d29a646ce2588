"""A sweep killed midway and started again finishes only the runs that are missing."""

import os
import signal
import subprocess
import sys
import time

from .helpers import REPO, run_cli

# three runs of eviction_ppl's cpu grid (budgets 32, 64, 128), a few seconds each
SUBSET = ["experiment=eviction_ppl", "scale=cpu", "method=streaming_llm", "task.mode=masked", "task.max_tokens=2000",
          "progress=false"]


def _done(root):
    """Finished runs (a run still being written lives in a hidden staging folder beside its final one)."""
    return sorted(p for p in root.rglob("metrics.json") if not p.parent.name.startswith("."))


def test_killed_sweep_restarts_with_the_missing_runs_only(tmp_path):
    args = [sys.executable, str(REPO / "run.py"), *SUBSET, f"results_dir={tmp_path}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", WANDB_SILENT="true")
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        while not _done(tmp_path) and proc.poll() is None:  # no deadline: a slow machine only waits longer
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first = {p: p.stat().st_mtime_ns for p in _done(tmp_path)}
    assert 1 <= len(first) < 3, f"kill came too late or too early: {len(first)} runs ({proc.stderr.read()[-2000:]})"
    out = run_cli([*SUBSET, f"results_dir={tmp_path}"], threads=1)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("[kvx] skipped") == len(first)
    assert out.stdout.count("[kvx] results:") == 3 - len(first)
    after = _done(tmp_path)
    assert len(after) == 3
    assert all(p.stat().st_mtime_ns == t for p, t in first.items())  # no finished run was repeated
    budgets = sorted(int(p.parent.joinpath("config.yaml").read_text().split("budget: ")[1].split()[0]) for p in after)
    assert budgets == [32, 64, 128]
