"""Perplexity over windows of a text corpus: WikiText-2/103, PG-19, TinyStories, or any local text/jsonl file.

Recipe (as in the assets README and the H2O/LESS evaluations): documents tokenised with BOS (no EOS), concatenated,
cut to the first `max_tokens` tokens; windows of `window` inputs each predicting the next token, advancing by
`stride` (= window: disjoint windows; smaller: each window scores only its last `stride` targets).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from kvx.errors import ConfigError, DataError
from kvx.registry import TASKS
from kvx.tasks.base import RunContext, Task, TaskResult, data_paths, read_jsonl, read_text

HUB = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", "text", "join"),
    "wikitext103": ("wikitext", "wikitext-103-raw-v1", "test", "text", "join"),
    "pg19": ("deepmind/pg19", None, "test", "text", "docs"),
    "tinystories": ("roneneldan/TinyStories", None, "validation", "text", "docs"),
}


def load_documents(dataset: str, data_files, text_field: str = "text", split: str | None = None) -> list[str]:
    """Documents from local files (one .txt file = one document; one jsonl row = one document) or the hub."""
    paths = data_paths(data_files)
    if paths:
        docs: list[str] = []
        for p in paths:
            if not p.is_file():
                raise DataError(f"task.data_files: {p} does not exist")
            if p.suffix in (".jsonl", ".json"):
                docs += [r[text_field] for r in read_jsonl(p, required=[text_field], text=[text_field])]
            else:
                text = read_text(p)
                if not text.strip():
                    raise DataError(f"task.data_files: {p} is empty")
                docs.append(text)
        return docs
    if dataset not in HUB:
        raise ConfigError("task.data_files", f"dataset {dataset!r} has no hub source; give local files in task.data_files")
    repo, conf, default_split, field_name, layout = HUB[dataset]
    try:
        import datasets

        ds = datasets.load_dataset(repo, conf, split=split or default_split)
    except Exception as e:  # the hub is unreachable or the dataset is missing
        raise DataError(
            f"cannot load {repo} ({conf or 'default'}) from the hub ({type(e).__name__}: {e}); "
            "set task.data_files to local files"
        ) from e
    texts = [str(t) for t in ds[field_name]]
    if layout == "join":
        return ["".join(texts)]
    return texts


def tokenize_documents(tokenizer, docs: list[str], bos_per_document: bool, max_tokens: int | None) -> list[int]:
    ids: list[int] = []
    bos = tokenizer.bos_token_id
    for doc in docs:
        toks = tokenizer(doc, add_special_tokens=False).input_ids
        if bos_per_document and bos is not None:
            toks = [bos] + toks
        ids += toks
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return ids


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_scored): inputs ids[begin:end] predict ids[begin+1:end+1]; only the last n_scored count."""
    out, prev_end = [], 0
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + window, n_tokens - 1)
        out.append((begin, end, end - max(prev_end, begin)))
        prev_end = end
        if end == n_tokens - 1:
            break
    return out


def compression_metrics(acct: dict[str, int], full_bytes: int, held_bytes: int) -> dict:
    """Compression of any method, two ways:
    - `compression_bytes`: the bytes a full cache holds for the same tokens over the bytes this cache held on the
      compute device at its peak (everything the store holds: codes, metadata, outliers, addressing);
    - `compression_bits`: 16 over the average bits per element held, as the QAQ paper counts them (codes at their
      width, zero/scale, outliers and full-precision elements at 16 bits, outlier indices included), over the
      caches held at the end of each window; 1.0 for a method that keeps what it holds at full precision.
    Beside them the average code bits of quantized keys and values."""
    out = {}
    if held_bytes:
        out["compression_bytes"] = full_bytes / held_bytes
    if acct.get("acct_bits"):
        out["compression_bits"] = 16.0 * acct["acct_elements"] / acct["acct_bits"]
    q = acct.get("acct_quantized_elements", 0)
    if q:
        out["avg_key_bits"] = acct["acct_key_code_bits"] / q
        out["avg_value_bits"] = acct["acct_value_code_bits"] / q
    return out


def full_cache_bytes(arch, batch: int, tokens: int) -> int:
    """Bytes of a full-precision cache holding `tokens` tokens of `batch` sequences in every layer."""
    return batch * tokens * arch.n_layers * arch.n_kv_heads * 2 * arch.head_dim * arch.dtype_bytes


@TASKS.register("perplexity")
@dataclass
class Perplexity(Task):
    type: str = "perplexity"
    name: str = "tinystories"
    dataset: str = "tinystories"  # tinystories | wikitext2 | wikitext103 | pg19 | text (local files only)
    text_field: str = "text"
    split: str | None = None
    max_tokens: int | None = 60000
    window: int = 512
    stride: int | None = None  # default: window (disjoint windows)
    bos_per_document: bool = True
    chunk_size: int | None = None  # stream mode: tokens per forward (default 1 for compressing methods)
    batch_size: int = 1

    def validate(self) -> None:
        super().validate()
        if self.window <= 0:
            raise ConfigError("task.window", f"must be > 0, got {self.window}")
        if self.stride is not None and not 0 < self.stride <= self.window:
            raise ConfigError("task.stride", f"must lie in [1, window={self.window}], got {self.stride}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ConfigError("task.max_tokens", f"must be >= 2, got {self.max_tokens}")
        if self.batch_size < 1:
            raise ConfigError("task.batch_size", f"must be >= 1, got {self.batch_size}")

    def check(self) -> None:
        if self.data_files is not None:
            load_documents(self.dataset, self.data_files, self.text_field, self.split)

    def run(self, engine, ctx: RunContext) -> TaskResult:
        if self.window > engine.arch.max_positions:
            raise ConfigError(
                "task.window",
                f"{self.window} is longer than the model's context (max_position_embeddings="
                f"{engine.arch.max_positions})",
            )
        docs = load_documents(self.dataset, self.data_files, self.text_field, self.split)
        ids = tokenize_documents(engine.tokenizer, docs, self.bos_per_document, self.max_tokens)
        if len(ids) < 2:
            raise DataError(f"task {self.name}: fewer than 2 tokens in the data")
        x = torch.tensor(ids)
        wins = windows(len(ids), self.window, self.stride or self.window)
        total_nll, total_n, correct, peak, aux, offload, full_peak = 0.0, 0, 0, 0, 0, 0, 0
        acct: dict[str, int] = {}
        score_bytes = state_bytes = 0
        outputs = []
        t0 = time.perf_counter()
        groups = [wins[i : i + self.batch_size] for i in range(0, len(wins), self.batch_size)]
        bar = ctx.progress(groups, desc=f"{self.name} [{self.mode}]", unit="batch", total=len(groups))
        for group in bar:
            lengths = {e - b for b, e, _ in group}
            batches = [group] if len(lengths) == 1 else [[w] for w in group]
            for batch in batches:
                inp = torch.stack([x[b : e + 1] for b, e, _ in batch])
                nll, stats = engine.score_window(inp, mode=self.mode, chunk_size=self.chunk_size, return_logits=True)
                logits = stats.pop("logits")
                peak = max(peak, stats["cache_bytes_peak"])
                full_peak = max(full_peak, full_cache_bytes(engine.arch, inp.shape[0], inp.shape[1] - 1))
                aux = max(aux, stats.get("cache_aux_bytes", 0))
                score_bytes = max(score_bytes, stats.get("score_bytes", 0))
                state_bytes = max(state_bytes, stats.get("state_bytes", 0))
                offload = max(offload, stats.get("acct_offload_bytes", 0))
                for k, v in stats.items():
                    if k.startswith("acct_"):
                        acct[k] = acct.get(k, 0) + v
                for r, (b, e, n_sc) in enumerate(batch):
                    s_nll = nll[r, -n_sc:]
                    hit = logits[r, -n_sc:].argmax(-1).cpu() == x[e + 1 - n_sc : e + 1]
                    hits = int(hit.sum())
                    total_nll += float(s_nll.sum())
                    total_n += n_sc
                    correct += hits
                    outputs.append(
                        {"begin": b, "end": e, "tokens": n_sc, "nll": float(s_nll.mean()), "acc": hits / n_sc,
                         "hits": "".join("1" if h else "0" for h in hit.tolist())}  # per token (bootstrap)
                    )
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(ppl=f"{math.exp(total_nll / total_n):.3f}")
        nll_mean = total_nll / total_n
        metrics = {
            "ppl": math.exp(nll_mean),
            "nll": nll_mean,
            "acc": correct / total_n,
            "tokens": total_n,
            "windows": len(wins),
            "mode": self.mode,
            "cache_bytes_peak": peak,  # on the compute device, everything the store holds
            "cache_offload_bytes": offload,  # held off the compute device (QAQ's full-precision copy)
            "cache_total_bytes": peak + offload,
            "full_cache_bytes": full_peak,  # a full cache for the same tokens
            "cache_aux_bytes": aux,
            "score_bytes": score_bytes,
            "task_seconds": time.perf_counter() - t0,
        }
        if state_bytes:  # a constant-size state beside the cached tokens (LESS): its bytes, and in tokens
            a = engine.arch
            metrics["state_bytes"] = state_bytes
            metrics["state_tokens"] = state_bytes / (a.n_layers * a.n_kv_heads * 2 * a.head_dim * a.dtype_bytes)
        metrics.update(compression_metrics(acct, full_peak, peak))
        return TaskResult(metrics=metrics, outputs=outputs)
