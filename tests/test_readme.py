"""Every command the README shows runs as written, in README order, into a scratch results folder.

What counts as a command: each line of an indented or ```bash/```sh/```console code block, each inline code span that
starts with `python `, `kvx-` or `make `, and each ```python block that starts with an import (a whole program).
How each is run (the limits are appended only where the command sets none, so a README command that already says
`task.max_tokens=4096` runs exactly as printed):
- `python run.py ...`: `results_dir=<scratch>` and `progress=false` appended (an experiment would otherwise write the
  committed results/); with no `task.max_tokens`/`task.limit`, a perplexity task gets `task.max_tokens=512` and any
  other task `task.limit=2`. A command whose comment says GPU (the paper's model from the hub) is composed and its
  model, method and task validated instead.
- `kvx-runs ...` and `python -m kvx.<module> ...` run as `python -m kvx.<module> ...` with `$KVX_RESULTS_DIR` at the
  scratch folder (so they see the runs the commands above made), in a scratch working folder where `outputs` is that
  folder and `results` is the repository's results/.
- `kvx-lm-eval ...` is `python -m kvx.tasks.harness_cli ...` (`--limit 2` appended if absent), offline.
- `make run` runs with this interpreter's environment (`VENV`, its set-up stamp taken as done) and the same limits
  through `ARGS`; `make lint` runs; the other targets are expanded with `make -n` (their own tests run them:
  the suite itself, tests/test_bench.py, tests/test_aggregate.py, tests/test_notebook.py).
- A python block runs with this interpreter, from the repository root.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import REPO, compose_cfg

README = REPO / "README.md"
SHELL_FENCES = ("", "bash", "sh", "shell", "console")
PREFIXES = ("python ", "kvx-", "make ")
RUN_MAKE = {"run", "lint"}  # every other target (set-up, tests, benchmarks, tables, notebook, gpu-check) is expanded
# with `make -n` only: their own tests run them
# make test-slow: grids of several runs; lm-eval through Python and through run.py (the default suite checks them in
# tests/test_lm_eval_offline.py and tests/test_harness.py)
SLOW = ("experiment=", "simple_evaluate", "task=hellaswag")


def _strip_comment(line: str) -> tuple[str, str]:
    m = re.search(r"\s+#\s?(.*)$", line)
    return (line[: m.start()].strip(), m.group(1)) if m else (line.strip(), "")


def readme_commands(text: str) -> list[tuple[str, str, str]]:
    """(kind, command, comment) in README order; kind is "shell" or "python"."""
    out: list[tuple[str, str, str]] = []
    lines = text.splitlines()
    fence, block, prev_blank, indented = None, [], True, False
    for line in lines:
        if fence is not None:
            if line.startswith("```"):
                if fence == "python" and block and block[0].startswith(("import ", "from ")):
                    out.append(("python", "\n".join(block), ""))
                elif fence in SHELL_FENCES:
                    out += [("shell", *_strip_comment(b)) for b in _join(block) if b.strip()]
                fence, block = None, []
            else:
                block.append(line)
            continue
        if line.startswith("```"):
            fence = line[3:].strip()
            continue
        if line.startswith("    ") and (prev_blank or indented):  # an indented code block
            indented = True
            cmd, comment = _strip_comment(line[4:])
            out.append(("shell", cmd, comment))
            continue
        prev_blank = not line.strip()
        indented = indented and prev_blank
        for span in re.findall(r"`([^`]+)`", line):
            if span.startswith(PREFIXES):
                out.append(("shell", *_strip_comment(span)))
    seen, kept = set(), []
    for k, c, m in out:
        if (k == "python" or c.startswith(PREFIXES)) and c not in seen:  # a command repeated in the text runs once
            seen.add(c)
            kept.append((k, c, m))
    return kept


def _join(block: list[str]) -> list[str]:
    joined, cur = [], ""
    for b in block:
        cur += b.rstrip("\\").rstrip() + " " if b.rstrip().endswith("\\") else b
        if not b.rstrip().endswith("\\"):
            joined.append(cur)
            cur = ""
    return joined


COMMANDS = readme_commands(README.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    (root / "cwd").mkdir()
    (root / "cwd" / "results").symlink_to(REPO / "results")
    (root / "out").mkdir()
    (root / "cwd" / "outputs").symlink_to(root / "out")
    return root


DONE: set[int] = set()  # commands already run into this module's scratch folder


def _env(scratch: Path) -> dict:
    return dict(os.environ, KVX_RESULTS_DIR=str(scratch / "out"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                WANDB_SILENT="true", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))


def _has_limit(args: list[str]) -> bool:
    return any(a.startswith(("task.max_tokens=", "task.limit=", "task.sample=")) for a in args)


def _first_values(args: list[str]) -> list[str]:
    """Overrides a composition takes: `-m` dropped, each swept list cut to its first value."""
    out = []
    for a in args:
        if a == "-m" or "=" not in a:
            continue
        key, value = a.split("=", 1)
        out.append(f"{key}={value.split(',')[0]}" if "," in value and not value.startswith("[") else a)
    return out


def _limits(args: list[str]) -> list[str]:
    if _has_limit(args):
        return []
    cfg = compose_cfg(_first_values(args))
    return ["task.max_tokens=512"] if cfg.task.type == "perplexity" else ["task.limit=2"]


def _validate_only(args: list[str]) -> None:
    from kvx.config import build_method, build_model_config, build_task

    cfg = compose_cfg(_first_values(args))
    build_model_config(cfg.model)
    build_method(cfg.method)
    build_task(cfg.task)


def _run(argv: list[str], scratch: Path, cwd: Path = REPO, timeout: int = 900) -> None:
    out = subprocess.run(argv, cwd=cwd, env=_env(scratch), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{shlex.join(argv)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"


def _make(args: list[str], scratch: Path) -> None:
    target = args[0] if args else "run"
    if target not in RUN_MAKE:
        out = subprocess.run(["make", "-n", *args], cwd=REPO, capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.strip(), out.stderr
        return
    venv = Path(sys.executable).parent.parent
    extra = []
    if target == "run":
        given = next((a.split("=", 1)[1] for a in args if a.startswith("ARGS=")), "")
        run_args = shlex.split(given)
        run_args += [f"results_dir={scratch / 'out'}", "progress=false", *_limits(run_args)]
        args = [a for a in args if not a.startswith("ARGS=")] + [f"ARGS={shlex.join(run_args)}"]
    _run(["make", *args, f"VENV={venv}", "-o", f"{venv}/.installed", *extra], scratch)


def run_command(kind: str, cmd: str, comment: str, scratch: Path) -> None:
    if kind == "python":
        _run([sys.executable, "-c", cmd], scratch)
        return
    argv = shlex.split(cmd)
    if argv[0] == "make":
        _make(argv[1:], scratch)
    elif argv[:2] == ["python", "run.py"]:
        args = argv[2:]
        if "GPU" in comment:
            _validate_only(args)
            return
        if not any(a.startswith("results_dir=") for a in args):
            args += [f"results_dir={scratch / 'out'}"]
        _run([sys.executable, "run.py", *args, "progress=false", *_limits(args)], scratch)
    elif argv[0] == "kvx-runs" or argv[:2] == ["python", "-m"] and argv[2].startswith("kvx."):
        module, args = ("kvx.runs", argv[1:]) if argv[0] == "kvx-runs" else (argv[2], argv[3:])
        _run([sys.executable, "-m", module, *args], scratch, cwd=scratch / "cwd")
        for flag in ("--csv", "--plot"):
            if flag in argv:
                assert (scratch / "cwd" / argv[argv.index(flag) + 1]).is_file(), f"{cmd}: no {flag} file"
    elif argv[0] == "kvx-lm-eval":
        args = argv[1:] + ([] if "--limit" in argv else ["--limit", "2"])
        _run([sys.executable, "-m", "kvx.tasks.harness_cli", *args], scratch)
    else:
        raise AssertionError(f"README command with no mapping in tests/test_readme.py: {cmd}")


def _params():
    for i, (kind, cmd, comment) in enumerate(COMMANDS):
        marks = [pytest.mark.slow] if "GPU" not in comment and any(s in cmd for s in SLOW) else []
        yield pytest.param(kind, cmd, comment, id=f"{i:02d}-{cmd.splitlines()[0][:60]}", marks=marks)


def test_readme_has_the_first_steps():
    shell = [c for k, c, _ in COMMANDS if k == "shell"]
    sweep = next(c for c in shell if c.startswith("python run.py -m"))
    runs = 1
    for a in shlex.split(sweep)[3:]:
        runs *= len(a.split("=", 1)[1].split(",")) if "=" in a else 1
    assert runs == 6, sweep
    assert any(c.startswith("kvx-runs --compare") for c in shell)
    assert all("<" not in c for c in shell), "README commands run as written: no placeholders"
    assert shell.index(sweep) < next(i for i, c in enumerate(shell) if c.startswith("kvx-runs --compare"))


def _makes_runs(kind: str, cmd: str, comment: str) -> bool:
    return kind == "shell" and cmd.startswith(("python run.py", "make run")) and "GPU" not in comment \
        and "experiment=" not in cmd


@pytest.mark.parametrize("kind, cmd, comment", list(_params()))
def test_readme_command_runs(kind, cmd, comment, scratch):
    i = COMMANDS.index((kind, cmd, comment))
    if kind == "shell" and cmd.startswith(("kvx-runs", "python -m kvx.")):
        for j, earlier in enumerate(COMMANDS[:i]):  # the runs it lists, when selected alone (-k)
            if j not in DONE and _makes_runs(*earlier):
                run_command(*earlier, scratch)
                DONE.add(j)
    run_command(kind, cmd, comment, scratch)
    DONE.add(i)
