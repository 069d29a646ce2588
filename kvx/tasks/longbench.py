"""LongBench (Bai et al., 2023) and LongBench-E, run as THUDM/LongBench's pred.py and eval.py run them.

Per subtask: the official prompt template and maximum generation length (longbench/dataset2prompt.json and
dataset2maxlen.json), middle truncation of the prompt to the budget (the first and last half of its tokens, decoded
and joined), the chat wrapper for chat models except on trec, triviaqa, samsum, lsht, lcc and repobench-p, greedy
decoding (samsum: a newline also ends the answer, and at least one token is generated), and the official metric
(kvx.tasks.longbench_metrics). Scores are 100 x the mean over examples, rounded to two decimals; LongBench-E
subtasks (`<name>_e`) are also reported per input-length bucket (0-4k, 4-8k, 8k+ words).

Data: the hub's THUDM/LongBench data.zip (data/<subtask>.jsonl) when task.data_files is null; otherwise a folder
of <subtask>.jsonl files (or data/<subtask>.jsonl), a copy of data.zip, or a mapping subtask -> jsonl file.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvx.errors import ConfigError, DataError
from kvx.registry import TASKS
from kvx.tasks import longbench_metrics as lbm
from kvx.tasks.base import RunContext, Task, TaskResult, parse_rows, read_text

SUBTASKS = [
    "narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh", "hotpotqa", "2wikimqa", "musique", "dureader",
    "gov_report", "qmsum", "multi_news", "vcsum", "trec", "triviaqa", "samsum", "lsht", "passage_count",
    "passage_retrieval_en", "passage_retrieval_zh", "lcc", "repobench-p",
]
SUBTASKS_E = [
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa", "samsum",
    "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
]
ALL_SUBTASKS = SUBTASKS + [f"{s}_e" for s in SUBTASKS_E]
NO_CHAT = ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p")
CATEGORIES = {
    "single_doc_qa": ("narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh"),
    "multi_doc_qa": ("hotpotqa", "2wikimqa", "musique", "dureader"),
    "summarization": ("gov_report", "qmsum", "multi_news", "vcsum"),
    "few_shot": ("trec", "triviaqa", "samsum", "lsht"),
    "synthetic": ("passage_count", "passage_retrieval_en", "passage_retrieval_zh"),
    "code": ("lcc", "repobench-p"),
}
ZH = ("multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh")
FIELDS = ("input", "context", "answers", "length", "dataset", "language", "all_classes", "_id")
CHAT_FORMATS = ("auto", "none", "tokenizer", "llama2", "vicuna", "longchat", "xgen", "internlm")
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
XGEN_HEADER = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.\n\n"
)


def build_chat(tokenizer, prompt: str, fmt: str) -> str:
    """LongBench's per-model chat wrappers (pred.py's build_chat); `tokenizer`: the tokenizer's own template."""
    if fmt == "none":
        return prompt
    if fmt == "tokenizer":
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    if fmt == "llama2":
        return f"[INST]{prompt}[/INST]"
    if fmt in ("vicuna", "longchat"):
        return f"{VICUNA_SYSTEM} USER: {prompt} ASSISTANT:"
    if fmt == "xgen":
        return XGEN_HEADER + f" ### Human: {prompt}\n###"
    if fmt == "internlm":
        return f"<|User|>:{prompt}<eoh>\n<|Bot|>:"
    raise ConfigError("task.chat_template", f"unknown chat format {fmt!r}; allowed: {', '.join(CHAT_FORMATS)}")


def post_process(response: str, fmt: str) -> str:
    if fmt == "xgen":
        return response.strip().replace("Assistant:", "")
    if fmt == "internlm":
        return response.split("<eoa>")[0]
    return response


def check_rows(rows: list[dict], where: str) -> list[dict]:
    if not rows:
        raise DataError(f"{where} is empty")
    for i, row in enumerate(rows, start=1):
        missing = [k for k in FIELDS if k not in row]
        if missing:
            raise DataError(f"{where}, row {i}: missing field(s) {', '.join(missing)}")
        if not isinstance(row["answers"], list) or not row["answers"]:
            raise DataError(f"{where}, row {i}: field answers must be a non-empty list")
        if not isinstance(row["length"], (int, float)):
            raise DataError(f"{where}, row {i}: field length must be a number, got {row['length']!r}")
        if row["all_classes"] is not None and not isinstance(row["all_classes"], list):
            raise DataError(f"{where}, row {i}: field all_classes must be a list or null")
    return rows


def parse_jsonl(lines, where: str) -> list[dict]:
    return check_rows(parse_rows(lines, where), where)


def read_zip_member(path: Path, subtask: str) -> list[dict]:
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if n.endswith(f"/{subtask}.jsonl") or n == f"{subtask}.jsonl"]
        if not names:
            raise DataError(f"{path}: no {subtask}.jsonl inside")
        text = zf.read(names[0]).decode("utf-8")
    return parse_jsonl(text.splitlines(), f"{path}:{names[0]}")


@TASKS.register("longbench")
@dataclass
class LongBench(Task):
    type: str = "longbench"
    name: str = "longbench"
    subtasks: list[str] = field(default_factory=lambda: list(ALL_SUBTASKS))
    max_length: int | None = None  # prompt budget in tokens (LongBench's model2maxlen); null: what the context leaves
    # (an explicit max_length is taken as is: methods that re-position tokens may stream inputs beyond the context)
    max_new_tokens: int | None = None  # cap on the official per-subtask generation length (null: official)
    chat_template: str = "auto"  # auto (the tokenizer's, if any) | none | tokenizer | llama2 | vicuna | xgen | internlm
    prompts_file: str | None = None  # default: the assets' longbench/dataset2prompt.json
    maxlen_file: str | None = None  # default: the assets' longbench/dataset2maxlen.json
    hub_repo: str = "THUDM/LongBench"
    chunk_size: int | None = None  # stream mode: prefill in chunks of this many tokens

    def validate(self) -> None:
        super().validate()
        if self.mode != "stream":
            raise ConfigError("task.mode", "LongBench decodes token by token; only 'stream' is defined")
        if not self.subtasks:
            raise ConfigError("task.subtasks", "is empty")
        for s in self.subtasks:
            if s not in ALL_SUBTASKS:
                import difflib

                close = difflib.get_close_matches(s, ALL_SUBTASKS, n=2)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise ConfigError("task.subtasks", f"unknown LongBench subtask {s!r}.{hint} Known: {', '.join(ALL_SUBTASKS)}")
        if self.chat_template not in CHAT_FORMATS:
            raise ConfigError("task.chat_template", f"must be one of {', '.join(CHAT_FORMATS)}, got {self.chat_template!r}")
        if self.max_length is not None and self.max_length <= 0:
            raise ConfigError("task.max_length", f"must be > 0 or null, got {self.max_length}")
        if self.max_new_tokens is not None and self.max_new_tokens <= 0:
            raise ConfigError("task.max_new_tokens", f"must be > 0 or null, got {self.max_new_tokens}")

    def check(self) -> None:
        self._json(self.prompts_file, "longbench/dataset2prompt.json", "prompts_file")
        self._json(self.maxlen_file, "longbench/dataset2maxlen.json", "maxlen_file")
        if self.data_files is not None:
            for s in self.subtasks:
                self.load_subtask(s)

    # configuration files and data ------------------------------------------------------------------------------------
    def _json(self, path: str | None, default: str, what: str) -> dict:
        from kvx.assets import asset

        p = Path(path).expanduser() if path else asset(default)
        if not p.is_file():
            raise DataError(f"task.{what}: {p} does not exist")
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"task.{what}: {p} is not valid JSON ({e.msg})") from e

    def load_subtask(self, subtask: str) -> list[dict]:
        df: Any = self.data_files
        if df is None:
            return read_zip_member(self._hub_zip(), subtask)
        if isinstance(df, dict):
            if subtask not in df:
                raise DataError(f"task.data_files has no file for subtask {subtask!r} (has: {', '.join(df)})")
            path = Path(str(df[subtask])).expanduser()
            if not path.is_file():
                raise DataError(f"task.data_files: {path} (subtask {subtask}) does not exist")
            return parse_jsonl(read_text(path).split("\n"), str(path))
        path = Path(str(df)).expanduser()
        if path.is_file() and path.suffix == ".zip":
            return read_zip_member(path, subtask)
        if path.is_dir():
            for cand in (path / f"{subtask}.jsonl", path / "data" / f"{subtask}.jsonl"):
                if cand.is_file():
                    return parse_jsonl(read_text(cand).split("\n"), str(cand))
            raise DataError(f"task.data_files: no {subtask}.jsonl in {path}")
        raise DataError(f"task.data_files: {path} is neither a folder of <subtask>.jsonl files nor a .zip")

    def _hub_zip(self) -> Path:
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(self.hub_repo, "data.zip", repo_type="dataset"))
        except Exception as e:  # the hub is unreachable
            raise DataError(
                f"cannot download {self.hub_repo}/data.zip from the hub ({type(e).__name__}: {e}); "
                "set task.data_files to a folder of LongBench jsonl files"
            ) from e

    def _chat_format(self, tok) -> str:
        if self.chat_template != "auto":
            if self.chat_template == "tokenizer" and not getattr(tok, "chat_template", None):
                raise ConfigError("task.chat_template", "the tokenizer has no chat template")
            return self.chat_template
        return "tokenizer" if getattr(tok, "chat_template", None) else "none"

    # prompts ---------------------------------------------------------------------------------------------------------
    def build_input(self, tok, row: dict, template: str, subtask: str, budget: int, fmt: str) -> tuple[list[int], bool]:
        """Token ids of one example: the template filled, cut in the middle to `budget` tokens, then chat-wrapped."""
        prompt = template.format(**row)
        ids = tok(prompt, add_special_tokens=True).input_ids
        truncated = len(ids) > budget
        if truncated:
            half = int(budget / 2)
            prompt = tok.decode(ids[:half], skip_special_tokens=True) + tok.decode(ids[-half:], skip_special_tokens=True)
        base = lbm.base_name(subtask)
        if base not in NO_CHAT and fmt != "none":
            prompt = build_chat(tok, prompt, fmt)
            ids = tok(prompt, add_special_tokens=fmt != "tokenizer").input_ids
        else:
            ids = tok(prompt, add_special_tokens=True).input_ids
        return ids, truncated

    def _generate(self, engine, ids: list[int], max_gen: int, subtask: str) -> tuple[list[int], int]:
        """The answer's tokens and the peak bytes its cache held."""
        tok = engine.tokenizer
        if lbm.base_name(subtask) != "samsum":
            gen = engine.generate(torch.tensor([ids]), max_new_tokens=max_gen, chunk_size=self.chunk_size)
            return gen.tokens[0], int(gen.stats["cache_bytes_peak"])
        # samsum: a newline also ends the answer, and the first token may be neither EOS nor the newline
        stop = [tok.eos_token_id, tok("\n", add_special_tokens=False).input_ids[-1]]
        cache = engine.new_cache(1, seq_len=len(ids) + max_gen)
        logits = engine.prefill(cache, torch.tensor([ids]), None, self.chunk_size)[:, -1].clone()
        logits[:, [s for s in stop if s is not None]] = float("-inf")
        first = logits.argmax(-1)
        if max_gen == 1:
            return [int(first)], int(cache.peak_bytes)
        rest = engine.generate(first[:, None], max_new_tokens=max_gen - 1, eos_token_id=stop, cache=cache)
        return [int(first)] + rest.tokens[0], int(rest.stats["cache_bytes_peak"])

    # run -------------------------------------------------------------------------------------------------------------
    def run(self, engine, ctx: RunContext) -> TaskResult:
        tok = engine.tokenizer
        prompts = self._json(self.prompts_file, "longbench/dataset2prompt.json", "prompts_file")
        maxlens = self._json(self.maxlen_file, "longbench/dataset2maxlen.json", "maxlen_file")
        fmt = self._chat_format(tok)
        chat_overhead = 0 if fmt == "none" else len(tok(build_chat(tok, "", fmt)).input_ids)
        max_pos = engine.arch.max_positions
        plan = []
        for s in self.subtasks:
            base = lbm.base_name(s)
            if base not in prompts or base not in maxlens:
                raise DataError(f"subtask {base!r} is missing from the prompt or max-length file")
            max_gen = int(maxlens[base]) if self.max_new_tokens is None else min(int(maxlens[base]), self.max_new_tokens)
            budget = self.max_length if self.max_length is not None else max_pos - max_gen - chat_overhead
            if budget <= 1:
                raise ConfigError(
                    "task.max_new_tokens",
                    f"subtask {s}: generating {max_gen} tokens leaves no room for a prompt in the model's context "
                    f"of {max_pos} tokens; cap it with task.max_new_tokens or set task.max_length",
                )
            rows = self.load_subtask(s)
            if self.limit is not None:
                rows = rows[: self.limit]
            plan.append((s, base, max_gen, budget, rows))

        outputs, metrics = [], {}
        total = sum(len(p[-1]) for p in plan)
        items = [(s, base, max_gen, budget, row) for s, base, max_gen, budget, rows in plan for row in rows]
        per_task: dict[str, list[tuple[float, int]]] = {}
        for s, base, max_gen, budget, row in ctx.progress(items, desc=f"{self.name} [{engine.method.name}]", total=total):
            ids, truncated = self.build_input(tok, row, prompts[base], s, budget, fmt)
            engine.set_question(row.get("input") or None)  # CaP-Q reads it; other methods ignore it
            if self.max_length is None and len(ids) + max_gen > max_pos and not engine.allow_beyond_context:
                keep = max(max_pos - max_gen, 2)  # the chat wrapper pushed past the context: cut the middle again
                ids = ids[: keep // 2] + ids[len(ids) - (keep - keep // 2) :]
                truncated = True
            toks, peak = self._generate(engine, ids, max_gen, s)
            pred = post_process(tok.decode(toks, skip_special_tokens=True), fmt)
            score = lbm.score_example(base, pred, row["answers"], row["all_classes"])
            per_task.setdefault(s, []).append((score, int(row["length"])))
            outputs.append({"subtask": s, "_id": row["_id"], "prediction": pred, "answers": row["answers"],
                            "score": score, "length": row["length"], "prompt_tokens": len(ids),
                            "truncated": truncated, "cache_bytes_peak": peak})
        for s, vals in per_task.items():
            metrics[s] = lbm.subtask_score([v for v, _ in vals])
            if s.endswith("_e"):
                for bucket, v in lbm.subtask_score_e([v for v, _ in vals], [n for _, n in vals]).items():
                    metrics[f"{s}/{bucket}"] = v
        metrics.update(averages({s: metrics[s] for s in per_task}))
        metrics["cache_bytes_peak"] = max(o["cache_bytes_peak"] for o in outputs)
        return TaskResult(metrics, outputs)


def averages(scores: dict[str, float]) -> dict[str, float]:
    """The average over LongBench subtasks, per language and per category; LongBench-E's average apart."""
    out: dict[str, float] = {}
    plain = {s: v for s, v in scores.items() if not s.endswith("_e")}
    e = {s: v for s, v in scores.items() if s.endswith("_e")}
    mean = lambda xs: round(sum(xs) / len(xs), 2)  # noqa: E731
    if plain:
        out["average"] = mean(list(plain.values()))
        en = [v for s, v in plain.items() if s not in ZH]
        zh = [v for s, v in plain.items() if s in ZH]
        if en:
            out["average_en"] = mean(en)
        if zh:
            out["average_zh"] = mean(zh)
        for cat, members in CATEGORIES.items():
            vals = [plain[s] for s in members if s in plain]
            if vals:
                out[f"average_{cat}"] = mean(vals)
    if e:
        out["average_e"] = mean(list(e.values()))
    return out
