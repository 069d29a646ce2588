"""lm-evaluation-harness tasks (HellaSwag, PIQA, MathQA, BoolQ, ...) through the kvx engine.

`KVXLM` is an lm-eval `LM`, registered in lm-eval's model registry as "kvx" by `import kvx` (a lazy entry, so
`lm_eval.simple_evaluate(model="kvx", ...)` needs nothing else): every request runs through the engine
with the chosen method and a fresh cache. loglikelihood follows Engine.continuation_logprobs: the context is
compressed to the budget (stream: prefilled as the method prefills any prompt; masked: under the method's mask), then
each continuation token is predicted from that compressed context plus the continuation before it, whatever the
continuation's length. loglikelihood_rolling (perplexity tasks such as wikitext) predicts every token through the
compressed cache, as a perplexity run does (Engine.score_window). Tokenisation, truncation and rolling windows follow lm-eval's own HF model
(`HFLM`), so with the full cache both give the same numbers. From the command line (the `lm_eval` command itself
discovers only the models it ships, so its arguments go through kvx.tasks.harness_cli):

    python -m kvx.tasks.harness_cli --model kvx --model_args model=llama2-7b,method=streaming_llm,budget=256 \
        --tasks hellaswag,piqa

Without the hub, lm-eval reads a task's documents from local files when its YAML says so (`dataset_path: json`,
`dataset_kwargs: {data_files: ...}`): kvx/tasks/lm_eval_tasks/hellaswag_local.yaml does this for the assets' HellaSwag
(`--include_path kvx/tasks/lm_eval_tasks --tasks hellaswag_local`; a YAML file's path also works as a task name).

`model` is a configs/model/<name>.yaml name, a hub id, a local folder or a .gguf file; the other keys are fields of
the model config or of the method (prefix them with `model.` or `method.` where both have one), or `mode`,
`chunk_size`, `max_length`, `max_gen_toks`. In kvx runs: `python run.py task=harness task.tasks=[hellaswag,piqa]`
or the shortcuts `task=hellaswag` etc. With task.data_files the documents come from local files (in the hub
dataset's fields; HellaSwag also takes the assets' cleaned copy with a single `ctx`) through lm-eval's own task
definitions; `sample: N` evaluates N documents per task drawn with the task seed (QAQ: 1000).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import TemplateLM

from kvx.errors import ConfigError, DataError
from kvx.registry import TASKS
from kvx.tasks.base import RunContext, Task, TaskResult, read_jsonl

log = logging.getLogger(__name__)
LM_NAME = "kvx"
OWN_ARGS = ("mode", "chunk_size", "max_length", "max_gen_toks", "add_bos_token")


# model_args -> engine ------------------------------------------------------------------------------------------------
def _model_node(model: str) -> dict:
    from kvx.assets import REPO_ROOT

    path = REPO_ROOT / "configs" / "model" / f"{model}.yaml"
    if "/" not in model and path.is_file():
        from omegaconf import OmegaConf

        import kvx.config  # noqa: F401  (the ${kvx.assets:} resolver)

        return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return {"name_or_path": model}  # the name derives from the path (kvx.models.name_from_path)


def engine_from_args(model: str | None, method: str = "full", device: str | None = None, **kwargs):
    """Build an Engine from lm-eval model_args: a model (config name, hub id, folder, .gguf), a method, fields."""
    from kvx.config import build_method, build_model_config
    from kvx.engine import Engine
    from kvx.models import ModelConfig, load_model
    from kvx.registry import METHODS

    if not model:
        raise ConfigError("model_args.model", "missing: give model=<config name, hub id, folder or .gguf file>")
    import kvx.methods  # noqa: F401  (registers methods)

    method_cls = METHODS.get(str(method))
    method_fields = {f.name for f in dataclasses.fields(method_cls)} - {"name"}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"name"}
    model_kw: dict[str, Any] = {}
    method_kw: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key.startswith("model."):
            model_kw[key[6:]] = value
        elif key.startswith("method."):
            method_kw[key[7:]] = value
        elif key in model_fields and key in method_fields:
            raise ConfigError(f"model_args.{key}", f"is a field of both the model and the method; write model.{key} "
                                                   f"or method.{key}")
        elif key in model_fields:
            model_kw[key] = value
        elif key in method_fields:
            method_kw[key] = value
        else:
            raise ConfigError(
                f"model_args.{key}",
                f"unknown; allowed: model fields ({', '.join(sorted(model_fields))}), method {method!r} fields "
                f"({', '.join(sorted(method_fields)) or 'none'}) and {', '.join(OWN_ARGS)}",
            )
    node = {**_model_node(str(model)), **model_kw}
    if device and "device" not in model_kw:
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            log.warning("device %s asked for but CUDA is not available: running on cpu", device)
            device = "cpu"
        node["device"] = str(device)
    meth = build_method({"name": str(method), **method_kw})
    model_obj, tok = load_model(build_model_config(node))
    return Engine(model_obj, tok, meth)


# the LM ---------------------------------------------------------------------------------------------------------------
class KVXLM(TemplateLM):
    """lm-eval LM over a kvx Engine: one request at a time, each with a fresh cache."""

    backend = "causal"

    def __init__(self, engine=None, model: str | None = None, method: str = "full", mode: str = "stream",
                 chunk_size: int | None = None, max_length: int | None = None, max_gen_toks: int = 256,
                 add_bos_token: bool | None = None, progress=None, batch_size=None, max_batch_size=None,
                 device: str | None = None, **kwargs):
        super().__init__()
        if engine is None:
            engine = engine_from_args(model, method, device, **kwargs)
        elif kwargs:
            raise ConfigError(f"model_args.{next(iter(kwargs))}", "unknown when an engine is given")
        if mode not in ("stream", "masked"):
            raise ConfigError("task.mode", f"must be 'stream' or 'masked', got {mode!r}")
        if mode == "masked" and not engine.method.has_mask_form:
            raise ConfigError("task.mode", f"method {engine.method.name!r} has no mask form; use task.mode=stream")
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.mode = mode
        self.chunk_size = int(chunk_size) if chunk_size else None
        self._max_length = int(max_length) if max_length else engine.arch.max_positions
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.progress = progress or (lambda it, **kw: it)
        self.cache_bytes_peak = 0
        self.state_bytes = 0  # a constant-size state beside the cached tokens (LESS), as rolling windows measured it

    # properties lm-eval reads ----------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self):
        return self.engine.device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # tokenisation, as lm-eval's HF model does it ---------------------------------------------------------------------
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        if add_special_tokens is not None:
            kw = {"add_special_tokens": add_special_tokens}
        elif self.add_bos_token is not None:
            kw = {"add_special_tokens": self.add_bos_token}
        else:
            kw = {}
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            kw["add_special_tokens"] = False  # the string already starts with BOS
        ids = self.tokenizer.encode(string, **kw)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # scoring ---------------------------------------------------------------------------------------------------------
    def score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """log p(continuation | context) through the method's cache, and whether the continuation is greedy.

        Too long: the context is cut from the left to max_length + 1 tokens in all (HFLM's rule)."""
        n = len(continuation)
        full = (context + continuation)[-(self.max_length + 1) :]
        stats: dict = {}
        res = self.engine.loglikelihood(full[:-n], full[-n:], self.mode, self.chunk_size, stats)
        self.cache_bytes_peak = max(self.cache_bytes_peak, stats["cache_bytes_peak"])
        return res

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out = []
        for key, context, continuation in self.progress(requests, desc="loglikelihood", total=len(requests)):
            res = self.score(list(context), list(continuation))
            out.append(res)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def rolling_score(self, context: list[int], continuation: list[int]) -> float:
        """log p of a rolling window's tokens, each predicted through the method's cache as in perplexity runs
        (Engine.score_window: stream feeds the window in chunks of chunk_size, 1 for compressing methods; masked
        gives every query the method's mask), so that a document's perplexity reflects the compression."""
        ids = torch.tensor([list(context) + list(continuation)])
        nll, stats = self.engine.score_window(ids, mode=self.mode, chunk_size=self.chunk_size)
        self.cache_bytes_peak = max(self.cache_bytes_peak, int(stats["cache_bytes_peak"]))
        self.state_bytes = max(self.state_bytes, int(stats.get("state_bytes", 0)))
        return -float(nll[0, -len(continuation):].sum())

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Document log-likelihoods in lm-eval's disjoint rolling windows of max_length tokens (HFLM's windows)."""
        out = []
        for req in self.progress(requests, desc="loglikelihood_rolling", total=len(requests)):
            (string,) = req.args
            total, _ = self.document_loglikelihood(string)
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return out

    def document_loglikelihood(self, string: str) -> tuple[float, int]:
        """log p of a whole document in lm-eval's disjoint rolling windows of max_length tokens, and its tokens."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        ids = self.tok_encode(string)
        windows = map(make_disjoint_window, get_rolling_token_windows(
            token_list=ids, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1))
        return sum(self.rolling_score(c, t) for c, t in windows), len(ids)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        for i, req in enumerate(self.progress(requests, desc="generate_until", total=len(requests))):
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            if eos_text and eos_text not in until:
                until.append(eos_text)
            max_gen = int(kw.pop("max_gen_toks", None) or kw.pop("max_new_tokens", None) or self.max_gen_toks)
            temperature = float(kw.pop("temperature", 0.0) or 0.0)
            do_sample = kw.pop("do_sample", None)
            do_sample = temperature > 0 if do_sample is None else bool(do_sample) and temperature > 0
            if self.max_length - max_gen <= 0:
                raise ConfigError("max_gen_toks", f"{max_gen} leaves no room for a context in {self.max_length} tokens")
            ids = self.tok_encode(context, left_truncate_len=self.max_length - max_gen)
            gen = self.engine.generate(
                torch.tensor([ids]), max_new_tokens=max_gen, do_sample=do_sample,
                temperature=temperature if do_sample else 1.0, top_p=float(kw.pop("top_p", 1.0) or 1.0),
                top_k=int(kw.pop("top_k", 0) or 0), seed=i, stop_strings=[u for u in until if u],
                chunk_size=self.chunk_size,
            )
            self.cache_bytes_peak = max(self.cache_bytes_peak, int(gen.stats.get("cache_bytes_peak", 0)))
            text = self.tok_decode(gen.tokens[0])
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out



# local documents ------------------------------------------------------------------------------------------------------
def hellaswag_docs(dataset):
    """lm-eval's HellaSwag documents; rows may hold ctx_a/ctx_b (the hub's) or an already joined ctx."""
    from lm_eval.tasks.hellaswag.utils import preprocess

    def one(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize() if doc.get("ctx_a") is not None else doc["ctx"]
        return {
            "query": preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [preprocess(e) for e in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(one)


LOCAL_FIELDS = {
    "hellaswag": ("activity_label", "endings", "label"),
    "piqa": ("goal", "sol1", "sol2", "label"),
    "mathqa": ("Problem", "options", "correct"),
    "boolq": ("passage", "question", "label"),
    "wikitext": ("page",),
}

_TASK_MANAGERS: dict = {}
# lm-eval's own definitions of the tasks kvx reads from local files, relative to lm_eval/tasks
KNOWN_YAML = {
    "hellaswag": "hellaswag/hellaswag.yaml",
    "piqa": "piqa/piqa.yaml",
    "mathqa": "mathqa/mathqa.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "wikitext": "wikitext/wikitext.yaml",
}


def task_manager(include_path: str | None = None, defaults: bool = True):
    """lm-eval's TaskManager (cached); defaults=False skips indexing lm-eval's few thousand task files."""
    from lm_eval.tasks import TaskManager

    key = (include_path, defaults)
    if key not in _TASK_MANAGERS:
        _TASK_MANAGERS[key] = TaskManager(include_path=include_path, include_defaults=defaults)
    return _TASK_MANAGERS[key]


def task_yaml(task: str) -> Path:
    import lm_eval.tasks

    if task in KNOWN_YAML:
        path = Path(lm_eval.tasks.__file__).parent / KNOWN_YAML[task]
        if path.is_file():
            return path
    entry = task_manager().task_index.get(task)
    if entry is None or entry.yaml_path is None:
        raise ConfigError("task.tasks", f"lm-eval has no single task named {task!r} to read local files into")
    return Path(entry.yaml_path)


def check_local_rows(task: str, path: Path) -> None:
    rows = read_jsonl(path, required=LOCAL_FIELDS.get(task, ()))
    if task == "hellaswag":
        for i, row in enumerate(rows, start=1):
            if "ctx" not in row and not ("ctx_a" in row and "ctx_b" in row):
                raise DataError(f"{path}, row {i}: missing field(s) ctx (or ctx_a and ctx_b)")


def local_task_config(task: str, files: dict[str, list[str]]) -> dict:
    """lm-eval's own config for `task`, reading the given split -> files instead of its hub dataset."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(task_yaml(task), resolve_func=True)
    eval_split = cfg.get("test_split") or cfg.get("validation_split")
    if "eval" in files:
        files = {**{k: v for k, v in files.items() if k != "eval"}, eval_split: files["eval"]}
    if eval_split not in files:
        raise ConfigError("task.data_files", f"task {task}: no file for its evaluation split {eval_split!r}")
    for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
        if cfg.get(key) is not None and cfg[key] not in files:
            cfg[key] = None
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": files})
    for key in ("tag", "group"):
        cfg.pop(key, None)
    if task == "hellaswag":
        cfg["process_docs"] = hellaswag_docs
    return cfg


# the kvx task ----------------------------------------------------------------------------------------------------------
@TASKS.register("harness")
@dataclass
class Harness(Task):
    type: str = "harness"
    name: str = "harness"
    tasks: list[str] = field(default_factory=lambda: ["hellaswag"])
    num_fewshot: int | None = None
    sample: int | None = None  # evaluate N documents per task drawn with the task seed (QAQ uses 1000)
    max_gen_toks: int = 256
    chunk_size: int | None = None  # stream mode: prefill contexts in chunks of this many tokens
    apply_chat_template: bool = False
    include_path: str | None = None  # extra lm-eval task YAML folder
    bootstrap_iters: int = 100000

    def validate(self) -> None:
        super().validate()
        if not self.tasks:
            raise ConfigError("task.tasks", "is empty; e.g. [hellaswag, piqa]")
        if self.sample is not None and self.sample <= 0:
            raise ConfigError("task.sample", f"must be a positive number of documents or null, got {self.sample}")
        if self.sample is not None and self.limit is not None:
            raise ConfigError("task.sample", "give either task.sample (drawn with the seed) or task.limit (the first N)")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError("task.num_fewshot", f"must be >= 0 or null, got {self.num_fewshot}")
        self.local_files()

    def local_files(self) -> dict[str, dict[str, list[str]]]:
        """task -> {split: [files]} from task.data_files (a file or list for one task, or a task -> file mapping)."""
        df = self.data_files
        if df is None:
            return {}
        if isinstance(df, dict) or hasattr(df, "items"):
            out = {}
            for task, spec in df.items():
                if task not in self.tasks:
                    raise ConfigError("task.data_files", f"names task {task!r}, which is not in task.tasks {self.tasks}")
                if isinstance(spec, dict) or hasattr(spec, "items"):
                    out[task] = {str(k): _as_list(v) for k, v in spec.items()}
                else:
                    out[task] = {"eval": _as_list(spec)}
            return out
        if len(self.tasks) != 1:
            raise ConfigError("task.data_files", "with several tasks give a mapping task -> file")
        return {self.tasks[0]: {"eval": _as_list(df)}}

    def check(self) -> None:
        for task, splits in self.local_files().items():
            for split_files in splits.values():
                for f in split_files:
                    check_local_rows(task, Path(f))

    def run(self, engine, ctx: RunContext) -> TaskResult:
        from lm_eval import simple_evaluate

        local = self.local_files()
        only_known_local = all(t in local and t in KNOWN_YAML for t in self.tasks) and not self.include_path
        tm = task_manager(self.include_path, defaults=not only_known_local)
        specs: list[Any] = []
        for task in self.tasks:
            if task in local:
                for split_files in local[task].values():
                    for f in split_files:
                        check_local_rows(task, Path(f))
                specs.append(local_task_config(task, local[task]))
            else:
                if task not in tm.task_index:
                    import difflib

                    close = difflib.get_close_matches(task, tm.all_tasks, n=3)
                    hint = f" Did you mean {', '.join(close)}?" if close else ""
                    raise ConfigError("task.tasks", f"lm-eval knows no task {task!r}.{hint}")
                specs.append(task)
        samples = None
        if self.sample is not None:
            loaded = tm.load(specs)
            samples = {}
            for name, t in loaded["tasks"].items():
                n = len(t.eval_docs)
                samples[name] = sorted(random.Random(self.seed).sample(range(n), min(self.sample, n)))
        lm = KVXLM(engine=engine, mode=self.mode, chunk_size=self.chunk_size, max_gen_toks=self.max_gen_toks,
                   progress=ctx.progress)
        try:
            res = simple_evaluate(
                model=lm, tasks=specs, num_fewshot=self.num_fewshot, limit=self.limit, samples=samples,
                task_manager=tm, bootstrap_iters=self.bootstrap_iters, apply_chat_template=self.apply_chat_template,
                log_samples=True, random_seed=self.seed, numpy_random_seed=self.seed, torch_random_seed=self.seed,
                fewshot_random_seed=self.seed,
            )
        except (FileNotFoundError, ConnectionError, OSError) as e:
            raise DataError(
                f"lm-eval could not load the data of {self.tasks} ({type(e).__name__}: {e}); without the hub, give "
                "local files in task.data_files"
            ) from e
        metrics = flatten_results(res["results"])
        metrics["cache_bytes_peak"] = lm.cache_bytes_peak
        outputs = [sample_row(task, s) for task, rows in res.get("samples", {}).items() for s in rows]
        summary = {k: res.get(k) for k in ("results", "groups", "configs", "versions", "n-shot", "n-samples")}
        return TaskResult(metrics, outputs, {"lm_eval_results.json": json.dumps(summary, indent=2, default=str).encode()})


def _as_list(v) -> list[str]:
    if isinstance(v, (str, Path)):
        return [str(v)]
    return [str(x) for x in v]


def flatten_results(results: dict) -> dict[str, float]:
    """{"hellaswag": {"acc,none": 0.3, ...}} -> {"hellaswag/acc": 0.3, ...} (other filters keep a suffix)."""
    out = {}
    for task, vals in results.items():
        for key, v in vals.items():
            if "," not in key or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            out[f"{task}/{metric}" + ("" if filt == "none" else f"_{filt}")] = float(v)
    return out


def _plain(x):
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def sample_row(task: str, s: dict) -> dict:
    skip = {"doc", "arguments", "resps", "filtered_resps", "doc_hash", "prompt_hash", "target_hash", "metrics"}
    row = {"task": task, "doc_id": s.get("doc_id"), "target": _plain(s.get("target")),
           "responses": _plain(s.get("filtered_resps"))}
    for k, v in s.items():
        if k not in skip and k not in row:
            row[k] = _plain(v)
    return row
