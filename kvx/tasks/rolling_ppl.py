"""Word-level rolling document perplexity: lm-eval's `wikitext` protocol, the metric the LESS paper reports.

lm-evaluation-harness scores WikiText one document at a time (`loglikelihood_rolling`): the document (after lm-eval's
WikiText detokenizer) is tokenised without BOS and cut into disjoint windows of `window` tokens (its max_length); the
first window is predicted from the BOS/EOS prefix token and each later one from the tokens before it inside its
window. Its headline is `word_perplexity` = exp(-sum of log-likelihoods / sum of words), the words counted in the
original document (`len(re.split(r"\\s+", page))`), beside `byte_perplexity` and `bits_per_byte`.

This task runs that protocol through kvx's lm-eval model (kvx.tasks.harness.KVXLM, the same code `task=harness
task.tasks=[wikitext]` runs), so its numbers equal lm-eval's own wikitext task, without lm-eval's task loading:
documents come from the hub's document-level WikiText (EleutherAI/wikitext_document_level) or local files, and a
window's tokens are predicted through the method's cache as in any perplexity run (stream: token by token for
compressing methods; masked: one forward with the method's mask). `max_tokens` keeps whole documents, in order, until
their tokens reach it (null: all).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

from kvx.errors import ConfigError, DataError
from kvx.registry import TASKS
from kvx.tasks.base import RunContext, Task, TaskResult, data_paths
from kvx.tasks.perplexity import load_documents

HUB = {"wikitext2": ("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", "test", "page"),
       "wikitext103": ("EleutherAI/wikitext_document_level", "wikitext-103-raw-v1", "test", "page")}
DETOKENIZERS = ("wikitext", "none")


def word_count(doc: str) -> int:
    """Words as lm-eval's wikitext task counts them: in the original document, split on whitespace runs."""
    return len(re.split(r"\s+", doc))


def detokenize(doc: str, how: str) -> str:
    if how == "none":
        return doc
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    return wikitext_detokenizer({"page": doc})


@TASKS.register("rolling_perplexity")
@dataclass
class RollingPerplexity(Task):
    type: str = "rolling_perplexity"
    name: str = "wikitext2_words"
    dataset: str = "wikitext2"  # wikitext2 | wikitext103 (hub, document level) | text (local files only)
    text_field: str = "page"  # the document field of local jsonl rows (one .txt file = one document)
    detokenizer: str = "wikitext"  # wikitext (lm-eval's) | none
    window: int = 4096  # tokens per rolling window (lm-eval's max_length)
    max_tokens: int | None = None  # whole documents, in order, until their tokens reach this (null: all)
    chunk_size: int | None = None  # stream mode: tokens per forward (default 1 for compressing methods)

    def validate(self) -> None:
        super().validate()
        if self.window < 2:
            raise ConfigError("task.window", f"must be >= 2, got {self.window}")
        if self.detokenizer not in DETOKENIZERS:
            raise ConfigError("task.detokenizer", f"must be one of {', '.join(DETOKENIZERS)}, got {self.detokenizer!r}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError("task.max_tokens", f"must be >= 1 or null, got {self.max_tokens}")

    def documents(self) -> list[str]:
        if data_paths(self.data_files):  # jsonl rows (text_field) or .txt files, one document each
            docs = load_documents("text", self.data_files, self.text_field)
        else:
            if self.dataset not in HUB:
                raise ConfigError("task.data_files", f"dataset {self.dataset!r} has no hub source; give local files")
            repo, conf, split, fld = HUB[self.dataset]
            try:
                import datasets

                docs = [str(t) for t in datasets.load_dataset(repo, conf, split=split)[fld]]
            except Exception as e:  # the hub is unreachable or the dataset is missing
                raise DataError(f"cannot load {repo} ({conf}) from the hub ({type(e).__name__}: {e}); set "
                                "task.data_files to local files") from e
        docs = [d for d in docs if d.strip()]
        if not docs:
            raise DataError(f"task {self.name}: no non-empty document")
        return docs

    def run(self, engine, ctx: RunContext) -> TaskResult:
        from kvx.tasks.harness import KVXLM

        if self.window > engine.arch.max_positions:
            raise ConfigError("task.window", f"{self.window} is longer than the model's context "
                                             f"(max_position_embeddings={engine.arch.max_positions})")
        lm = KVXLM(engine=engine, mode=self.mode, chunk_size=self.chunk_size, max_length=self.window)
        docs = self.documents()
        if self.limit is not None:
            docs = docs[: self.limit]
        t0 = time.perf_counter()
        ll = words = n_bytes = tokens = 0
        outputs = []
        for i, doc in enumerate(ctx.progress(docs, desc=f"{self.name} [{self.mode}]", total=len(docs))):
            if self.max_tokens is not None and tokens >= self.max_tokens:
                break
            total, n_tok = lm.document_loglikelihood(detokenize(doc, self.detokenizer))
            w, b = word_count(doc), len(doc.encode("utf-8"))
            ll, words, n_bytes, tokens = ll + total, words + w, n_bytes + b, tokens + n_tok
            outputs.append({"document": i, "loglikelihood": total, "words": w, "bytes": b, "tokens": n_tok})
        metrics = {
            "word_perplexity": math.exp(-ll / words),
            "byte_perplexity": math.exp(-ll / n_bytes),
            "bits_per_byte": -ll / n_bytes / math.log(2),
            "ppl": math.exp(-ll / tokens),  # per token, as the perplexity task reports
            "documents": len(outputs),
            "words": words,
            "tokens": tokens,
            "mode": self.mode,
            "cache_bytes_peak": lm.cache_bytes_peak,
            "task_seconds": time.perf_counter() - t0,
        }
        if lm.state_bytes:
            metrics["state_bytes"] = lm.state_bytes
        return TaskResult(metrics, outputs)
