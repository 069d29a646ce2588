"""`infinipot`: a fixed-size KV "pot" filled in chunks and distilled whenever it is full.

Kim et al., EMNLP 2024, "InfiniPot: Infinite Context Processing on Memory-Constrained LLMs" (arXiv 2410.01518).
No official code is public; this follows the paper's text. Where the text leaves a choice open, ours is marked
[gap] below.

The pot (`budget` = |M| tokens per layer and KV head) never holds more than |M| tokens at any moment of prefill or
decoding. Input of any length is fed in chunks (`max_chunk` tells the engine how many tokens fit); when the next
chunk would not fit, Continual Context Distillation (CCD) keeps |C| = `keep` tokens per layer and head (default
|M|/2) and the pot goes on filling from there.

Importance scores (`scorer`):
- CaP (catalyst prompt): `cap_prompt` is appended to the pot and run through the model; each context token's score
  is the attention mass it receives from the prompt's tokens, summed over the prompt tokens and over the query heads
  of its KV group (per layer and KV head). The prompt's KV are then dropped and the token counter is restored, so the
  prompt leaves no trace. [gap] The prompt sits right after the context (its positions continue the pot's) and the
  pot reserves room for it: the context fills at most |M| - |prompt| slots, so the prompt fits inside the pot too.
  [gap] No pooling over neighbouring scores. CaP-Q (`cap_question: true`): the task's question, when the task
  passes it through `set_question`, is the catalyst instead of the generic prompt ([gap] a question longer than half
  the room left beside the distilled context keeps its last tokens, so that chunks stay reasonably long).
- NuC (novelty under compression): -log p of each token given the (compressed) pot before it, computed once when the
  token enters the pot; retained tokens keep their score. [gap] The first token of a chunk is scored with the logits
  of the previous chunk's last token, i.e. given the pot as it was then (before a distillation in between).
- cap_nuc (InfiniPot): the first round(`nuc_share` * |C|) tokens (α, 50% by default) by NuC (the same tokens in
  every layer and head: NuC is a token-level score), the rest by CaP per layer and head. `cap` (α = 0) and `nuc`
  (α = 1) are the two ablations.

Input of any length: with CR-RoPE the engine is told it may take inputs longer than the model's context (its rotary
positions stay inside the pot); without it only when `allow_beyond_context` (the CR-RoPE ablation).

CR-RoPE (`cr_rope`): after each distillation the kept keys move by the position delta (kvx/rope.py, with the
model's own rotary embedding) so that they sit at rotary positions 0..|C|-1 (in their original order) and new tokens
continue from |C| (the engine's `cache.rope_offset`), so rotary positions never exceed |M| - 1, inside the model's
trained range. The pot (kvx.cache.rotated.MovableStore) keeps each key as the model produced it and rotates it by its
total delta when attention reads it, so a token that survives many distillations carries one rounding, not one per
distillation.

Baselines run in the same chunked pipeline as other scorers inside the same pot, so all of them hold the same memory
(they reserve no room for a prompt, so their context fills the whole pot):
- `truncation`: LongBench's middle truncation in streaming form: the first |C|/2 tokens of the input and the most
  recent ones. [gap] our reading of the paper's "truncation" baseline.
- `streaming` (StreamingLLM): `sink` first tokens + the most recent ones.
- `h2o`: attention mass accumulated from every query since the token entered the pot (summed over the KV group's
  query heads) + the `recent` share of |C| as a recent window.
- `tova`: attention of the most recent query, averaged over all heads of the layer (one choice per layer).
- `snapkv`: attention from the pot's last `window` queries, average-pooled over `kernel` neighbours, per head;
  the window itself is kept.
- `nuc` is the SirLLM-style baseline (token cross-entropy only). [gap] The paper's "no CaP / no NuC" ablation row is
  CCD scored by the pot's own last-window attention, i.e. `snapkv`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kvx.cache.dense import DenseStore
from kvx.cache.rotated import MovableStore
from kvx.errors import ConfigError
from kvx.kernels.reference import group_sum
from kvx.methods.base import ArchInfo, LayerPolicy, Method, recency_rank, select_top
from kvx.registry import METHODS
from kvx.rope import compact_positions, find_rotary_embedding

DEFAULT_PROMPT = "Summarize the previous context highlighting the most important parts."
SCORERS = ("cap_nuc", "cap", "nuc", "h2o", "tova", "snapkv", "streaming", "truncation")
CAP_SCORERS = ("cap_nuc", "cap")  # scorers that run the catalyst prompt
NUC_SCORERS = ("cap_nuc", "nuc")  # scorers that need each token's loss
ATTN_SCORERS = ("h2o", "tova", "snapkv")  # scorers that read attention on every forward


def _pad(x: torch.Tensor | None, n: int, shape_prefix: tuple, device) -> torch.Tensor:
    """Zero-pad the last dimension of x to n (x None: zeros of shape_prefix + (n,))."""
    if x is None:
        return torch.zeros(*shape_prefix, n, dtype=torch.float32, device=device)
    if x.shape[-1] >= n:
        return x
    return F.pad(x, (0, n - x.shape[-1]))


# per-layer policy --------------------------------------------------------------------------------------------------
class PotPolicy(LayerPolicy):
    """One layer's scores, aligned with the store's slots. Eviction happens only in `InfiniPot.distill`."""

    def __init__(self, method: InfiniPot, arch: ArchInfo):
        self.m = method
        self.n_kv = arch.n_kv_heads
        self.needs_probs = method.scorer in ATTN_SCORERS
        self.nuc: torch.Tensor | None = None  # [B, Hkv, n] -log p of each token given the pot before it
        self.acc: torch.Tensor | None = None  # [B, Hkv, n] h2o: attention received since entering the pot
        self.win: torch.Tensor | None = None  # [B, Hkv, w, n] snapkv/tova: attention rows of the last w queries
        self.cap: torch.Tensor | None = None  # [B, Hkv, n] CaP mass of the probe in progress
        self.probing = False
        self.pending: torch.Tensor | None = None  # [B, Hkv, t, n + t] attention of the forward in progress

    # hooks ---------------------------------------------------------------------------------------------------------
    def observe(self, store, q, probs):
        if probs is None:
            return
        a = group_sum(probs.float(), self.n_kv)  # [B, Hkv, t, n + t]
        if self.probing:  # the catalyst prompt's attention onto the context slots
            self.cap = self.cap + a[..., : self.cap.shape[-1]].sum(2)
        else:
            self.pending = a

    def on_append(self, store, t):
        if self.probing:  # the prompt's slots are dropped right after the probe
            return
        B, H, n = store.pos.shape
        dev = store.pos.device
        if self.m.scorer in NUC_SCORERS:
            self.nuc = _pad(self.nuc, n, (B, H), dev)
        if self.m.scorer in ATTN_SCORERS:
            a, self.pending = self.pending, None
            if a is not None:
                real = (store.pos[:, :, -t:] >= 0).float()  # padding queries read every slot: ignore their rows
                a = a * real[..., None]
            if self.m.scorer == "h2o":
                self.acc = _pad(self.acc, n, (B, H), dev)
                if a is not None:
                    self.acc = self.acc + a.sum(2)
            else:
                w = 1 if self.m.scorer == "tova" else self.m.window
                self.win = _pad(self.win, n, (B, H, 0), dev)
                if a is not None:
                    self.win = torch.cat([self.win, a[:, :, -w:]], dim=2)[:, :, -w:]

    def observe_token_nll(self, store, nll):
        if self.probing or self.m.scorer not in NUC_SCORERS:
            return
        t = nll.shape[1]
        self.nuc[:, :, -t:] = nll.float()[:, None, :].to(self.nuc.device)

    # distillation --------------------------------------------------------------------------------------------------
    def begin_probe(self, store) -> None:
        B, H, n = store.pos.shape
        self.cap = torch.zeros(B, H, n, dtype=torch.float32, device=store.pos.device)
        self.probing, self.saved_needs_probs, self.needs_probs = True, self.needs_probs, True

    def end_probe(self) -> None:
        self.probing, self.needs_probs = False, self.saved_needs_probs

    def select(self, store, m: int) -> torch.Tensor:
        """Slots [B, Hkv, m] to keep."""
        pos, sc = store.pos, self.m.scorer
        rank = recency_rank(pos)  # 0 = most recent
        real = pos >= 0
        if sc in ATTN_SCORERS and self.acc is None and self.win is None:
            return select_top(-rank.float(), pos, m)  # nothing observed yet: the most recent tokens
        if sc in ("cap_nuc", "cap", "nuc"):
            n_nuc = {"cap": 0, "nuc": m}.get(sc, round(self.m.nuc_share * m))
            forced = None
            if n_nuc > 0:
                idx = select_top(self.nuc, pos, n_nuc)
                if n_nuc == m:
                    return idx
                forced = torch.zeros(pos.shape, dtype=torch.bool, device=pos.device).scatter_(2, idx, True)
            return select_top(self.cap, pos, m, forced=forced)
        if sc == "h2o":
            return select_top(self.acc, pos, m, forced=real & (rank < int(self.m.recent * m)))
        if sc == "tova":
            s = self.win[:, :, -1].mean(1, keepdim=True).expand_as(self.win[:, :, -1])
            return select_top(s, pos, m)
        if sc == "snapkv":
            w = min(self.m.window, self.win.shape[2])
            s = self.win.sum(2)  # [B, Hkv, n]
            k = self.m.kernel
            if k > 1:
                B, H, n = s.shape
                s = F.avg_pool1d(s.reshape(B * H, 1, n), k, stride=1, padding=k // 2, count_include_pad=False)
                s = s.reshape(B, H, n)
            return select_top(s, pos, m, forced=real & (rank < w))
        # streaming / truncation: the oldest `head` tokens in the pot (the input's first ones) + the most recent
        head = min(self.m.sink, m) if sc == "streaming" else m // 2
        old_key = torch.where(pos >= 0, pos, torch.iinfo(pos.dtype).max).to(torch.int64)
        old_rank = old_key.argsort(dim=-1, stable=True).argsort(dim=-1)  # 0 = oldest real token
        forced = real & ((old_rank < head) | (rank < m - head))
        return select_top(-rank.float(), pos, m, forced=forced)

    def keep(self, store, idx: torch.Tensor) -> None:
        """Keep slots idx [B, Hkv, m] (sorted) in the store and in every score."""
        if self.nuc is not None:
            self.nuc = self.nuc.gather(2, idx)
        if self.acc is not None:
            self.acc = self.acc.gather(2, idx)
        if self.win is not None:
            self.win = self.win.gather(3, idx[:, :, None].expand(*idx.shape[:2], self.win.shape[2], idx.shape[2]))
        store.keep(idx)


# the method --------------------------------------------------------------------------------------------------------
@dataclass
class PotState:
    """Per-cache bookkeeping (attached to the cache as `cache.pot`)."""

    busy: bool = False  # a distillation (and its probe forward) is running
    distillations: int = 0
    probe_tokens: int = 0
    sizes: list = field(default_factory=list)  # pot size before each distillation


@METHODS.register("infinipot")
@dataclass
class InfiniPot(Method):
    name: str = "infinipot"
    budget: int = 2048  # |M|: the pot, tokens per layer and KV head (catalyst prompt included while it runs)
    keep: int | None = None  # |C|: tokens kept by each distillation (default budget // 2)
    scorer: str = "cap_nuc"  # cap_nuc | cap | nuc | h2o | tova | snapkv | streaming | truncation
    nuc_share: float = 0.5  # α: share of |C| chosen by NuC (scorer cap_nuc)
    cap_prompt: str = DEFAULT_PROMPT  # the catalyst prompt
    cap_question: bool = False  # CaP-Q: use the task's question (set_question) as the catalyst when known
    cr_rope: bool = True  # re-assign rotary positions 0..|C|-1 after each distillation
    window: int = 32  # snapkv: observation window (the pot's last queries)
    kernel: int = 5  # snapkv: average-pooling kernel (odd; 1 = none)
    sink: int = 4  # streaming: attention-sink tokens
    recent: float = 0.5  # h2o: share of |C| kept as the most recent tokens
    allow_beyond_context: bool = False  # cr_rope off: let rotary positions leave the model's context (the ablation)

    compresses = True
    has_mask_form = False

    def __post_init__(self) -> None:
        self._prompt_ids: list[int] | None = None
        self._question_ids: list[int] | None = None
        self._rotary = None  # the model's rotary embedding module (CR-RoPE)

    @property
    def needs_token_nll(self) -> bool:  # type: ignore[override]
        return self.scorer in NUC_SCORERS

    @property
    def kept(self) -> int:
        return self.keep if self.keep is not None else self.budget // 2

    # validation ----------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 2:
            raise ConfigError("method.budget", f"the pot size must be an int >= 2 tokens, got {self.budget!r}")
        if self.keep is not None and not 1 <= self.keep < self.budget:
            raise ConfigError("method.keep", f"must lie in [1, budget={self.budget}), got {self.keep}")
        if self.scorer not in SCORERS:
            raise ConfigError("method.scorer", f"unknown scorer {self.scorer!r}; allowed: {', '.join(SCORERS)}")
        if not 0.0 <= self.nuc_share <= 1.0:
            raise ConfigError("method.nuc_share", f"must lie in [0, 1], got {self.nuc_share}")
        if self.scorer in CAP_SCORERS and not self.cap_prompt.strip():
            raise ConfigError("method.cap_prompt", "is empty; the cap scorers need a catalyst prompt")
        if self.scorer == "snapkv":
            if not 1 <= self.window < self.kept:
                raise ConfigError("method.window", f"must lie in [1, keep={self.kept}), got {self.window}")
            if self.kernel < 1 or self.kernel % 2 == 0:
                raise ConfigError("method.kernel", f"must be an odd number >= 1, got {self.kernel}")
        if self.scorer == "streaming" and not 0 <= self.sink < self.kept:
            raise ConfigError("method.sink", f"must lie in [0, keep={self.kept}), got {self.sink}")
        if not 0.0 <= self.recent <= 1.0:
            raise ConfigError("method.recent", f"must lie in [0, 1], got {self.recent}")

    def check_arch(self, arch: ArchInfo) -> None:
        if self.cr_rope and self.budget > arch.max_positions:
            raise ConfigError(
                "method.budget",
                f"a pot of {self.budget} tokens reaches rotary positions beyond the model's context "
                f"({arch.max_positions} tokens)",
            )

    def bind(self, engine) -> None:
        self.validate()
        if self.scorer in CAP_SCORERS:
            tok = engine.tokenizer
            if tok is None:
                raise ConfigError("method.cap_prompt", "the catalyst prompt needs the model's tokenizer")
            self._prompt_ids = list(tok(self.cap_prompt, add_special_tokens=False).input_ids)
            room = self.budget - self.kept - len(self._prompt_ids)
            if room < 1:
                raise ConfigError(
                    "method.cap_prompt",
                    f"takes {len(self._prompt_ids)} tokens, but the pot (budget={self.budget}) minus the distilled "
                    f"context (keep={self.kept}) leaves {self.budget - self.kept}: shorten it or enlarge the pot",
                )
        self._rotary = find_rotary_embedding(engine.model) if self.cr_rope else None
        if self.cr_rope or self.allow_beyond_context:
            # the pot takes input of any length: with CR-RoPE its rotary positions stay below |M| <= the model's
            # context (check_arch), so tasks need not cut long inputs to the context
            engine.allow_beyond_context = True

    def set_question(self, ids: list[int] | None) -> None:
        """CaP-Q: the task's question tokens (None: none known); used as the catalyst when `cap_question`."""
        if ids is None:
            self._question_ids = None
            return
        room = max(1, (self.budget - self.kept) // 2)  # leave the pot chunks of at least half its free room
        self._question_ids = list(ids)[-room:]

    # the pot ----------------------------------------------------------------------------------------------------------
    def catalyst(self) -> list[int]:
        if self.scorer not in CAP_SCORERS:
            return []
        if self.cap_question and self._question_ids:
            return self._question_ids
        if self._prompt_ids is None:
            raise RuntimeError("InfiniPot: the method is not bound to an engine (Engine(model, tok, method))")
        return self._prompt_ids

    def make_store(self, layer_idx: int, arch: ArchInfo):
        if self.cr_rope:  # keys move at every distillation: rotate on read from the keys the model produced
            return MovableStore(self._rotary)
        return DenseStore()

    def make_policy(self, layer_idx: int, arch: ArchInfo, seq_len: int | None):
        return PotPolicy(self, arch)

    @staticmethod
    def state(cache) -> PotState:
        st = getattr(cache, "pot", None)
        if st is None:
            st = cache.pot = PotState()
        return st

    def max_chunk(self, cache) -> int | None:
        if cache.mode != "stream" or self.state(cache).busy:
            return None
        room = self.budget - len(self.catalyst()) - cache.layers[0].store.n
        return room if room > 0 else self.budget - len(self.catalyst()) - self.kept

    def before_forward(self, engine, cache, t: int) -> None:
        if cache.mode != "stream" or self.state(cache).busy:
            return
        reserve = len(self.catalyst())
        if cache.layers[0].store.n + t + reserve > self.budget:
            self.distill(engine, cache)
        if cache.layers[0].store.n + t + reserve > self.budget:
            raise RuntimeError(
                f"InfiniPot: a forward of {t} tokens does not fit in the pot (budget={self.budget}, keep={self.kept}, "
                f"catalyst={reserve}); feed it through Engine.prefill"
            )

    @torch.inference_mode()
    def distill(self, engine, cache) -> None:
        """Continual Context Distillation: score (CaP probe if needed), keep |C| per layer and head, CR-RoPE."""
        st = self.state(cache)
        st.busy = True
        try:
            st.sizes.append(cache.layers[0].store.n)
            if self.scorer in CAP_SCORERS:
                self._probe(engine, cache)
            m = self.kept
            for layer in cache.layers:
                if layer.store.n > m:
                    layer.policy.keep(layer.store, layer.policy.select(layer.store, m).sort(dim=-1).values)
            if self.cr_rope:  # kept keys to rotary positions 0..|C|-1; the next token gets |C|
                compact_positions(cache, self._rotary)
            for layer in cache.layers:
                cache.note_bytes(layer.layer_idx, layer.store)
            st.distillations += 1
        finally:
            st.busy = False

    def _probe(self, engine, cache) -> None:
        """Run the catalyst prompt through the pot, collect each layer's CaP scores, then remove every trace of it."""
        ids = self.catalyst()
        B = cache.seen.shape[0]
        x = torch.tensor(ids, dtype=torch.long, device=engine.device)[None].expand(B, -1)
        seen, last = cache.seen.clone(), cache.last_logits
        n_ctx = [layer.store.n for layer in cache.layers]
        for layer in cache.layers:
            layer.policy.begin_probe(layer.store)
        try:
            engine.forward(cache, x)
        finally:
            for layer, n in zip(cache.layers, n_ctx):
                layer.policy.end_probe()
                if layer.store.n > n:
                    B_, H = layer.store.pos.shape[:2]
                    layer.store.keep(torch.arange(n, device=layer.store.pos.device).expand(B_, H, n))
                cache.note_bytes(layer.layer_idx, layer.store)
            cache.seen, cache.last_logits = seen, last
        self.state(cache).probe_tokens += len(ids)
