"""Pure-torch attention over a stored cache. Every Triton kernel has its twin here.

Shapes: q [B, Hq, t, D]; k, v [B, Hkv, n, D] (never repeated for GQA); kpos [B, Hkv, n] (token index of each
stored key, -1 for padding); qpos [B, t] (token index of each query, -1 for padding).
A query at position p may read a stored key at position s when 0 <= s <= p. Padding queries read every slot
(their outputs are discarded) so that no row is empty.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def allowed_mask(kpos: torch.Tensor, qpos: torch.Tensor) -> torch.Tensor:
    """Boolean [B, Hkv, 1, t, n]: True where query t may read slot n."""
    kp = kpos[:, :, None, None, :]  # [B, Hkv, 1, 1, n]
    qp = qpos[:, None, None, :, None]  # [B, 1, 1, t, 1]
    return ((kp >= 0) & (kp <= qp)) | (qp < 0)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kpos: torch.Tensor,
    qpos: torch.Tensor,
    scaling: float,
    return_probs: bool = False,
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax attention of q over the slots it may read. Returns out [B, Hq, t, D] and probs [B, Hq, t, n].

    `allowed` ([B, Hkv, 1 or g, t, n]) replaces the position rule when given (masked-mode evaluation); with neither
    `allowed` nor `kpos`, every query reads every slot.
    """
    B, Hq, t, D = q.shape
    Hkv, n = k.shape[1], k.shape[2]
    g = Hq // Hkv
    if allowed is None and kpos is not None:
        allowed = allowed_mask(kpos, qpos)
    if not return_probs:
        mask = None if allowed is None else allowed.expand(B, Hkv, g, t, n).reshape(B, Hq, t, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=g > 1)
        return out, None
    qg = q.view(B, Hkv, g, t, D)
    logits = torch.matmul(qg, k[:, :, None].transpose(-1, -2)) * scaling  # [B, Hkv, g, t, n]
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits.float(), dim=-1).to(q.dtype)
    out = torch.matmul(probs, v[:, :, None])  # [B, Hkv, g, t, D]
    return out.reshape(B, Hq, t, D), probs.reshape(B, Hq, t, n)


def group_sum(probs: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """Sum attention over the query heads of each GQA group: [B, Hq, ...] -> [B, Hkv, ...]."""
    B, Hq = probs.shape[:2]
    return probs.reshape(B, n_kv_heads, Hq // n_kv_heads, *probs.shape[2:]).sum(2)
