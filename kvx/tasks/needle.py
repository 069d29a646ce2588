"""Needle in a haystack: retrieve one sentence hidden at a given depth of a long context.

Grid: context lengths (tokens of the whole prompt) x depths (percent of the haystack before the needle). The
haystack is the Paul Graham essays (sorted by file name, concatenated, repeated if short), cut so that the prompt
holds exactly `length` tokens; the needle goes after the last sentence end at or before the depth (at the very
end for 100%), as in the original test (gkamradt/LLMTest_NeedleInAHaystack). The `passkey` variant hides a random
5-digit pass key in repeated filler sentences (Mohtashami & Jaggi, 2023).

Scores per grid point: `exact` (1 if the normalised answer appears in the normalised prediction), the headline
(`retrieval` in metrics.json: the exact retrieval rate), and beside it ROUGE-1 / ROUGE-L F1 (rouge-score, stemming)
of the prediction against the answer (ROUGE has a floor from shared stop words, so it is no retrieval measure on its
own). Depths whose needle lands at the same place (at short lengths the sentence end before several depths can be the
same) are one test: it runs once, the means count it once (`points`; `merged_points` counts the depths merged into
an earlier one) and its output row lists them in `merged_depths`; `real_depth` is where the needle really sits. The
heatmap (depth x length, colour = `heatmap_metric`) comes back as the artifact heatmap.png. Context lengths beyond the model's context are an error
unless `allow_beyond_context: true`; `limit` caps the number of grid points (lengths first, then depths).
"""

from __future__ import annotations

import io
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvx.errors import ConfigError, DataError
from kvx.registry import TASKS
from kvx.tasks.base import RunContext, Task, TaskResult, data_paths, read_text
from kvx.tasks.summarization import cut_stop, rouge_scores

ESSAY_NEEDLE = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
ESSAY_QUESTION = "What is the best thing to do in San Francisco?"
ESSAY_ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day"
ESSAY_TEMPLATE = (
    "You are a helpful AI bot that answers questions for a user. Keep your response short and direct.\n\n"
    "{context}\n\n{question} Don't give information outside the document or repeat your findings.\nAnswer:"
)
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "What is the pass key? The pass key is"
PASSKEY_TEMPLATE = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there.\n{context}\n{question}"
)
METRICS = ("exact", "rouge1", "rougeL")
_MARK = "\x00KVX_CONTEXT\x00"


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def essay_texts(paths: list[Path]) -> list[str]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(p.glob("*.txt"))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"task.data_files: {p} does not exist")
    if not files:
        raise DataError(f"task.data_files: no .txt essays in {', '.join(str(p) for p in paths)}")
    texts = []
    for f in files:
        text = read_text(f)
        if not text.strip():
            raise DataError(f"haystack file {f} is empty")
        texts.append(text)
    return texts


def heatmap_png(grid: dict[tuple[int, float], float], lengths: list[int], depths: list[float], title: str) -> bytes:
    """A depth x length heatmap (colour = score in [0, 1], value written in each cell) as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    mat = np.full((len(depths), len(lengths)), np.nan)
    for (n, d), v in grid.items():
        mat[depths.index(d), lengths.index(n)] = v
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.45 * len(depths)), dpi=100)
    im = ax.imshow(mat, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (%)")
    ax.set_title(title)
    for r in range(len(depths)):
        for c in range(len(lengths)):
            if not np.isnan(mat[r, c]):
                ax.text(c, r, f"{mat[r, c]:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


@TASKS.register("needle")
@dataclass
class Needle(Task):
    type: str = "needle"
    name: str = "needle"
    variant: str = "essays"  # essays | passkey
    context_lengths: list[int] = field(default_factory=lambda: [1000, 2000, 4000, 8000, 16000, 32000])
    depths: list[float] = field(default_factory=lambda: [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100])
    needle: str | None = None  # default per variant; the passkey variant fills {key}
    question: str | None = None
    answer: str | None = None  # what a correct prediction contains; passkey: the key
    template: str | None = None  # with {context} and {question}
    chat_template: bool = False  # wrap the prompt in the tokenizer's chat template (one user turn)
    max_new_tokens: int = 32
    stop: list[str] = field(default_factory=list)
    allow_beyond_context: bool = False
    heatmap_metric: str = "exact"  # exact | rouge1 | rougeL
    chunk_size: int | None = None  # stream mode: prefill in chunks of this many tokens

    def validate(self) -> None:
        super().validate()
        if self.variant not in ("essays", "passkey"):
            raise ConfigError("task.variant", f"must be 'essays' or 'passkey', got {self.variant!r}")
        if self.mode != "stream":
            raise ConfigError("task.mode", "the needle test decodes token by token; only 'stream' is defined")
        if not self.context_lengths or any(int(n) <= 0 for n in self.context_lengths):
            raise ConfigError("task.context_lengths", f"must be a non-empty list of positive token counts, got "
                              f"{list(self.context_lengths)}")
        if not self.depths or any(not 0 <= float(d) <= 100 for d in self.depths):
            raise ConfigError("task.depths", f"must be a non-empty list of percentages in [0, 100], got {list(self.depths)}")
        if self.max_new_tokens <= 0:
            raise ConfigError("task.max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        if self.heatmap_metric not in METRICS:
            raise ConfigError("task.heatmap_metric", f"must be one of {', '.join(METRICS)}, got {self.heatmap_metric!r}")
        tpl = self.template or (ESSAY_TEMPLATE if self.variant == "essays" else PASSKEY_TEMPLATE)
        if "{context}" not in tpl:
            raise ConfigError("task.template", "must contain {context}")
        if self.variant == "passkey" and self.needle is not None and "{key}" not in self.needle:
            raise ConfigError("task.needle", "the passkey variant's needle must contain {key}")

    def check(self) -> None:
        if self.variant == "essays" and self.data_files is not None:
            essay_texts(data_paths(self.data_files))

    # pieces ----------------------------------------------------------------------------------------------------------
    def _spec(self) -> tuple[str, str, str | None, str]:
        if self.variant == "essays":
            answer = self.answer or (ESSAY_ANSWER if self.needle is None else self.needle.strip())
            return self.needle or ESSAY_NEEDLE, self.question or ESSAY_QUESTION, answer, self.template or ESSAY_TEMPLATE
        return (self.needle or PASSKEY_NEEDLE, self.question or PASSKEY_QUESTION, self.answer,
                self.template or PASSKEY_TEMPLATE)

    def _frame(self, tok, template: str, question: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the context: the template (and chat turn) around it."""
        text = template.replace("{question}", question).replace("{context}", _MARK)
        special = True
        if self.chat_template:
            if not getattr(tok, "chat_template", None):
                raise ConfigError("task.chat_template", "the tokenizer has no chat template")
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
            special = False  # the chat template writes its own BOS
        before, after = text.split(_MARK)
        pre = tok(before, add_special_tokens=special).input_ids if (before or special) else []
        post = tok(after, add_special_tokens=False).input_ids if after else []
        return pre, post

    def _haystack(self, tok, n_tokens: int) -> list[int]:
        if self.variant == "passkey":
            unit = tok(PASSKEY_FILLER, add_special_tokens=False).input_ids
            return (unit * (n_tokens // max(len(unit), 1) + 1))[:n_tokens]
        paths = data_paths(self.data_files)
        if not paths:
            from kvx.assets import asset

            paths = [asset("niah/PaulGrahamEssays")]
        ids: list[int] = []
        texts = essay_texts(paths)
        while len(ids) < n_tokens:
            for t in texts:
                ids += tok(t, add_special_tokens=False).input_ids
                if len(ids) >= n_tokens:
                    break
        return ids[:n_tokens]

    @staticmethod
    def _point(tok, hay: list[int], depth: float) -> int:
        """Where the needle goes: after the last sentence end at or before the depth (the end for 100%)."""
        if depth >= 100:
            return len(hay)
        point = int(len(hay) * depth / 100)
        while point > 0 and not tok.decode(hay[point - 1 : point]).rstrip().endswith("."):
            point -= 1  # back up to the end of a sentence
        return point

    def grid(self) -> list[tuple[int, float]]:
        points = [(int(n), float(d)) for n in self.context_lengths for d in self.depths]
        return points[: self.limit] if self.limit is not None else points

    def prompts(self, tok) -> list[tuple[int, float, str, list[int]]]:
        """(context length, depth, expected answer, prompt token ids) per grid point."""
        return [(n, d, want, ids) for n, d, want, ids, _ in self.placed(tok)]

    def placed(self, tok) -> list[tuple[int, float, str, list[int], float]]:
        """prompts() plus the depth the needle really sits at (percent of the haystack before it)."""
        needle_t, question, answer, template = self._spec()
        pre, post = self._frame(tok, template, question)
        points = self.grid()
        rng = random.Random(self.seed)
        keys = [rng.randint(10000, 99999) for _ in points]
        hay_all = self._haystack(tok, max(n for n, _ in points))
        out = []
        for (n, depth), key in zip(points, keys):
            text = needle_t.replace("{key}", str(key))
            want = str(key) if answer is None else answer.replace("{key}", str(key))
            needle_ids = tok(text, add_special_tokens=False).input_ids
            room = n - len(pre) - len(post) - len(needle_ids)
            if room < 0:
                raise ConfigError(
                    "task.context_lengths",
                    f"{n} tokens cannot hold the template and the needle ({n - room} tokens)",
                )
            hay = hay_all[:room]
            at = self._point(tok, hay, depth)
            ids = pre + hay[:at] + needle_ids + hay[at:] + post
            out.append((n, depth, want, ids, 100.0 * at / max(len(hay), 1)))
        return out

    # run -------------------------------------------------------------------------------------------------------------
    def run(self, engine, ctx: RunContext) -> TaskResult:
        tok = engine.tokenizer
        max_pos = engine.arch.max_positions
        too_long = [n for n in self.context_lengths if int(n) + self.max_new_tokens > max_pos]
        if too_long and not self.allow_beyond_context:
            raise ConfigError(
                "task.context_lengths",
                f"{too_long} plus max_new_tokens={self.max_new_tokens} go beyond the model's context of {max_pos} "
                "tokens (max_position_embeddings); shorten them or set task.allow_beyond_context=true",
            )
        placed = self.placed(tok)
        first: dict[tuple[int, float], tuple[int, float]] = {}  # (length, real depth) -> the grid point run for it
        saved = engine.allow_beyond_context
        engine.allow_beyond_context = saved or self.allow_beyond_context
        outputs, grid_scores, merged = [], {}, {}
        try:
            bar = ctx.progress(placed, desc=f"{self.name} [{engine.method.name}]", total=len(placed))
            for n, depth, want, ids, real in bar:
                same = first.setdefault((n, real), (n, depth))
                if same != (n, depth):  # the needle lands where an earlier depth put it: the same test, run once
                    merged[(n, depth)] = same
                    continue
                engine.set_question(self._spec()[1])  # CaP-Q reads it; other methods ignore it
                gen = engine.generate(torch.tensor([ids]), max_new_tokens=self.max_new_tokens,
                                      stop_strings=self.stop or None, chunk_size=self.chunk_size)
                pred = cut_stop(tok.decode(gen.tokens[0], skip_special_tokens=True), self.stop).strip()
                scores = {"exact": float(normalize(want) in normalize(pred)) if normalize(want) else 0.0,
                          **rouge_scores(pred, want, ("rouge1", "rougeL"))}
                grid_scores[(n, depth)] = scores
                outputs.append({"context_length": n, "depth": depth, "real_depth": real, "merged_depths": [],
                                "prompt_tokens": len(ids), "answer": want, "prediction": pred, **scores,
                                "cache_bytes_peak": int(gen.stats.get("cache_bytes_peak", 0))})
        finally:
            engine.allow_beyond_context = saved
        for (_, depth), same in merged.items():
            next(o for o in outputs if (o["context_length"], o["depth"]) == same)["merged_depths"].append(depth)
        # headline: the exact retrieval rate over distinct tests; ROUGE beside it
        metrics = {m: sum(s[m] for s in grid_scores.values()) / len(grid_scores) for m in METRICS}
        metrics["retrieval"] = metrics["exact"]
        metrics["points"] = len(grid_scores)
        metrics["merged_points"] = len(merged)
        metrics["cache_bytes_peak"] = max(o["cache_bytes_peak"] for o in outputs)
        for n in sorted({p[0] for p in grid_scores}):
            vals = [s[self.heatmap_metric] for (m, _), s in grid_scores.items() if m == n]
            metrics[f"{self.heatmap_metric}@{n}"] = sum(vals) / len(vals)
        cells = {k: v[self.heatmap_metric] for k, v in grid_scores.items()}
        cells.update({k: cells[same] for k, same in merged.items()})  # a merged depth shows its test's score
        lengths = sorted({p[0] for p in cells})
        depths = sorted({p[1] for p in cells})
        png = heatmap_png(cells, lengths, depths, f"{self.name} · {engine.method.name} · {self.heatmap_metric}")
        return TaskResult(metrics, outputs, {"heatmap.png": png})
