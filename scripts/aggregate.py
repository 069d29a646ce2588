"""Paper tables and figures from results/runs (`make tables`).

    python scripts/aggregate.py                                  # every experiment, every scale that has runs
    python scripts/aggregate.py --experiment eviction_ppl --scale cpu
    python scripts/aggregate.py --experiment eviction_ppl --scale cpu task.max_tokens=600   # as the runs were made

The runs of a table are exactly its experiment's grid: configs/experiment/<name>.yaml is composed at each scale,
its `hydra.sweeper` grid is expanded as the sweeper expands it (kvx/grid.py), and each cell's config hash names
its folder results/runs/<task>/<model>/<method>/<hash>/. A scale none of whose runs exist is skipped; a scale with
some runs missing fails, naming them (and the command that makes them).

Writes results/tables/<experiment>.md and .csv (laid out like the paper's table, the paper's numbers beside ours
where the paper gives them; scale, model and mode marked) and PNG figures in results/figures/. Output is a pure
function of results/runs: rows in grid order, fixed float formats, no timestamps, PNGs saved without metadata.
"""

from __future__ import annotations

import argparse
import copy
import csv
import functools
import io
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
CONFIGS = REPO / "configs"
SCALES = ("gpu", "cpu")
# numbers that vary from one identical run to the next: never in a table
VOLATILE = {"wall_time", "task_seconds", "peak_process_memory_bytes", "peak_gpu_memory_bytes", "tokens_per_second"}


class MissingRuns(SystemExit):
    pass


# ---------------------------------------------------------------------------------------------------------------------
# the runs of an experiment
@dataclass
class Run:
    cell: list[str]  # the grid's overrides for this run, as the sweeper passes them
    cfg: dict  # resolved model, method, task, seed
    run_dir: Path
    metrics: dict | None
    outputs_path: Path

    @property
    def method(self) -> str:
        return self.cfg["method"]["name"]

    @property
    def mode(self) -> str:
        return self.cfg["task"].get("mode", "")

    @property
    def model(self) -> str:
        return self.cfg["model"]["name"]

    def get(self, dotted: str, default=None):
        node = self.cfg
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def outputs(self) -> list[dict]:
        if not self.outputs_path.is_file():
            return []
        return [json.loads(line) for line in self.outputs_path.read_text(encoding="utf-8").splitlines() if line.strip()]

    @property
    def digest(self) -> str | None:
        """The digest of the kvx source the run executed (env.json; None for runs made before it was recorded)."""
        env = self.run_dir / "env.json"
        return json.loads(env.read_text(encoding="utf-8")).get("kvx_source_digest") if env.is_file() else None

    @property
    def stale(self) -> bool:
        """Made from a kvx source other than this checkout's (or from an unrecorded one)."""
        return self.metrics is not None and self.digest != checkout_digest()


@functools.cache
def checkout_digest() -> str:
    from kvx.provenance import source_digest

    return source_digest(REPO / "kvx")


STALE_MARK = "‡"


def label(run: Run, text: str) -> str:
    """A row's label, marked when the run was made from another kvx source than this checkout's."""
    return f"{text} {STALE_MARK}" if run.stale else text


@dataclass
class Plan:
    experiment: str
    scale: str
    runs: list[Run]
    command: str
    same_as: list[str] = field(default_factory=list)  # scales whose runs are these very runs

    @property
    def done(self) -> list[Run]:
        return [r for r in self.runs if r.metrics is not None]

    @property
    def missing(self) -> list[Run]:
        return [r for r in self.runs if r.metrics is None]


@functools.cache
def cells(experiment: str, scale: str, extra: tuple[str, ...] = ()) -> tuple[tuple[tuple[str, ...], dict, str], ...]:
    """(overrides, resolved model/method/task/seed, folder under results) for each run of the experiment's grid."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import kvx.config  # noqa: F401  (resolvers)
    from kvx.config import config_hash
    from kvx.grid import expand

    base = [f"experiment={experiment}", f"scale={scale}", *extra]
    out = []
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        root = compose(config_name="config", overrides=base, return_hydra_config=True)
        sweeper = OmegaConf.to_container(root.hydra.sweeper, resolve=True)  # as the sweeper receives it
        for job in expand(sweeper.get("params"), sweeper.get("grids"), base):
            cfg = compose(config_name="config", overrides=job)
            plain = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "method", "task")}
            plain["seed"] = cfg.get("seed")
            rel = f"runs/{plain['task']['name']}/{plain['model']['name']}/{plain['method']['name']}/{config_hash(cfg)}"
            out.append((tuple(j for j in job if j not in base), plain, rel))
    return tuple(out)


@functools.cache
def folders(experiment: str, scale: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """runs/<task>/<model> folders the experiment's runs can lie in (cheap: one composition per model/task choice)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import kvx.config  # noqa: F401  (resolvers)

    base = [f"experiment={experiment}", f"scale={scale}", *extra]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        root = compose(config_name="config", overrides=base, return_hydra_config=True)
        sweeper = OmegaConf.to_container(root.hydra.sweeper, resolve=True)
        choices = {"model": {None}, "task": {None}}
        for grid in [sweeper.get("params") or {}, *(sweeper.get("grids") or [])]:
            for key, values in grid.items():
                if key in choices:
                    choices[key] |= {v.strip() for v in str(values).split(",")}
        out = set()
        for m in choices["model"]:
            for t in choices["task"]:
                cfg = compose(config_name="config", overrides=base + [f"{k}={v}" for k, v in (("model", m), ("task", t))
                                                                      if v is not None])
                out.add(f"runs/{cfg.task.name}/{cfg.model.name}")
    return tuple(sorted(out))


def plan(experiment: str, scale: str, results: Path, extra: list[str] = ()) -> Plan:
    """The experiment's runs at `scale`, with the metrics of those already in `results`."""
    runs = []
    for cell, cfg, rel in cells(experiment, scale, tuple(extra)):
        run_dir = results / rel
        mpath = run_dir / "metrics.json"
        metrics = json.loads(mpath.read_text(encoding="utf-8")) if mpath.is_file() else None
        runs.append(Run(list(cell), copy.deepcopy(cfg), run_dir, metrics, run_dir / "outputs.jsonl"))
    command = " ".join(["python run.py", f"experiment={experiment}", f"scale={scale}", *extra])
    return Plan(experiment, scale, runs, command)


# ---------------------------------------------------------------------------------------------------------------------
# tables
@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        out = [f"**{self.title}**", ""] if self.title else []
        out.append("| " + " | ".join(self.columns) + " |")
        out.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(self.columns))) + "|")
        out += ["| " + " | ".join(r) + " |" for r in self.rows]
        out += [""] + [f"{n}" for n in self.notes] if self.notes else []
        return "\n".join(out) + "\n"


@dataclass
class Section:
    """One scale of one experiment: the main table (also the CSV), more tables, figures (paths relative to repo).
    heading: what the rows are (model, data, window or pot); claim: the paper's claim they test, in one sentence."""

    scale: str
    model: str
    main: Table
    extra: list[Table] = field(default_factory=list)
    figures: list[tuple[str, Path]] = field(default_factory=list)
    heading: str = ""
    claim: str = ""


def fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def kib(nbytes) -> str:
    return "–" if nbytes is None else f"{nbytes / 1024:.1f}"


def ratio(x) -> str:
    return "–" if x is None else f"{x:.2f}×"


# ---------------------------------------------------------------------------------------------------------------------
# uncertainty: bootstrap over the windows, sequences or examples of a run (outputs.jsonl), fixed seed
BOOT = 2000  # resamples


def units(run: Run) -> tuple[list[float], list[int]] | None:
    """(summed nll, scored tokens) per window or sequence from outputs.jsonl; None when the run has no such rows."""
    sums, counts = [], []
    for o in run.outputs():
        n = o.get("scored", o.get("tokens"))
        if not isinstance(o.get("nll"), (int, float)) or not n:
            return None
        sums.append(o["nll"] * n)
        counts.append(n)
    return (sums, counts) if len(sums) > 1 else None


def _resample(k: int):
    import numpy as np

    return np.random.default_rng(0).integers(0, k, size=(BOOT, k))  # the same draws for every run of k units


def ppl_boot(run: Run):
    """Bootstrap perplexities [BOOT] (resampling windows or sequences), or None."""
    import numpy as np

    u = units(run)
    if u is None:
        return None
    s, c = np.array(u[0]), np.array(u[1], dtype=float)
    idx = _resample(len(s))
    return np.exp(s[idx].sum(1) / c[idx].sum(1))


def interval(boot) -> tuple[float, float] | None:
    import numpy as np

    if boot is None:
        return None
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(lo), float(hi)


def ppl_interval(run: Run) -> tuple[float, float] | None:
    return interval(ppl_boot(run))


def paired_diff(a: Run, b: Run) -> tuple[float, tuple[float, float]] | None:
    """ppl(a) - ppl(b) with a 95% interval resampling the same windows or sequences for both (None: not paired)."""
    ua, ub = units(a), units(b)
    if ua is None or ub is None or ua[1] != ub[1]:
        return None
    return a.metrics["ppl"] - b.metrics["ppl"], interval(ppl_boot(a) - ppl_boot(b))


def mean_interval(values: list[float]) -> tuple[float, float] | None:
    """95% bootstrap interval of a mean over examples."""
    import numpy as np

    if len(values) < 2:
        return None
    v = np.array(values, dtype=float)
    return interval(v[_resample(len(v))].mean(1))


def with_ci(x, ci, digits: int = 3) -> str:
    if x is None:
        return "–"
    return fmt(x, digits) if ci is None else f"{x:.{digits}f} ({ci[0]:.{digits}f}–{ci[1]:.{digits}f})"


def overlaps(a, b) -> bool:
    return a is not None and b is not None and a[0] <= b[1] and b[0] <= a[1]


CI_NOTE = ("Parentheses: 95% bootstrap interval ({what}, {n} resamples, seed 0). ≈: the interval overlaps that of "
           "the best method in the same column (not distinguishable from it at this sample size); *: the best.")


def mark_best(cells: list[tuple[int, float, tuple | None]], lower_is_better: bool = True) -> dict[int, str]:
    """{row: '*' | '≈' | ''} for (row, value, interval) of one column: the best, and those overlapping it."""
    if not cells:
        return {}
    best = (min if lower_is_better else max)(cells, key=lambda c: c[1])
    return {i: "*" if i == best[0] else ("≈" if overlaps(ci, best[2]) else "") for i, _, ci in cells}


def budget_of(run: Run):
    return run.get("method.budget")


def budget_key(b) -> tuple:
    return (b is None, float(b) if isinstance(b, (int, float)) else 0.0, str(b))


def mode_note(runs: list[Run]) -> str:
    """How the runs fed their inputs: masked, or stream with how each kind of run was fed."""
    parts = []
    if any(r.mode == "masked" for r in runs):
        parts.append("masked: one parallel forward with each policy's mask")
    stream = [r for r in runs if r.mode == "stream"]
    kinds = []
    for r in stream:
        task = r.cfg["task"].get("type")
        if r.method == "infinipot":
            k = ("InfiniPot's pot: the input fed in chunks that fill the pot (M minus the catalyst prompt minus the "
                 "tokens held), distilled to C whenever the next chunk would not fit")
        elif r.method == "full":
            k = "the full cache keeps every token"
        elif r.get("task.prefill") == "full":
            k = "prefill=full: the context in one forward, compressed afterwards, then the scored tokens one at a time"
        elif task in ("perplexity", "pot_ppl"):
            k = "other methods: token by token through the real cache"
        elif task == "harness":
            chunk = r.get("task.chunk_size")
            k = (f"other methods: each context through the real cache ({f'{chunk} tokens a forward' if chunk else 'one forward'}), "
                 "then its endings scored over that cache, frozen")
        else:
            k = ("other methods: the prompt in one forward, evicted to the budget afterwards, then the answer decoded "
                 "token by token")
        if k not in kinds:
            kinds.append(k)
    if stream:
        parts.append("stream (real cache): " + "; ".join(kinds))
    return "Mode: " + "; ".join(parts) + "."


# ---------------------------------------------------------------------------------------------------------------------
# figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 100, "font.size": 9, "path.simplify": False})
    return plt


def save_png(fig, path: Path) -> None:
    """PNG without the variable metadata matplotlib writes by default (software version), so reruns are equal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", metadata={"Software": None}, bbox_inches=None)
    _plt().close(fig)


METHOD_ORDER = ["full", "streaming_llm", "h2o", "tova", "snapkv", "scissorhands", "sirllm", "less", "infinipot",
                "uniform", "kivi", "qaq"]
MARKERS = "os^vD<>ph*Px"


def style(name: str, names: list[str]) -> dict:
    """The same colour and marker for a method in every figure (by its base name: `qaq outliers=0` is qaq's)."""
    base = name.split()[0]
    order = METHOD_ORDER + sorted(n.split()[0] for n in names if n.split()[0] not in METHOD_ORDER)
    i = order.index(base)
    variant = sorted(n for n in names if n.split()[0] == base).index(name)
    return {"color": f"C{i % 10}", "marker": MARKERS[(i + 3 * variant) % len(MARKERS)],
            "linestyle": ["-", "--", "-.", ":"][variant % 4]}


def _ticks(ax, xs) -> None:
    """Tick marks at the data's own x values (budgets, KiB) when there are few of them."""
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullFormatter, NullLocator

    kept = []
    for x in sorted(set(xs)):
        if x > 0 and (not kept or x >= 1.25 * kept[-1]):  # apart enough on a log axis to be read
            kept.append(x)
    if kept and len(kept) <= 12:
        ax.xaxis.set_major_locator(FixedLocator(kept))
        ax.xaxis.set_major_formatter(FixedFormatter([f"{x:.3g}" for x in kept]))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both axes (smaller x = memory, smaller y = loss), sorted by x."""
    front, best = [], math.inf
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


def plot_pareto(series: dict[str, list[tuple[float, float]]], path: Path, title: str, ylabel: str,
                ref: float | None = None, higher_is_better: bool = False) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    allpts = []
    for name, pts in sorted(series.items()):
        xs, ys = zip(*sorted(pts)) if pts else ((), ())
        ax.plot(xs, ys, linewidth=0.8, label=name, **style(name, list(series)))
        allpts += [(x, -y if higher_is_better else y) for x, y in pts]
    front = pareto_front(allpts)
    if len(front) > 1:
        ax.plot([x for x, _ in front], [(-y if higher_is_better else y) for _, y in front], color="black",
                linestyle=":", linewidth=1.2, label="Pareto front")
    if ref is not None:
        ax.axhline(ref, color="grey", linestyle="--", linewidth=0.8, label="full cache")
    ax.set_xscale("log", base=2)
    _ticks(ax, [x for x, _ in allpts])
    ax.set_xlabel("measured cache (KiB, peak)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, linewidth=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_png(fig, path)


def plot_lines(series: dict[str, list[tuple[float, float]]], path: Path, title: str, xlabel: str, ylabel: str,
               ref: float | None = None, logx: bool = True) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, pts in sorted(series.items()):
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, ys, linewidth=0.9, label=name, **style(name, list(series)))
    if ref is not None:
        ax.axhline(ref, color="grey", linestyle="--", linewidth=0.8, label="full cache")
    if logx:
        ax.set_xscale("log", base=2)
        _ticks(ax, [x for pts in series.values() for x, _ in pts])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, linewidth=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_png(fig, path)


def plot_heatmaps(maps: list[tuple[str, list, list, dict]], path: Path, title: str, label: str) -> None:
    """maps: (name, lengths, depths, {(length, depth): score}) -> one depth x length panel each."""
    import numpy as np

    plt = _plt()
    n = len(maps)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    fig.subplots_adjust(hspace=0.45, wspace=0.35, top=0.9)
    for ax in axes.flat[n:]:
        ax.axis("off")
    im = None
    for ax, (name, lengths, depths, grid) in zip(axes.flat, maps):
        mat = np.array([[grid.get((L, d), np.nan) for L in lengths] for d in depths], dtype=float)
        im = ax.imshow(mat, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth (%)")
        ax.set_title(name, fontsize=8)
        for (i, j), v in np.ndenumerate(mat):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6)
    fig.suptitle(title, fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label=label)
    save_png(fig, path)


# ---------------------------------------------------------------------------------------------------------------------
# layouts: one per paper table; `generic` for any other experiment
Layout = Callable[[Plan, Path], Section]
LAYOUTS: dict[str, Layout] = {}


def layout(name: str):
    def deco(fn):
        LAYOUTS[name] = fn
        return fn

    return deco


def figure_path(figures: Path, plan_: Plan, name: str) -> Path:
    return figures / f"{plan_.experiment}-{plan_.scale}-{name}.png"


def _full(runs: list[Run], mode: str | None = None) -> Run | None:
    cands = [r for r in runs if r.method == "full" and (mode is None or r.mode == mode)]
    return cands[0] if cands else None


# names a title may use, and what a run must hold for its title to use them (tests/test_aggregate.py checks titles)
MODEL_NAMES = {"llama2-7b": "Llama-2-7B", "llama2-13b": "Llama-2-13B", "mistral-7b": "Mistral-7B",
               "falcon-7b": "Falcon-7B", "llama3-8b": "Llama-3-8B", "qwen2.5-7b": "Qwen2.5-7B",
               "stories260k": "stories260k"}
DATA_NAMES = {"tinystories": "TinyStories", "wikitext2": "WikiText-2", "wikitext103": "WikiText-103", "pg19": "PG-19",
              "longbench": "LongBench", "needle": "Paul Graham essays", "xsum": "XSum", "cnn_dailymail": "CNN/DailyMail",
              "multi_news": "Multi-News", "hellaswag": "HellaSwag", "piqa": "PIQA", "mathqa": "MathQA", "boolq": "BoolQ",
              "c4": "C4"}


def model_name(run: Run) -> str:
    return MODEL_NAMES.get(run.model, run.model)


def data_name(run: Run) -> str:
    task = run.cfg["task"]
    key = task.get("dataset") if task.get("dataset") in DATA_NAMES else task.get("type", task["name"])
    return DATA_NAMES.get(key, DATA_NAMES.get(task["name"], task["name"]))


def names_used(runs: list[Run]) -> set[str]:
    """The model and data names (display and config spellings) the runs really use."""
    out = set()
    for r in runs:
        out |= {r.model, model_name(r), data_name(r), r.cfg["task"]["name"], str(r.cfg["task"].get("dataset"))}
    return {n.lower() for n in out}


def title_problems(title: str, runs: list[Run]) -> list[str]:
    """Model or data names in `title` that none of `runs` uses."""
    used = names_used(runs)
    known = {n.lower() for n in [*MODEL_NAMES, *MODEL_NAMES.values(), *DATA_NAMES.values()]}
    low = title.lower()
    return sorted(n for n in known if n in low and n not in used
                  and not any(n in u for u in used))  # "LongBench" inside "LongBench-format" is used


def _one(values) -> str:
    vals = list(dict.fromkeys(values))
    return vals[0] if len(vals) == 1 else " and ".join(str(v) for v in vals)


def cpu_prefix(p: Plan, what: str) -> str:
    return f"CPU analog of {what}" if p.scale == "cpu" else what[0].upper() + what[1:]


@layout("eviction_ppl")
def eviction_table(p: Plan, figures: Path) -> Section:
    runs = p.done
    budgets = sorted({budget_of(r) for r in runs if r.method != "full"}, key=budget_key)
    modes = [m for m in ("masked", "stream") if any(r.mode == m for r in runs)]
    methods = []
    for r in runs:
        if r.method not in methods:
            methods.append(r.method)
    by = {(r.method, budget_of(r) if r.method != "full" else None, r.mode): r for r in runs}
    cis = {id(r): ppl_interval(r) for r in runs}
    cols = ["method"] + [f"{b} {m}" for b in budgets for m in modes]
    grid = [[by.get((meth, None if meth == "full" else b, m)) for b in budgets for m in modes] for meth in methods]
    marks = {}
    for j in range(len(cols) - 1):  # per column, the best non-full method and those whose interval overlaps it
        col = [(i, row[j].metrics["ppl"], cis[id(row[j])]) for i, row in enumerate(grid)
               if row[j] is not None and methods[i] != "full"]
        for i, m in mark_best(col).items():
            marks[(i, j)] = m
    rows, cache_rows = [], []
    for i, meth in enumerate(methods):
        anyrun = next(r for r in grid[i] if r is not None)
        rows.append([label(anyrun, meth)] + [
            "–" if r is None else with_ci(r.metrics["ppl"], cis[id(r)]) + marks.get((i, j), "")
            for j, r in enumerate(grid[i])])
        crow = [meth]
        for b in budgets:
            r = by.get((meth, None if meth == "full" else b, "stream")) or by.get((meth, None if meth == "full" else b,
                                                                                   "masked"))
            crow.append(kib(r.metrics.get("cache_bytes_peak")) if r else "–")
        cache_rows.append(crow)
    n_units = len(units(runs[0])[0]) if units(runs[0]) else 0
    notes = [mode_note(runs), "Budget: tokens kept per KV head and layer, the current one included; the full cache "
             "keeps every token of the window (its row repeats one number).",
             CI_NOTE.format(what=f"over the {n_units} windows", n=BOOT)]
    gaps = [abs(by[(k[0], k[1], "masked")].metrics["ppl"] - r.metrics["ppl"])
            for k, r in by.items() if k[2] == "stream" and (k[0], k[1], "masked") in by]
    if gaps:
        notes.append(f"Masked versus stream: largest |ppl difference| {max(gaps):.2e} over {len(gaps)} pairs.")
    notes += _h2o_vs_streaming(by, budgets, modes)
    task = runs[0].cfg["task"]
    heading = cpu_prefix(p, f"the eviction baselines at equal budget: {_one(model_name(r) for r in runs)}, "
                            f"{_one(data_name(r) for r in runs)}, {task.get('window')}-token windows "
                            f"(first {task.get('max_tokens')} tokens)")
    title = f"Perplexity (95% interval) per budget and mode, {_one(data_name(r) for r in runs)} ({p.runs[0].model})"
    cache = Table("Measured peak cache (KiB) per budget (stream mode where run)", ["method"] + [str(b) for b in budgets],
                  cache_rows)
    full = _full(runs)
    ref = full.metrics["ppl"] if full else None
    figs = []
    for m in modes:
        series = {meth: [(float(b), by[(meth, b, m)].metrics["ppl"]) for b in budgets if (meth, b, m) in by]
                  for meth in methods if meth != "full"}
        series = {k: v for k, v in series.items() if v}
        path = figure_path(figures, p, f"ppl_budget_{m}")
        plot_lines(series, path, f"{p.experiment} ({p.scale}, {p.runs[0].model}, {m})", "budget (tokens per head)",
                   "perplexity", ref)
        figs.append((f"perplexity versus budget ({m})", path))
    pts = {}
    for r in runs:
        if r.method == "full" or r.mode != (modes[-1]):
            continue
        pts.setdefault(r.method, []).append((r.metrics["cache_bytes_peak"] / 1024, r.metrics["ppl"]))
    path = figure_path(figures, p, "pareto")
    plot_pareto(pts, path, f"{p.experiment} ({p.scale}, {p.runs[0].model}, {modes[-1]})", "perplexity", ref)
    figs.append((f"perplexity versus measured cache ({modes[-1]})", path))
    claim = ("H2O (Zhang et al., 2023) and the other scored policies claim to beat a recent window with attention sinks "
             "(StreamingLLM) at the same budget.")
    return Section(p.scale, p.runs[0].model, Table(title, cols, rows, notes), [cache], figs, heading, claim)


def _h2o_vs_streaming(by: dict, budgets: list, modes: list[str]) -> list[str]:
    """The paired difference H2O - StreamingLLM per budget, and what it says about H2O's claim."""
    mode = "masked" if "masked" in modes else modes[0]
    diffs = []
    for b in budgets:
        h, s = by.get(("h2o", b, mode)), by.get(("streaming_llm", b, mode))
        d = paired_diff(h, s) if h and s else None
        if d is not None:
            diffs.append((b, d))
    if not diffs:
        return []
    text = ", ".join(f"{b}: {d:+.3f} ({ci[0]:+.3f} to {ci[1]:+.3f})" for b, (d, ci) in diffs)
    out = [f"H2O minus StreamingLLM perplexity ({mode}, paired bootstrap over the same windows), per budget: {text}."]
    worse = [b for b, (d, ci) in diffs if ci[0] > 0]
    if worse:
        out.append(f"This contradicts H2O's claim at budget {', '.join(map(str, worse))}: StreamingLLM is better here "
                   "and the interval excludes 0. Likely reason: in 512-token windows of short, simple stories the next "
                   "token depends mostly on the last few dozen tokens, and H2O spends half its budget on heavy hitters "
                   "(accumulated attention favours early positions) where StreamingLLM keeps more recent tokens.")
    return out


PAPER_MISSING = "paper value not transcribed"
# The papers' own numbers go in only as read in the paper itself; none of the three papers' result tables could be
# read from here, so every paper column says PAPER_MISSING. INFINIPOT_PAPER: scorer (or "<scorer>, unbounded") ->
# (the value as printed in the paper, where it sits there).
INFINIPOT_PAPER: dict[str, tuple[str, str]] = {}
INFINIPOT_NOTE = (f"InfiniPot paper column: {PAPER_MISSING}. The paper's LongBench results per scorer in the pot and "
                  "its CaP / NuC / CR-RoPE ablations are in arXiv 2410.01518; no text of those tables could be "
                  "retrieved here, so none are shown.")


def infinipot_paper(key: str | None) -> str:
    """The InfiniPot paper's value for a scorer, with where it sits in the paper; PAPER_MISSING if none."""
    if key not in INFINIPOT_PAPER:
        return PAPER_MISSING
    value, where = INFINIPOT_PAPER[key]
    return f"{value} ({where})"


LESS_PAPER_NOTE = (
    f"LESS paper column: {PAPER_MISSING}. The values are in the language-modelling results of arXiv 2402.09398; no "
    "text of that table could be retrieved here, so none are shown. This scale runs another model and data in any "
    "case: compare trends, not values.")


@layout("less_llama2_7b")
def less_lm(p: Plan, figures: Path) -> Section:
    """LESS's language-modelling comparison: each policy, its Baseline+ (as many bytes as LESS's state), LESS."""
    runs = p.done
    cis = {id(r): ppl_interval(r) for r in runs}
    cols = ["method", "policy", "budget", "role", "mode", "ppl (95% interval)", "cache KiB", "LESS paper"]
    base_budgets = sorted({r.get("method.base.budget") for r in runs if r.method == "less"}, key=budget_key)

    def role(r: Run) -> str:
        if r.method == "full":
            return "full cache"
        if r.method == "less":
            return "LESS"
        return "policy" if budget_of(r) in base_budgets else "Baseline+"

    rows = []
    for r in runs:
        pol = r.get("method.base.name") if r.method == "less" else ("–" if r.method == "full" else r.method)
        b = r.get("method.base.budget") if r.method == "less" else budget_of(r)
        rows.append([label(r, r.method), pol, fmt(b), role(r), r.mode, with_ci(r.metrics["ppl"], cis[id(r)]),
                     kib(r.metrics.get("cache_bytes_peak")), PAPER_MISSING])
    notes = [mode_note(runs), "Budget: tokens kept per KV head and layer (LESS: its policy's budget, plus the low-rank "
             "state in the measured bytes). Baseline+: the policy given as many extra tokens as the bytes of LESS's "
             "state.", CI_NOTE.format(what="over the windows", n=BOOT).split(" ≈:")[0],
             LESS_PAPER_NOTE]
    notes += _less_claims(runs, base_budgets)
    heading = cpu_prefix(p, f"LESS's language-modelling comparison: {_one(model_name(r) for r in runs)}, "
                            f"{_one(data_name(r) for r in runs)}, {runs[0].cfg['task'].get('window')}-token windows "
                            f"(first {runs[0].cfg['task'].get('max_tokens')} tokens)")
    claim = ("LESS claims its low-rank state recovers much of the perplexity the policies lose, more than giving the "
             "policy the state's bytes as extra tokens (Baseline+).")
    title = f"Perplexity per policy, Baseline+ and LESS, {_one(data_name(r) for r in runs)} ({p.runs[0].model})"
    return Section(p.scale, p.runs[0].model, Table(title, cols, rows, notes), [], [], heading, claim)


def _less_claims(runs: list[Run], base_budgets: list) -> list[str]:
    out = []
    for r in runs:
        if r.method != "less" or r.mode != "masked":
            continue
        pol, b = r.get("method.base.name"), r.get("method.base.budget")
        policy = [q for q in runs if q.method == pol and q.mode == r.mode and budget_of(q) == b]
        plus = [q for q in runs if q.method == pol and q.mode == r.mode and budget_of(q) not in base_budgets
                and budget_of(q) > b and budget_of(q) - b <= 8]
        for name, other in (("its policy", policy), ("Baseline+", plus)):
            d = paired_diff(r, other[0]) if other else None
            if d is None:
                continue
            verdict = "better" if d[1][1] < 0 else ("worse" if d[1][0] > 0 else "not distinguishable")
            out.append(f"LESS ({pol}, {b}) minus {name} ({budget_of(other[0])}): {d[0]:+.3f} "
                       f"({d[1][0]:+.3f} to {d[1][1]:+.3f}, paired over the windows): {verdict}.")
    return out


def _pot(r: Run) -> tuple:
    """(|M|, |C|) of a pot run; an unbounded run is filed under the pot it compresses to (its budget)."""
    if r.method == "infinipot":
        b = r.get("method.budget")
        return b, r.get("method.keep") or b // 2
    b = budget_of(r)
    return (b, b // 2) if b is not None else (None, None)


def _scorer(r: Run) -> str:
    if r.method == "infinipot":
        s = r.get("method.scorer")
        return "InfiniPot (cap_nuc)" if s == "cap_nuc" else s
    if r.get("task.prefill") == "full":
        return f"{r.method}, full prefill (unbounded)"
    return "full cache (unbounded)" if r.method == "full" else r.method


def _paper_key(r: Run) -> str | None:
    """The key of a pot-table row in INFINIPOT_PAPER: the scorer in the pot (α 50% for cap_nuc), or the unbounded
    baseline; None for rows the paper has no counterpart of (CR-RoPE off, other α)."""
    if r.method == "infinipot":
        if not r.get("method.cr_rope") or (r.get("method.scorer") == "cap_nuc" and r.get("method.nuc_share") != 0.5):
            return None
        return r.get("method.scorer")
    if r.get("task.prefill") == "full":
        return f"{r.method}, unbounded"
    return None


def _fill(r: Run) -> str:
    if r.method != "infinipot":
        return "whole input" if r.method == "full" else "whole context, then 1"
    b = r.get("method.budget")
    return f"{b} − prompt" if r.get("method.scorer") in ("cap_nuc", "cap") else str(b)


@layout("infinipot_tinystories_pot")
def infinipot_pot(p: Plan, figures: Path) -> Section:
    runs = p.done
    cis = {id(r): ppl_interval(r) for r in runs}
    keeps = sorted({_pot(r)[1] for r in runs if r.method == "infinipot"}, reverse=True)
    cols = ["pot M", "kept C", "context fill", "scorer", "CR-RoPE", "ppl (95% interval)", "cache KiB",
            "InfiniPot paper"]
    rows = []
    full = [r for r in runs if r.method == "full"]
    for r in full:
        rows.append(["–", "–", _fill(r), label(r, _scorer(r)), "–", with_ci(r.metrics["ppl"], cis[id(r)]),
                     kib(r.metrics.get("cache_bytes_peak")), infinipot_paper(_paper_key(r))])
    for c in keeps:
        group = [r for r in runs if r.method != "full" and _pot(r)[1] == c
                 and (r.method != "infinipot" or r.get("method.cr_rope"))]
        bounded = [(i, r.metrics["ppl"], cis[id(r)]) for i, r in enumerate(group) if r.method == "infinipot"]
        marks = mark_best(bounded)
        for i, r in enumerate(group):
            rows.append([fmt(r.get("method.budget")), fmt(c), _fill(r), label(r, _scorer(r)),
                         "on" if r.method == "infinipot" else "–",
                         with_ci(r.metrics["ppl"], cis[id(r)]) + marks.get(i, ""),
                         kib(r.metrics.get("cache_bytes_peak")), infinipot_paper(_paper_key(r))])
    ablation = []
    for c in keeps:
        for sc in dict.fromkeys(r.get("method.scorer") for r in runs if r.method == "infinipot"):
            on = [r for r in runs if r.method == "infinipot" and _pot(r) == (2 * c, c) and r.get("method.scorer") == sc]
            by = {r.get("method.cr_rope"): r for r in on}
            if True in by and False in by:
                d = paired_diff(by[False], by[True])
                ablation.append([fmt(2 * c), sc, with_ci(by[True].metrics["ppl"], cis[id(by[True])]),
                                 with_ci(by[False].metrics["ppl"], cis[id(by[False])]),
                                 "–" if d is None else f"{d[0]:+.3f} ({d[1][0]:+.3f} to {d[1][1]:+.3f})"])
    n = len(units(runs[0])[0]) if units(runs[0]) else 0
    task = runs[0].cfg["task"]
    notes = [mode_note(runs),
             "Pot M: tokens per layer and KV head (the paper's |M|); kept C: tokens kept by each distillation (|C|). "
             "CaP scorers (cap_nuc, cap) reserve room for the catalyst prompt inside the pot, so their context fills "
             "M − prompt slots (chunks of M − prompt − C); the baselines at M = 115 and 51 run at that same fill (C 64 "
             "and 32), "
             "those at 128 and 64 fill the whole pot. Unbounded rows hold the whole story at some point (their cache "
             "KiB says so).",
             CI_NOTE.format(what=f"over the {n} stories", n=BOOT).replace("the best method in the same column",
                                                                          "the best pot method of the same C"),
             INFINIPOT_NOTE + " This scale runs another model and task (perplexity, lower is better; the "
             "paper's column is a score, higher is better): compare trends, not values."]
    notes += _pot_claims(runs, keeps)
    heading = cpu_prefix(p, f"InfiniPot's pot comparison and Table 3 ablation: {_one(model_name(r) for r in runs)}, "
                            f"{_one(data_name(r) for r in runs)} stories of {task.get('min_tokens')}-"
                            f"{task.get('max_tokens')} tokens (last {100 * task.get('tail', 0):.0f}% scored), pots of "
                            f"{' and '.join(str(2 * c) for c in keeps)} tokens")
    claim = ("InfiniPot claims CaP + NuC in a fixed pot beat the other scorers in the same pot and approach the "
             "unbounded baselines (Table 1), and that each of CaP, NuC and CR-RoPE helps (Table 3).")
    title = f"Perplexity of each story's ending per pot and scorer, CR-RoPE on ({p.runs[0].model})"
    extra = [Table("CR-RoPE on versus off (the Table 3 ablation)", ["pot M", "scorer", "ppl, CR-RoPE on",
                                                                    "ppl, CR-RoPE off", "off − on (paired, 95%)"],
                   ablation)] if ablation else []
    return Section(p.scale, p.runs[0].model, Table(title, cols, rows, notes), extra, [], heading, claim)


def _pot_run(runs: list[Run], budget: int, scorer: str, keep=None) -> Run | None:
    for r in runs:
        if (r.method == "infinipot" and r.get("method.budget") == budget and r.get("method.scorer") == scorer
                and r.get("method.cr_rope") and r.get("method.keep") == keep):
            return r
    return None


SCORERS_SHOWN = ("cap_nuc", "cap", "nuc", "h2o", "tova", "snapkv", "streaming", "truncation")


def _pot_off(runs: list[Run], budget: int, scorer: str) -> Run | None:
    return next((r for r in runs if r.method == "infinipot" and r.get("method.budget") == budget
                 and r.get("method.scorer") == scorer and not r.get("method.cr_rope") and r.get("method.keep") is None),
                None)


def _vs(a: Run, b: Run) -> str:
    d = paired_diff(a, b)
    return "–" if d is None else f"{d[0]:+.3f} ({d[1][0]:+.3f} to {d[1][1]:+.3f})"


def _pot_claims(runs: list[Run], keeps: list[int]) -> list[str]:
    """Where the runs agree with InfiniPot's claims and where they contradict them, each from paired differences."""
    out = []
    for c in keeps:
        pot = 2 * c
        ip, cap, nuc = (_pot_run(runs, pot, s) for s in ("cap_nuc", "cap", "nuc"))
        if ip and cap and nuc:
            with_nuc, alone = paired_diff(ip, cap), paired_diff(nuc, cap)
            if with_nuc and alone and (with_nuc[1][1] >= 0 or alone[1][0] > 0):
                what = ("makes it worse" if with_nuc[1][0] > 0 else "does not help significantly"
                        if with_nuc[1][1] >= 0 else "helps")
                out.append(f"Pot {pot}: adding NuC to CaP {what} (InfiniPot minus CaP only: {_vs(ip, cap)}), and NuC "
                           f"alone is {'worse' if alone[1][0] > 0 else 'not better'} than CaP alone ({_vs(nuc, cap)}), "
                           "contrary to Table 3. Likely reason: NuC keeps the tokens the model found most surprising "
                           "(rare names and words in these simple stories), while a story's ending is predicted from "
                           "its recent plot.")
        if ip:
            better, level = [], []
            for sc in ("snapkv", "tova", "h2o", "streaming", "truncation"):
                same = _pot_run(runs, pot, sc)
                matched = next((r for r in runs if r.method == "infinipot" and r.get("method.scorer") == sc
                                and r.get("method.keep") == c and r.get("method.budget") != pot), None)
                for r, where in ((same, f"pot {pot}"), (matched, f"InfiniPot's fill ({matched and budget_of(matched)})")):
                    d = paired_diff(r, ip) if r else None
                    if d and d[1][1] < 0:
                        better.append(f"{sc} at {where}: {d[0]:+.3f} ({d[1][0]:+.3f} to {d[1][1]:+.3f})")
                    elif d and d[1][0] <= 0:
                        level.append(f"{sc} at {where}")
            if better:
                out.append(f"Pot {pot}: baselines better than InfiniPot, the paired 95% interval below 0: "
                           + "; ".join(better) + ". This contradicts Table 1. Likely reason: the catalyst prompt means "
                           "little to a story model never trained on instructions, so CaP's attention is a weak "
                           "importance signal.")
            if level:
                out.append(f"Pot {pot}: not distinguishable from InfiniPot (paired interval spans 0): "
                           + ", ".join(level) + ".")
        pairs = [(sc, paired_diff(off, on)) for sc in SCORERS_SHOWN
                 for on, off in [(_pot_run(runs, pot, sc), _pot_off(runs, pot, sc))] if on and off]
        better_off = [sc for sc, d in pairs if d and d[1][1] < 0]
        if better_off:
            out.append(f"Pot {pot}: CR-RoPE off is better for {len(better_off)} of {len(pairs)} scorers "
                       f"({', '.join(better_off)}; intervals below 0 in the ablation table), contrary to Table 3. "
                       "Likely reason: these stories stay inside the 512-token context, so positions never leave the "
                       "trained range and CR-RoPE only compacts them; infinipot_long_pot tests inputs beyond it.")
        unb = [r for r in runs if r.get("task.prefill") == "full" and budget_of(r) == pot]
        if ip and unb:
            out.append(f"Pot {pot}: InfiniPot minus the full prefill followed by {unb[0].method} (unbounded, compressed "
                       f"to {pot}): {_vs(ip, unb[0])}.")
    return out


@layout("infinipot_long_pot")
def infinipot_long(p: Plan, figures: Path) -> Section:
    runs = p.done
    cis = {id(r): ppl_interval(r) for r in runs}
    cols = ["sequence tokens", "pot M", "scorer", "CR-RoPE", "ppl (95% interval)", "cache KiB", "InfiniPot paper"]
    rows, notes_d = [], []
    lengths = list(dict.fromkeys(r.get("task.concat_tokens") for r in runs))
    for n in lengths:
        for r in [r for r in runs if r.get("task.concat_tokens") == n]:
            cr = "–" if r.method != "infinipot" else ("on" if r.get("method.cr_rope") else "off")
            rows.append([fmt(n), fmt(r.get("method.budget")), label(r, _scorer(r)), cr,
                         with_ci(r.metrics["ppl"], cis[id(r)]), kib(r.metrics.get("cache_bytes_peak")), PAPER_MISSING])
        for sc in dict.fromkeys(r.get("method.scorer") for r in runs if r.method == "infinipot"):
            by = {r.get("method.cr_rope"): r for r in runs if r.method == "infinipot"
                  and r.get("task.concat_tokens") == n and r.get("method.scorer") == sc}
            if True in by and False in by:
                notes_d.append(f"{n} tokens, {sc}: CR-RoPE off minus on {_vs(by[False], by[True])}")
    task = runs[0].cfg["task"]
    notes = [mode_note(runs),
             f"Every token from position {task.get('score_from')} on is scored, beyond the model's context: with "
             "CR-RoPE the pot's rotary positions stay below M; without it (and for the full cache) positions grow "
             "with the input, past the range the model was trained on.",
             CI_NOTE.format(what=f"over the {task.get('limit')} sequences", n=BOOT).split(" ≈:")[0],
             "Perplexity differences (paired over the same sequences, 95%): " + "; ".join(notes_d) + "."
             if notes_d else "",
             f"InfiniPot paper column: {PAPER_MISSING}. The paper (arXiv 2410.01518) reports CR-RoPE's effect with "
             "its own tasks, not perplexity; no text of those results could be retrieved here."]
    heading = cpu_prefix(p, f"InfiniPot's CR-RoPE beyond the context: {_one(model_name(r) for r in runs)}, "
                            f"{_one(data_name(r) for r in runs)} sequences of "
                            f"{' and '.join(str(n) for n in lengths)} tokens scored from position "
                            f"{task.get('score_from')}, a {_one(str(r.get('method.budget')) for r in runs if r.method == 'infinipot')}-token pot")
    claim = ("InfiniPot claims CR-RoPE lets a pot take inputs far beyond the model's context (its positions stay inside "
             "the trained range).")
    title = f"Perplexity beyond the context, CR-RoPE on and off ({p.runs[0].model})"
    return Section(p.scale, p.runs[0].model, Table(title, cols, rows, [n for n in notes if n]), [], [], heading, claim)


def compression(run: Run, full: Run | None) -> float | None:
    """Full-cache bytes for the same tokens over the bytes the run held on the compute device (`compression_bytes`),
    else the full run's bytes over this one's; for runs made before bytes were reported, the method's own ratio."""
    m = run.metrics
    if isinstance(m.get("compression_bytes"), (int, float)):
        return float(m["compression_bytes"])
    if full is not None and m.get("cache_bytes_peak") and "compression_bits" in m:
        return full.metrics["cache_bytes_peak"] / m["cache_bytes_peak"]
    for key in ("compression_ratio", "compression"):
        if isinstance(m.get(key), (int, float)):
            return float(m[key])
    if full is not None and m.get("cache_bytes_peak"):
        return full.metrics["cache_bytes_peak"] / m["cache_bytes_peak"]
    return None


def compression_bits(run: Run) -> float | None:
    """16 bits over the average bits per element held, as the QAQ paper counts them."""
    v = run.metrics.get("compression_bits")
    return float(v) if isinstance(v, (int, float)) else None


def setting(run: Run) -> str:
    """The method's swept fields, e.g. `bits=4` or `key_error=0.1 value_error=0.1`."""
    keys = [c.split("=", 1)[0].lstrip("+~") for c in run.cell]
    def show(v):
        return f"{v:g}" if isinstance(v, float) else fmt(v)

    return " ".join(f"{k.split('.', 1)[1]}={show(run.get(k))}" for k in keys if k.startswith("method.")) or "–"


def accuracy_key(run: Run) -> str:
    """The run's accuracy metric: `acc` (perplexity runs: next-token accuracy), or an lm-eval task's
    `<task>/acc` (harness runs)."""
    for key in ("acc", "acc_norm", "exact"):
        if isinstance(run.metrics.get(key), (int, float)):
            return key
    for task in run.cfg["task"].get("tasks") or []:
        for metric in ("acc", "acc_norm"):
            if isinstance(run.metrics.get(f"{task}/{metric}"), (int, float)):
                return f"{task}/{metric}"
    raise KeyError(f"no accuracy metric in {run.run_dir}/metrics.json")


# QAQ Table 1 (LLaMA-2-7B, compression at <1% accuracy drop) reports these tasks; no source text holding its values
# could be retrieved (the abstract says "up to 10x"), so the column says PAPER_MISSING on them.
QAQ_PAPER_TASKS = ("hellaswag", "piqa", "mathqa")
QAQ_PAPER_NOTE = (
    f"QAQ paper column: {PAPER_MISSING}. The values are in Table 1 of arXiv 2403.04643 (LLaMA-2-7B on HellaSwag, "
    "PIQA and MathQA, compression at <1% accuracy drop); no source text holding them could be retrieved here. Its "
    "abstract reports \"up to 10x the compression ratio of the KV cache size with a neglectable impact on model "
    "performance\".")
MAX_DROP = 0.01  # relative: (acc_full - acc) / acc_full < 1%
BOOTSTRAP = 2000  # resamples of the paired per-token accuracy difference (95% interval)
RANDOM_MODELS = ("random",)  # random weights: byte columns only, no accuracy


def _token_hits(run: Run) -> dict[tuple, str] | None:
    out = {}
    for o in run.outputs():
        if "hits" not in o:
            return None
        out[(o["begin"], o["end"])] = o["hits"]
    return out or None


def _doc_scores(run: Run, key: str) -> dict[tuple, str] | None:
    """A harness run's per-document score of `key` (`<task>/<metric>`), as one-unit strings like _token_hits'."""
    task, metric = key.split("/", 1)
    out = {(o["task"], o["doc_id"]): str(int(o[metric])) for o in run.outputs()
           if o.get("task") == task and isinstance(o.get(metric), (int, float))}
    return out or None


def delta_interval(run: Run, full: Run | None, key: str = "acc") -> tuple[float, float] | None:
    """95% interval (points) of run acc - full acc by a paired bootstrap (fixed seed) over the scored tokens, or over
    the documents for a harness metric (`<task>/acc`)."""
    import numpy as np

    if full is None or run is full:
        return None
    units = (lambda r: _doc_scores(r, key)) if "/" in key else _token_hits
    a, b = units(run), units(full)
    if a is None or b is None or set(a) != set(b):
        return None
    keys = sorted(a)
    d = np.array([int(x) - int(y) for k in keys for x, y in zip(a[k], b[k])], dtype=np.float64)
    if d.size == 0:
        return None
    idx = np.random.default_rng(0).integers(0, d.size, size=(BOOTSTRAP, d.size))
    means = d[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return 100 * float(lo), 100 * float(hi)


def _delta_text(run: Run, full: Run | None, key: str) -> str:
    if full is None:
        return "–"
    drop = 100 * (run.metrics[key] - full.metrics[key])
    ci = delta_interval(run, full, key)
    return f"{drop:+.2f}" + ("" if ci is None else f" [{ci[0]:+.2f}, {ci[1]:+.2f}]")


def _best_under_drop(runs: list[Run], full: Run, key: str) -> tuple[float | None, Run | None]:
    best, arg = None, None
    for r in runs:
        c = compression(r, full)
        ref = full.metrics[key]
        rel_drop = (ref - r.metrics[key]) / ref if ref else 0.0
        if c is not None and rel_drop < MAX_DROP and (best is None or c > best):
            best, arg = c, r
    return best, arg


def _byte_cells(r: Run, full: Run | None) -> list[str]:
    m = r.metrics
    return [ratio(compression(r, full)), ratio(compression_bits(r)), kib(m.get("cache_bytes_peak")),
            kib(m.get("cache_offload_bytes"))]


BYTE_COLS = ["compression (bytes)", "compression (bits)", "device KiB", "offloaded KiB"]
BYTE_NOTE = ("Compression (bytes): the bytes a full cache holds for the same tokens over the bytes this cache held "
             "on the compute device at its peak (codes, zero points and scales, outliers with their indices, "
             "per-row widths and outlier counts, the full-precision residual window). Compression (bits): 16 over the "
             "average bits per element, as the QAQ paper counts them (codes at their width, 16-bit zero/scale per "
             "group, outliers at 16 bits plus their index, full-precision elements at 16 bits), at the end of each "
             "window. Device KiB: the peak of those bytes; offloaded KiB: QAQ's full-precision copy held off the "
             "compute device (CPU), for re-quantization.")
CI_NOTE = ("Δacc: accuracy minus the full cache's, in points, with its 95% interval from a paired bootstrap over the "
           f"scored tokens ({BOOTSTRAP} resamples); a difference inside the interval of zero is noise.")


HARNESS_BYTE_NOTE = ("Compression (bytes): the full cache's peak bytes over this cache's, both at the longest request "
                     "(each context through the cache, then an ending scored over it: the ending's tokens are held "
                     "in full precision beside the compressed context); no bit accounting (–). Device KiB: that "
                     "peak.")
CI_NOTE_DOCS = ("Δacc: accuracy minus the full cache's, in points, with its 95% interval from a paired bootstrap over "
                f"the documents ({BOOTSTRAP} resamples); a difference inside the interval of zero is noise.")


def _notes_for(runs: list[Run]) -> list[str]:
    """The byte and interval notes: perplexity runs (tokens) or harness runs (documents)."""
    if runs and all(r.cfg["task"].get("type") == "harness" for r in runs):
        return [HARNESS_BYTE_NOTE, CI_NOTE_DOCS]
    return [BYTE_NOTE, CI_NOTE]


def _quality_runs(runs: list[Run]) -> list[Run]:
    return [r for r in runs if r.model not in RANDOM_MODELS]


def _qaq_detail(p: Plan, runs: list[Run], tasks: list[str]) -> Table:
    cols = ["task", "method", "setting"] + BYTE_COLS + ["acc", "Δacc (points) [95%]", "ppl"]
    rows = []
    for t in tasks:
        trs = [r for r in runs if r.cfg["task"]["name"] == t]
        full = _full(trs)
        for r in trs:
            key = accuracy_key(r)
            rows.append([t, r.method, setting(r)] + _byte_cells(r, full)
                        + [fmt(r.metrics[key], 4), _delta_text(r, full, key), fmt(r.metrics.get("ppl"))])
    return Table(f"Every run ({runs[0].model})" if runs else "Every run", cols, rows, _notes_for(runs))


REVIEW_HD128 = {("uniform", "bits=4"): 3.74, ("uniform", "bits=2"): 7.03, ("qaq", "min_bits=2 max_bits=2"): 6.15}


def _bits_cell(r: Run) -> str:
    k, v = r.metrics.get("avg_key_bits"), r.metrics.get("avg_value_bits")
    return "–" if k is None or v is None else f"{k:.2f} / {v:.2f}"


def _byte_table(runs: list[Run]) -> Table | None:
    """Bytes at a paper-sized head (random weights: no accuracy)."""
    rnd = [r for r in runs if r.model in RANDOM_MODELS]
    if not rnd:
        return None
    full = _full(rnd)
    m = rnd[0].cfg["model"]
    geo = (f"head_dim {m['hidden_size'] // m['num_heads']}, {m['num_kv_heads']} KV heads, {m['num_layers']} layers, "
           f"{m['dtype']}, {rnd[0].cfg['task']['max_tokens'] - 1} tokens")
    rows = [[r.method, setting(r)] + _byte_cells(r, full)
            + [_bits_cell(r), ratio(REVIEW_HD128.get((r.method, setting(r))))] for r in rnd]
    notes = [f"A random Llama ({geo}): its accuracy means nothing and is not reported. Key/value bits: the average "
             "code width of the quantized keys and values. Review: the compression (bytes) an independent review "
             "measured at head_dim 128 and 512 tokens. KIVI holds its residual in full precision (up to 127 keys and "
             "128 values of these 512 tokens). QAQ's widths follow the model's attention and key/value statistics: "
             "on random weights its 0..2-bit range settles at 0 bits, so that row shows what the store holds then, "
             "not a ratio QAQ reaches on a trained model."]
    return Table(f"Bytes at head_dim 128 ({rnd[0].model}, random weights)",
                 ["method", "setting"] + BYTE_COLS + ["key / value bits", "review (bytes)"], rows, notes)


def _tasks(runs: list[Run]) -> list[str]:
    out = []
    for r in runs:
        if r.cfg["task"]["name"] not in out:
            out.append(r.cfg["task"]["name"])
    return out


@layout("qaq_table1")
@layout("qaq_hellaswag")
def qaq_table1(p: Plan, figures: Path) -> Section:
    allruns = p.done
    runs = _quality_runs(allruns)
    model = runs[0].model
    tasks = _tasks(runs)
    families = [m for m in dict.fromkeys(r.method for r in runs) if m != "full"]
    cols = ["task", "acc (full)", "method", "best setting"] + BYTE_COLS + ["Δacc (points) [95%]",
                                                                         "QAQ paper (LLaMA-2-7B)"]
    rows = []
    for t in tasks:
        trs = [r for r in runs if r.cfg["task"]["name"] == t]
        full = _full(trs)
        key = accuracy_key(full)
        for fam in families:
            best, arg = _best_under_drop([r for r in trs if r.method == fam], full, key)
            cells = _byte_cells(arg, full) if arg is not None else ["–"] * len(BYTE_COLS)
            rows.append([t, fmt(full.metrics[key], 4), fam, "–" if arg is None else setting(arg)] + cells
                        + ["–" if arg is None else _delta_text(arg, full, key),
                           PAPER_MISSING if fam == "qaq" and t in QAQ_PAPER_TASKS else "–"])
    notes = [f"Per method, the grid point with the largest compression (bytes) whose accuracy drops less than "
             f"{100 * MAX_DROP:.0f}% relative to the full cache's (the paper's criterion, on the point estimate; – "
             "where none does).", *_notes_for(runs), mode_note(runs), QAQ_PAPER_NOTE]
    if p.scale != "gpu" and not any(t in QAQ_PAPER_TASKS for t in tasks):
        notes.append("The paper reports none of this scale's tasks (–): it runs a different model and task, so "
                     "compare trends, not values.")
    elif p.scale != "gpu":
        notes.append(f"This scale runs {model}, not the paper's LLaMA-2-7B: compare trends, not values.")
    figs = []
    for t in tasks:
        trs = [r for r in runs if r.cfg["task"]["name"] == t]
        full = _full(trs)
        key = accuracy_key(full)
        series = {}
        for r in trs:
            if r.method != "full" and r.metrics.get("cache_bytes_peak"):
                series.setdefault(r.method, []).append((r.metrics["cache_bytes_peak"] / 1024, r.metrics[key]))
        path = figure_path(figures, p, f"pareto_{t}")
        plot_pareto(series, path, f"{p.experiment} ({p.scale}, {model}, {t})", key,
                    full.metrics[key], higher_is_better=True)
        figs.append((f"{key} versus measured cache ({t})", path))
    main = Table(f"Compression at <{100 * MAX_DROP:.0f}% accuracy drop ({model})", cols, rows, notes)
    extra = [_qaq_detail(p, runs, tasks)]
    bt = _byte_table(allruns)
    if bt is not None:
        extra.append(bt)
    return Section(p.scale, model, main, extra, figs)


@layout("qaq_table2")
def qaq_table2(p: Plan, figures: Path) -> Section:
    runs = _quality_runs(p.done)
    tasks = _tasks(runs)
    variants = []
    for r in runs:
        if r.method == "full":
            continue
        v = (r.get("method.outliers"), r.get("method.attn_window"))
        if v not in variants:
            variants.append(v)
    cols = ["outliers", "attention window"]
    for t in tasks:
        cols += [f"{t} max compression (bytes)", f"{t} compression (bits)", f"{t} Δacc (points) [95%]"]
    rows = []
    for out, win in variants:
        row = [fmt(out), fmt(win)]
        for t in tasks:
            trs = [r for r in runs if r.cfg["task"]["name"] == t]
            full = _full(trs)
            key = accuracy_key(full)
            sel = [r for r in trs if r.method != "full" and (r.get("method.outliers"), r.get("method.attn_window"))
                   == (out, win)]
            best, arg = _best_under_drop(sel, full, key)
            row += [ratio(best), "–" if arg is None else ratio(compression_bits(arg)),
                    "–" if arg is None else _delta_text(arg, full, key)]
        rows.append(row)
    notes = [f"Max compression (bytes) at <{100 * MAX_DROP:.0f}% accuracy drop over the error-target grid, per "
             "ablation (outliers: share of the elements kept exact over the whole cache, 0 = none; attention window "
             "n: importance = max of the last n attention weights); the bits column and Δacc are that run's.",
             BYTE_NOTE, CI_NOTE, mode_note(runs),
             f"QAQ paper: {PAPER_MISSING}. Its ablation values (outliers and attention window, LLaMA-2-7B) are in "
             "arXiv 2403.04643; no source text holding them could be retrieved here, and the paper reports none of "
             "this scale's tasks."]
    main = Table(f"QAQ ablation: outliers and attention window ({runs[0].model})", cols, rows, notes)
    return Section(p.scale, runs[0].model, main, [_qaq_detail(p, runs, tasks)], [])


def _point_scores(r: Run, metric: str) -> list[float]:
    return [float(o[metric]) for o in r.outputs() if isinstance(o.get(metric), (int, float))]


@layout("needle_grid")
def needle_grid(p: Plan, figures: Path) -> Section:
    runs = p.done
    metric = runs[0].cfg["task"].get("heatmap_metric", "rougeL")
    cols = ["method", "budget", "exact (95% interval)", f"mean {metric} (95% interval)", "cache KiB"]
    rows, maps = [], []
    for r in runs:
        b = budget_of(r)
        rows.append([label(r, r.method), fmt(b),
                     with_ci(r.metrics.get("exact"), mean_interval(_point_scores(r, "exact"))),
                     with_ci(r.metrics.get(metric), mean_interval(_point_scores(r, metric))),
                     kib(r.metrics.get("cache_bytes_peak"))])
        grid = {(o["context_length"], float(o["depth"])): float(o[metric]) for o in r.outputs()}
        lengths = sorted({k[0] for k in grid})
        depths = sorted({k[1] for k in grid})
        maps.append((f"{r.method}" + ("" if b is None else f" {b}"), lengths, depths, grid))
    path = figure_path(figures, p, "heatmaps")
    plot_heatmaps(maps, path, f"{p.experiment} ({p.scale}, {p.runs[0].model}, {runs[0].mode})", metric)
    chunk = runs[0].cfg["task"].get("chunk_size")
    prefill = ("the whole prompt in one forward, evicted down to the budget afterwards" if not chunk
               else f"the prompt in chunks of {chunk} tokens")
    task = runs[0].cfg["task"]
    full = _full(runs)
    notes = [mode_note(runs), f"cache KiB: measured peak, prefill included ({prefill}).",
             "Parentheses: 95% bootstrap interval over the grid points (seed 0)."]
    if full is not None and not full.metrics.get("exact"):
        notes.append(f"The full cache retrieves no needle (exact {fmt(full.metrics.get('exact'))}): this model cannot "
                     f"do the task, so these rows test the pipeline, not retrieval; {metric} is word overlap with the "
                     "answer (stop words included), not evidence of retrieval.")
    lengths = task.get("context_lengths") or []
    heading = cpu_prefix(p, f"the needle-in-a-haystack grid: {_one(model_name(r) for r in runs)}, "
                            f"{_one(data_name(r) for r in runs)} haystacks of {min(lengths)}-{max(lengths)} tokens, "
                            f"budget {_one(str(budget_of(r)) for r in runs if r.method != 'full')}")
    claim = "Eviction methods at one budget against the full cache on needle retrieval (no single paper's table)."
    main = Table(f"Needle in a haystack ({p.runs[0].model})", cols, rows, notes)
    return Section(p.scale, p.runs[0].model, main, [], [(f"{metric} by context length and depth", path)], heading,
                   claim)


def _pipeline_paper_note(needle: bool) -> str:
    what = "needle" if needle else "LongBench"
    return (f"InfiniPot paper column: {PAPER_MISSING}. The paper's {what} results (arXiv 2410.01518) could not be "
            "retrieved here as text; this scale runs a story model on fixture examples: compare nothing but the "
            "pipeline.")


def infinipot_pipeline(p: Plan, figures: Path) -> Section:
    """InfiniPot's needle or LongBench runs at cpu scale: the generic catalyst versus CaP-Q, beside the full cache."""
    runs = p.done
    task = runs[0].cfg["task"]
    needle = task.get("type") == "needle"
    metric = "exact" if needle else "average"
    per = "exact" if needle else "score"
    score = "exact (95% interval)" if needle else "mean example score, 0-1 (95% interval)"
    cols = ["method", "pot M", "catalyst", score, "rougeL" if needle else "LongBench average, 0-100", "cache KiB",
            "InfiniPot paper"]
    rows = []
    for r in runs:
        cat = "–" if r.method != "infinipot" else ("question (CaP-Q)" if r.get("method.cap_question") else "prompt")
        pts = _point_scores(r, per)
        value = r.metrics.get(metric) if needle else (sum(pts) / len(pts) if pts else None)
        row = [label(r, r.method), fmt(r.get("method.budget")), cat, with_ci(value, mean_interval(pts)),
               fmt(r.metrics.get("rougeL") if needle else r.metrics.get("average"))]
        # the paper's LongBench average of InfiniPot with the generic catalyst in a 4K pot (LLaMA-3-8B-Instruct)
        paper = (infinipot_paper("cap_nuc") if p.experiment == "infinipot_longbench_4k" and cat == "prompt"
                 else PAPER_MISSING)
        rows.append(row + [kib(r.metrics.get("cache_bytes_peak")), paper])
    if needle:
        lengths = task.get("context_lengths") or []
        data = f"{_one(data_name(r) for r in runs)} haystacks of {min(lengths)}-{max(lengths)} tokens"
        what = "InfiniPot's needle test"
        claim = ("InfiniPot claims the pot retrieves needles from haystacks far beyond the context; this model retrieves "
                 "none even with the full cache, so the rows check the pipeline beyond the context and CaP-Q, not "
                 "the claim.")
    else:
        n = sum(1 for _ in runs[0].outputs())
        data = f"{n} LongBench-format fixture examples (tests/fixtures/longbench)"
        what = "InfiniPot's LongBench comparison"
        claim = ("InfiniPot's LongBench comparison (Table 1) with the generic catalyst and with the question as catalyst "
                 "(CaP-Q); on a handful of fixture examples and a story model the scores are noise: the rows check the "
                 "pipeline.")
    heading = cpu_prefix(p, f"{what}: {_one(model_name(r) for r in runs)}, {data}, a "
                            f"{_one(str(r.get('method.budget')) for r in runs if r.method == 'infinipot')}-token pot")
    notes = [mode_note(runs), "Parentheses: 95% bootstrap interval over the examples or grid points (seed 0).",
             "The full cache's positions pass the model's context where the input is longer than it.",
             _pipeline_paper_note(needle)]
    title = f"{'Needle retrieval' if needle else 'LongBench score'}: catalyst prompt versus CaP-Q ({p.runs[0].model})"
    return Section(p.scale, p.runs[0].model, Table(title, cols, rows, notes), [], [], heading, claim)


for _name in ("infinipot_needle_2k", "infinipot_needle_4k", "infinipot_longbench_2k", "infinipot_longbench_4k"):
    LAYOUTS[_name] = infinipot_pipeline

# experiments whose runs at a scale another table already shows: no table of their own there
COVERED = {("less_llama2_13b", "cpu"): "less_llama2_7b (the cpu variant of both is one grid)",
           **{(f"infinipot_table3_{v}", "cpu"): "infinipot_tinystories_pot (one row each of its Table 3 ablation)"
              for v in ("cap", "no_cap_nuc", "no_cr_rope", "nuc", "nuc25", "nuc50", "nuc75")}}


def generic(p: Plan, figures: Path) -> Section:
    """One row per run: the swept keys, then the numeric metrics all runs share (timings left out)."""
    runs = p.done
    keys = []
    for r in runs:
        for c in r.cell:
            k = c.split("=", 1)[0]
            if k not in keys:
                keys.append(k)
    shared = None
    for r in runs:
        nums = [k for k, v in r.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and k not in VOLATILE]
        shared = nums if shared is None else [k for k in shared if k in nums]
    shared = sorted(shared or [])
    cols = ["model", "method", "mode"] + [k for k in keys if k not in ("method", "task.mode")] + shared
    rows = []
    for r in runs:
        vals = dict(c.split("=", 1) for c in r.cell)
        rows.append([r.model, r.method, r.mode] + [vals.get(k, "–") for k in keys if k not in ("method", "task.mode")]
                    + [fmt(r.metrics[k], 4) if isinstance(r.metrics[k], float) else fmt(r.metrics[k]) for k in shared])
    return Section(p.scale, p.runs[0].model, Table(f"{p.experiment} ({p.runs[0].model})", cols, rows,
                                                   [mode_note(runs)]))


# ---------------------------------------------------------------------------------------------------------------------
def describe(experiment: str) -> list[str]:
    """The experiment file's leading comment, up to its first command line or a line ending in a colon."""
    lines = []
    for line in (CONFIGS / "experiment" / f"{experiment}.yaml").read_text(encoding="utf-8").splitlines():
        if line.startswith("# @package"):
            continue
        text = line[1:].strip() if line.startswith("#") else None
        if not text or text.startswith(("python ", "make ")):
            break
        lines.append(text.rstrip(":"))
        if text.endswith(":"):
            break
    return [" ".join(lines)] if lines else []


def _link(path: Path, tables: Path) -> str:
    """A figure's path as seen from the tables folder (relative when both sit under one results folder)."""
    if path.is_relative_to(tables.parent):
        return (Path("..") / path.relative_to(tables.parent)).as_posix()
    return path.as_posix()


def write(experiment: str, sections: list[Section], plans: list[Plan], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    first = sections[0].heading or f"{experiment} ({sections[0].model})"
    md = [f"# {first}", "", f"Experiment `{experiment}` (configs/experiment/{experiment}.yaml)."]
    gpu_only_text = describe(experiment)
    for s, p in zip(sections, plans):
        then = "make tables" if p.command.endswith(f"scale={s.scale}") else (
            f"python scripts/aggregate.py --experiment {experiment} --scale {s.scale} "
            + p.command.split(f"scale={s.scale} ", 1)[1])
        md += ["", f"## scale={s.scale} · model {s.model}", ""]
        if len(sections) > 1 and s.heading:
            md += [f"**{s.heading}**", ""]
        if s.claim:
            md += [f"Claim tested: {s.claim}", ""]
        if gpu_only_text:
            which = ("The experiment" if p.same_as else "At gpu scale (the paper's setting, not these rows)")
            md += [f"{which}: {gpu_only_text[0]}", ""]
        md += [f"Reproduce: `{p.command}`, then `{then}`.", ""]
        if p.same_as:
            md += [f"(This experiment has no {'/'.join(p.same_as)} variant: `scale={p.same_as[0]}` runs these same "
                   "runs.)", ""]
        stale = [r for r in p.done if r.stale]
        if stale:
            md += [f"{STALE_MARK} {len(stale)} of {len(p.done)} runs were made from a kvx source other than this "
                   f"checkout's (env.json `kvx_source_digest` differs from {checkout_digest()[:12]}): their rows may "
                   f"not reproduce; `{p.command} force=true` makes them again.", ""]
        md.append(s.main.markdown())
        for t in s.extra:
            md.append(t.markdown())
        for caption, path in s.figures:
            md.append(f"![{caption}]({_link(path, out)})\n")
    md_path = out / f"{experiment}.md"
    md_path.write_text("\n".join(md).rstrip() + "\n", encoding="utf-8")
    cols = ["scale", "model"]
    for s in sections:
        cols += [c for c in s.main.columns if c not in cols]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for s in sections:
        for row in s.main.rows:
            d = dict(zip(s.main.columns, row), scale=s.scale, model=s.model)
            w.writerow([d.get(c, "") for c in cols])
    csv_path = out / f"{experiment}.csv"
    csv_path.write_text(buf.getvalue(), encoding="utf-8")
    return [md_path, csv_path] + [path for s in sections for _, path in s.figures]


def cross_pareto(plans: list[Plan], tables: Path, figures: Path) -> list[Path]:
    """Quality against measured cache bytes for every method of every experiment that evaluates the same thing
    (same scale, model, task settings, seed and mode): one figure per such group that spans two or more experiments
    and methods, and results/tables/pareto.md with the points on each front."""
    groups: dict[str, list[tuple[str, Run]]] = {}
    for p in plans:
        for r in p.done:
            if not isinstance(r.metrics.get("ppl"), (int, float)) or not r.metrics.get("cache_bytes_peak"):
                continue
            task = {k: v for k, v in r.cfg["task"].items() if k != "mode"}
            key = json.dumps([p.scale, r.cfg["model"], task, r.cfg["seed"], r.mode], sort_keys=True)
            members = groups.setdefault(key, [])
            same = [i for i, (_, o) in enumerate(members) if o.run_dir == r.run_dir]
            if same:  # one run, several experiments
                members[same[0]] = (f"{members[same[0]][0]}, {p.experiment}", members[same[0]][1])
            else:
                members.append((p.experiment, r))
    md, written = ["# Pareto view: quality against measured cache, across experiments", ""], []
    for key, members in sorted(groups.items()):
        exps = sorted({x for e, _ in members for x in e.split(", ")})
        if len(exps) < 2 or len({r.method for _, r in members if r.method != "full"}) < 2:
            continue  # one experiment or one method: its own table shows it
        scale, model, task, _, mode = json.loads(key)
        name = f"pareto-{scale}-{model['name']}-{task['name']}-{mode}"
        series: dict[str, list[tuple[float, float]]] = {}
        full = None
        for _, r in members:
            if r.method == "full":
                full = r.metrics["ppl"]
                continue
            series.setdefault(r.method, []).append((r.metrics["cache_bytes_peak"] / 1024, r.metrics["ppl"]))
        path = figures / f"{name}.png"
        plot_pareto(series, path, f"{task['name']} ({scale}, {model['name']}, {mode}): {', '.join(exps)}",
                    "perplexity", full)
        written.append(path)
        front = set(pareto_front([(r.metrics["cache_bytes_peak"] / 1024, r.metrics["ppl"]) for _, r in members]))
        rows = [[r.method, setting(r), e, kib(r.metrics["cache_bytes_peak"]), fmt(r.metrics["ppl"])]
                for e, r in sorted(members, key=lambda m: (m[1].metrics["cache_bytes_peak"], m[1].metrics["ppl"]))
                if (r.metrics["cache_bytes_peak"] / 1024, r.metrics["ppl"]) in front]
        md += [f"## {task['name']} · scale={scale} · model {model['name']} · {mode}", "",
               Table("On the front (no run is both smaller and better)", ["method", "setting", "experiment",
                                                                          "cache KiB", "ppl"], rows).markdown(),
               f"![pareto]({_link(path, tables)})\n"]
    if written:
        tables.mkdir(parents=True, exist_ok=True)
        out = tables / "pareto.md"
        out.write_text("\n".join(md).rstrip() + "\n", encoding="utf-8")
        written.insert(0, out)
    return written


def experiments() -> list[str]:
    return sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


class StaleRuns(SystemExit):
    pass


# headings of the layouts that set none: (what the rows are an analog of, the claim they test)
HEADINGS = {"qaq_table1": ("QAQ Table 1", "QAQ claims a larger KV-cache compression at <1% accuracy drop than uniform "
                                          "or KIVI-style quantization."),
            "qaq_hellaswag": ("QAQ's Table 1 criterion on HellaSwag through the lm-eval harness",
                              "QAQ claims a larger KV-cache compression at <1% accuracy drop than uniform or "
                              "KIVI-style quantization."),
            "qaq_table2": ("QAQ Table 2 (ablation)", "QAQ claims that keeping outliers exact and the attention window "
                                                     "each raise the compression reached at <1% accuracy drop.")}


def fill_heading(name: str, sec: Section, p: Plan) -> None:
    """A heading naming what the rows hold (model, data, window), for layouts that set none."""
    runs = p.done
    if not sec.heading:
        what, claim = HEADINGS.get(name, (name, ""))
        task = runs[0].cfg["task"]
        win = f", {task['window']}-token windows" if task.get("window") else ""
        sec.heading = cpu_prefix(p, f"{what}: {_one(model_name(r) for r in runs)}, "
                                    f"{_one(data_name(r) for r in runs)}{win}")
        sec.claim = sec.claim or claim
    if name == "qaq_table1" and p.scale == "cpu":
        cols = sec.main.columns
        if "qaq max compression" in cols and "kivi max compression" in cols:
            for row in sec.main.rows:
                q, k = (row[cols.index(f"{m} max compression")] for m in ("qaq", "kivi"))
                if q != "–" and k != "–" and float(q.rstrip("×")) < float(k.rstrip("×")):
                    sec.main.notes.append(
                        f"{row[0]}: QAQ reaches {q} where KIVI-style reaches {k}, contrary to the paper. Likely reason: "
                        f"{runs[0].model}'s heads are tiny (head_dim 8 for stories260k), so QAQ's per-token "
                        "quantization parameters and exact outliers cost about as much as the codes they describe, "
                        "which a 128-dimensional head amortizes.")


def aggregate(names: list[str] | None, scales: list[str] | None, results: Path, tables: Path, figures: Path,
              extra: list[str] = (), pareto: bool | None = None, strict: bool = False) -> dict[str, list[Path]]:
    """Build the tables; raise MissingRuns naming the missing runs of any table partly run, of a scale asked for by
    name that has none, or of an experiment asked for by name that has none at any scale. Rows of runs made from
    another kvx source than this checkout's are marked; with `strict` they are refused (StaleRuns)."""
    written, problems, all_plans = {}, [], []
    for name in names or experiments():
        if not (CONFIGS / "experiment" / f"{name}.yaml").is_file():
            raise SystemExit(f"aggregate: no experiment {name!r} in configs/experiment (known: {', '.join(experiments())})")
        plans = []
        for scale in scales or SCALES:
            if (name, scale) in COVERED:
                print(f"[aggregate] {name}: scale={scale} has no table of its own (shown in {COVERED[name, scale]})")
                continue
            if not scales and not any((results / f).is_dir() for f in folders(name, scale, tuple(extra))):
                continue  # nothing of this experiment at this scale (and the scale was not asked for)
            p = plan(name, scale, results, list(extra))
            if not p.done and not scales:
                continue
            if p.missing:
                lines = [f"  {' '.join(r.cell) or '(the single run)'}  ->  {r.run_dir}" for r in p.missing]
                problems.append(f"{name} (scale={scale}): {len(p.missing)} of {len(p.runs)} runs missing; make "
                                f"them with `{p.command}`:\n" + "\n".join(lines))
                continue
            stale = [r for r in p.done if r.stale]
            if strict and stale:
                raise StaleRuns(f"aggregate: {name} (scale={scale}): {len(stale)} runs made from another kvx source "
                                f"than this checkout's, e.g. {stale[0].run_dir}; make them again with "
                                f"`{p.command} force=true`")
            twin = [q for q in plans if [r.run_dir for r in q.runs] == [r.run_dir for r in p.runs]]
            if twin:  # no variant for one of the scales: one section, under the later scale (cpu)
                plans.remove(twin[0])
                p.same_as = [*twin[0].same_as, twin[0].scale]
            plans.append(p)
        if not plans:
            if names and not problems:
                problems.append(f"{name}: no runs at any scale; make them with `python run.py experiment={name} "
                                "scale=cpu` (or at gpu scale)")
            continue
        all_plans += plans
        fn = LAYOUTS.get(name, generic)
        sections = [fn(p, figures) for p in plans]
        for sec, p in zip(sections, plans):
            fill_heading(name, sec, p)
        written[name] = write(name, sections, plans, tables)
        print(f"[aggregate] {name}: " + ", ".join(f"scale={p.scale} ({len(p.runs)} runs)" for p in plans))
    if problems:
        raise MissingRuns("aggregate: tables with missing runs\n" + "\n".join(problems))
    if pareto or (pareto is None and names is None):  # the cross-experiment view needs every table
        written["pareto"] = cross_pareto(all_plans, tables, figures)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--experiment", action="append", help="experiment name (repeatable; default: all)")
    ap.add_argument("--scale", action="append", choices=SCALES, help="scale (repeatable; default: all)")
    ap.add_argument("--results", type=Path, default=REPO / "results", help="the results_dir of the runs")
    ap.add_argument("--tables", type=Path, default=None, help="default: <results>/tables")
    ap.add_argument("--figures", type=Path, default=None, help="default: <results>/figures")
    ap.add_argument("--strict", action="store_true",
                    help="refuse runs made from another kvx source than this checkout's (default: mark their rows)")
    ap.add_argument("overrides", nargs="*", help="overrides the runs were made with (e.g. task.max_tokens=600)")
    a = ap.parse_args(argv)
    tables = a.tables or a.results / "tables"
    figures = a.figures or a.results / "figures"
    aggregate(a.experiment, a.scale, a.results, tables, figures, a.overrides, strict=a.strict)
    return 0


if __name__ == "__main__":
    sys.exit(main())
