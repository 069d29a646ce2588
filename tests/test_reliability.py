"""Results that heal and one clear line for every bad input (docs/errors.md lists the messages)."""

import errno
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kvx.models
from kvx.config import config_hash
from kvx.errors import ConfigError, DataError
from kvx.results import claim, staging_dir
from kvx.runner import plan, run

from .helpers import REPO, compose_cfg, run_cli

TINY = ["task.max_tokens=300", "progress=false"]


def _cfg(root, *extra):
    return compose_cfg([f"results_dir={root}", *TINY, *extra])


def _no_model(monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(kvx.models, "load_model", no_load)


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", WANDB_SILENT="true")


# 2. a run folder that does not validate is moved aside and made again -----------------------------------------------
def test_unreadable_results_are_moved_aside_and_run_again(tmp_path, capsys):
    first = run(_cfg(tmp_path))
    d = first.run_dir
    good = (d / "metrics.json").read_text()
    for bad in ("", '{"task": "tinyst', "[1, 2]", '{"ppl": 3.2}'):
        (d / "metrics.json").write_text(bad)
        capsys.readouterr()
        again = run(_cfg(tmp_path))
        assert not again.skipped and again.run_dir == d
        assert json.loads((d / "metrics.json").read_text())["ppl"] == json.loads(good)["ppl"]
        out = capsys.readouterr().out
        assert "incomplete results (metrics.json is not" in out and "moved aside" in out
        aside = [p for p in d.parent.iterdir() if p.name.startswith(f".{d.name}.incomplete-")]
        assert any((p / "metrics.json").read_text() == bad for p in aside)  # kept, not deleted
    (d / "outputs.jsonl").unlink()
    assert not run(_cfg(tmp_path)).skipped
    assert run(_cfg(tmp_path)).skipped


# 3. identical runs finishing together: one result, no traceback, no leftovers ---------------------------------------
def _finish(final: str, i: int, barrier, outcomes) -> None:
    try:
        with staging_dir(Path(final)) as tmp:
            (tmp / "who").write_text(str(i))
            barrier.wait()
        outcomes.put("ok")
    except BaseException as e:  # noqa: BLE001
        outcomes.put(f"{type(e).__name__}: {e}")


def test_simultaneous_finishes_leave_one_result(tmp_path):
    ctx = mp.get_context("fork")
    n = 12
    for round_ in range(4):
        final = tmp_path / "runs" / f"r{round_ % 2}" / "abc"  # rounds 2, 3 replace an existing result
        barrier, queue = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_finish, args=(str(final), i, barrier, queue)) for i in range(n)]
        for p in procs:
            p.start()
        outcomes = [queue.get() for _ in procs]
        for p in procs:
            p.join()
        assert outcomes == ["ok"] * n
        assert sorted(p.name for p in final.parent.iterdir()) == ["abc"]
        assert [p.name for p in final.iterdir()] == ["who"]


def _fake_result(d: Path) -> None:
    d.mkdir(parents=True)
    (d / "config.yaml").write_text("seed: 0\n")
    (d / "metrics.json").write_text(json.dumps({"task": "tinystories", "model": "stories260k", "method": "full",
                                                "ppl": 1.2345}))
    (d / "outputs.jsonl").write_text("")
    (d / "env.json").write_text("{}")


def test_second_identical_run_waits_then_skips_with_its_metrics(tmp_path):
    args = [f"results_dir={tmp_path}", *TINY, "logger=wandb"]  # and logs the result it found to W&B
    run_dir = plan(_cfg(tmp_path)).run_dir
    env = {k: v for k, v in _env().items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    with claim(run_dir):
        proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = proc.stdout.readline()
        assert line.startswith("[kvx] waiting: another process is running this config"), line
        _fake_result(run_dir)  # what the other process would have published
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert "[kvx] skipped" in out and '"ppl": 1.2345' in out  # a skipped run prints its metrics
    assert "[kvx] logged the existing results to W&B" in out and list(run_dir.glob("wandb/offline-run-*"))
    assert not [p for p in run_dir.parent.iterdir() if p.name.startswith(".")]


# 4. the umask is honoured ---------------------------------------------------------------------------------------------
def test_run_folders_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        d = run(_cfg(tmp_path)).run_dir
    finally:
        os.umask(old)
    assert d.stat().st_mode & 0o777 == 0o755
    assert (d / "metrics.json").stat().st_mode & 0o777 == 0o644


# 5. leftovers -------------------------------------------------------------------------------------------------------
def test_stale_staging_folders_are_removed_by_a_later_run(tmp_path, capsys):
    d = plan(_cfg(tmp_path)).run_dir
    stale = [d.parent / f".{d.name}.tmp-99999-abcdef", d.parent / f".{d.name}.tmp-x1y2z3"]  # ours, and mkdtemp's
    for s in stale:
        (s / "sub").mkdir(parents=True)
    run(_cfg(tmp_path))
    assert not any(s.exists() for s in stale)
    assert "removed 2 staging folder(s)" in capsys.readouterr().out


def test_clean_command_removes_stale_leftovers_only(tmp_path):
    from kvx.clean import main

    parent = tmp_path / "runs" / "t" / "m" / "x"
    stale, busy = parent / ".aaaa.tmp-1-abc", parent / ".bbbb.tmp-2-def"
    for p in (stale, busy, tmp_path / ".sweeps" / "2026-01-01" / "0"):
        p.mkdir(parents=True)
    (parent / ".cccc.incomplete-20260101T000000").mkdir()
    with claim(parent / "bbbb"):  # a run in progress
        assert main([str(tmp_path)]) == 0
    assert not stale.exists() and busy.exists() and (parent / ".cccc.incomplete-20260101T000000").exists()
    assert not (tmp_path / ".sweeps").exists() or not any((tmp_path / ".sweeps").iterdir())
    assert not list(parent.glob("*.lock"))


def test_failed_run_leaves_no_folders(tmp_path, monkeypatch):
    from kvx.tasks.perplexity import Perplexity

    def boom(self, engine, ctx):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(Perplexity, "run", boom)
    with pytest.raises(RuntimeError):
        run(_cfg(tmp_path))
    assert list(tmp_path.iterdir()) == []


# 6. the config hash ----------------------------------------------------------------------------------------------------
def test_hash_normalises_numbers():
    a = config_hash(compose_cfg(["method=streaming_llm", "method.budget=1e3"]))
    assert a == config_hash(compose_cfg(["method=streaming_llm", "method.budget=1000"]))
    assert a != config_hash(compose_cfg(["method=streaming_llm", "method.budget=0.5"]))


def test_hash_covers_input_file_contents_once(tmp_path, monkeypatch):
    import kvx.digests

    monkeypatch.setenv("KVX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(kvx.digests, "_LOADED", None)
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "one upon a time"}\n')
    h1 = config_hash(compose_cfg([f"task.data_files={data}"]))
    data.write_text('{"text": "once upon a time"}\n')  # same size: an in-place edit
    h2 = config_hash(compose_cfg([f"task.data_files={data}"]))
    assert h1 != h2
    cache = json.loads((tmp_path / "cache" / "digests.json").read_text())
    assert len(cache) == 2 and all(len(v) == 64 for v in cache.values())
    # hashed once: a second hash reads the cached digest (here replaced to prove it is used)
    key = max(cache, key=lambda k: int(k.rsplit("|", 1)[1]))
    monkeypatch.setattr(kvx.digests, "_MEMO", {})
    monkeypatch.setattr(kvx.digests, "_LOADED", {**cache, key: "0" * 64})
    assert config_hash(compose_cfg([f"task.data_files={data}"])) != h2


def test_hash_covers_less_kernels(tmp_path):
    src = REPO / "results" / "less_kernels" / "stories260k" / "streaming_llm_b32"
    k = tmp_path / "kernels"
    shutil.copytree(src, k)
    args = ["method=less", "method.base.budget=32", f"method.kernels={k}"]
    h1 = config_hash(compose_cfg(args))
    layer = k / "layer_0.safetensors"
    data = bytearray(layer.read_bytes())
    data[-1] ^= 1
    layer.write_bytes(bytes(data))
    assert config_hash(compose_cfg(args)) != h1


# 7, 8. data files: one line naming the file, the row and what is expected, before the model loads -------------------
@pytest.mark.parametrize("content, message", [
    (b'{"text": "a"}\n{"text": null}\n', "row 2: field text is null"),
    (b'{"text": "a"}\n{"text": 3}\n', "row 2: field text must be a string, got a number"),
    (b'{"text": "a"}\n{"text": "caf\xe9"}\n', r"row 2: not UTF-8 text \(byte 0xe9\)"),
    (b"1\n2\n", r"row 1: expected a JSON object \(\{...\}\) per line, got a number"),
    (b'"some text"\n', "row 1: expected a JSON object .* got a string"),
])
def test_bad_jsonl_rows_name_file_and_row(tmp_path, monkeypatch, content, message):
    _no_model(monkeypatch)
    f = tmp_path / "data.jsonl"
    f.write_bytes(content)
    with pytest.raises(DataError, match=f"{f}, {message}"):
        run(_cfg(tmp_path, f"task.data_files={f}"))


def test_binary_text_file_and_summaries_are_checked_before_the_model_loads(tmp_path, monkeypatch):
    _no_model(monkeypatch)
    f = tmp_path / "book.txt"
    f.write_bytes(b"line one\n" + bytes(range(128, 256)))
    with pytest.raises(DataError, match=rf"{f}, row 2: not UTF-8 text"):
        run(_cfg(tmp_path, "task=text", f"task.data_files={f}"))
    s = tmp_path / "articles.jsonl"
    s.write_text('{"document": "d", "summary": "s"}\n{"document": "d"}\n')
    with pytest.raises(DataError, match=f"{s}, row 2: missing field"):
        run(compose_cfg([f"results_dir={tmp_path}", "task=xsum", f"task.data_files={s}"]))
    with pytest.raises(DataError, match="does not exist"):
        run(compose_cfg([f"results_dir={tmp_path}", "task=needle", f"task.data_files={tmp_path}/nope"]))
    assert list(tmp_path.glob("runs")) == []


def test_bad_data_is_one_line_on_the_command_line(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text('{"text": null}\n')
    out = run_cli([f"results_dir={tmp_path}", f"task.data_files={f}", *TINY], threads=1)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [f"kvx: error: {f}, row 1: field text is null"]


# 9. model folder without config.json, corrupt LESS kernels ---------------------------------------------------------
def test_model_folder_without_config_json(tmp_path, assets, monkeypatch):
    _no_model(monkeypatch)
    m = tmp_path / "model"
    shutil.copytree(assets / "models" / "stories260k", m)
    (m / "config.json").unlink()
    with pytest.raises(ConfigError, match=f"model.name_or_path: {m} has no config.json"):
        run(_cfg(tmp_path, f"model.name_or_path={m}"))


def test_corrupt_less_kernels(tmp_path):
    src = REPO / "results" / "less_kernels" / "stories260k" / "streaming_llm_b32"
    k = tmp_path / "kernels"
    shutil.copytree(src, k)
    layer = k / "layer_1.safetensors"
    layer.write_bytes(layer.read_bytes()[:100])
    args = ["method=less", "method.base.budget=32", f"method.kernels={k}", "task.mode=masked"]
    with pytest.raises(ConfigError, match=f"method.kernels: {layer} is corrupt"):
        run(_cfg(tmp_path, *args))
    (k / "record.json").write_text('{"format": "kvx-less')
    with pytest.raises(ConfigError, match=f"method.kernels: {k / 'record.json'} is corrupt"):
        run(_cfg(tmp_path, *args))


# 10. budgets ----------------------------------------------------------------------------------------------------------
def test_budget_at_or_above_the_sequence_warns_once(tmp_path, capsys):
    run(_cfg(tmp_path, "method=streaming_llm", "method.budget=600", "task.mode=masked"))
    err = capsys.readouterr().err
    assert err.count("kvx: warning: method.budget=600") == 1 and "nothing is evicted" in err


def test_budget_one_point_zero_is_refused(tmp_path, monkeypatch):
    _no_model(monkeypatch)
    for method in ("streaming_llm", "h2o"):
        with pytest.raises(ConfigError, match=r"method.budget: 1.0 is ambiguous .* write 1 .* fraction below 1"):
            run(_cfg(tmp_path, f"method={method}", "method.budget=1.0"))
    from kvx.methods.base import resolve_tokens

    with pytest.raises(ConfigError, match="ambiguous"):
        resolve_tokens(1.0, "method.budget", 100)


@pytest.mark.parametrize("name", ["kivi", "uniform"])
def test_bits_comment_matches_what_is_accepted(name):
    import re

    from kvx.config import build_method

    line = next(x for x in (REPO / "configs" / "method" / f"{name}.yaml").read_text().splitlines()
                if x.startswith("bits:"))
    lo, hi = map(int, re.search(r"(\d+)\.\.(\d+)", line).groups())
    assert "16 = full precision" in line
    for bits in (lo, hi, 16):
        build_method({"name": name, "bits": bits})
    for bits in (lo - 1, 17):
        with pytest.raises(ConfigError, match="method.bits"):
            build_method({"name": name, "bits": bits})
    assert hi == 15  # every width up to 15 is packed (kvx/cache/quantized.py)


# 11. Ctrl-C and a full disk ------------------------------------------------------------------------------------------
def test_ctrl_c_exits_130_with_one_line(tmp_path):
    args = [sys.executable, str(REPO / "run.py"), f"results_dir={tmp_path}", "task.max_tokens=20000", "progress=false"]
    proc = subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not list(tmp_path.glob("runs/*/*/*/.*.tmp-*")):
        time.sleep(0.05)  # computing: the staging folder exists
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate()
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "kvx: interrupted; the run was not recorded"
    assert "Traceback" not in err
    assert not list(tmp_path.rglob("metrics.json")) and not list(tmp_path.rglob(".*.tmp-*"))


def test_disk_full_is_one_line_naming_the_results_folder(tmp_path, monkeypatch):
    import kvx.runner

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(kvx.runner, "write_json", full)
    with pytest.raises(ConfigError, match=f"results_dir: no space left on the device of {tmp_path}"):
        run(_cfg(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_clean_rehash_moves_folders_to_their_current_hash(tmp_path):
    from omegaconf import OmegaConf

    from kvx.clean import main

    cfg = _cfg(tmp_path, "method=streaming_llm", "method.budget=32")
    right = plan(cfg).run_dir
    wrong = right.with_name("0123456789")
    _fake_result(wrong)
    (wrong / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    assert main([str(tmp_path), "--rehash", "--dry-run"]) == 0 and wrong.is_dir()
    assert main([str(tmp_path), "--rehash"]) == 0
    assert not wrong.exists() and (right / "metrics.json").is_file()
