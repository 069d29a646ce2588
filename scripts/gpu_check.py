"""The GPU check (`make gpu-check`, scripts/gpu_check.sh): one prepared run for a machine with an NVIDIA GPU.

1. The Triton kernels natively (no interpreter) against their torch twins on CUDA, in fp16 and bf16, at small shapes
   and at a 7B model's geometry: decode attention (dense, with the H2O score sums, with LESS's low-rank term) and the
   fused dequantize + decode attention of the quantized store, the latter also split-K with explicit split counts
   and slot blocks of 16, 32 and 64 (with outliers) up to 16k tokens. (tests/test_decode_kernels.py and
   tests/test_quant_kernels.py run the same kernels under TRITON_INTERPRET=1 on CPU tensors.)
2. The bench grid on CUDA at a 7B model's full geometry in bfloat16 (`python scripts/bench.py bench=cuda`), into
   <out>/cuda/bench.md.
3. The bandwidth of the decode kernels: bytes read per call / time per call / the card's peak bandwidth (the table
   below, by device name), goal >= 60%.

Writes <out>/cuda.md with the command on top. Without a GPU (or with --dry-run) nothing is measured: cuda.md says so
and gives the command, with the bytes each bandwidth case reads.

    python scripts/gpu_check.py [--out results/bench] [--dry-run] [--skip-grid]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# peak memory bandwidth, bytes/s, from the vendors' data sheets; the first name fragment found in the device name wins
PEAK_BANDWIDTH = [
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM5
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100-PCIE-40GB", 1.555e12),
    ("A100", 1.555e12),  # SXM4 40GB
]
GOAL = 0.60
# decode-kernel cases: (label, B, Hq, Hkv, N, D) at a 7B model's geometry, one layer per call
CASES = [
    ("Llama-3-8B layer, B=1, 16k", 1, 32, 8, 16384, 128),
    ("Llama-3-8B layer, B=8, 16k", 8, 32, 8, 16384, 128),
    ("Llama-2-7B layer, B=8, 4k", 8, 32, 32, 4096, 128),
]


def peak_bandwidth(device_name: str) -> float | None:
    for frag, bw in PEAK_BANDWIDTH:
        if frag.lower() in device_name.lower():
            return bw
    return None


def dense_bytes(B, Hq, Hkv, N, D, elem: int) -> int:
    """Bytes one dense decode call reads and writes: K and V, the query, the output."""
    return (2 * B * Hkv * N * D + 2 * B * Hq * D) * elem


def quant_bytes(B, Hq, Hkv, N, D, bits: int, elem: int) -> int:
    """Bytes one 4-bit (uniform, per-token groups of head_dim) decode call reads: codes, 16-bit zero and scale, the
    row offset and width, for K and V; query and output."""
    per_row = (D * bits + 7) // 8 + 4 + 4 + 1
    return 2 * B * Hkv * N * per_row + 2 * B * Hq * D * elem


def cuda_time(fn, iters: int = 50) -> float:
    """Median seconds per call (CUDA events), after a warm-up."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def kernel_checks(dtypes) -> list[dict]:
    """Triton against the torch twin on CUDA: max |difference| over the outputs (and score sums)."""
    from kvx import kernels
    from kvx.kernels.decode import decode_attention

    out = []
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(2, 4, 4, 37, 16), (3, 8, 2, 300, 64), (1, 32, 8, 4096, 128), (2, 32, 32, 1000, 128)]
    for dtype in dtypes:
        for B, Hq, Hkv, N, D in shapes:
            q = torch.randn(B, Hq, D, device="cuda", generator=g, dtype=dtype)
            k = torch.randn(B, Hkv, N, D, device="cuda", generator=g, dtype=dtype)
            v = torch.randn(B, Hkv, N, D, device="cuda", generator=g, dtype=dtype)
            lengths = torch.randint(1, N + 1, (B, Hkv), device="cuda", generator=g)
            res = {}
            for backend in ("ref", "triton"):
                kernels.set_backend(backend)
                res[backend] = decode_attention(q, k, v, lengths, D**-0.5, return_scores=True)
            kernels.set_backend("auto")
            err = (res["ref"][0].float() - res["triton"][0].float()).abs().max().item()
            serr = (res["ref"][1].float() - res["triton"][1].float()).abs().max().item()
            tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
            out.append({"kernel": "decode_attention (+ score sums)", "shape": f"B={B} Hq={Hq} Hkv={Hkv} N={N} D={D}",
                        "dtype": str(dtype).split(".")[-1], "max_err": max(err, serr), "tol": tol,
                        "ok": err <= tol and serr <= tol})
            out.append(quant_check(B, Hq, Hkv, N, D, dtype, g))
        out += quant_split_checks(dtype, g)
    return out


SPLITS = [(1, 16), (3, 16), (16, 16), (None, 16), (4, 32), (None, 64)]  # (num_splits, slot block); None: fill the GPU


def quant_split_checks(dtype, g) -> list[dict]:
    """Split-K of the fused quantized decode kernel, natively: explicit split counts and slot blocks (and the default,
    which fills the device) against the torch twin, on a 4-bit store with 1% outliers (the runtime outlier bound) at
    a 7B model's geometry and long context; output and log-sum-exp."""
    from kvx.kernels.quant import decode_attention_quant_ref
    from kvx.kernels.quant_triton import decode_attention_quant_triton

    out = []
    for B, Hq, Hkv, N, D in [(1, 32, 8, 16384, 128), (4, 32, 32, 2000, 128)]:
        store = quant_store(B, Hkv, N, D, dtype, g, outliers=0.01)
        q = torch.randn(B, Hq, D, device="cuda", generator=g, dtype=dtype)
        nq = store.nq
        args = (q, store.kq.rows(), store.vq.rows(), store.pos[:, :, :nq], store.k, store.v, store.pos[:, :, nq:],
                torch.full((B,), N, device="cuda"), D**-0.5)
        ref_out, _, ref_lse = decode_attention_quant_ref(*args)
        for splits, block_n in SPLITS:
            tri_out, _, tri_lse = decode_attention_quant_triton(*args, num_splits=splits, block_n=block_n)
            err = (ref_out.float() - tri_out.float()).abs().max().item()
            lerr = (ref_lse.float() - tri_lse.float()).abs().max().item()
            tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
            out.append({"kernel": f"decode_attention_quant split-K (splits={splits or 'auto'}, block {block_n})",
                        "shape": f"B={B} Hq={Hq} Hkv={Hkv} N={N} D={D}", "dtype": str(dtype).split(".")[-1],
                        "max_err": max(err, lerr), "tol": tol, "ok": err <= tol and lerr <= tol})
    return out


def quant_store(B, Hkv, N, D, dtype, g, bits: int = 4, outliers: float = 0.0):
    """A uniform `bits`-bit QuantizedStore on CUDA holding N random tokens (all quantized but one)."""
    from kvx.methods.base import ArchInfo
    from kvx.methods.uniform import Uniform

    store = Uniform(bits=bits, outliers=outliers).make_store(0, ArchInfo(1, Hkv, Hkv, D, 1 << 20, torch.finfo(dtype).bits // 8))
    k = torch.randn(B, Hkv, N, D, device="cuda", generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, N, D, device="cuda", generator=g, dtype=dtype)
    pos = torch.arange(N, device="cuda").expand(B, Hkv, N)
    store.append(k, v, pos)
    store.flush()
    return store


def quant_call(store, B, Hq, Hkv, N, D, dtype, g):
    from kvx.kernels.quant import decode_attention_quant

    q = torch.randn(B, Hq, D, device="cuda", generator=g, dtype=dtype)
    nq = store.nq
    qpos = torch.full((B,), N, device="cuda")
    args = (q, store.kq.rows(), store.vq.rows(), store.pos[:, :, :nq], store.k, store.v, store.pos[:, :, nq:], qpos,
            D**-0.5)
    return lambda: decode_attention_quant(*args)


def quant_check(B, Hq, Hkv, N, D, dtype, g) -> dict:
    from kvx import kernels

    store = quant_store(B, Hkv, N, D, dtype, g)
    call = quant_call(store, B, Hq, Hkv, N, D, dtype, g)
    res = {}
    for backend in ("ref", "triton"):
        kernels.set_backend(backend)
        res[backend] = call()[0]
    kernels.set_backend("auto")
    err = (res["ref"].float() - res["triton"].float()).abs().max().item()
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    return {"kernel": "decode_attention_quant (4-bit)", "shape": f"B={B} Hq={Hq} Hkv={Hkv} N={N} D={D}",
            "dtype": str(dtype).split(".")[-1], "max_err": err, "tol": tol, "ok": err <= tol}


def bandwidth(dtype, peak: float | None) -> list[dict]:
    from kvx import kernels
    from kvx.kernels.decode import decode_attention

    kernels.set_backend("triton")
    g = torch.Generator(device="cuda").manual_seed(1)
    out = []
    elem = torch.finfo(dtype).bits // 8
    for label, B, Hq, Hkv, N, D in CASES:
        q = torch.randn(B, Hq, D, device="cuda", generator=g, dtype=dtype)
        k = torch.randn(B, Hkv, N, D, device="cuda", generator=g, dtype=dtype)
        v = torch.randn(B, Hkv, N, D, device="cuda", generator=g, dtype=dtype)
        for kind, nbytes, fn in [
            ("dense", dense_bytes(B, Hq, Hkv, N, D, elem), partial(decode_attention, q, k, v, None, D**-0.5)),
            ("4-bit", quant_bytes(B, Hq, Hkv, N, D, 4, elem),
             quant_call(quant_store(B, Hkv, N, D, dtype, g), B, Hq, Hkv, N, D, dtype, g)),
        ]:
            t = cuda_time(fn)
            bw = nbytes / t
            out.append({"case": label, "kind": kind, "bytes": nbytes, "us": t * 1e6, "GBps": bw / 1e9,
                        "fraction": None if peak is None else bw / peak})
    kernels.set_backend("auto")
    return out


def planned_bandwidth(dtype) -> list[dict]:
    elem = torch.finfo(dtype).bits // 8
    return [{"case": label, "kind": kind, "bytes": nb, "us": None, "GBps": None, "fraction": None}
            for label, B, Hq, Hkv, N, D in CASES
            for kind, nb in (("dense", dense_bytes(B, Hq, Hkv, N, D, elem)),
                             ("4-bit", quant_bytes(B, Hq, Hkv, N, D, 4, elem)))]


def write(out: Path, command: str, device: str | None, checks, bw, grid: str | None, peak) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    L = ["# kvx on CUDA: native Triton kernels, the 7B-geometry grid, decode bandwidth\n", f"Command: `{command}`\n"]
    if device is None:
        L += ["**Unmeasured**: no GPU was available where this file was written, so nothing below was measured on "
              "CUDA. On a machine with an NVIDIA GPU run `make gpu-check` (or the command above without "
              "`--dry-run`); it replaces this file with the measurements.\n",
              "What it runs: the Triton decode kernels natively against their torch twins (fp16, bf16; small shapes "
              "and 7B geometry), `python scripts/bench.py bench=cuda` (Llama-3-8B geometry, random weights, "
              "bfloat16, batch 1 and 8 up to 16k tokens, every system), and the bandwidth figure below.\n"]
    else:
        L.append(f"Device: {device}; peak bandwidth {fmt_bw(peak)} (table in scripts/gpu_check.py); torch "
                 f"{torch.__version__}.\n")
    if checks:
        bad = [c for c in checks if not c["ok"]]
        L += [f"## Triton kernels against their torch twins (native): {len(checks) - len(bad)} / {len(checks)} "
              "within tolerance\n", "| kernel | shape | dtype | max abs error | tolerance | |", "|---|---|---|---:|---:|---|"]
        L += [f"| {c['kernel']} | {c['shape']} | {c['dtype']} | {c['max_err']:.2e} | {c['tol']:.0e} | "
              f"{'ok' if c['ok'] else 'FAIL'} |" for c in checks]
        L.append("")
    L += ["## Decode-kernel bandwidth (one layer per call; goal >= 60% of the card's peak)\n",
          "| case | cache | bytes read | time µs | GB/s | of peak | goal |", "|---|---|---:|---:|---:|---:|---|"]
    for r in bw:
        frac = r["fraction"]
        L.append(f"| {r['case']} | {r['kind']} | {r['bytes']:,} | {fmt(r['us'], '.1f')} | {fmt(r['GBps'], '.0f')} | "
                 f"{'–' if frac is None else f'{100 * frac:.0f}%'} | "
                 f"{'unmeasured' if frac is None else ('met' if frac >= GOAL else 'NOT met')} |")
    L += ["", "Peak bandwidths used (vendor data sheets): " + ", ".join(f"{n} {b / 1e12:.2f} TB/s"
                                                                       for n, b in PEAK_BANDWIDTH) + "."]
    if grid:
        L += ["", f"## The grid on CUDA\n\nSee [{grid}]({grid})."]
    path = out / "cuda.md"
    path.write_text("\n".join(L) + "\n")
    return path


def fmt(x, spec):
    return "–" if x is None else format(x, spec)


def fmt_bw(b):
    return "unknown (not in the table)" if b is None else f"{b / 1e12:.2f} TB/s"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/bench")
    ap.add_argument("--dry-run", action="store_true", help="measure nothing: write cuda.md as unmeasured")
    ap.add_argument("--skip-grid", action="store_true", help="skip the bench grid (kernels and bandwidth only)")
    args = ap.parse_args(argv)
    command = "python scripts/gpu_check.py" + "".join(" " + shlex.quote(a) for a in (argv or sys.argv[1:]))
    out = Path(args.out) if Path(args.out).is_absolute() else ROOT / args.out
    dtype = torch.bfloat16
    if args.dry_run or not torch.cuda.is_available():
        path = write(out, command, None, [], planned_bandwidth(dtype), None, None)
        print(f"[gpu-check] no GPU used: wrote {path} (unmeasured)")
        return 0
    device = torch.cuda.get_device_name(0)
    peak = peak_bandwidth(device)
    t0 = time.perf_counter()
    checks = kernel_checks([torch.float16, torch.bfloat16])
    bw = bandwidth(dtype, peak)
    grid = None
    if not args.skip_grid:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "bench=cuda", f"out={out}"], check=True,
                       cwd=ROOT)
        grid = "cuda/bench.md"
    path = write(out, command, device, checks, bw, grid, peak)
    print(f"[gpu-check] wrote {path} ({time.perf_counter() - t0:.0f} s)")
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
