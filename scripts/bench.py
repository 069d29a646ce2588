"""Decode throughput and memory of kvx's engine, per method, against transformers' `model.generate`.

For every batch size and context length of the grid (configs/bench.yaml), each system (transformers'
model.generate with its own DynamicCache, then kvx's Engine.generate for each method) generates `new_tokens`
greedy tokens after a prompt of random token ids. Per run it records
    prefill_s        time from the call to the prompt's logits (kvx: chunked prefill; transformers: one forward)
    decode_s_tok     time of one decode step (forward + token pick), from per-step timestamps after the prefill
    tok_s            batch / decode_s_tok: generated tokens per second in decode
    cache_bytes      bytes of the cache held at the end (kvx: cache.nbytes(), transformers: its key/value tensors)
    cache_peak       kvx: cache.peak_bytes (the most the cache held at any point, the step's new tokens included)
    peak_mem         growth of the process' memory during the run: CUDA max_memory_allocated, or on CPU the
                     peak resident set (VmHWM, reset through /proc/self/clear_refs before each run)
After `warmup` untimed runs per system and grid point, `repeats` timed sweeps of the whole grid follow (systems
interleaved within each point) and the median of each quantity over the sweeps is kept. Ratios are always of numbers
measured in this same run.

Writes <out_dir>/bench.md (the command on top), bench.json, time_per_token.png and cache_bytes.png.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kvx import kernels  # noqa: E402
from kvx.engine import Engine  # noqa: E402
from kvx.errors import ConfigError  # noqa: E402
from kvx.models import ModelConfig, load_model  # noqa: E402
from kvx.registry import METHODS  # noqa: E402

HF = "transformers"
METRICS = ("prefill_s", "decode_s_tok", "tok_s", "cache_bytes", "cache_peak", "peak_mem")


# --- measurement helpers ----------------------------------------------------------------------------------------
class PeakMemory:
    """Growth of process memory over a region: CUDA allocator peak, or the CPU resident-set high-water mark."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu_ok = device.type == "cpu" and os.path.exists("/proc/self/clear_refs")

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif self.cpu_ok:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current resident set
            except OSError:
                self.cpu_ok = False
            self.base = self._status("VmRSS")
        self.peak = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.cpu_ok:
            self.peak = max(0, self._status("VmHWM") - self.base)
        return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StampStreamer:
    """A transformers streamer that only records when each put() happens (prompt first, then every new token)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps: list[float] = []

    def put(self, value) -> None:
        sync(self.device)
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_transformers(model, ids: torch.Tensor, new_tokens: int, device: torch.device) -> dict:
    streamer = StampStreamer(device)
    with PeakMemory(device) as mem:
        sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, use_cache=True, streamer=streamer, return_dict_in_generate=True, pad_token_id=0,
            )
    st = streamer.stamps  # [prompt, token 1 (after prefill), token 2, ..., token n]
    assert out.sequences.shape[1] == ids.shape[1] + new_tokens and len(st) == new_tokens + 1
    cache = out.cache
    cbytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    dec = (st[-1] - st[1]) / (new_tokens - 1)
    return {"prefill_s": st[1] - t0, "decode_s_tok": dec, "tok_s": ids.shape[0] / dec, "cache_bytes": cbytes,
            "cache_peak": None, "peak_mem": mem.peak}


def run_kvx(engine: Engine, ids: torch.Tensor, new_tokens: int, chunk: int, device: torch.device) -> dict:
    stamps: list[float] = []
    marks: dict[str, float] = {}
    prefill = engine.prefill

    def timed_prefill(*a, **kw):
        out = prefill(*a, **kw)
        sync(device)
        marks["prefill_end"] = time.perf_counter()
        return out

    def on_step(cache) -> None:
        sync(device)
        stamps.append(time.perf_counter())

    engine.prefill = timed_prefill  # instance attribute: generate() calls it through self
    try:
        with PeakMemory(device) as mem:
            sync(device)
            t0 = time.perf_counter()
            gen = engine.generate(ids, max_new_tokens=new_tokens, eos_token_id=[], chunk_size=chunk, on_step=on_step)
    finally:
        del engine.prefill
    assert all(len(t) == new_tokens for t in gen.tokens) and len(stamps) == new_tokens
    dec = (stamps[-1] - marks["prefill_end"]) / len(stamps)
    return {"prefill_s": marks["prefill_end"] - t0, "decode_s_tok": dec, "tok_s": ids.shape[0] / dec,
            "cache_bytes": gen.cache.nbytes(), "cache_peak": gen.cache.peak_bytes, "peak_mem": mem.peak}


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# --- configuration ----------------------------------------------------------------------------------------------
def build_methods(cfg: DictConfig) -> tuple[list, list[str]]:
    methods, skipped = [], []
    for entry in cfg.methods:
        fields = dict(OmegaConf.to_container(entry, resolve=True))
        name = fields.get("name")
        if name not in METHODS:
            skipped.append(str(name))
            continue
        cls = METHODS.get(name)
        names = {f.name for f in dataclasses.fields(cls)}
        if "budget" in names and "budget" not in fields:
            fields["budget"] = cfg.budget
        unknown = set(fields) - names
        if unknown:
            raise ConfigError(f"methods.{name}", f"unknown field(s) {sorted(unknown)}; allowed: {sorted(names)}")
        m = cls(**fields)
        m.validate()
        methods.append(m)
    if not methods:
        raise ConfigError("methods", "no registered method to benchmark")
    return methods, skipped


def label(method) -> str:
    budget = getattr(method, "budget", None)
    return method.name if budget is None else f"{method.name}@{budget:g}"


def pick_grid(cfg: DictConfig, device: torch.device) -> DictConfig:
    name = cfg.grid if cfg.grid != "auto" else ("cuda" if device.type == "cuda" else "cpu")
    if name not in cfg.grids:
        raise ConfigError("grid", f"unknown grid {name!r}; defined: {', '.join(cfg.grids)}")
    return cfg.grids[name]


# --- the benchmark ----------------------------------------------------------------------------------------------
def measure(cfg: DictConfig) -> dict:
    torch.set_num_threads(int(cfg.threads))
    kernels.set_backend(cfg.kernels)
    mcfg = ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True))
    model, tok = load_model(mcfg)
    device = next(model.parameters()).device
    grid = pick_grid(cfg, device)
    methods, skipped = build_methods(cfg)
    engines = {label(m): Engine(model, tok, m) for m in methods}
    systems = ([HF] if cfg.baseline else []) + list(engines)
    for name in skipped:
        print(f"[bench] method {name!r} is not registered: skipped", flush=True)
    gen = torch.Generator().manual_seed(int(cfg.seed))
    points = []  # (B, T, prompt ids)
    for B in grid.batch_sizes:
        for T in grid.contexts:
            if B * T > grid.max_tokens:
                print(f"[bench] B={B} T={T}: above max_tokens={grid.max_tokens}, skipped", flush=True)
                continue
            points.append((B, T, torch.randint(3, mcfg.vocab_size, (B, T), generator=gen).to(device)))

    def once(system, ids):
        if system == HF:
            return run_transformers(model, ids, grid.new_tokens, device)
        return run_kvx(engines[system], ids, grid.new_tokens, grid.prefill_chunk, device)

    t_start = time.perf_counter()
    for _, _, ids in points:
        for system in systems:
            for _ in range(grid.warmup):
                once(system, ids)
    runs = {(B, T, s): [] for B, T, _ in points for s in systems}
    # each repetition sweeps the whole grid, systems interleaved: a slow spell of the machine hits every system and
    # every context alike instead of one point
    for rep in range(grid.repeats):
        for B, T, ids in points:
            for system in systems:
                runs[(B, T, system)].append(once(system, ids))
        print(f"[bench] repetition {rep + 1}/{grid.repeats} done ({time.perf_counter() - t_start:.0f} s)", flush=True)
    rows = []
    for B, T, _ in points:
        for system in systems:
            row = {"system": system, "batch": B, "context": T}
            row.update({k: median([r[k] for r in runs[(B, T, system)]]) for k in METRICS})
            rows.append(row)
            print(f"[bench] B={B:<2} T={T:<6} {system:<22} prefill {row['prefill_s']:8.3f} s   "
                  f"decode {1e3 * row['decode_s_tok']:8.2f} ms/step   {row['tok_s']:8.1f} tok/s   "
                  f"cache {row['cache_bytes'] / 2**20:8.2f} MiB", flush=True)
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
        "device_type": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "kernels": kernels.backend(), "triton_decode": kernels.use_triton(device), "python": platform.python_version(),
        "wall_s": time.perf_counter() - t_start,
    }
    return {"rows": rows, "systems": systems, "skipped": skipped, "grid": OmegaConf.to_container(grid),
            "model": dataclasses.asdict(mcfg), "budget": cfg.budget, "env": env}


# --- ratios and report ------------------------------------------------------------------------------------------
def lookup(rows, system, B, T):
    for r in rows:
        if r["system"] == system and r["batch"] == B and r["context"] == T:
            return r
    return None


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def fmt(x, spec=".2f"):
    return "–" if x is None else format(x, spec)


def ratios(res: dict) -> dict:
    rows, systems = res["rows"], res["systems"]
    kvx = [s for s in systems if s != HF]
    full = next((s for s in kvx if s == "full"), None)
    out = {"vs_transformers": [], "vs_full": [], "flat": [], "targets": []}
    batches = sorted({r["batch"] for r in rows})
    for B in batches:
        ctxs = sorted({r["context"] for r in rows if r["batch"] == B})
        for T in ctxs:
            hf = lookup(rows, HF, B, T)
            f = lookup(rows, full, B, T) if full else None
            if hf and f:
                out["vs_transformers"].append({"batch": B, "context": T,
                                               "decode": ratio(f["decode_s_tok"], hf["decode_s_tok"]),
                                               "prefill": ratio(f["prefill_s"], hf["prefill_s"]),
                                               "cache_bytes": ratio(f["cache_bytes"], hf["cache_bytes"])})
            for s in kvx:
                r = lookup(rows, s, B, T)
                if f and r and s != full:
                    out["vs_full"].append({"batch": B, "context": T, "system": s,
                                           "decode": ratio(r["decode_s_tok"], f["decode_s_tok"]),
                                           "speedup": ratio(f["decode_s_tok"], r["decode_s_tok"]),
                                           "cache_bytes": ratio(r["cache_bytes"], f["cache_bytes"])})
        if len(ctxs) >= 2:
            lo = min(ctxs, key=lambda c: abs(c - 1024))
            hi = max(ctxs)
            if hi > lo:
                for s in kvx:
                    a, b = lookup(rows, s, B, lo), lookup(rows, s, B, hi)
                    if a and b:
                        out["flat"].append({"batch": B, "system": s, "from": lo, "to": hi,
                                            "decode": ratio(b["decode_s_tok"], a["decode_s_tok"]),
                                            "cache_bytes": ratio(b["cache_bytes"], a["cache_bytes"])})
    # targets (reported, never enforced)
    vt = [r["decode"] for r in out["vs_transformers"] if r["decode"] is not None]
    if vt:
        worst = max(vt)
        out["targets"].append(f"kvx full / model.generate decode time per token: median {statistics.median(vt):.2f}, "
                              f"worst {worst:.2f} (target <= 1.10: {'met' if worst <= 1.10 else 'NOT met'})")
    for fl in out["flat"]:
        if fl["system"] == full:
            out["targets"].append(f"full, B={fl['batch']}: {fl['to']} vs {fl['from']} tokens: decode x{fl['decode']:.2f}, "
                                  f"cache bytes x{fl['cache_bytes']:.2f} (grows, as it should)")
        else:
            ok = fl["decode"] <= 1.2 and fl["cache_bytes"] <= 1.2
            out["targets"].append(
                f"{fl['system']}, B={fl['batch']}: {fl['to']} vs {fl['from']} tokens: decode x{fl['decode']:.2f}, cache "
                f"bytes x{fl['cache_bytes']:.2f} (target <= 1.2 at 16k vs 1k: {'met' if ok else 'NOT met'} on this grid)")
    if full:
        big_b = max(batches)
        longest = max((r["context"] for r in rows if r["batch"] == big_b), default=None)
        for s in kvx:
            if s == full:
                continue
            r = next((x for x in out["vs_full"] if x["system"] == s and x["batch"] == big_b
                      and x["context"] == longest), None)
            if r:
                out["targets"].append(
                    f"{s} vs full, B={big_b}, {longest} tokens: decode {r['speedup']:.2f}x faster "
                    f"(target >= 3x at long context: {'met' if r['speedup'] >= 3 else 'NOT met'} here)")
    return out


def write_report(res: dict, rat: dict, out_dir: Path, command: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, env, grid, model = res["rows"], res["env"], res["grid"], res["model"]
    L = ["# kvx decode benchmark\n", f"Command: `{command}`\n",
         f"Device: {env['device']} ({env['device_type']}), torch {env['torch']}, {env['threads']} threads, "
         f"kernels={env['kernels']} (Triton decode kernel in use: {env['triton_decode']}), total {env['wall_s']:.0f} s.",
         f"Model: random Llama, hidden {model['hidden_size']}, {model['num_layers']} layers, {model['num_heads']} heads "
         f"/ {model['num_kv_heads']} KV heads, {model['dtype']}. " if model["random"] else
         f"Model: {model['name_or_path']} ({model['dtype']}). ",
         f"Grid: {grid['new_tokens']} new tokens, {grid['warmup']} warm-up + median of {grid['repeats']} interleaved "
         f"sweeps of the grid, kvx prefill in chunks of {grid['prefill_chunk']}; budget {res['budget']} for compressing methods.",
         "Decode time per token = one decode step for the whole batch (forward + token pick); tok/s = batch / that.",
         "Peak memory = growth of the process' resident set (CPU) or of allocated CUDA memory during one run.\n"]
    if res["skipped"]:
        L.append(f"Not registered, skipped: {', '.join(res['skipped'])}.\n")
    L.append("## Where we stand against the targets\n")
    L += [f"- {t}" for t in rat["targets"]] + [""]
    L.append("## Measurements\n")
    L.append("| batch | context | system | prefill s | decode ms/token | tok/s | cache MiB | cache peak MiB | peak mem MiB |")
    L.append("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    mib = 2.0**20
    for r in rows:
        L.append(f"| {r['batch']} | {r['context']} | {r['system']} | {r['prefill_s']:.3f} | {1e3 * r['decode_s_tok']:.2f} "
                 f"| {r['tok_s']:.1f} | {r['cache_bytes'] / mib:.2f} | "
                 f"{fmt(None if r['cache_peak'] is None else r['cache_peak'] / mib)} | "
                 f"{fmt(None if r['peak_mem'] is None else r['peak_mem'] / mib, '.1f')} |")
    if rat["vs_transformers"]:
        L += ["", "## kvx full / transformers model.generate (same run)\n",
              "| batch | context | decode time | prefill time | cache bytes |", "|---:|---:|---:|---:|---:|"]
        L += [f"| {r['batch']} | {r['context']} | {fmt(r['decode'])} | {fmt(r['prefill'])} | {fmt(r['cache_bytes'])} |"
              for r in rat["vs_transformers"]]
    if rat["vs_full"]:
        L += ["", "## method / kvx full (same run)\n",
              "| batch | context | method | decode time | speed-up | cache bytes |", "|---:|---:|---|---:|---:|---:|"]
        L += [f"| {r['batch']} | {r['context']} | {r['system']} | {fmt(r['decode'])} | {fmt(r['speedup'])} | "
              f"{fmt(r['cache_bytes'], '.3f')} |" for r in rat["vs_full"]]
    if rat["flat"]:
        L += ["", "## Growth with context (longest / about 1k tokens)\n",
              "| batch | system | contexts | decode time | cache bytes |", "|---:|---|---|---:|---:|"]
        L += [f"| {r['batch']} | {r['system']} | {r['to']} / {r['from']} | {fmt(r['decode'])} | {fmt(r['cache_bytes'])} |"
              for r in rat["flat"]]
    L += ["", "![time per token](time_per_token.png)", "", "![cache bytes](cache_bytes.png)", ""]
    (out_dir / "bench.md").write_text("\n".join(L))
    (out_dir / "bench.json").write_text(json.dumps({"command": command, **res, "ratios": rat}, indent=1) + "\n")
    plot(res, out_dir)


def plot(res: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    batches = sorted({r["batch"] for r in rows})
    for key, scale, ylabel, fname in [("decode_s_tok", 1e3, "decode time per token (ms)", "time_per_token.png"),
                                      ("cache_bytes", 2.0**-20, "cache held (MiB)", "cache_bytes.png")]:
        fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4), squeeze=False)
        for ax, B in zip(axes[0], batches):
            for s in res["systems"]:
                pts = sorted((r["context"], r[key]) for r in rows if r["system"] == s and r["batch"] == B)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] * scale for p in pts], marker="o",
                            linestyle="--" if s == HF else "-", label=s)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"batch {B}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)


def print_ratios(rat: dict) -> None:
    print("\n[bench] ratios measured in this run")
    for r in rat["vs_transformers"]:
        print(f"  kvx full / transformers  B={r['batch']:<2} T={r['context']:<6} decode x{fmt(r['decode'])}  "
              f"prefill x{fmt(r['prefill'])}  cache bytes x{fmt(r['cache_bytes'])}")
    for r in rat["vs_full"]:
        print(f"  {r['system']:>18} / full  B={r['batch']:<2} T={r['context']:<6} decode x{fmt(r['decode'])} "
              f"({fmt(r['speedup'])}x faster)  cache bytes x{fmt(r['cache_bytes'], '.3f')}")
    for r in rat["flat"]:
        print(f"  growth {r['system']:>18} B={r['batch']:<2} {r['to']}/{r['from']}: decode x{fmt(r['decode'])}  "
              f"cache bytes x{fmt(r['cache_bytes'])}")
    print("\n[bench] targets")
    for t in rat["targets"]:
        print("  " + t)


@hydra.main(version_base=None, config_path="../configs", config_name="bench")
def main(cfg: DictConfig) -> None:
    command = "python scripts/bench.py" + "".join(" " + shlex.quote(a) for a in sys.argv[1:])
    res = measure(cfg)
    rat = ratios(res)
    print_ratios(rat)
    out_dir = Path(cfg.out_dir)
    if not out_dir.is_absolute():
        out_dir = ROOT / out_dir
    write_report(res, rat, out_dir, command)
    print(f"\n[bench] wrote {out_dir}/bench.md, bench.json, time_per_token.png, cache_bytes.png")


if __name__ == "__main__":
    main()
