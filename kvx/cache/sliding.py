"""Sliding-window layers and attention-logit softcapping, as the model itself does them.

A transformers attention layer with a sliding window W lets the query at token index p read the keys at
p - W < s <= p (masking_utils.sliding_window_overlay), and its own cache keeps the last W - 1 tokens
(DynamicSlidingWindowLayer). Gemma 2/3 (and Qwen2 with `use_sliding_window`) alternate such layers with global ones;
Mistral v0.1 and Phi-3 window every layer. Gemma 2 also caps attention logits: `tanh(s / c) * c` before the softmax.

kvx gives each layer its store and policy through `layer_parts`:
- a sliding layer whose window can bind (the cache is built for more than W tokens, or for an unknown length) holds
  exactly the model's window: a dense store of the last W - 1 tokens (`WindowPolicy`), whatever the method; the
  method compresses the global layers;
- a sliding layer whose window covers the whole sequence is an ordinary layer for the method (the window cannot
  restrict anything there), its attention still applying the window rule;
- every layer of a softcapping model attends with the cap (`WindowedStore`); methods whose stores are not dense
  (quantized codes, a low-rank state) are refused there, since their attention does not apply it.
"""

from __future__ import annotations

import torch

from kvx.cache.dense import DenseStore, Store
from kvx.errors import UnsupportedModelError
from kvx.kernels import reference

LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_windows(cfg, n_layers: int) -> tuple[int | None, ...]:
    """The sliding window of each layer (None: global), read from a transformers text config."""
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types:
        other = sorted(set(types) - set(LAYER_TYPES))
        if other:
            raise UnsupportedModelError(f"layer types {other} are not supported by kvx (supported: {', '.join(LAYER_TYPES)})")
        return tuple(int(window) if t == "sliding_attention" and window else None for t in types)
    if window and getattr(cfg, "use_sliding_window", True) is not False:
        return (int(window),) * n_layers
    return (None,) * n_layers


def window_allowed(kpos: torch.Tensor, qpos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[B, Hkv, 1, t, n]: query t may read slot n (causal, and within the window). kpos [B, Hkv, n]; qpos [B, t]."""
    allowed = reference.allowed_mask(kpos, qpos)
    if window is None:
        return allowed
    kp = kpos[:, :, None, None, :].long()
    qp = qpos[:, None, None, :, None].long()
    return allowed & ((kp > qp - window) | (qp < 0))


def capped_attention(q, k, v, allowed, scaling: float, softcap: float | None, return_probs: bool = False):
    """Attention with logits capped to (-softcap, softcap) as Gemma 2 does. q [B, Hq, t, D]; k, v [B, Hkv, n, D];
    allowed [B, Hkv, 1, t, n]. Returns out [B, Hq, t, D] and probs [B, Hq, t, n] (or None)."""
    if softcap is None:
        return reference.attention(q, k, v, None, None, scaling, return_probs=return_probs, allowed=allowed)
    B, Hq, t, D = q.shape
    Hkv, n = k.shape[1], k.shape[2]
    qg = q.view(B, Hkv, Hq // Hkv, t, D)
    logits = torch.matmul(qg, k[:, :, None].transpose(-1, -2)) * scaling  # [B, Hkv, g, t, n]
    logits = cap_logits(logits, softcap).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits.float(), dim=-1).to(q.dtype)
    out = torch.matmul(probs, v[:, :, None]).reshape(B, Hq, t, D)
    return out, (probs.reshape(B, Hq, t, n) if return_probs else None)


def cap_logits(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


class WindowedStore(DenseStore):
    """A dense store whose attention applies a sliding window (token distance < window) and a logit cap."""

    probs_blocks = False  # attend returns whole probabilities (return_probs), not blocks

    def __init__(self, window: int | None, softcap: float | None) -> None:
        super().__init__()
        self.window = window
        self.softcap = softcap

    def _binds(self, pos_new: torch.Tensor, qpos: torch.Tensor) -> bool:
        """Whether some query of this step lies `window` tokens or more after some slot it could read."""
        if self.window is None:
            return False
        pos = pos_new if self.pos is None else torch.cat([self.pos, pos_new.to(self.pos.dtype)], dim=2)
        real = pos[pos >= 0]
        return bool(real.numel()) and int(qpos.max()) - int(real.min()) >= self.window

    def attend(self, q, k_new, v_new, pos_new, qpos, scaling, return_probs=False, probs_fn=None):
        """DenseStore.attend with the window and the cap; `probs_fn(probs, 0)` gets all probabilities at once."""
        if self.softcap is None and not self._binds(pos_new, qpos):
            if probs_fn is None:
                return super().attend(q, k_new, v_new, pos_new, qpos, scaling, return_probs)
            return super().attend(q, k_new, v_new, pos_new, qpos, scaling, return_probs, probs_fn=probs_fn)
        if self.k is None:
            k, v, kpos = k_new, v_new, pos_new
        else:
            k = torch.cat([self.keys(), k_new], dim=2)
            v = torch.cat([self.values(), v_new], dim=2)
            kpos = torch.cat([self.pos, pos_new.to(self.pos.dtype)], dim=2)
        allowed = window_allowed(kpos, qpos, self.window)
        out, probs = capped_attention(q, k, v, allowed, scaling, self.softcap, return_probs or probs_fn is not None)
        if probs_fn is not None:
            probs_fn(probs, 0)
            return out, None
        return out, probs

    def masked_attention(self, q, k, v, allowed, scaling, evicted=None):
        out, _ = capped_attention(q, k, v, allowed, scaling, self.softcap)
        return out


class WindowPolicy:
    """Keeps the last window - 1 tokens of a sliding layer between steps, as the model's own cache does."""

    needs_probs = False

    def __init__(self, window: int):
        self.window = window
        self.hold = max(1, window - 1)

    def _cut(self, store: Store) -> None:
        if store.n <= self.hold:
            return
        from kvx.methods.base import recency_rank

        rank = recency_rank(store.pos)  # 0 = most recent real token, padding last
        store.keep(rank.topk(self.hold, dim=-1, largest=False).indices.sort(dim=-1).values)

    def before_attend(self, store: Store, t: int) -> None:
        if store.n == 0 and hasattr(store, "reserve"):  # preallocating stores: hold W - 1 slots between steps
            store.reserve(self.hold)
        self._cut(store)  # masked mode: one query at a time reads the W - 1 tokens before it and itself

    def observe(self, store, q, probs) -> None:
        pass

    def on_append(self, store, t: int) -> None:
        pass

    def observe_token_nll(self, store, nll) -> None:
        pass

    def end_step(self, store: Store) -> None:
        self._cut(store)


def _method_names(desc) -> set[str]:
    """Every method name in a method's description (nested ones included: LESS's base, a quantized method's evict)."""
    if isinstance(desc, dict):
        return {v for k, v in desc.items() if k == "name" and isinstance(v, str)} | set().union(
            *(_method_names(v) for v in desc.values()))
    return set()


def layer_parts(method, arch, layer_idx: int, seq_len: int | None):
    """(store, policy) of one layer: the method's, or the model's own window on a sliding layer (module docstring)."""
    windows = getattr(arch, "windows", ()) or ()
    window = windows[layer_idx] if layer_idx < len(windows) else None
    softcap = getattr(arch, "softcap", None)
    if window is None and softcap is None:
        return method.make_store(layer_idx, arch), method.make_policy(layer_idx, arch, seq_len)
    if window is not None and (seq_len is None or seq_len > window):
        if "infinipot" in _method_names(method.describe()):
            raise UnsupportedModelError(
                f"method {method.name!r} manages every layer's cache together (a pot), which the model's "
                f"sliding-window layers (window {window}) cannot share")
        return WindowedStore(window, softcap), WindowPolicy(window)
    store = method.make_store(layer_idx, arch)
    policy = method.make_policy(layer_idx, arch, seq_len)
    if type(store) is DenseStore:
        return WindowedStore(window, softcap), policy
    if softcap is not None:
        raise UnsupportedModelError(
            f"method {method.name!r} stores keys as {type(store).__name__}, whose attention does not apply the "
            f"model's attention-logit softcapping ({softcap}); use a method with a dense store")
    return store, policy
