"""Perplexity of each story's ending after streaming the whole story through a memory-constrained cache.

Each story (one document, BOS first, cut to `max_tokens`) at least `min_tokens` long is fed through the method's
cache from its first token; the loss is measured on the story's last `tail` share of tokens (25% by default), whose
predictions are made from whatever the cache kept of everything before them. With a pot method (InfiniPot and the
baselines scored inside its pot) the story is fed in the pot's own chunks, so every method holds the same memory;
other compressing methods are fed `chunk_size` tokens per forward (default 1: real token-by-token streaming).

`concat_tokens`: sequences longer than the model's context, each made of consecutive whole stories (BOS before each)
cut to exactly `concat_tokens` tokens; `score_from` then scores every token at that position or later (e.g. all
beyond a 512-token context) instead of the `tail` share. `prefill: full` is the memory-unconstrained protocol of
InfiniPot's baselines: everything before the scored tokens goes through the model in one forward (the method
compresses it afterwards, e.g. SnapKV), then the scored tokens are fed one at a time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvx.errors import ConfigError, DataError
from kvx.registry import TASKS
from kvx.tasks.base import RunContext, Task, TaskResult
from kvx.tasks.perplexity import load_documents


@TASKS.register("pot_ppl")
@dataclass
class PotPerplexity(Task):
    type: str = "pot_ppl"
    name: str = "tinystories_pot"
    dataset: str = "tinystories"  # label of the data; local files in data_files (else the hub's copy)
    text_field: str = "text"
    split: str | None = None
    min_tokens: int = 256  # stories shorter than this (BOS included, after the cut) are skipped: longer than the pot
    max_tokens: int | None = 480  # each story is cut to its first max_tokens tokens (below the context)
    tail: float = 0.25  # share of each story's tokens whose loss is measured (its ending)
    chunk_size: int | None = None  # tokens per forward; null: the method's own (a pot's chunks; 1 for other compressors)
    allow_beyond_context: bool = False  # let rotary positions pass the model's context (read by the runner)
    concat_tokens: int | None = None  # sequences of consecutive stories cut to this many tokens (null: one story each)
    score_from: int | None = None  # score positions >= this (null: the last `tail` share of each sequence)
    prefill: str = "stream"  # stream: the method's own feeding | full: the context in one forward, then token by token

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.tail < 1.0:
            raise ConfigError("task.tail", f"must lie in (0, 1), got {self.tail}")
        if self.min_tokens < 2:
            raise ConfigError("task.min_tokens", f"must be >= 2, got {self.min_tokens}")
        if self.max_tokens is not None and self.max_tokens < self.min_tokens:
            raise ConfigError("task.max_tokens", f"must be >= min_tokens={self.min_tokens}, got {self.max_tokens}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError("task.chunk_size", f"must be >= 1 or null, got {self.chunk_size}")
        if self.concat_tokens is not None and self.concat_tokens < 2:
            raise ConfigError("task.concat_tokens", f"must be >= 2 or null, got {self.concat_tokens}")
        if self.score_from is not None and not 1 <= self.score_from < (self.concat_tokens or self.min_tokens):
            raise ConfigError("task.score_from", f"must lie in [1, {self.concat_tokens or self.min_tokens}) (the "
                              f"shortest sequence), got {self.score_from}")
        if self.prefill not in ("stream", "full"):
            raise ConfigError("task.prefill", f"must be 'stream' or 'full', got {self.prefill!r}")
        if self.prefill == "full" and self.mode != "stream":
            raise ConfigError("task.prefill", "'full' feeds a real cache: it needs task.mode=stream")

    def check(self) -> None:
        if self.data_files is not None:
            load_documents(self.dataset, self.data_files, self.text_field, self.split)

    def stories(self, tokenizer) -> list[tuple[int, list[int]]]:
        """(document index, token ids) of the stories used, in file order, at most `limit` of them."""
        docs = load_documents(self.dataset, self.data_files, self.text_field, self.split)
        bos = tokenizer.bos_token_id
        if self.concat_tokens is not None:
            return self._concatenated(docs, tokenizer, bos)
        out = []
        for i, doc in enumerate(docs):
            ids = ([bos] if bos is not None else []) + list(tokenizer(doc, add_special_tokens=False).input_ids)
            if self.max_tokens is not None:
                ids = ids[: self.max_tokens]
            if len(ids) >= self.min_tokens:
                out.append((i, ids))
                if self.limit is not None and len(out) >= self.limit:
                    break
        if not out:
            raise DataError(f"task {self.name}: no document has at least min_tokens={self.min_tokens} tokens")
        return out

    def _concatenated(self, docs: list[str], tokenizer, bos) -> list[tuple[int, list[int]]]:
        """(index of the first story, token ids) of sequences of consecutive stories cut to concat_tokens each."""
        out, cur, first = [], [], 0
        for i, doc in enumerate(docs):
            if not cur:
                first = i
            cur += ([bos] if bos is not None else []) + list(tokenizer(doc, add_special_tokens=False).input_ids)
            if len(cur) >= self.concat_tokens:
                out.append((first, cur[: self.concat_tokens]))
                cur = []
                if self.limit is not None and len(out) >= self.limit:
                    break
        if not out:
            raise DataError(f"task {self.name}: the documents hold fewer than concat_tokens={self.concat_tokens} tokens")
        return out

    def n_scored(self, n: int) -> int:
        """How many of a sequence's n tokens are scored (its last ones)."""
        if self.score_from is not None:
            return n - self.score_from
        return max(1, math.ceil(self.tail * n))

    def score_story(self, engine, ids: list[int]) -> tuple[torch.Tensor, dict]:
        """Loss [n_tail] of the story's last tokens, and the cache statistics of the run."""
        x = torch.tensor([ids], device=engine.device)
        inp, n_tail = x[:, :-1], self.n_scored(len(ids))
        if self.prefill == "full":
            # x: [1, L]; inp[:, :L - n_tail] in one forward (its last logits predict the first scored token)
            cache = engine.new_cache(1, seq_len=inp.shape[1])
            split = len(ids) - n_tail
            head = engine.prefill(cache, inp[:, :split], None, split)
            rest = engine.prefill(cache, inp[:, split:], None, 1) if split < inp.shape[1] else head[:, :0]
            logits = torch.cat([head, rest], dim=1)
            peak = cache.peak_bytes
        elif self.mode == "masked":
            cache = engine.new_cache(1, seq_len=inp.shape[1], mode="masked")
            logits = engine.forward(cache, inp)
            peak = cache.masked_peak_bytes(1)
        else:
            cache = engine.new_cache(1, seq_len=inp.shape[1])
            step = self.chunk_size
            if step is None and engine.method.compresses and engine.method.max_chunk(cache) is None:
                step = 1
            logits = engine.prefill(cache, inp, None, step)
            peak = cache.peak_bytes
        nll = F.cross_entropy(logits[0, -n_tail:].float(), x[0, -n_tail:], reduction="none")
        stats = {"cache_bytes_peak": peak}
        pot = getattr(cache, "pot", None)
        if pot is not None:
            stats["distillations"] = pot.distillations
        return nll, stats

    def run(self, engine, ctx: RunContext) -> TaskResult:
        a = engine.arch
        token_bytes = a.n_layers * a.n_kv_heads * 2 * a.head_dim * a.dtype_bytes  # one fp token in every layer
        stories = self.stories(engine.tokenizer)
        total_nll, total_n, peak, story_ppl, outputs = 0.0, 0, 0, [], []
        t0 = time.perf_counter()
        bar = ctx.progress(stories, desc=f"{self.name} [{self.mode}]", unit="story", total=len(stories))
        for doc, ids in bar:
            nll, stats = self.score_story(engine, ids)
            s = float(nll.sum())
            total_nll += s
            total_n += nll.numel()
            peak = max(peak, stats["cache_bytes_peak"])
            story_ppl.append(math.exp(s / nll.numel()))
            outputs.append({"doc": doc, "tokens": len(ids), "scored": nll.numel(), "nll": s / nll.numel(),
                            "ppl": story_ppl[-1], **stats})
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(ppl=f"{math.exp(total_nll / total_n):.3f}")
        nll_mean = total_nll / total_n
        metrics = {
            "ppl": math.exp(nll_mean),
            "nll": nll_mean,
            "ppl_story_mean": sum(story_ppl) / len(story_ppl),
            "tokens": total_n,
            "stories": len(stories),
            "story_tokens_mean": sum(len(i) for _, i in stories) / len(stories),
            "mode": self.mode,
            "cache_bytes_peak": peak,
            "cache_tokens_peak": peak / token_bytes,  # peak bytes in units of one full-precision token per layer
            "task_seconds": time.perf_counter() - t0,
        }
        return TaskResult(metrics=metrics, outputs=outputs)
