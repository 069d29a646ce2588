"""The runs under a results folder as one table (pandas): filter, choose columns, pivot, export, plot.

    kvx-runs                                          # every run under $KVX_RESULTS_DIR, else outputs/
    kvx-runs results task=tinystories method.budget=64,128        # the committed runs, filtered
    kvx-runs -c method,method.budget,task.mode,ppl,cache_bytes_peak --csv runs.csv
    kvx-runs --compare method method.budget --metric ppl           # one row per method, one column per budget
    kvx-runs --plot ppl.png --metric ppl              # the metric against the measured cache bytes, a line per method

A column is any key of a run's resolved config (`method.budget`, `task.max_tokens`, `model.name`) or of its
metrics.json (`ppl`, `acc`, `cache_bytes_peak`, `hellaswag/acc`); `task`, `model`, `method` and `mode` are the
names the run was filed under. A filter `key=v1,v2` keeps the runs whose value is one of those (numbers compare as
numbers: 64 matches 64.0); `key=` (empty) keeps the runs that have no such key (the full cache's budget).
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
import yaml

DEFAULT_DIR = "outputs"  # configs/config.yaml: results_dir: ${oc.env:KVX_RESULTS_DIR,outputs}
FILED_UNDER = ("task", "model", "method", "mode")
HEADLINE = ("ppl", "acc", "acc_norm", "exact", "rougeL", "score")  # shown by default when the runs have them
NONE = "-"  # how a run without the key appears in a pivot (the full cache under method.budget)


class RunsError(ValueError):
    """A bad filter, column or pivot: one line naming what is allowed."""


def default_dir() -> Path:
    return Path(os.environ.get("KVX_RESULTS_DIR") or DEFAULT_DIR)


def _flat(prefix: str, node, out: dict) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(node) if isinstance(node, list) else node


def load_runs(root: str | Path) -> pd.DataFrame:
    """One row per run folder under root/runs/<task>/<model>/<method>/<hash>/ with metrics.json: the metrics, the
    resolved config flattened to dotted keys, and `run` (the folder). Unreadable folders are named on stderr."""
    root = Path(root)
    rows = []
    for mpath in sorted((root / "runs").glob("*/*/*/*/metrics.json")):
        folder = mpath.parent
        if folder.name.startswith("."):  # staging or moved-aside folders (kvx/results.py), not finished runs
            continue
        try:
            metrics = json.loads(mpath.read_text(encoding="utf-8"))
            cfg_path = folder / "config.yaml"
            cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
        except (OSError, ValueError, yaml.YAMLError) as e:
            print(f"[kvx-runs] skipped {folder}: {type(e).__name__}: {str(e).splitlines()[0]}", file=sys.stderr)
            continue
        row: dict = {}
        _flat("", cfg or {}, row)
        for key, value in metrics.items():
            if not isinstance(value, (dict, list)):
                row[key] = value
        row["run"] = str(folder)
        rows.append(row)
    df = pd.DataFrame(rows)
    for col in df.columns:  # whole numbers stay whole where some runs lack the key (budget 64, not 64.0)
        values = df[col].dropna()
        if df[col].dtype == float and len(values) and (values == values.round()).all():
            df[col] = pd.Series([None if pd.isna(v) else int(v) for v in df[col]], index=df.index, dtype=object)
    return df


def _column(df: pd.DataFrame, key: str) -> str:
    if key in df.columns:
        return key
    close = difflib.get_close_matches(key, [str(c) for c in df.columns], n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise RunsError(f"no run has the key {key!r}{hint} (keys: config keys such as method.budget, metrics such as ppl)")


def _number(x) -> float | None:
    if isinstance(x, bool):
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _is_missing(x) -> bool:
    return x is None or x is pd.NA or (isinstance(x, float) and math.isnan(x))


def _matches(value, wanted: list[str]) -> bool:
    if _is_missing(value):
        return "" in wanted
    num = _number(value)
    for w in wanted:
        if w == "":
            continue
        wn = _number(w)
        if num is not None and wn is not None:
            if num == wn:
                return True
        elif str(value) == w or str(value).lower() == w.lower() and isinstance(value, bool):
            return True
    return False


def select(df: pd.DataFrame, filters: Iterable[str]) -> pd.DataFrame:
    """The runs matching every `key=v1,v2` filter."""
    for f in filters:
        if "=" not in f:
            raise RunsError(f"filter {f!r}: write key=value (e.g. method.budget=64 or method=h2o,tova)")
        key, values = f.split("=", 1)
        if df.empty:
            return df
        col = _column(df, key.strip())
        wanted = [v.strip() for v in values.split(",")]
        df = df[df[col].map(lambda v, w=wanted: _matches(v, w))]
    return df


def default_columns(df: pd.DataFrame) -> list[str]:
    cols = [c for c in (*FILED_UNDER[:3], "method.budget", "mode") if c in df.columns]
    metrics = [c for c in df.columns if c in HEADLINE or str(c).rsplit("/", 1)[-1] in ("acc", "acc_norm")]
    cols += [c for c in metrics if df[c].notna().any()]
    return cols + [c for c in ("cache_bytes_peak", "wall_time", "run") if c in df.columns]


def table(df: pd.DataFrame, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """The chosen columns (default: what ran, the headline metrics, measured cache bytes, time, folder), sorted."""
    if df.empty:
        return df
    cols = [_column(df, c) for c in columns] if columns else default_columns(df)
    out = df[cols]
    keys = [c for c in (*FILED_UNDER[:3], "method.budget") if c in cols]
    if keys:
        out = out.sort_values(keys, key=lambda s: s.map(_sort_key), kind="stable")
    return out.reset_index(drop=True)


def _sort_key(x):
    num = _number(x)
    return (0, num, "") if num is not None else (1, 0.0, NONE if _is_missing(x) else str(x))


def _labels(series: pd.Series) -> pd.Categorical:
    """A pivot key as ordered labels: numbers in numeric order, then text, runs without the key last (`-`)."""
    values = sorted(set(series.tolist()), key=_sort_key)
    def label(x):
        num = _number(x)
        if num is not None:
            return str(int(num)) if num.is_integer() else f"{num:g}"
        return NONE if _is_missing(x) else str(x)
    labels = list(dict.fromkeys(label(v) for v in values))
    return pd.Categorical(series.map(label), categories=labels, ordered=True)


def compare(df: pd.DataFrame, rows: Sequence[str], cols: Sequence[str], metric: str) -> pd.DataFrame:
    """`metric` with one row per value of `rows` and one column per value of `cols` (keys may be lists). Two runs
    in one cell are refused, naming the keys they differ in, rather than averaged."""
    if df.empty:
        raise RunsError("no runs to compare (check the folder and the filters)")
    rows, cols = [_column(df, k) for k in rows], [_column(df, k) for k in cols]
    metric = _column(df, metric)
    keyed = pd.DataFrame({k: _labels(df[k]) for k in dict.fromkeys([*rows, *cols])}, index=df.index)
    keyed["_value"] = pd.to_numeric(df[metric], errors="coerce")
    sizes = keyed.groupby([*rows, *cols], observed=True).size()
    crowded = sizes[sizes > 1]
    if len(crowded):
        cell = crowded.index[0]
        cell = cell if isinstance(cell, tuple) else (cell,)
        same = (keyed[[*rows, *cols]] == pd.Series(cell, index=[*rows, *cols])).all(axis=1)
        differ = [c for c in df.columns if c not in ("run", *rows, *cols) and not c.startswith(("logger.", "hydra."))
                  and df.loc[same, c].astype(str).nunique() > 1 and c in _config_keys(df)]
        raise RunsError(f"{int(crowded.iloc[0])} runs fall in the cell {dict(zip([*rows, *cols], cell))}: they "
                        f"differ in {', '.join(differ[:6]) or 'nothing recorded'}; filter them (e.g. "
                        f"{differ[0] if differ else 'task.mode'}=...) or add that key to --compare")
    pivot = keyed.pivot_table(index=rows, columns=cols, values="_value", aggfunc="first", observed=True)
    pivot.columns.name = " / ".join(cols) if len(cols) > 1 else cols[0]
    return pivot


def _config_keys(df: pd.DataFrame) -> set[str]:
    return {c for c in df.columns if "." in str(c) or c in ("seed", "kernels")}


def plot(df: pd.DataFrame, metric: str, path: str | Path, by: str = "method") -> Path:
    """`metric` against the measured peak cache bytes, one line per value of `by`, written to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, by, x = _column(df, metric), _column(df, by), _column(df, "cache_bytes_peak")
    data = df.assign(_x=pd.to_numeric(df[x], errors="coerce") / 1024, _y=pd.to_numeric(df[metric], errors="coerce"))
    data = data.dropna(subset=["_x", "_y"])
    if data.empty:
        raise RunsError(f"no run has both {metric} and cache_bytes_peak to plot")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, g in data.groupby(by, sort=True, dropna=False):
        g = g.sort_values("_x")
        ax.plot(g["_x"], g["_y"], marker="o", linewidth=0.8, label=str(name))
    ax.set_xscale("log", base=2)
    where = ", ".join(sorted({f"{t} · {m}" for t, m in zip(data.get("task", ["?"] * len(data)),
                                                            data.get("model", ["?"] * len(data)))}))
    ax.set(xlabel="measured cache (KiB, peak)", ylabel=metric, title=where)
    ax.grid(True, linewidth=0.3)
    ax.legend(fontsize=7, ncol=2, title=by)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _split(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvx-runs", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("args", nargs="*", metavar="[FOLDER] [KEY=VALUE ...]",
                    help=f"the results folder (default: $KVX_RESULTS_DIR, else {DEFAULT_DIR}), then filters")
    ap.add_argument("-c", "--columns", type=_split, help="comma-separated config keys and metrics to show")
    ap.add_argument("--compare", nargs=2, metavar=("ROWS", "COLUMNS"),
                    help="pivot: one row per value of ROWS, one column per value of COLUMNS (comma-separated keys)")
    ap.add_argument("-m", "--metric", default=None, help="the metric of --compare and --plot (default: ppl or acc)")
    ap.add_argument("--csv", type=Path, help="also write the table to this CSV file")
    ap.add_argument("--plot", type=Path, help="write METRIC against the measured cache bytes to this PNG")
    ap.add_argument("--by", default="method", help="--plot: one line per value of this key (default: method)")
    a = ap.parse_intermixed_args(argv)
    folder, filters = default_dir(), list(a.args)
    if filters and "=" not in filters[0]:
        folder = Path(filters.pop(0))
    if not (folder / "runs").is_dir():
        print(f"[kvx-runs] no runs under {folder}/runs (give the results folder, e.g. kvx-runs results)", file=sys.stderr)
        return 2
    try:
        runs = select(load_runs(folder), filters)
        if runs.empty:
            print(f"[kvx-runs] no run under {folder} matches {' '.join(filters)}", file=sys.stderr)
            return 1
        metric = a.metric or next((m for m in HEADLINE if m in runs.columns and runs[m].notna().any()), None)
        if (a.compare or a.plot) and metric is None:
            raise RunsError("give --metric (a key of metrics.json, e.g. ppl or hellaswag/acc)")
        if a.compare:
            out = compare(runs, _split(a.compare[0]), _split(a.compare[1]), metric)
            print(f"{metric} ({len(runs)} runs under {folder})")
        else:
            out = table(runs, a.columns)
        if a.plot:
            print(f"[kvx-runs] plot: {plot(runs, metric, a.plot, a.by)}")
    except RunsError as e:
        print(f"[kvx-runs] {e}", file=sys.stderr)
        return 2
    with pd.option_context("display.width", 250, "display.max_columns", None, "display.max_rows", None,
                           "display.max_colwidth", 80):
        shown = out.copy()
        for col in shown.columns:
            if shown[col].dtype == object:  # na_rep covers float columns only
                shown[col] = shown[col].map(lambda v: NONE if _is_missing(v) else v)
        try:
            print(shown.to_string(na_rep=NONE))
        except BrokenPipeError:  # kvx-runs | head
            return 0
    if a.csv:
        a.csv.parent.mkdir(parents=True, exist_ok=True)
        out.to_csv(a.csv, index=a.compare is not None)
        print(f"[kvx-runs] csv: {a.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
