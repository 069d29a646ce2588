"""The engine: the one place that calls the model's forward.

prefill (optionally in chunks), decode (greedy or sampled), loglikelihood and rolling loglikelihood, all through a
KVXCache and the kvx attention function. The attention function is registered with transformers'
AttentionInterface when an engine is built, and switched on only inside the engine's own forwards, so the same
model object still runs plain transformers code (for example `model.generate`) outside them.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from kvx.cache.kvcache import KVXCache
from kvx.cache.sliding import layer_windows
from kvx.errors import ConfigError, UnsupportedModelError
from kvx.methods.base import ArchInfo, LayerPolicy, Method

_ACTIVE: contextvars.ContextVar[KVXCache | None] = contextvars.ContextVar("kvx_active_cache", default=None)
ATTN_NAME = "kvx"


def kvx_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [B, Hq, t, D], key/value [B, Hkv, t, D] (new tokens, after RoPE)."""
    cache = _ACTIVE.get()
    if cache is None:
        raise RuntimeError("the kvx attention function was called outside a kvx engine forward")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    check_layer_kwargs(cache.arch, module.layer_idx, kwargs)
    out = cache.layers[module.layer_idx].attend(query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None


def arch_info(model) -> ArchInfo:
    """Read the attention geometry of a causal LM; refuse architectures the engine cannot drive."""
    cls = type(model).__name__
    cfg = model.config
    if not getattr(model, "_supports_attention_backend", False):
        raise UnsupportedModelError(
            f"model architecture {cls} ({cfg.model_type}) does not route attention through transformers' "
            "AttentionInterface, so kvx cannot drive its cache. Supported: decoder-only models whose attention uses "
            "the attention interface (tested: Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, OPT)."
        )
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n_heads = getattr(text_cfg, "num_attention_heads", None)
    n_layers = getattr(text_cfg, "num_hidden_layers", None)
    if n_heads is None or n_layers is None:
        raise UnsupportedModelError(f"model architecture {cls}: cannot read num_attention_heads/num_hidden_layers")
    n_kv = getattr(text_cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // n_heads
    max_pos = getattr(text_cfg, "max_position_embeddings", None) or 2048
    windows = layer_windows(text_cfg, n_layers)  # sliding-window layers hold the model's own window
    softcap = getattr(text_cfg, "attn_logit_softcapping", None)
    dtype = next(model.parameters()).dtype
    model_id = str(getattr(cfg, "_name_or_path", "") or "")
    return ArchInfo(n_layers, n_heads, n_kv, head_dim, max_pos, torch.finfo(dtype).bits // 8, model_id, windows,
                    None if softcap is None else float(softcap))


def check_layer_kwargs(arch: ArchInfo, layer_idx: int, kwargs: dict) -> None:
    """The window and logit cap a layer's attention asks for must be those arch_info read from the config."""
    window = kwargs.get("sliding_window")
    want = arch.windows[layer_idx] if arch.windows else None
    if window != want and not (window is None and want is None):
        raise UnsupportedModelError(f"layer {layer_idx} attends with sliding_window={window}, but the config reads "
                                    f"{want}: kvx cannot hold this layer's window")
    if kwargs.get("softcap") != arch.softcap:
        raise UnsupportedModelError(f"layer {layer_idx} attends with softcap={kwargs.get('softcap')}, but the config "
                                    f"reads {arch.softcap}")


class _ContextOnly(LayerPolicy):
    """A layer's policy while the first `n_ctx` tokens go in, then none (masked mode of `continuation_logprobs`).

    Tokens are counted as they are appended; from token `n_ctx` on nothing is evicted or scored, so later queries
    read the store as the policy left it after the context, plus the tokens since."""

    def __init__(self, inner: LayerPolicy, n_ctx: int):
        self.inner = inner
        self.n_ctx = n_ctx
        self.count = 0  # tokens appended so far
        self.needs_probs = inner.needs_probs

    def _live(self) -> bool:
        return self.count < self.n_ctx

    def before_attend(self, store, t: int) -> None:
        if self._live():
            self.inner.before_attend(store, t)

    def observe(self, store, q, probs) -> None:
        if self._live():
            self.inner.observe(store, q, probs)

    def on_append(self, store, t: int) -> None:
        live = self._live()
        self.count += t
        if live:
            self.inner.on_append(store, t)

    def end_step(self, store) -> None:
        if self.count <= self.n_ctx:  # the step that appended the last context token still compresses
            self.inner.end_step(store)

    def observe_token_nll(self, store, nll) -> None:
        pass  # reported after the whole parallel forward, when the mask is already decided

    def nbytes(self) -> int:
        return self.inner.nbytes() if hasattr(self.inner, "nbytes") else 0


@dataclass
class Generation:
    tokens: list[list[int]]
    finished: list[bool]
    cache: KVXCache | None = None
    stats: dict = field(default_factory=dict)


class Engine:
    def __init__(self, model, tokenizer, method: Method, allow_beyond_context: bool = False):
        AttentionInterface.register(ATTN_NAME, kvx_attention)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.method = method
        self.arch = arch_info(model)
        method.check_arch(self.arch)
        self.device = next(model.parameters()).device
        self.allow_beyond_context = allow_beyond_context
        method.bind(self)

    def set_question(self, text: str | None) -> None:
        """Tell the method the task's question, for methods that use it (InfiniPot's CaP-Q); others ignore it."""
        if hasattr(self.method, "set_question"):
            ids = self.tokenizer(text, add_special_tokens=False).input_ids if text else None
            self.method.set_question(ids)

    # caches and forwards -----------------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, seq_len: int | None = None, mode: str = "stream") -> KVXCache:
        if mode not in ("stream", "masked"):
            raise ConfigError("task.mode", f"must be 'stream' or 'masked', got {mode!r}")
        if mode == "masked" and not self.method.has_mask_form:
            raise ConfigError(
                "task.mode", f"method {self.method.name!r} has no mask form; use task.mode=stream"
            )
        cache = KVXCache(self.method, self.arch, batch_size, self.device, seq_len=seq_len, mode=mode)
        cache.rope_offset = cache.rope_zero = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        cache.last_logits = None
        return cache

    @contextlib.contextmanager
    def _active(self, cache: KVXCache):
        configs = self.__dict__.get("_configs")
        if configs is None:  # the model's config objects, collected once (walking the modules costs every step)
            configs = self._configs = {id(m.config): m.config for m in self.model.modules() if hasattr(m, "config")}
        saved = {k: c._attn_implementation_internal for k, c in configs.items()}
        token = _ACTIVE.set(cache)
        try:
            for c in configs.values():
                c._attn_implementation_internal = ATTN_NAME
            yield
        finally:
            for k, c in configs.items():
                c._attn_implementation_internal = saved[k]
            _ACTIVE.reset(token)

    @torch.inference_mode()
    def forward(self, cache: KVXCache, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                frozen: bool = False):
        """Run t new tokens through the model and the cache. input_ids [B, t]; attention_mask [B, t] (0 = padding).
        `frozen`: the method's engine hooks are skipped (the cache takes the tokens as they come; see
        `continuation_logprobs`).

        Returns logits [B, t, V] (fp32)."""
        input_ids = input_ids.to(self.device)
        B, t = input_ids.shape
        if not frozen:
            limit = self.method.max_chunk(cache)
            if limit is not None and t > limit:  # the method takes at most `limit` tokens per forward (a pot)
                return self.prefill(cache, input_ids, attention_mask)
            self.method.before_forward(self, cache, t)
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(self.device).bool()
        pos = cache.seen[:, None] + real.long().cumsum(dim=1) - 1  # [B, t]
        pos = torch.where(real, pos, torch.full_like(pos, -1))
        rope = torch.where(real, pos - cache.rope_offset[:, None], torch.zeros_like(pos))
        if not self.allow_beyond_context and t and int(rope.max()) >= self.arch.max_positions:
            raise ConfigError(
                "max_position_embeddings",
                f"position {int(rope.max())} is beyond the model's context of {self.arch.max_positions} tokens "
                "(max_position_embeddings); shorten the input or window",
            )
        cache.step_pos = pos
        cache.step_rope = rope
        zero = getattr(cache, "rope_zero", None)  # the offset the cache was built with: none was set since (no sync)
        cache.rope_shifted = bool(cache.rope_offset.any()) if zero is None else cache.rope_offset is not zero
        with self._active(cache):
            out = self.model(input_ids=input_ids, position_ids=rope, cache=cache, use_cache=True)
        logits = out.logits.float()
        cache.seen += real.long().sum(dim=1)
        nll = None
        if self.method.needs_token_nll:
            nll = self.token_nll(cache.last_logits, logits, input_ids)
        cache.end_step(nll)
        cache.last_logits = logits[:, -1]
        return logits

    @staticmethod
    def token_nll(prev_logits: torch.Tensor | None, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """-log p of each new token given what came before; [B, t]. The first token of a sequence gets 0."""
        B, t = ids.shape
        pred = logits[:, :-1]
        if prev_logits is not None:
            pred = torch.cat([prev_logits[:, None], pred], dim=1)
        lp = torch.log_softmax(pred, dim=-1)
        tgt = ids[:, t - lp.shape[1] :]
        nll = -lp.gather(-1, tgt[..., None]).squeeze(-1)
        if prev_logits is None:
            nll = torch.cat([torch.zeros(B, 1, device=ids.device), nll], dim=1)
        return nll

    def prefill(
        self, cache, input_ids, attention_mask=None, chunk_size: int | None = None, last_only: bool = False
    ) -> torch.Tensor:
        """Feed a prompt, in chunks of chunk_size tokens if given. Returns the logits of every prompt token
        ([B, T, V]), or only of the last one ([B, 1, V]) with last_only (decoding needs no more)."""
        T = input_ids.shape[1]
        outs, s = [], 0
        while s < T:
            step = T - s if not chunk_size else int(chunk_size)
            limit = self.method.max_chunk(cache)  # a method may cap each forward (InfiniPot's pot)
            if limit is not None:
                step = min(step, limit)
            am = None if attention_mask is None else attention_mask[:, s : s + step]
            logits = self.forward(cache, input_ids[:, s : s + step], am)
            outs = [logits[:, -1:]] if last_only else outs + [logits]
            s += step
        return torch.cat(outs, dim=1)

    # decoding ----------------------------------------------------------------------------------------------------
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        eos_token_id: int | list[int] | None = None,
        stop_strings: list[str] | None = None,
        chunk_size: int | None = None,
        cache: KVXCache | None = None,
        on_step=None,
    ) -> Generation:
        """Prefill the (left-padded) prompts, then decode token by token through the method's cache."""
        B, T = input_ids.shape
        if cache is None:
            cache = self.new_cache(B, seq_len=T + max_new_tokens)
        logits = self.prefill(cache, input_ids, attention_mask, chunk_size, last_only=True)[:, -1]
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(int(seed))
        if eos_token_id is None:
            eos_token_id = self.tokenizer.eos_token_id if self.tokenizer is not None else None
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        tokens: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        peak = cache.peak_bytes
        for _ in range(max_new_tokens):
            nxt = self._pick(logits, do_sample, temperature, top_p, top_k, gen)
            for b in range(B):
                if not done[b]:
                    tokens[b].append(int(nxt[b]))
                    if int(nxt[b]) in eos or self._hit_stop(tokens[b], stop_strings):
                        done[b] = True
            if all(done):
                break
            logits = self.forward(cache, nxt[:, None])[:, -1]
            peak = max(peak, cache.peak_bytes)
            if on_step is not None:
                on_step(cache)
        if stop_strings:
            tokens = [self._trim_stop(tk, stop_strings) for tk in tokens]
        return Generation(tokens, done, cache, {"cache_bytes_peak": peak})

    @staticmethod
    def _pick(logits, do_sample, temperature, top_p, top_k, gen) -> torch.Tensor:
        if not do_sample or temperature <= 0:
            return logits.argmax(dim=-1)
        logits = logits.float().cpu() / temperature
        if top_k and top_k > 0:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            srt, idx = logits.sort(dim=-1, descending=True)
            cum = srt.softmax(-1).cumsum(-1)
            cut = cum - srt.softmax(-1) > top_p
            srt = srt.masked_fill(cut, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, srt)
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=gen).squeeze(-1)

    def _hit_stop(self, toks: list[int], stops: list[str] | None) -> bool:
        if not stops or self.tokenizer is None:
            return False
        text = self.tokenizer.decode(toks[-16:], skip_special_tokens=True)
        return any(s in text for s in stops)

    def _trim_stop(self, toks: list[int], stops: list[str]) -> list[int]:
        if self.tokenizer is None:
            return toks
        for i in range(1, len(toks) + 1):
            text = self.tokenizer.decode(toks[:i], skip_special_tokens=True)
            if any(s in text for s in stops):
                return toks[: i - 1] if i > 1 else []
        return toks

    # scoring -----------------------------------------------------------------------------------------------------
    def score_window(
        self, ids: torch.Tensor, mode: str = "stream", chunk_size: int | None = None, return_logits: bool = False
    ) -> tuple[torch.Tensor, dict]:
        """Per-token negative log-likelihood of ids[:, 1:] given the prefix, through the method's cache.

        ids [B, T+1]. Returns nll [B, T] and stats (peak cache bytes; the logits [B, T, V] if asked)."""
        inp, tgt = ids[:, :-1], ids[:, 1:].to(self.device)
        B, T = inp.shape
        cache = self.new_cache(B, seq_len=T, mode=mode)
        if mode == "masked":
            logits = self.forward(cache, inp)
            peak = cache.masked_peak_bytes(B)
        else:
            step = T if (chunk_size is None and not self.method.compresses) else (chunk_size or 1)
            logits = self.prefill(cache, inp, None, step)
            peak = cache.peak_bytes
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none").view(B, T)
        stats = {"cache_bytes_peak": peak, "cache_aux_bytes": cache.aux_nbytes(), **cache.extra_stats()}
        state = sum(layer.store.state_nbytes() for layer in cache.layers)  # constant-size states (LESS's H, z)
        if state:
            stats["state_bytes"] = state // B  # per sequence, all layers and KV heads
        if return_logits:
            stats["logits"] = logits
        return nll, stats

    def loglikelihood(
        self, context: list[int], continuation: list[int], mode: str = "stream", chunk_size: int | None = None,
        stats: dict | None = None,
    ) -> tuple[float, bool]:
        """log p(continuation | context) and whether the continuation is the greedy one (see `continuation_logprobs`).

        `stats` (if given) gets the peak cache bytes."""
        lp, greedy = self.continuation_logprobs(context, continuation, mode, chunk_size, stats)
        return float(lp.sum()), bool(greedy.all())

    def continuation_logprobs(
        self, context: list[int], continuation: list[int], mode: str = "stream", chunk_size: int | None = None,
        stats: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """log p of each continuation token [n] and whether it is the greedy one [n], under one causal protocol.

        The context but its last token goes through the method's cache (stream: prefilled in chunks of chunk_size,
        compressed as the method compresses any prompt; masked: one token at a time under the method's mask) and
        is left compressed to the budget (a quantized store also moves the context's older tokens into its codes, as
        it would before its next forward). From then on the cache is frozen: the last context token and the
        continuation (never its last token, as in lm-eval's HF model) are appended without eviction, so every
        continuation token is predicted from that compressed context plus the tokens before it, whatever the
        continuation's length. A token's score therefore never depends on the tokens after it, and endings of
        different lengths are scored under the same context budget. A fractional budget refers to the context."""
        n = len(continuation)
        if n == 0:
            raise ConfigError("continuation", "is empty; a log-likelihood request needs at least one token")
        if not context:
            raise ConfigError("context", "is empty; give at least one token (lm-eval uses the BOS/EOS prefix)")
        inp = torch.tensor([(context + continuation)[:-1]], device=self.device)  # [1, T]
        c = len(context) - 1  # tokens compressed by the method; the rest are scored over the frozen cache
        cache = self.new_cache(1, seq_len=max(c, 1), mode=mode)
        if mode == "masked":
            for layer in cache.layers:
                if layer.policy is not None:
                    layer.policy = _ContextOnly(layer.policy, c)
            logits = self.forward(cache, inp)[0, c:]  # [n, V]
            peak = cache.masked_peak_bytes(1)
        else:
            if c:
                self.prefill(cache, inp[:, :c], None, chunk_size, last_only=True)
            for layer in cache.layers:
                flush = getattr(layer.store, "flush", None)
                if layer.policy is not None and flush is not None and c:
                    flush()  # a quantized store moves the context into its codes, as its next forward would
                layer.policy = None  # frozen: no eviction, no scores
            logits = self.forward(cache, inp[:, c:], frozen=True)[0]  # [n, V]
            peak = cache.peak_bytes
        if stats is not None:
            stats["cache_bytes_peak"] = max(stats.get("cache_bytes_peak", 0), peak)
        lp = torch.log_softmax(logits.float(), dim=-1)
        tgt = torch.tensor(continuation, device=lp.device)
        return lp.gather(-1, tgt[:, None])[:, 0], lp.argmax(-1) == tgt

    def loglikelihood_rolling(self, ids: list[int], window: int | None = None, mode: str = "stream") -> float:
        """Sum of log p over a whole token sequence, in disjoint windows of at most the model's context."""
        window = window or self.arch.max_positions
        total = 0.0
        # the first token is predicted from BOS-less context only by lm-eval's convention of a prefix token
        prefix = [self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id]
        seq = prefix + list(ids)
        for s in range(0, len(seq) - 1, window):
            chunk = seq[s : s + window + 1]
            nll, _ = self.score_window(torch.tensor([chunk]), mode=mode)
            total -= float(nll.sum())
        return total
