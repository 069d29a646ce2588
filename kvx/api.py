"""The Python API: `kvx.load(model, method, **fields)` -> a Pipeline over an Engine.

    import kvx
    pipe = kvx.load("stories260k", "h2o", budget=64)
    pipe.generate("Once upon a time", max_new_tokens=20)
    pipe.perplexity(text), pipe.loglikelihood("The cat sat on the", " mat")
    pipe.cache_bytes, pipe.kept_positions()

The pipeline only tokenizes and decodes: every forward goes through its Engine (`pipe.engine`), so the numbers are
those of the runner and the tasks.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from kvx.errors import ConfigError


def _model_node(model: str, model_args: dict) -> dict:
    """A configs/model/<name>.yaml name, or a hub id / folder / .gguf file (configs/model/hf.yaml: dtype as stored,
    a GPU when there is one), as a model config node; model_args override its fields."""
    from omegaconf import OmegaConf

    import kvx.config  # noqa: F401  (the ${kvx.assets:} and ${kvx.model_name:} resolvers)
    from kvx.assets import REPO_ROOT

    folder = REPO_ROOT / "configs" / "model"
    named = "/" not in model and (folder / f"{model}.yaml").is_file()
    node = OmegaConf.load(folder / (f"{model}.yaml" if named else "hf.yaml"))
    if not named:
        node.name_or_path = model
    for key, value in model_args.items():
        node[key] = value
    return OmegaConf.to_container(node, resolve=True)


def _method(method, fields: dict):
    from kvx.config import build_method
    from kvx.methods.base import Method

    if isinstance(method, Method):
        if fields:
            raise ConfigError(f"method.{next(iter(fields))}", "give fields either in the Method object or as keywords")
        method.validate()
        return method
    if isinstance(method, dict):
        return build_method({**method, **fields})
    if isinstance(method, str):
        return build_method({"name": method, **fields})
    raise ConfigError("method", f"must be a method name, a dict with a name, or a Method object; got {method!r}")


def load(model, method="full", tokenizer=None, *, mode: str = "stream", chunk_size: int | None = None,
         model_args: dict | None = None, **fields) -> Pipeline:
    """A Pipeline for `model` compressed by `method`.

    model: a configs/model name (`stories260k`), a hub id, a local folder or .gguf file, or a loaded transformers
    causal LM (then give its `tokenizer`, an object or a path). A hub id or folder loads as configs/model/hf.yaml does
    (dtype as stored, a GPU when there is one); model_args override ModelConfig fields (`dtype`, `device`, ...). method: a name with its fields as keywords (`"h2o", budget=64`), a dict with a `name`, or
    a Method object. mode: `stream` (decode through the cache) or `masked` (one forward with the method's mask) for
    perplexity and loglikelihood. chunk_size: prefill chunk (None: one forward per context; perplexity in stream
    mode feeds compressing methods one token at a time, as the runner does)."""
    from kvx.engine import Engine
    from kvx.models import load_tokenizer

    meth = _method(method, fields)
    if isinstance(model, (str, Path)):
        if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
            raise ConfigError("tokenizer", "with a model name or path, give the tokenizer as a path (or none)")
        from kvx.config import build_model_config
        from kvx.models import load_model

        args = dict(model_args or {})
        if tokenizer is not None:
            args["tokenizer"] = str(tokenizer)
        model, tokenizer = load_model(build_model_config(_model_node(str(model), args)))
    else:
        if model_args:
            raise ConfigError("model_args", "only applies to a model loaded by kvx.load (a name, hub id or folder)")
        if not isinstance(model, torch.nn.Module):
            raise ConfigError("model", f"must be a name, hub id, folder or a loaded transformers model; got {model!r}")
        if tokenizer is None:
            raise ConfigError("tokenizer", "give the tokenizer of a loaded model (an object or a path)")
        if isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(str(tokenizer))
    return Pipeline(Engine(model, tokenizer, meth), mode=mode, chunk_size=chunk_size)


class Pipeline:
    """Text in, text and numbers out, through one Engine. After each call, `cache` is the call's cache (generate and
    compress keep it), `stats` its peak bytes and other counters."""

    def __init__(self, engine, mode: str = "stream", chunk_size: int | None = None):
        if mode not in ("stream", "masked"):
            raise ConfigError("mode", f"must be 'stream' or 'masked', got {mode!r}")
        if mode == "masked" and not engine.method.has_mask_form:
            raise ConfigError("mode", f"method {engine.method.name!r} has no mask form; use mode='stream'")
        self.engine = engine
        self.mode = mode
        self.chunk_size = chunk_size
        self.cache = None
        self.stats: dict = {}

    @property
    def model(self):
        return self.engine.model

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def method(self):
        return self.engine.method

    # tokens --------------------------------------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Token ids of text; with the tokenizer's special tokens (BOS) at the start of a sequence."""
        return self.tokenizer(text, add_special_tokens=bos).input_ids

    def _ids(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor([ids], device=self.engine.device)  # [1, T]

    # generation ----------------------------------------------------------------------------------------------------
    def compress(self, context: str, extra_tokens: int = 0):
        """Feed the context through the method's cache and keep the cache (`self.cache`). extra_tokens: how many
        more tokens the cache will receive (question, generated text), for methods whose budget is a fraction."""
        ids = self.encode(context)
        cache = self.engine.new_cache(1, seq_len=len(ids) + extra_tokens)
        self.engine.prefill(cache, self._ids(ids), chunk_size=self.chunk_size, last_only=True)
        self.cache, self.stats = cache, {"cache_bytes_peak": cache.peak_bytes, "context_tokens": len(ids)}
        return cache

    def generate(self, context: str, question: str | None = None, max_new_tokens: int = 32, **kwargs) -> str:
        """Greedy (or sampled: do_sample, temperature, top_p, top_k, seed) continuation of context [+ question].

        The context goes through the method's cache first, then the question (its tokens follow the compressed
        context, as in kvpress's pipeline), then decoding; `eos_token_id`, `stop_strings` as in Engine.generate.
        Returns the generated text; `cache` (kept) and `stats` describe the call."""
        ids = self.encode(context)
        q = self.encode(question, bos=False) if question else []
        cache = self.engine.new_cache(1, seq_len=len(ids) + len(q) + max_new_tokens)
        self.engine.set_question(question)
        try:
            if q:
                self.engine.prefill(cache, self._ids(ids), chunk_size=self.chunk_size, last_only=True)
            gen = self.engine.generate(self._ids(q or ids), max_new_tokens=max_new_tokens, cache=cache,
                                       chunk_size=self.chunk_size, **kwargs)
        finally:
            self.engine.set_question(None)
        self.cache = cache
        self.stats = {"cache_bytes_peak": gen.stats["cache_bytes_peak"], "context_tokens": len(ids),
                      "question_tokens": len(q), "new_tokens": len(gen.tokens[0])}
        return self.tokenizer.decode(gen.tokens[0], skip_special_tokens=True)

    # scoring -------------------------------------------------------------------------------------------------------
    def perplexity(self, text: str) -> float:
        """exp(mean negative log-likelihood) of text's tokens (after the first, BOS), through the method's cache, in
        disjoint windows of at most the model's context."""
        ids = self.encode(text)
        if len(ids) < 2:
            raise ConfigError("text", "needs at least two tokens to score")
        window = self.engine.arch.max_positions
        total, count, peak = 0.0, 0, 0
        for s in range(0, len(ids) - 1, window):
            chunk = ids[s : s + window + 1]
            nll, stats = self.engine.score_window(self._ids(chunk), mode=self.mode, chunk_size=self.chunk_size)
            total += float(nll.sum())
            count += nll.numel()
            peak = max(peak, stats["cache_bytes_peak"])
        self.cache, self.stats = None, {"cache_bytes_peak": peak, "tokens": count, "nll_sum": total}
        return math.exp(total / count)

    def loglikelihood(self, context: str, continuation: str) -> float:
        """log p(continuation | context) through the method's cache (the context compressed first).

        Tokenized as lm-eval does: the pair is encoded whole and the continuation is what follows the context's
        tokens (a trailing space of the context moves to the continuation). `stats["greedy"]` says whether the
        continuation is the greedy one."""
        if not continuation:
            raise ConfigError("continuation", "is empty")
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        cont = whole[len(ctx):]
        stats: dict = {}
        lp, greedy = self.engine.loglikelihood(ctx, cont, self.mode, self.chunk_size, stats)
        self.cache, self.stats = None, {**stats, "greedy": greedy, "continuation_tokens": len(cont)}
        return lp

    # the cache -----------------------------------------------------------------------------------------------------
    def _held(self):
        if self.cache is None:
            raise RuntimeError("no cache held: call generate() or compress() first")
        return self.cache

    @property
    def cache_bytes(self) -> int:
        """Bytes of key/value payload the last generate/compress cache holds now, measured from its tensors."""
        return self._held().nbytes()

    @property
    def peak_bytes(self) -> int:
        """Peak cache bytes of the last call (any call)."""
        return int(self.stats.get("cache_bytes_peak", 0))

    def kept_positions(self) -> list[torch.Tensor]:
        """Per layer, the token indices the cache holds, [Hkv, n] (one row per KV head, in slot order; -1: a padding
        slot, as when heads hold different numbers of tokens)."""
        return [layer.store.pos[0].long().cpu() for layer in self._held().layers]
