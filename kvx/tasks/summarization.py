"""Few-shot summarization (CNN/DailyMail, XSum, MultiNews) scored with ROUGE-1/2/L, as in the H2O and LESS evaluations.

Prompts follow the HELM summarization format those papers used: each shot is

    ###
    Article: <document>

    Summarize the above article in <n> sentence(s).
    <summary>

and shots are joined by a newline, then the evaluated article follows with the same lines up to the instruction.
Shots are drawn once with the task seed: from the hub's train split, or, with local files, from the same file
excluding the evaluated example. When the prompt would not fit into the model's context minus `max_new_tokens`,
documents are cut at their end, the longest first (each keeps the same share), and shots are dropped (the first
first) when the evaluated article would keep fewer than `min_article_tokens` tokens. Dropped shots are logged once
per run; a cut article is logged loudly once (or refused with `article_cut: refuse`). metrics.json records these
decisions (shots_mean, shots_min, prompt_tokens_mean/max, article_tokens_mean, article_kept_mean, articles_cut) and
why generation stopped (stop_eos, stop_stop, stop_max_new_tokens: counts of examples). Generation is greedy
(temperature 0) or sampled, and stops at a blank line, at `###` or at EOS. ROUGE F1 with stemming from the
rouge-score package, averaged over examples (values in [0, 1]).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import torch

from kvx.errors import ConfigError, DataError
from kvx.registry import TASKS
from kvx.tasks.base import RunContext, Task, TaskResult, data_paths, read_jsonl

log = logging.getLogger(__name__)
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
_SCORERS: dict = {}


def rouge_scores(prediction: str, reference: str, keys: tuple[str, ...] = ROUGE_KEYS) -> dict[str, float]:
    """ROUGE F1 of prediction against reference (rouge-score, Porter stemming on)."""
    from rouge_score import rouge_scorer

    if keys not in _SCORERS:
        _SCORERS[keys] = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    scores = _SCORERS[keys].score(reference, prediction)
    return {k: float(scores[k].fmeasure) for k in keys}


def mean_rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    if not predictions:
        raise DataError("no predictions to score")
    rows = [rouge_scores(p, r) for p, r in zip(predictions, references)]
    return {k: sum(r[k] for r in rows) / len(rows) for k in ROUGE_KEYS}


def instruction(num_sentences: int | None) -> str:
    if num_sentences is None:
        return "Summarize the above article."
    if num_sentences == 1:
        return "Summarize the above article in 1 sentence."
    return f"Summarize the above article in {num_sentences} sentences."


def format_prompt(documents: list[str], summaries: list[str], instr: str) -> str:
    """HELM's prompt: shots (document, summary) then the evaluated document; documents[-1] is the evaluated one."""
    blocks = [f"###\nArticle: {d}\n\n{instr}\n{s}\n" for d, s in zip(documents[:-1], summaries)]
    blocks.append(f"###\nArticle: {documents[-1]}\n\n{instr}\n")
    return "\n".join(blocks)


def water_fill(lengths: list[int], budget: int) -> list[int]:
    """Per-document token caps summing to at most budget: short documents keep everything, long ones share the rest."""
    caps = list(lengths)
    if sum(lengths) <= budget:
        return caps
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    left, remaining = budget, len(lengths)
    for i in order:
        share = left // remaining
        caps[i] = min(lengths[i], share)
        left -= caps[i]
        remaining -= 1
    return caps


def cut_stop(text: str, stops: list[str]) -> str:
    for s in stops:
        if s and s in text:
            text = text[: text.index(s)]
    return text


@dataclass
class Fit:
    """How one prompt was fitted into the context: shots kept, the evaluated article's tokens and how many stayed."""

    shots: int
    article_tokens: int
    article_kept: int
    truncated: bool  # any document (shot or article) was cut

    @property
    def article_cut(self) -> bool:
        return self.article_kept < self.article_tokens


def stop_reason(gen, eos_id: int | None) -> str:
    """Why generation ended: 'eos', 'stop' (a stop string) or 'max_new_tokens' (the cap)."""
    if not gen.finished[0]:
        return "max_new_tokens"
    return "eos" if eos_id is not None and gen.tokens[0] and gen.tokens[0][-1] == eos_id else "stop"


def fit_metrics(outputs: list[dict], shots_asked: int) -> dict:
    """The fitting decisions over all examples, for metrics.json."""
    n = len(outputs)
    mean = lambda key: sum(o[key] for o in outputs) / n  # noqa: E731
    reasons = [o["stop_reason"] for o in outputs]
    return {
        "shots_asked": shots_asked,
        "shots_mean": mean("shots"),
        "shots_min": min(o["shots"] for o in outputs),
        "prompt_tokens_mean": mean("prompt_tokens"),
        "prompt_tokens_max": max(o["prompt_tokens"] for o in outputs),
        "article_tokens_mean": mean("article_tokens"),
        "article_kept_mean": mean("article_kept"),
        "articles_cut": sum(o["article_cut"] for o in outputs),
        "new_tokens_mean": mean("new_tokens"),
        **{f"stop_{r}": reasons.count(r) for r in ("eos", "stop", "max_new_tokens")},
    }


@TASKS.register("summarization")
@dataclass
class Summarization(Task):
    type: str = "summarization"
    name: str = "xsum"
    dataset: str = "EdinburghNLP/xsum"  # hub id, used when data_files is null
    dataset_config: str | None = None  # e.g. "3.0.0" for CNN/DailyMail
    split: str = "test"
    shot_split: str = "train"  # the hub split the shots come from
    document_field: str = "document"
    summary_field: str = "summary"
    shots: int = 0  # k: CNN/DailyMail 5 (Llama) or 3 (Falcon), XSum 5, MultiNews 1
    num_sentences: int | None = 1  # the instruction's sentence count (null: "Summarize the above article.")
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy; > 0: sampled (HELM uses 0.3)
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=lambda: ["\n\n", "###"])
    max_prompt_tokens: int | None = None  # default: the model's context minus max_new_tokens
    min_article_tokens: int = 64  # fewer left for the evaluated article: drop shots first
    article_cut: str = "warn"  # the evaluated article itself had to be cut: warn (loudly, once) | refuse
    chunk_size: int | None = None  # stream mode: prefill in chunks of this many tokens

    def validate(self) -> None:
        super().validate()
        if self.mode != "stream":
            raise ConfigError("task.mode", "summarization decodes token by token; only 'stream' is defined")
        if self.shots < 0:
            raise ConfigError("task.shots", f"must be >= 0, got {self.shots}")
        if self.max_new_tokens <= 0:
            raise ConfigError("task.max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError("task.temperature", f"must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError("task.top_p", f"must lie in (0, 1], got {self.top_p}")
        if self.num_sentences is not None and self.num_sentences <= 0:
            raise ConfigError("task.num_sentences", f"must be > 0 or null, got {self.num_sentences}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens <= 0:
            raise ConfigError("task.max_prompt_tokens", f"must be > 0 or null, got {self.max_prompt_tokens}")
        if self.article_cut not in ("warn", "refuse"):
            raise ConfigError("task.article_cut", f"must be 'warn' or 'refuse', got {self.article_cut!r}")
        if self.min_article_tokens < 1:
            raise ConfigError("task.min_article_tokens", f"must be >= 1, got {self.min_article_tokens}")

    def check(self) -> None:
        if self.data_files is not None:
            self.load()

    # data ------------------------------------------------------------------------------------------------------------
    def _required(self) -> list[str]:
        return [self.document_field, self.summary_field]

    def _check_rows(self, rows: list[dict], where: str) -> list[dict]:
        if not rows:
            raise DataError(f"{where} is empty")
        for i, row in enumerate(rows, start=1):
            missing = [k for k in self._required() if k not in row]
            if missing:
                raise DataError(f"{where}, row {i}: missing field(s) {', '.join(missing)}")
            for k in self._required():
                if not isinstance(row[k], str):
                    raise DataError(f"{where}, row {i}: field {k} must be a string, got {type(row[k]).__name__}")
        return rows

    def _load_hub(self, split: str) -> list[dict]:
        try:
            import datasets

            ds = datasets.load_dataset(self.dataset, self.dataset_config, split=split)
        except Exception as e:  # the hub is unreachable or the dataset is missing
            raise DataError(
                f"cannot load {self.dataset} ({self.dataset_config or 'default'}, split {split}) from the hub "
                f"({type(e).__name__}: {e}); set task.data_files to local jsonl files"
            ) from e
        return self._check_rows([dict(r) for r in ds], f"{self.dataset} ({split})")

    def load(self) -> tuple[list[dict], list[dict], bool]:
        """(examples, shot pool, whether the pool is the examples' own file)."""
        paths = data_paths(self.data_files)
        if paths:
            rows: list[dict] = []
            for p in paths:
                rows += self._check_rows(read_jsonl(p, required=self._required()), str(p))
            return rows, rows, True
        examples = self._load_hub(self.split)
        pool = self._load_hub(self.shot_split) if self.shots else []
        return examples, pool, False

    # prompts ---------------------------------------------------------------------------------------------------------
    def build_prompt(self, tok, doc: str, shots: list[dict], budget: int) -> tuple[list[int], Fit]:
        """Token ids (with BOS) of the prompt within budget, and how it was fitted (shots kept, article kept)."""
        instr = instruction(self.num_sentences)
        shots = list(shots)
        enc = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        doc_ids = enc(doc)
        while True:
            docs = [s[self.document_field] for s in shots] + [doc]
            sums = [s[self.summary_field] for s in shots]
            overhead = len(bos) + len(enc(format_prompt([""] * len(docs), sums, instr)))
            ids_per_doc = [enc(d) for d in docs[:-1]] + [doc_ids]
            room = budget - overhead
            caps = water_fill([len(x) for x in ids_per_doc], max(room, 0))
            if caps[-1] >= min(len(doc_ids), self.min_article_tokens) or not shots:
                break
            shots = shots[1:]  # the evaluated article needs more room: drop the first shot
        if room <= 0:
            raise ConfigError(
                "task.max_new_tokens",
                f"the prompt template alone takes {overhead} tokens, more than the {budget} tokens left for the "
                f"prompt next to max_new_tokens={self.max_new_tokens}",
            )
        truncated = False
        for _ in range(8):  # re-tokenising cut text may move a few tokens across the joins
            texts = [
                d if c >= len(x) else tok.decode(x[:c], skip_special_tokens=True)
                for d, x, c in zip(docs, ids_per_doc, caps)
            ]
            truncated = truncated or any(c < len(x) for x, c in zip(ids_per_doc, caps))
            ids = bos + enc(format_prompt(texts, sums, instr))
            over = len(ids) - budget
            if over <= 0:
                return ids, Fit(len(shots), len(doc_ids), min(caps[-1], len(doc_ids)), truncated)
            caps = water_fill([len(x) for x in ids_per_doc], max(sum(caps) - over, 0))
        # last resort: keep the end (the instruction); the article loses what the start loses
        kept = max(0, min(caps[-1], len(doc_ids)) - over)
        return bos + ids[len(bos) + over :], Fit(len(shots), len(doc_ids), kept, True)

    # run -------------------------------------------------------------------------------------------------------------
    def run(self, engine, ctx: RunContext) -> TaskResult:
        tok = engine.tokenizer
        ctx_len = engine.arch.max_positions
        budget = self.max_prompt_tokens if self.max_prompt_tokens is not None else ctx_len - self.max_new_tokens
        if budget <= 0:
            raise ConfigError(
                "task.max_new_tokens",
                f"{self.max_new_tokens} leaves no room for a prompt in the model's context of {ctx_len} tokens",
            )
        if budget + self.max_new_tokens > ctx_len and not engine.allow_beyond_context:
            raise ConfigError(
                "task.max_prompt_tokens",
                f"{budget} prompt tokens + max_new_tokens={self.max_new_tokens} exceed the model's context of "
                f"{ctx_len} tokens",
            )
        self._warned: dict[str, bool] = {}
        examples, pool, same_file = self.load()
        if self.limit is not None:
            examples = examples[: self.limit]
        rng = random.Random(self.seed)
        if self.shots and len(pool) - (1 if same_file else 0) < self.shots:
            raise DataError(f"task {self.name}: {self.shots} shots asked for but only {len(pool)} examples to draw from")
        candidates = rng.sample(range(len(pool)), min(len(pool), self.shots + 1)) if self.shots else []

        preds, refs, outputs = [], [], []
        peak = 0
        bar = ctx.progress(list(enumerate(examples)), desc=f"{self.name} [{engine.method.name}]", total=len(examples))
        for i, ex in bar:
            own = i if same_file else -1
            shot_idx = [j for j in candidates if j != own][: self.shots]
            ids, fit = self.build_prompt(tok, ex[self.document_field], [pool[j] for j in shot_idx], budget)
            self._check_fit(fit, i, budget)
            gen = engine.generate(
                torch.tensor([ids]),
                max_new_tokens=self.max_new_tokens,
                do_sample=self.temperature > 0,
                temperature=self.temperature if self.temperature > 0 else 1.0,
                top_p=self.top_p,
                top_k=self.top_k,
                seed=self.seed + i,
                stop_strings=self.stop,
                chunk_size=self.chunk_size,
            )
            peak = max(peak, int(gen.stats.get("cache_bytes_peak", 0)))
            text = cut_stop(tok.decode(gen.tokens[0], skip_special_tokens=True), self.stop).strip()
            ref = ex[self.summary_field]
            scores = rouge_scores(text, ref)
            preds.append(text)
            refs.append(ref)
            outputs.append({
                "id": ex.get("id", ex.get("index", i)),
                "prediction": text,
                "reference": ref,
                **scores,
                "shots": fit.shots,
                "shot_ids": shot_idx[len(shot_idx) - fit.shots :],
                "prompt_tokens": len(ids),
                "article_tokens": fit.article_tokens,
                "article_kept": fit.article_kept,
                "article_cut": fit.article_cut,
                "truncated": fit.truncated,
                "new_tokens": len(gen.tokens[0]),
                "stop_reason": stop_reason(gen, tok.eos_token_id),
            })
        metrics = mean_rouge(preds, refs)
        metrics.update({"examples": len(preds), "cache_bytes_peak": peak, **fit_metrics(outputs, self.shots)})
        return TaskResult(metrics, outputs)

    def _check_fit(self, fit: Fit, i: int, budget: int) -> None:
        """Warn once per run when shots are dropped; warn loudly once (or refuse) when the article itself is cut."""
        if fit.shots < self.shots and not self._warned.get("shots"):
            self._warned["shots"] = True
            log.warning("task %s: example %d keeps %d of %d shots to fit %d prompt tokens (metrics.json: shots_mean)",
                        self.name, i, fit.shots, self.shots, budget)
        if fit.article_cut:
            msg = (f"task {self.name}: example {i}: the evaluated article keeps {fit.article_kept} of its "
                   f"{fit.article_tokens} tokens to fit {budget} prompt tokens")
            if self.article_cut == "refuse":
                raise DataError(msg + " (task.article_cut=refuse; raise the model's context or lower max_new_tokens)")
            if not self._warned.get("article"):
                self._warned["article"] = True
                log.warning("ARTICLE CUT: %s; the summary is scored against the whole reference "
                            "(metrics.json: articles_cut, article_kept_mean)", msg)
