"""Rotary position helpers: re-rotate keys stored after RoPE, and compact a cache's rotary positions.

Keys are stored rotated by their rotary position. RoPE rotations compose, R(p + d) = R(d) R(p), so moving a stored key
to another position is one more rotation by the delta, computed with the model's own rotary embedding (its inv_freq
and rope scaling) and its rotate_half convention. StreamingLLM's in-cache positions (Xiao et al., 2024, Sec. 3.2)
and InfiniPot's CR-RoPE re-assign positions this way.
"""

from __future__ import annotations

import sys

import torch

from kvx.errors import UnsupportedModelError


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def find_rotary_embedding(model):
    """The model's rotary embedding module (the one that turns position ids into cos/sin)."""
    for m in model.modules():
        if type(m).__name__.endswith("RotaryEmbedding") and hasattr(m, "inv_freq"):
            return m
        if type(m).__name__.endswith("RotaryEmbedding") and len(getattr(m, "layer_types", ())) > 1:
            raise UnsupportedModelError(f"{type(model).__name__} rotates keys differently per layer type "
                                        f"({', '.join(m.layer_types)}): its keys cannot be re-rotated")
    raise UnsupportedModelError(f"{type(model).__name__} has no rotary embedding module: its keys cannot be re-rotated")


def rerotate(k: torch.Tensor, delta: torch.Tensor, rotary_emb) -> torch.Tensor:
    """Keys rotated at positions p -> the same keys rotated at p + delta.

    k [..., n, D] (after RoPE); delta [..., n] integer position shifts (negative moves keys back). Computed in fp32."""
    rotate_half = getattr(sys.modules.get(type(rotary_emb).__module__), "rotate_half", _rotate_half)
    kf = k.float()
    lead = delta.shape[:-1]
    pid = delta.reshape(-1, delta.shape[-1]).long()  # rotary modules take [batch, n] position ids
    cos, sin = rotary_emb(kf.reshape(-1, *kf.shape[-2:]), pid)
    scale = float(getattr(rotary_emb, "attention_scaling", 1.0) or 1.0)
    cos = (cos.float() / scale).reshape(*lead, *cos.shape[-2:])
    sin = (sin.float() / scale).reshape(*lead, *sin.shape[-2:])
    return (kf * cos + rotate_half(kf) * sin).to(k.dtype)


def compact_positions(cache, rotary_emb, layers=None) -> torch.Tensor:
    """Give the real tokens of every layer contiguous rotary positions that end right before the next token's.

    In each layer, per sequence and KV head, the m kept real tokens get R - m .. R - 1 in slot order, where R (per
    sequence) is the largest m over the layers: with one budget for all layers that is 0 .. m - 1, StreamingLLM's
    in-cache positions; with per-layer budgets every layer keeps the same distances to the next query. Keys are
    re-rotated by the delta (a store with `move`, kvx.cache.rotated.MovableStore, records the delta instead and
    rotates on read, so that repeated moves do not add rounding errors) and `cache.rope_offset` is set so that the
    next token gets rotary position R.

    Stores must hold dense keys (`k`) and `rpos`, the rotary position each key was rotated with. Returns R [B].
    """
    layers = list(cache.layers if layers is None else layers)
    B = cache.seen.shape[0]
    device = cache.seen.device
    R = torch.zeros(B, dtype=torch.long, device=device)
    counts = []
    for layer in layers:
        pos = layer.store.pos
        m = None if pos is None or pos.shape[-1] == 0 else (pos >= 0).sum(dim=-1)  # [B, Hkv]
        counts.append(m)
        if m is not None:
            R = torch.maximum(R, m.max(dim=1).values)
    for layer, m in zip(layers, counts):
        if m is None:
            continue
        store = layer.store
        if getattr(store, "k", None) is None or getattr(store, "rpos", None) is None:
            raise UnsupportedModelError(f"store {type(store).__name__} holds no dense keys to re-rotate")
        pos = store.pos.long()
        real = pos >= 0
        cur = store.rpos.long()
        rank = real.long().cumsum(dim=-1) - 1
        target = torch.where(real, R[:, None, None] - m[..., None] + rank, cur)
        delta = torch.where(real, target - cur, torch.zeros_like(cur))
        if bool(delta.any()):
            if hasattr(store, "move"):  # a MovableStore rotates on read, from the key the model produced
                store.move(delta)
            else:
                store.k = rerotate(store.k, delta, rotary_emb)
        store.rpos = target.to(store.rpos.dtype)
    cache.rope_offset = cache.seen - R
    cache.rope_synced = cache.seen.clone()  # tokens seen at the last compaction
    return R
