"""Pure-torch attention over a stored cache. Every Triton kernel has its twin here.

Shapes: q [B, Hq, t, D]; k, v [B, Hkv, n, D] (never repeated for GQA); kpos [B, Hkv, n] (token index of each
stored key, -1 for padding); qpos [B, t] (token index of each query, -1 for padding).
A query at position p may read a stored key at position s when 0 <= s <= p. Padding queries read every slot
(their outputs are discarded) so that no row is empty.

Long inputs are processed in blocks of queries, so that neither a mask nor probabilities of B x Hq x t x n elements
are ever built at once: at most `BLOCK_ELEMENTS` per block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK_ELEMENTS = 1 << 23  # mask / probability elements per block of queries (32 MiB of fp32)


def allowed_mask(kpos: torch.Tensor, qpos: torch.Tensor) -> torch.Tensor:
    """Boolean [B, Hkv, 1, t, n]: True where query t may read slot n."""
    kp = kpos[:, :, None, None, :]  # [B, Hkv, 1, 1, n]
    qp = qpos[:, None, None, :, None]  # [B, 1, 1, t, 1]
    return ((kp >= 0) & (kp <= qp)) | (qp < 0)


def query_blocks(B: int, Hq: int, t: int, n: int) -> int:
    """Queries per block so that a block's B x Hq x rows x n elements stay within BLOCK_ELEMENTS."""
    return max(1, min(t, BLOCK_ELEMENTS // max(1, B * Hq * n)))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kpos: torch.Tensor,
    qpos: torch.Tensor,
    scaling: float,
    return_probs: bool = False,
    allowed: torch.Tensor | None = None,
    probs_fn=None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax attention of q over the slots it may read. Returns out [B, Hq, t, D] and probs [B, Hq, t, n].

    `allowed` ([B, Hkv, 1 or g, t, n]) replaces the position rule when given (masked-mode evaluation); with neither
    `allowed` nor `kpos`, every query reads every slot (`causal`: query i reads slots 0 .. i, with t == n).
    `probs_fn(probs [B, Hq, tb, n], row0)`, when given, receives the probabilities one block of queries at a time
    (and probs is returned as None): the attention pass itself hands them over, with no T x T tensor.
    """
    B, Hq, t, D = q.shape
    Hkv, n = k.shape[1], k.shape[2]
    g = Hq // Hkv
    want = return_probs or probs_fn is not None
    if causal and allowed is None and kpos is None and not want:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=g > 1), None
    if causal and kpos is None and allowed is None:
        kpos = torch.arange(n, device=q.device).expand(B, Hkv, n)
        qpos = torch.arange(n - t, n, device=q.device).expand(B, t)
    no_mask = allowed is None and kpos is None
    rows = t if return_probs or (no_mask and not want) else query_blocks(B, Hq, t, n)
    if rows >= t:
        return _attention_block(q, k, v, kpos, qpos, scaling, want, allowed, probs_fn, 0, return_probs)
    out = torch.empty_like(q)
    for r0 in range(0, t, rows):
        r1 = min(t, r0 + rows)
        blk_allowed = None if allowed is None else allowed[..., r0:r1, :]
        blk_qpos = None if qpos is None else qpos[:, r0:r1]
        out[:, :, r0:r1] = _attention_block(q[:, :, r0:r1], k, v, kpos, blk_qpos, scaling, want, blk_allowed,
                                            probs_fn, r0, False)[0]
    return out, None


def _attention_block(q, k, v, kpos, qpos, scaling, want, allowed, probs_fn, r0, return_probs):
    B, Hq, t, D = q.shape
    Hkv, n = k.shape[1], k.shape[2]
    g = Hq // Hkv
    if allowed is None and kpos is not None:
        allowed = allowed_mask(kpos, qpos)
    if not want:
        mask = None if allowed is None else allowed.expand(B, Hkv, g, t, n).reshape(B, Hq, t, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=g > 1)
        return out, None
    logits = group_logits(q, k, scaling)  # [B, Hkv, g, t, n]
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits.float(), dim=-1).to(q.dtype)
    out = torch.matmul(probs.view(B, Hkv, g * t, n), v)  # [B, Hkv, g * t, D]
    probs = probs.reshape(B, Hq, t, n)
    if probs_fn is not None:
        probs_fn(probs, r0)
    return out.reshape(B, Hq, t, D), probs if return_probs else None


def group_logits(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """scaling * q·k per KV head, [B, Hkv, g, t, n], from q [B, Hq, t, D] and k [B, Hkv, n, D]: the g query heads of a
    group are stacked into one matrix product with their KV head (no broadcast copy of k)."""
    B, Hq, t, D = q.shape
    Hkv, n = k.shape[1], k.shape[2]
    g = Hq // Hkv
    qg = q.reshape(B, Hkv, g * t, D)
    return (torch.matmul(qg, k.transpose(-1, -2)) * scaling).view(B, Hkv, g, t, n)


def group_sum(probs: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """Sum attention over the query heads of each GQA group: [B, Hq, ...] -> [B, Hkv, ...]."""
    B, Hq = probs.shape[:2]
    return probs.reshape(B, n_kv_heads, Hq // n_kv_heads, *probs.shape[2:]).sum(2)
