"""Decode speed and memory of kvx's engine per method, against transformers' `model.generate`, on random Llamas of
a 7B model's attention geometry (configs/bench.yaml; grids in configs/bench/: `bench=default` or `bench=scale`).

Every point (model, system, batch B, context T) runs in its own forked process on CPU (in-process on CUDA): the
prompt (T random token ids per sequence) is prefilled, then `new_tokens` greedy tokens are decoded. Per point:
    prefill_s      time from the call to the end of the prefill (kvx: chunked prefill; transformers: its prefill
                   forward and first token pick)
    decode_s_tok   median over the decode steps of one step's time (forward + token pick, whole batch)
    prefill_peak   peak resident memory during the prefill minus the resident memory just before the call
    decode_peak    peak resident memory during decoding, minus the same baseline (so it includes the cache held)
                   CPU: the kernel's high-water mark VmHWM, reset through /proc/self/clear_refs at each phase start
                   (glibc's mmap threshold is fixed at 1 MiB in the children, so freed tensors leave the resident set);
                   CUDA: torch.cuda.max_memory_allocated, reset at each phase start
    cache_bytes    bytes of the cache held at the end (kvx: cache.nbytes(); transformers: its tensors)
    promise        the bytes the method says it holds (`promise()`), checked against cache_bytes
Before each measured call the child runs the same system once on a short prompt (warm-up). The systems of a point
run one after the other, and `repeats` sweeps of the whole grid follow each other, so a slow spell of the shared
machine hits every system alike; ratios are of numbers measured in this same run.

The same run measures evaluation throughput: tokens/s of kvx's own perplexity task (the default task, stories260k
on TinyStories) per eviction method and mode, against the full cache.

Writes <out>/<grid>/bench.md (the command on top), bench.json, decode_time.png and peak_memory.png.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import json
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kvx import kernels  # noqa: E402
from kvx.config import build_dataclass, build_method  # noqa: E402
from kvx.engine import Engine  # noqa: E402
from kvx.errors import ConfigError  # noqa: E402
from kvx.models import ModelConfig, load_model  # noqa: E402
from kvx.registry import METHODS  # noqa: E402

GENERATE = "generate"
EVICTION = ("streaming_llm", "h2o", "tova", "snapkv", "scissorhands", "infinipot", "less")
SCORED = ("h2o", "tova", "snapkv", "scissorhands", "infinipot")  # the prefill-memory goal
QUANTIZED = ("uniform", "kivi", "qaq")
MIB = 2.0**20


# --- geometry: parameters and cache bytes of a Llama ---------------------------------------------------------------
def llama_params(g: dict) -> int:
    """Parameters of a Llama (untied embeddings): embeddings, lm_head, attention, MLP and norms."""
    h, L, V, inter = g["hidden_size"], g["num_layers"], g["vocab_size"], g["intermediate_size"]
    D = h // g["num_heads"]
    attn = h * g["num_heads"] * D * 2 + h * g["num_kv_heads"] * D * 2
    return 2 * V * h + L * (attn + 3 * h * inter + 2 * h) + h


def kv_bytes_per_token(g: dict, dtype_bytes: int) -> int:
    """Cache bytes of one token of one sequence, all layers: L x H_kv x 2 (K, V) x head_dim x dtype bytes."""
    return g["num_layers"] * g["num_kv_heads"] * 2 * (g["hidden_size"] // g["num_heads"]) * dtype_bytes


def cache_weight_ratio(g: dict, tokens: int, batch: int) -> float:
    """KV-cache bytes / weight bytes at `tokens` of context and `batch` sequences (the dtype cancels out)."""
    return batch * tokens * kv_bytes_per_token(g, 1) / llama_params(g)


# --- what each method promises to hold -------------------------------------------------------------------------------
def residual_after(forwards: list[int], residual: int, block: int) -> int:
    """Tokens still in a quantized store's full-precision window after forwards of these sizes: before each forward
    the oldest block-multiples beyond `residual` move to the quantized part (kvx/cache/quantized.py, flush)."""
    r = 0
    for t in forwards:
        if r >= residual + block:
            r -= ((r - residual) // block) * block
        r += t
    return r


def kivi_residual_after(forwards: list[int], residual: int, block: int) -> tuple[int, int]:
    """(keys, values) in full precision after these forwards under KIVI's published rule: before each forward, keys
    move R at a time once R are held (block at a time if R = 0), values beyond the last R move."""
    rk = rv = 0
    for t in forwards:
        step = residual or block
        rk -= (rk // step) * step
        rv = min(rv, residual)
        rk, rv = rk + t, rv + t
    return rk, rv


def quant_row_bytes(D: int, bits: int, groups: int) -> int:
    """One quantized row (one token, one KV head, K or V) at a fixed width: codes and a 16-bit zero and scale per
    group (no per-row width or offset is held)."""
    return (D * bits + 7) // 8 + 4 * groups


def promise(method, arch, batch: int, forwards: list[int], cache=None) -> tuple[int, str]:
    """(bytes, kind) the method promises to hold after forwards of these token counts. kind: `exact` for eviction
    (2%), `quant` for quantized caches (5%), `bound` where the method promises a ceiling (InfiniPot's pot)."""
    L, H, D, db = arch.n_layers, arch.n_kv_heads, arch.head_dim, arch.dtype_bytes
    n = sum(forwards)
    per_token = L * H * 2 * D * db * batch  # one token in every layer and KV head, K and V
    name = method.name
    if name == "full":
        return n * per_token, "exact"
    if name == "less":
        inner, _ = promise(method.policy_method, arch, batch, forwards)
        return inner + L * H * batch * (method.rank * D + method.rank) * 4, "exact"
    if name == "infinipot":
        return min(n, int(method.budget)) * per_token, "bound"
    if name in EVICTION or name == "sirllm":
        return min(n, int(method.budget)) * per_token, "exact"
    if name in ("uniform", "kivi"):
        ks, vs = method.specs(arch)
        block = ks.group if ks.axis == "channel" else 1
        if getattr(method, "residual_rule", "grouped") == "kivi":
            rk, rv = kivi_residual_after(forwards, method.residual, block)
        else:
            rk = rv = residual_after(forwards, method.residual, block)
        total = 0
        for spec, r in ((ks, min(n, rk)), (vs, min(n, rv))):
            nq = n - r
            if spec.axis == "token":
                total += nq * quant_row_bytes(D, spec.bits, D // spec.channels_per_group(D))
            else:  # one zero/scale per channel per block of `group` rows
                total += nq * quant_row_bytes(D, spec.bits, 0) + (nq // spec.group) * 4 * D
            total += r * D * db
        return L * H * batch * total, "quant"
    if name == "qaq" and cache is not None:  # mixed widths: what the widths it chose cost
        total = 0
        for layer in cache.layers:
            st = layer.store
            for pt in (st.kq, st.vq):
                if pt is None:
                    continue
                b = pt.bits.long()
                exact = b >= 16
                codes = torch.where(exact, D * db, (D * b + 7) // 8)
                per_row = 1 + (0 if pt.ocnt is None else 1)  # its width, its outlier count
                outl = 0 if pt.ocnt is None else torch.where(exact, 0, pt.ocnt.long()) * (db + 1)  # value, index
                total += int((codes + outl + per_row).sum()) + 4 * pt.zero.numel()  # zero/scale: per token (layer)
            if st.k is not None:
                total += 2 * st.k.numel() * db
        return total, "quant"
    return 0, "none"


def tolerance(kind: str) -> float:
    return {"exact": 0.02, "quant": 0.05, "bound": 0.02}.get(kind, 0.0)


def promise_met(measured: int, promised: int, kind: str) -> bool | None:
    if not promised or kind == "none":
        return None
    if kind == "bound":
        return measured <= promised * (1 + tolerance(kind))
    return abs(measured - promised) <= tolerance(kind) * promised


# --- systems ------------------------------------------------------------------------------------------------------------
def method_fields(entry: dict, budget: int) -> dict:
    """The method config of a system entry with the grid's budget filled in where the method has one."""
    fields = dict(entry["method"])
    cls = METHODS.get(fields["name"])
    names = {f.name for f in dataclasses.fields(cls)}
    if "budget" in names and "budget" not in fields:
        fields["budget"] = budget
    for nested in ("base", "evict"):
        if isinstance(fields.get(nested), dict) and "budget" not in fields[nested]:
            fields[nested] = {**fields[nested], "budget": budget}
    return fields


def random_feature_maps(arch, rank: int, hidden: int, seed: int):
    """LESS phi/psi with random weights (untrained): they cost what trained ones cost, and predict nothing."""
    from kvx.cache.lowrank import FeatureMaps

    g = torch.Generator().manual_seed(seed)
    return [FeatureMaps(arch.n_heads, arch.n_kv_heads, arch.head_dim, rank, hidden, generator=g).eval()
            .requires_grad_(False) for _ in range(arch.n_layers)]


def build_system(entry: dict, budget: int, model, tokenizer, seed: int):
    """An Engine for a kvx system, or None for transformers' own generate."""
    if entry.get("kind", "kvx") != "kvx":
        return None
    fields = method_fields(entry, budget)
    if entry.get("random_maps"):
        from kvx.engine import arch_info
        from kvx.methods.less import LESS

        method = build_dataclass(LESS, {**fields, "kernels": None}, "method")
        maps = random_feature_maps(arch_info(model), method.rank, int(entry.get("hidden", 64)), seed)
        method.set_feature_maps([m.to(next(model.parameters()).device) for m in maps])
        method.validate()
    else:
        method = build_method(fields)
    return Engine(model, tokenizer, method)


def system_label(entry: dict, budget: int) -> str:
    if "label" in entry:
        return str(entry["label"])
    return entry.get("kind", "kvx") if "method" not in entry else entry["method"]["name"]


# --- measurement ----------------------------------------------------------------------------------------------------
class PhaseMemory:
    """Peak memory of successive phases over a baseline: VmHWM (reset through clear_refs) on CPU, the allocator's
    peak on CUDA."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0
        self.cpu_ok = device.type == "cpu" and os.path.exists("/proc/self/clear_refs")

    @staticmethod
    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def start(self) -> None:
        """Set the baseline (memory now) and start the first phase."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif self.cpu_ok:
            self.base = self.status("VmRSS")
        self.reset()

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.cpu_ok:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # VmHWM := VmRSS
            except OSError:
                self.cpu_ok = False

    def peak(self) -> int | None:
        """Peak of the phase since the last reset, over the baseline."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        if self.cpu_ok:
            return max(0, self.status("VmHWM") - self.base)
        return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in obj (a tensor, or lists, tuples and dicts of them, or an object's attributes)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    if hasattr(obj, "__tensor_flatten__"):  # quanto's quantized tensors
        names, _ = obj.__tensor_flatten__()
        return sum(tensor_bytes(getattr(obj, n)) for n in names)
    return 0


def hf_cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            total += tensor_bytes(getattr(layer, name, None))
    return total


def hf_quant_cache(entry: dict, model):
    from transformers import QuantizedCache

    return QuantizedCache(backend=entry.get("backend", "hqq"), config=model.config, nbits=int(entry["nbits"]),
                          q_group_size=int(entry.get("q_group_size", 64)),
                          residual_length=int(entry.get("residual_length", 128)))


def stamp() -> tuple[float, float]:
    """(wall clock, CPU time of this process) now."""
    return time.perf_counter(), time.process_time()


def timings(t0, prefill_end, marks, device) -> dict:
    """Prefill time and the decode steps (differences of successive marks). On CPU the times are CPU seconds of the
    measuring process (one thread): on a shared machine the wall clock also counts the time spent waiting for a core.
    On CUDA they are wall seconds after a synchronize. The wall clock is kept beside them."""
    k = 1 if device.type == "cpu" else 0
    return {"prefill_s": prefill_end[k] - t0[k], "steps": [b[k] - a[k] for a, b in zip(marks, marks[1:])],
            "prefill_wall_s": prefill_end[0] - t0[0], "wall_steps": [b[0] - a[0] for a, b in zip(marks, marks[1:])]}


class StampStreamer:
    """A transformers streamer that records when each put() happens (the prompt first, then every new token)."""

    def __init__(self, device, mem: PhaseMemory):
        self.device, self.mem = device, mem
        self.stamps: list[float] = []
        self.prefill_peak = None

    def put(self, value) -> None:
        sync(self.device)
        now = stamp()
        if len(self.stamps) == 1:  # the first new token: the prefill is over
            self.prefill_peak = self.mem.peak()
            self.mem.reset()
            now = stamp()
        self.stamps.append(now)

    def end(self) -> None:
        pass


def run_generate(model, entry, ids, new_tokens, device) -> dict:
    mem = PhaseMemory(device)
    streamer = StampStreamer(device, mem)
    kw = {}
    if entry.get("kind") == "hf_quant":
        kw["cache"] = hf_quant_cache(entry, model)
    gc.collect()
    mem.start()
    sync(device)
    t0 = stamp()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, use_cache=True, streamer=streamer,
                             return_dict_in_generate=True, pad_token_id=0, **kw)
    decode_peak = mem.peak()
    st = streamer.stamps  # [prompt, token 1 (after the prefill), token 2, ..., token n]
    if out.sequences.shape[1] != ids.shape[1] + new_tokens or len(st) != new_tokens + 1:
        raise RuntimeError(f"generate made {out.sequences.shape[1] - ids.shape[1]} tokens, not {new_tokens}")
    return {**timings(t0, st[1], st[1:], device), "cache_bytes": hf_cache_bytes(out.cache), "cache_aux": 0,
            "prefill_peak": streamer.prefill_peak, "decode_peak": decode_peak, "promise": 0, "promise_kind": "none",
            "forwards": None}


def run_kvx(engine: Engine, ids, new_tokens, chunk, device) -> dict:
    mem = PhaseMemory(device)
    stamps: list[float] = []
    marks: dict = {}
    forwards: list[int] = []
    prefill, forward = engine.prefill, engine.forward

    def timed_prefill(*a, **kw):
        out = prefill(*a, **kw)
        sync(device)
        marks["prefill_peak"] = mem.peak()
        mem.reset()
        marks["prefill_end"] = stamp()
        return out

    def counted_forward(cache, input_ids, *a, **kw):
        forwards.append(int(input_ids.shape[1]))
        return forward(cache, input_ids, *a, **kw)

    def on_step(cache) -> None:
        sync(device)
        stamps.append(stamp())

    engine.prefill, engine.forward = timed_prefill, counted_forward  # instance attributes: generate() uses them
    try:
        gc.collect()
        mem.start()
        sync(device)
        t0 = stamp()
        gen = engine.generate(ids, max_new_tokens=new_tokens, eos_token_id=[], chunk_size=chunk, on_step=on_step)
        decode_peak = mem.peak()
    finally:
        del engine.prefill, engine.forward
    if any(len(t) != new_tokens for t in gen.tokens) or len(stamps) != new_tokens:
        raise RuntimeError(f"kvx generate made {len(stamps)} steps, not {new_tokens}")
    cache = gen.cache
    pb, kind = promise(engine.method, engine.arch, ids.shape[0], forwards, cache)
    return {**timings(t0, marks["prefill_end"], [marks["prefill_end"], *stamps], device), "cache_bytes": cache.nbytes(),
            "cache_aux": cache.aux_nbytes(), "prefill_peak": marks["prefill_peak"], "decode_peak": decode_peak,
            "promise": pb, "promise_kind": kind, "forwards": len(forwards)}


def measure_point(job: dict) -> dict:
    """One system at one (model, batch, context): warm-up on a short prompt, then the measured run."""
    model, entry, grid = job["model"], job["entry"], job["grid"]
    device = next(model.parameters()).device
    torch.manual_seed(job["seed"])
    engine = build_system(entry, job["budget"], model, job["tokenizer"], job["seed"])
    gen = torch.Generator().manual_seed(job["seed"] * 1000 + job["context"])
    ids = torch.randint(3, model.config.vocab_size, (job["batch"], job["context"]), generator=gen).to(device)
    warm = ids[:, : min(job["context"], int(grid["warmup_tokens"]))]

    def once(x, n):
        if engine is None:
            return run_generate(model, entry, x, n, device)
        return run_kvx(engine, x, n, int(grid["prefill_chunk"]), device)

    once(warm, 2)
    return once(ids, int(grid["new_tokens"]))


def _child(conn, job) -> None:
    try:
        torch.set_num_threads(job["threads"])
        conn.send(("ok", measure_point(job)))
    except BaseException as e:  # reported as the point's status; the grid goes on
        conn.send(("error", f"{type(e).__name__}: {e}".splitlines()[0][:300] + "\n" + traceback.format_exc(limit=3)))
    finally:
        conn.close()


def run_isolated(job: dict, isolate: bool, timeout: float | None = None) -> dict:
    """measure_point in a forked process (or in this one); a point that runs past `timeout` seconds is stopped."""
    if not isolate:
        try:
            return {"status": "ok", **measure_point(job)}
        except Exception as e:
            return {"status": f"error: {type(e).__name__}: {e}".splitlines()[0][:300]}
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, job))
    proc.start()
    send.close()
    try:
        if recv.poll(timeout):
            status, payload = recv.recv()
        else:
            proc.kill()
            status, payload = "error", f"stopped after {timeout:.0f} s (grid.point_timeout_s)"
    except EOFError:
        status, payload = "error", f"the process died (exit code {proc.join() or proc.exitcode}; out of memory?)"
    proc.join()
    if status == "ok":
        return {"status": "ok", **payload}
    print(f"[bench]   {payload}", flush=True)
    return {"status": "error: " + payload.splitlines()[0]}


# --- the grid -------------------------------------------------------------------------------------------------------------
def grid_points(cfg: DictConfig) -> list[tuple[str, int, int, list[str]]]:
    """(model key, batch, context, system labels) of every point of the grid, in run order."""
    labels = [system_label(e, cfg.budget) for e in cfg.systems]
    out = []
    for model_key in cfg.grid.models:
        if model_key not in cfg.models:
            raise ConfigError("grid.models", f"unknown model {model_key!r}; defined: {', '.join(cfg.models)}")
        for p in cfg.grid.points:
            if p.get("models") is not None and model_key not in p.models:
                continue
            names = labels if p.systems == "all" else list(p.systems)
            unknown = [s for s in names if s not in labels]
            if unknown:
                raise ConfigError("grid.points.systems", f"unknown system(s) {unknown}; defined: {', '.join(labels)}")
            for T in p.contexts:
                out.append((model_key, int(p.batch), int(T), names))
    return out


def model_info(mcfg: dict, dtype_bytes: int, ref: dict) -> dict:
    g = {k: mcfg[k] for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                              "vocab_size")}
    mine, theirs = cache_weight_ratio(g, 1, 1), cache_weight_ratio(ref, 1, 1)
    return {"params": llama_params(g), "head_dim": g["hidden_size"] // g["num_heads"],
            "kv_bytes_per_token": kv_bytes_per_token(g, dtype_bytes), "ratio_per_token": mine,
            "reference_ratio_per_token": theirs, "ratio_vs_reference": mine / theirs}


def measure(cfg: DictConfig) -> dict:
    torch.set_num_threads(int(cfg.threads))
    kernels.set_backend(cfg.kernels)
    points = grid_points(cfg)
    entries = {system_label(e, cfg.budget): OmegaConf.to_container(e, resolve=True) for e in cfg.systems}
    grid = OmegaConf.to_container(cfg.grid, resolve=True)
    models, infos = {}, {}
    for key in dict.fromkeys(p[0] for p in points):
        mcfg = ModelConfig(**OmegaConf.to_container(cfg.models[key], resolve=True))
        models[key] = load_model(mcfg)
        db = next(models[key][0].parameters()).element_size()
        ref_key = cfg.compare[key]
        infos[key] = {"config": dataclasses.asdict(mcfg), "reference": ref_key,
                      **model_info(dataclasses.asdict(mcfg), db, OmegaConf.to_container(cfg.references[ref_key]))}
    device = next(next(iter(models.values()))[0].parameters()).device
    isolate = cfg.isolate == "fork" or (cfg.isolate == "auto" and device.type == "cpu")
    if isolate:  # freed tensors of 1 MiB and more go back to the system at once: the resident set tells the truth
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(2**20)
        os.environ["MALLOC_TRIM_THRESHOLD_"] = str(2**20)
    runs: dict[tuple, list[dict]] = {}
    t_start = time.perf_counter()
    budget_s = 60 * float("inf" if grid.get("max_minutes") is None else grid["max_minutes"])
    for rep in range(int(grid["repeats"])):
        for model_key, B, T, names in points:
            for name in names:
                if time.perf_counter() - t_start > budget_s:  # past the grid's time budget: listed, not run
                    if not rep:
                        runs.setdefault((model_key, name, B, T), []).append(
                            {"status": f"not run: past the grid's time budget (grid.max_minutes={grid['max_minutes']})"})
                    continue
                job = {"model": models[model_key][0], "tokenizer": models[model_key][1], "entry": entries[name],
                       "grid": grid, "budget": int(cfg.budget), "batch": B, "context": T, "seed": int(cfg.seed),
                       "threads": int(cfg.threads)}
                t0 = time.perf_counter()
                r = run_isolated(job, isolate, grid.get("point_timeout_s"))
                runs.setdefault((model_key, name, B, T), []).append(r)
                what = r["status"]
                if what == "ok":
                    what = f"prefill {r['prefill_s']:7.2f} s  decode {statistics.median(r['steps']) * 1e3:8.2f} ms/step"
                print(f"[bench] rep {rep + 1} {model_key} B={B:<2} T={T:<6} {name:<16} {what}  "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = [summarise(k, v) for k, v in runs.items()]
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
        "device_type": device.type, "torch": torch.__version__, "threads": int(cfg.threads),
        "kernels": kernels.backend(), "triton_decode": kernels.use_triton(device), "python": platform.python_version(),
        "isolated": isolate, "wall_s": time.perf_counter() - t_start,
    }
    return {"rows": rows, "models": infos, "grid": grid, "name": cfg.name, "budget": int(cfg.budget), "env": env,
            "systems": list(entries), "kinds": {k: system_kind(v) for k, v in entries.items()}, "entries": entries,
            "notes": [str(n) for n in cfg.get("notes", [])] + [str(n) for n in grid.get("notes", [])]}


def system_kind(entry: dict) -> str:
    """generate | hf_quant | the kvx method's name."""
    return entry.get("kind", "kvx") if entry.get("kind", "kvx") != "kvx" else entry["method"]["name"]


def summarise(key: tuple, reps: list[dict]) -> dict:
    model_key, name, B, T = key
    row = {"model": model_key, "system": name, "batch": B, "context": T}
    ok = [r for r in reps if r["status"] == "ok"]
    if not ok:
        return {**row, "status": reps[-1]["status"]}

    def med(k):
        vals = [r[k] for r in ok if r.get(k) is not None]
        return statistics.median(vals) if vals else None

    step_medians = [statistics.median(r["steps"]) for r in ok]
    row.update({"status": "ok", "repeats": len(ok), "prefill_s": med("prefill_s"),
                "decode_s_tok": statistics.median(step_medians), "decode_steps": len(ok[0]["steps"]),
                "prefill_wall_s": med("prefill_wall_s"),
                "decode_wall_s_tok": statistics.median(statistics.median(r["wall_steps"]) for r in ok),
                "prefill_peak": med("prefill_peak"), "decode_peak": med("decode_peak"),
                "cache_bytes": ok[-1]["cache_bytes"], "cache_aux": ok[-1]["cache_aux"],
                "promise": ok[-1]["promise"], "promise_kind": ok[-1]["promise_kind"]})
    row["tok_s"] = B / row["decode_s_tok"]
    row["promise_ratio"] = row["cache_bytes"] / row["promise"] if row["promise"] else None
    row["promise_met"] = promise_met(row["cache_bytes"], row["promise"], row["promise_kind"])
    return row


# --- evaluation throughput (kvx's own perplexity task) ----------------------------------------------------------------
TOKEN_BY_TOKEN = "full, one token per forward"  # a reference row, not a goal's
def eval_throughput(cfg: DictConfig) -> list[dict]:
    """tokens/s of the default perplexity task per method and mode, and the ratio to the full cache's."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from kvx.runner import run

    ev = cfg.eval
    out = []
    # inside scripts/bench.py's own hydra.main the project's configs are already on the search path
    hydra_ctx = (contextlib.nullcontext() if GlobalHydra.instance().is_initialized()
                 else initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"))
    with tempfile.TemporaryDirectory() as tmp, hydra_ctx:
        for mode in ev.modes:
            # stream mode also runs the full cache one token per forward (task.chunk_size=1), as the eviction methods
            # run: how much of their gap is the token-by-token forward itself, not their eviction
            names = ["full", *ev.methods] + ([TOKEN_BY_TOKEN] if mode == "stream" else [])
            for name in names:
                method = "full" if name == TOKEN_BY_TOKEN else name
                overrides = [f"method={method}", f"task.mode={mode}", f"task.max_tokens={int(ev.max_tokens)}",
                             f"results_dir={tmp}/{mode}", "force=true", "progress=false",
                             *ev.overrides, *ev.method_overrides.get(name, []),
                             *(["task.chunk_size=1"] if name == TOKEN_BY_TOKEN else [])]
                row = {"method": name, "mode": mode}
                try:
                    with contextlib.redirect_stdout(io.StringIO()):  # the runner prints every metric
                        res = run(compose(config_name="config", overrides=overrides))
                    m = res.metrics
                    row.update({"status": "ok", "tokens": m["tokens"], "seconds": m["task_seconds"],
                                "tok_s": m["tokens"] / m["task_seconds"], "ppl": m["ppl"]})
                except ConfigError as e:
                    row["status"] = "n/a (no masked form)" if "no mask form" in str(e) else f"error: {e}"
                except Exception as e:
                    row["status"] = f"error: {type(e).__name__}: {e}".splitlines()[0][:200]
                what = f"{row['tok_s']:9.1f} tok/s" if row["status"] == "ok" else row["status"]
                print(f"[bench] eval {mode:<6} {name:<14} {what}", flush=True)
                out.append(row)
    for row in out:
        full = next((r for r in out if r["mode"] == row["mode"] and r["method"] == "full"), None)
        ok = row.get("tok_s") and full and full.get("tok_s")
        row["vs_full"] = row["tok_s"] / full["tok_s"] if ok else None
    return out


# --- goals ---------------------------------------------------------------------------------------------------------------
def lookup(rows, model, system, B, T):
    for r in rows:
        if (r["model"], r["system"], r["batch"], r["context"]) == (model, system, B, T) and r["status"] == "ok":
            return r
    return None


def verdict(ok: bool | None) -> str:
    return "–" if ok is None else ("met" if ok else "NOT met")


def goal(name: str, figure: str, target: str, ok: bool | None) -> dict:
    return {"goal": name, "figure": figure, "target": target, "verdict": verdict(ok)}


def evaluate_goals(res: dict, evals: list[dict], long_ctx: int = 16384, short_ctx: int = 1024) -> list[dict]:
    """Every goal with its figure from this run and met / NOT met; a goal whose points are not in this grid gets a
    row with "–"."""
    rows, kinds = res["rows"], res["kinds"]
    out = []
    kvx_systems = [s for s in res["systems"] if kinds[s] not in (GENERATE, "hf_quant")]
    full = next((s for s in kvx_systems if kinds[s] == "full"), None)
    gen = next((s for s in res["systems"] if kinds[s] == GENERATE), None)
    evict = [s for s in kvx_systems if kinds[s] in EVICTION]

    def family(title: str, target: str, found: list[dict]) -> None:
        out.extend(found or [goal(title, "–", target, None)])

    for model in res["models"]:
        mrows = [r for r in rows if r["model"] == model]
        batches = sorted({r["batch"] for r in mrows})
        tag = f"[{model}]"
        # eviction against full at the long context
        info = res["models"].get(model, {})
        for B, need in ((8, 3.0), (1, 1.5)):
            found = []
            ceiling = bytes_bound(info, B, long_ctx, res["budget"])
            for _, s, q in vs_full(rows, model, full, [B], long_ctx, evict):
                found.append(goal(f"{tag} {s} decode vs full, B={B}, {long_ctx} tokens, budget {res['budget']}",
                                  f"{1 / q:.2f}x faster", f">= {need:g}x{ceiling}", 1 / q >= need))
            family(f"{tag} eviction decode vs full, B={B}, {long_ctx} tokens", f">= {need:g}x", found)
        # flat in context (eviction: a constant cache; the quantized caches grow with the context by design)
        found = []
        for B in batches:
            for s in kvx_systems:
                if s == full:
                    continue
                a, b = lookup(rows, model, s, B, short_ctx), lookup(rows, model, s, B, long_ctx)
                if a is None or b is None:
                    continue
                g = b["decode_s_tok"] / a["decode_s_tok"]
                applies = kinds[s] in EVICTION
                found.append(goal(f"{tag} {s} decode {long_ctx} / {short_ctx} tokens, B={B}", f"x{g:.2f}",
                                  "<= 1.2" if applies else "n/a (quantized: the cache grows with the context)",
                                  (g <= 1.2) if applies else None))
        family(f"{tag} compressed decode {long_ctx} / {short_ctx} tokens", "<= 1.2", found)
        # kvx full against transformers' generate
        vt = []
        for r in mrows:
            if r["system"] == full and r["status"] == "ok":
                h = lookup(rows, model, gen, r["batch"], r["context"]) if gen else None
                if h:
                    vt.append((r["decode_s_tok"] / h["decode_s_tok"], r["batch"], r["context"]))
        found = []
        if vt:
            med = statistics.median(v for v, _, _ in vt)
            worst = max(vt)
            found = [goal(f"{tag} kvx full / model.generate, decode time per token (median over {len(vt)} points)",
                          f"{med:.2f}", "<= 1.05", med <= 1.05),
                     goal(f"{tag} kvx full / model.generate, worst point (B={worst[1]}, {worst[2]} tokens)",
                          f"{worst[0]:.2f}", "<= 1.05", worst[0] <= 1.05)]
        family(f"{tag} kvx full / model.generate, decode time per token", "<= 1.05", found)
        # quantized decode against full at the long context: 4-bit not slower, 2-bit faster
        found = []
        for B, s, q in vs_full(rows, model, full, batches, long_ctx, [s for s in kvx_systems
                                                                       if kinds[s] in ("uniform", "kivi")]):
            two = quant_bits(res, s) == 2
            found.append(goal(f"{tag} {s} decode / full, B={B}, {long_ctx} tokens", f"{q:.2f}",
                              "< 1 (faster)" if two else "<= 1 (not slower)", q < 1 if two else q <= 1))
        family(f"{tag} 4-bit / 2-bit decode vs full, {long_ctx} tokens", "<= 1 / < 1", found)
        # prefill memory of the score-based methods
        found = []
        for B, s, m in vs_full(rows, model, full, batches, long_ctx, [s for s in kvx_systems if kinds[s] in SCORED],
                               "prefill_peak"):
            found.append(goal(f"{tag} {s} prefill peak memory / full's, B={B}, {long_ctx} tokens", f"{m:.2f}",
                              "<= 1.3", m <= 1.3))
        family(f"{tag} score-based prefill peak memory / full's, {long_ctx} tokens", "<= 1.3", found)
        # bytes against the promise: the worst point per system
        for s in kvx_systems:
            pts = [r for r in mrows if r["system"] == s and r["status"] == "ok"
                   and promise_met(r["cache_bytes"], r["promise"], r["promise_kind"]) is not None]
            if not pts:
                continue
            worst = max(pts, key=lambda r: abs(r["cache_bytes"] / r["promise"] - 1))
            tgt = {"exact": "within 2%", "quant": "within 5%", "bound": "<= the pot (+2%)"}[worst["promise_kind"]]
            out.append(goal(f"{tag} {s} cache bytes / promise, worst of {len(pts)} points",
                            f"{worst['cache_bytes'] / worst['promise']:.4f}", tgt,
                            all(promise_met(r["cache_bytes"], r["promise"], r["promise_kind"]) for r in pts)))
    for r in evals:
        if r["method"] in ("full", TOKEN_BY_TOKEN):
            continue
        vs = r.get("vs_full")
        out.append(goal(f"evaluation throughput {r['method']} / full, {r['mode']} mode",
                        f"{vs:.2f}" if vs is not None else ("–" if r["status"] == "ok" else r["status"]), ">= 0.33",
                        None if vs is None else vs >= 1 / 3))
    return out


def bytes_bound(info: dict, B: int, T: int, budget: int) -> str:
    """The speed-up a budget can give at most where decode time follows the bytes each step reads (weights + cache):
    (1 + r(T)) / (1 + r(budget)), r = cache bytes / weight bytes; for this model and for its 7B/8B reference."""
    r, ref = info.get("ratio_per_token"), info.get("reference_ratio_per_token")
    if r is None:
        return ""
    b = min(T, budget)
    out = f"; bytes-read bound {(1 + B * T * r) / (1 + B * b * r):.2f}x"
    if ref is not None:
        out += f" ({info.get('reference', 'reference')}: {(1 + B * T * ref) / (1 + B * b * ref):.2f}x)"
    return out


def vs_full(rows, model, full, batches, T, systems, key="decode_s_tok"):
    """(B, system, its `key` / full's) at context T for each batch and system measured with the full cache."""
    for B in batches:
        f = lookup(rows, model, full, B, T) if full else None
        for s in systems:
            r = lookup(rows, model, s, B, T)
            if f is not None and r is not None and f.get(key) and r.get(key) is not None:
                yield B, s, r[key] / f[key]


def quant_bits(res: dict, system: str) -> int | None:
    """The code width of a fixed-width quantized system (None if unknown)."""
    entry = res.get("entries", {}).get(system)
    if entry is None:
        return 2 if "2" in system else (4 if "4" in system else None)
    m = entry["method"]
    return int(m.get("bits", {"kivi": 2, "uniform": 4}.get(m["name"], 0)))


# --- report ----------------------------------------------------------------------------------------------------------------
def fmt(x, spec=".2f", scale=1.0):
    return "–" if x is None else format(x * scale, spec)


def write_report(res: dict, evals: list[dict], goals: list[dict], out_dir: Path, command: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    env, grid = res["env"], res["grid"]
    L = ["# kvx decode benchmark: random Llamas of 7B attention geometry\n", f"Command: `{command}`\n",
         f"Grid `{res['name']}`. Device: {env['device']} ({env['device_type']}), torch {env['torch']}, "
         f"{env['threads']} thread(s), kernels={env['kernels']} (Triton decode in use: {env['triton_decode']}). "
         f"Run time: {env['wall_s'] / 60:.1f} minutes for the grid"
         + (f", {env['eval_s'] / 60:.1f} for the evaluation-throughput runs." if env.get("eval_s") else "."),
         f"Per point: a prompt of random token ids, {grid['new_tokens']} greedy new tokens, kvx prefill in chunks of "
         f"{grid['prefill_chunk']}; a warm-up on the first {grid['warmup_tokens']} tokens first; median of "
         f"{grid['repeats']} sweep(s) of the grid. Budget {res['budget']} tokens per KV head and layer for every "
         "eviction method (InfiniPot: a pot of that size).",
         "Decode time per token = median over the steps of one decode step for the whole batch (forward + token "
         "pick). "
         + ("Times are CPU seconds of the measuring process (time.process_time; one thread): the machine is shared, "
            "and the wall clock (kept in the table and bench.json) also counts the time spent waiting for a core. "
            if env["device_type"] == "cpu" else "Times are wall seconds after a CUDA synchronize. ")
         + "Peak memory = peak resident set during the phase minus the resident set before the call "
         + ("(each point in its own forked process; VmHWM reset through /proc/self/clear_refs at each phase; glibc's "
            "mmap threshold fixed at 1 MiB so freed tensors leave the resident set)." if env["isolated"] else
            "(CUDA allocator peak, reset at each phase)."),
         "The machine is shared: timings are noisy, so only ratios of numbers measured side by side in this run are "
         "compared against the goals.\n"]
    if res.get("notes"):
        L += ["## Notes\n", *[f"- {n}" for n in res["notes"]], ""]
    L += ["## Models\n", "| model | layers | hidden | heads / KV heads | head_dim | intermediate | vocab | dtype | "
          "params | cache bytes / weight bytes per token of context (x B x T) | reference | reference's | ours / "
          "reference's |", "|---|---:|---:|---|---:|---:|---:|---|---:|---:|---|---:|---:|"]
    for key, m in res["models"].items():
        c = m["config"]
        L.append(f"| {key} | {c['num_layers']} | {c['hidden_size']} | {c['num_heads']} / {c['num_kv_heads']} | "
                 f"{m['head_dim']} | {c['intermediate_size']} | {c['vocab_size']} | {c['dtype']} | "
                 f"{m['params'] / 1e6:.1f}M | {m['ratio_per_token']:.3e} | {m['reference']} | "
                 f"{m['reference_ratio_per_token']:.3e} | {m['ratio_vs_reference']:.2f} |")
    ctxs = sorted({r["context"] for r in res["rows"]})
    bs = sorted({r["batch"] for r in res["rows"]})
    L.append("\nKV-cache bytes / weight bytes at each point of this grid (decode reads both each step: above 1 the "
             "cache dominates):\n")
    L += ["| model | " + " | ".join(f"B={b}, {t}" for b in bs for t in ctxs) + " |",
          "|---|" + "---:|" * (len(bs) * len(ctxs))]
    for key, m in res["models"].items():
        L.append(f"| {key} | " + " | ".join(f"{m['ratio_per_token'] * b * t:.3f}" for b in bs for t in ctxs) + " |")
        L.append(f"| {m['reference']} | " + " | ".join(f"{m['reference_ratio_per_token'] * b * t:.3f}"
                                                       for b in bs for t in ctxs) + " |")
    L += ["", "## Goals (met / NOT met; – = not measured in this grid)\n", "| goal | figure | target | |",
          "|---|---:|---|---|"]
    L += [f"| {g['goal']} | {g['figure']} | {g['target']} | {g['verdict']} |" for g in goals]
    L += ["", "## Measurements\n",
          "| model | B | context | system | prefill s | decode ms/token | tok/s | wall: prefill s, decode ms/token | "
          "prefill peak MiB | decode peak MiB | cache MiB | promise MiB | cache / promise | aux MiB |",
          "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        if r["status"] != "ok":
            L.append(f"| {r['model']} | {r['batch']} | {r['context']} | {r['system']} | {r['status']} |||||||||")
            continue
        L.append(f"| {r['model']} | {r['batch']} | {r['context']} | {r['system']} | {r['prefill_s']:.3f} | "
                 f"{1e3 * r['decode_s_tok']:.2f} | {r['tok_s']:.1f} | {r['prefill_wall_s']:.2f}, "
                 f"{1e3 * r['decode_wall_s_tok']:.1f} | {fmt(r['prefill_peak'], '.1f', 1 / MIB)} | "
                 f"{fmt(r['decode_peak'], '.1f', 1 / MIB)} | {r['cache_bytes'] / MIB:.2f} | "
                 f"{fmt(r['promise'] or None, '.2f', 1 / MIB)} | {fmt(r['promise_ratio'], '.4f')} | "
                 f"{r['cache_aux'] / MIB:.2f} |")
    L += ["", "Promise = bytes the method says it holds: eviction budget x layers x KV heads x 2 x head_dim x dtype "
          "bytes x B (LESS adds its float32 state, R x head_dim + R per KV head; InfiniPot's is a ceiling, the pot); "
          "quantized: per token and KV head, for K and V, the codes (ceil(head_dim x bits / 8) bytes), one bit-width "
          "byte and a 16-bit zero and scale per group (KIVI's keys: per channel per block of group_size tokens), "
          "plus the full-precision residual window; QAQ: the same from the widths it chose. Aux = token indices and "
          "row offsets held beside the payload (not in the promise). transformers' caches: the tensors they hold."]
    sysr = [(r, lookup(res["rows"], r["model"], s, r["batch"], r["context"]))
            for r in res["rows"] for s in [r["system"]] if r["status"] == "ok"]
    L += ["", "## Ratios (same run)\n", "| model | B | context | system | decode / kvx full | decode / generate | "
          "prefill / kvx full | prefill peak / kvx full's |", "|---|---:|---:|---|---:|---:|---:|---:|"]
    kinds = res["kinds"]
    full = next((s for s in res["systems"] if kinds[s] == "full"), None)
    gen = next((s for s in res["systems"] if kinds[s] == GENERATE), None)
    for r, _ in sysr:
        f = lookup(res["rows"], r["model"], full, r["batch"], r["context"]) if full else None
        h = lookup(res["rows"], r["model"], gen, r["batch"], r["context"]) if gen else None

        def rat(a, b, k):
            return None if a is None or b is None or not b.get(k) or a.get(k) is None else a[k] / b[k]

        L.append(f"| {r['model']} | {r['batch']} | {r['context']} | {r['system']} | "
                 f"{fmt(rat(r, f, 'decode_s_tok'))} | {fmt(rat(r, h, 'decode_s_tok'))} | {fmt(rat(r, f, 'prefill_s'))} "
                 f"| {fmt(rat(r, f, 'prefill_peak'))} |")
    if evals:
        L += ["", "## Evaluation throughput: kvx's perplexity task (stories260k, TinyStories, window 512, each "
              "method's default config)\n", "| mode | method | tokens | seconds | tokens/s | / full | ppl |",
              "|---|---|---:|---:|---:|---:|---:|"]
        for r in evals:
            if r["status"] != "ok":
                L.append(f"| {r['mode']} | {r['method']} | {r['status']} |||||")
                continue
            L.append(f"| {r['mode']} | {r['method']} | {r['tokens']} | {r['seconds']:.1f} | {r['tok_s']:.1f} | "
                     f"{fmt(r['vs_full'])} | {r['ppl']:.3f} |")
        L += ["", "Stream mode feeds a compressing method one token per forward (as decoding does), the full cache a whole "
              f"window per forward; `{TOKEN_BY_TOKEN}` is the full cache fed one token per forward: the ceiling of "
              "any method's stream mode on this model, where the forward's own cost per call dominates. Masked mode "
              "runs one parallel forward per window and steps each policy one query at a time beside it (the "
              "StreamingLLM mask has a closed form, LESS over it too)."]
    L += ["", "![decode time per token](decode_time.png)", "", "![peak memory](peak_memory.png)", ""]
    (out_dir / "bench.md").write_text("\n".join(L))
    (out_dir / "bench.json").write_text(json.dumps({"command": command, **res, "eval": evals, "goals": goals},
                                                   indent=1, default=str) + "\n")
    plot(res, out_dir)


def plot(res: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["rows"] if r["status"] == "ok"]
    panels = sorted({(r["model"], r["batch"]) for r in rows})
    specs = [("decode_time.png", [("decode_s_tok", 1e3, "decode time per token (ms)")]),
             ("peak_memory.png", [("prefill_peak", 1 / MIB, "prefill peak memory (MiB)"),
                                  ("decode_peak", 1 / MIB, "decode peak memory (MiB)")])]
    for fname, keys in specs:
        fig, axes = plt.subplots(len(keys), max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 4 * len(keys)),
                                 squeeze=False)
        for i, (key, scale, ylabel) in enumerate(keys):
            for ax, (model, B) in zip(axes[i], panels):
                for j, s in enumerate(res["systems"]):
                    pts = sorted((r["context"], r[key]) for r in rows if r["system"] == s and r["model"] == model
                                 and r["batch"] == B and r.get(key))
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] * scale for p in pts], marker="os^Dv"[j % 5],
                                color=plt.cm.tab20(j % 20), label=s,
                                linestyle="--" if res["kinds"][s] in (GENERATE, "hf_quant") else "-")
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("context (tokens)")
                ax.set_ylabel(ylabel)
                ax.set_title(f"{model}, batch {B}")
                ax.grid(True, which="both", alpha=0.3)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=100)
        plt.close(fig)


def print_goals(goals: list[dict]) -> None:
    print("\n[bench] goals (ratios measured side by side in this run)")
    for g in goals:
        print(f"  {g['verdict']:>7}  {g['goal']}: {g['figure']} (goal {g['target']})")


@hydra.main(version_base=None, config_path="../configs", config_name="bench")
def main(cfg: DictConfig) -> None:
    command = "python scripts/bench.py" + "".join(" " + shlex.quote(a) for a in sys.argv[1:])
    res = measure(cfg)
    t0 = time.perf_counter()
    evals = eval_throughput(cfg) if cfg.eval.enabled else []
    res["env"]["eval_s"] = time.perf_counter() - t0 if evals else None
    goals = evaluate_goals(res, evals, int(cfg.long_context), int(cfg.short_context))
    print_goals(goals)
    out_dir = Path(cfg.out) / cfg.name
    if not out_dir.is_absolute():
        out_dir = ROOT / out_dir
    write_report(res, evals, goals, out_dir, command)
    print(f"\n[bench] wrote {out_dir}/bench.md, bench.json, decode_time.png, peak_memory.png")


if __name__ == "__main__":
    main()
