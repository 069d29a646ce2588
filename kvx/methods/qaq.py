"""`qaq`: Quality Adaptive Quantization: mixed precision per token from separate key and value error bounds.

Dong et al., 2024, "QAQ: Quality Adaptive Quantization for LLM KV Cache" (arXiv:2403.04643). Per token t, with T
tokens attended and S_t the largest of the last `attn_window` attention weights it received (`bit_rule: paper`):
    values: sigma_V,t <= value_error / (sqrt(T) * |S_t|)
    keys:   sigma_K,t^2 <= log(T^3 / (T - 1) * key_error^2 + 1) / ||q||^2   (||q||^2: `query_quantile` of the
            squared norms of the last `query_history` queries, after the attention scaling; 0.9 as in the paper)
    bits:   B_t = ceil(log2((max_t - min_t) / (2 sqrt(3) sigma_t))), clamped to [min_bits, max_bits]
`bit_rule: official` uses the authors' code's bounds and rule instead (kvx/cache/quant_qaq.py, QAQConfig).
(max_bits >= 16 lets a token be held exactly; min_bits 0 holds a token as its range's midpoint.) `granularity`: one
width per token for all layers (`token`), per token and layer (`layer`: one zero/scale per token for all KV heads,
as the authors' code) or per token, layer and KV head (`head`). `outliers`: that fraction of the elements held
exactly (both ends together), over the whole cache. Tokens are quantized once they leave the `residual` window (so
each has seen n attention rows when residual >= attn_window - 1); with `requant`, a full-precision copy of the
quantized tokens is held off the fast path (`offload_device`, CPU memory) and a token whose required width changes,
up or down, is re-quantized from it (section 4.2). Storage and masked-mode semantics: kvx/cache/quantized.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvx.cache.quantized import QAQConfig, QuantSpec
from kvx.errors import ConfigError
from kvx.methods.base import ArchInfo
from kvx.methods.quantization import QuantMethod, check_int
from kvx.registry import METHODS


@METHODS.register("qaq")
@dataclass
class QAQ(QuantMethod):
    name: str = "qaq"
    key_error: float = 1.0  # sigma_S,max: target std of the attention-weight error caused by key quantization
    value_error: float = 1.0  # sigma_max: target std of the attention-output error caused by value quantization
    min_bits: int = 2
    max_bits: int = 8  # >= 16: a token may be held exactly
    attn_window: int = 5  # n: importance = max of the last n attention weights a token received
    granularity: str = "layer"  # token | layer | head
    query_quantile: float = 0.9  # the paper's quantile of the observed query norms
    query_history: int = 1024  # queries whose norms the quantile is taken over
    outliers: float = 0.01  # alpha: fraction of each token's unit held exactly (both ends together)
    residual: int = 4  # most recent tokens held in full precision before being quantized
    requant: bool = True  # keep a full-precision copy off the fast path and re-quantize tokens whose importance rises
    offload_device: str = "cpu"
    bit_rule: str = "paper"  # paper (section 3's formulas) | official (the authors' code: QAQConfig)
    max_q_value: float = 3.0  # official rule only: the query magnitude in the key bound (the authors' grid: 3)
    evict: dict | None = None  # an eviction method's config, e.g. {name: h2o, budget: 64}

    def validate(self) -> None:
        for f in ("key_error", "value_error"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"method.{f}", f"must be a positive number, got {v!r}")
        check_int(self.min_bits, "method.min_bits", 0, 16)
        check_int(self.max_bits, "method.max_bits", 0, 16)
        if self.max_bits < self.min_bits:
            raise ConfigError("method.max_bits", f"must be >= min_bits={self.min_bits}, got {self.max_bits}")
        check_int(self.attn_window, "method.attn_window", 1)
        if self.granularity not in ("token", "layer", "head"):
            raise ConfigError("method.granularity", f"must be token, layer or head, got {self.granularity!r}")
        q = self.query_quantile
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 < float(q) <= 1.0:
            raise ConfigError("method.query_quantile", f"must lie in (0, 1], got {q!r}")
        check_int(self.query_history, "method.query_history", 1)
        if self.bit_rule not in ("paper", "official"):
            raise ConfigError("method.bit_rule", f"must be paper or official, got {self.bit_rule!r}")
        m = self.max_q_value
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not m > 0:
            raise ConfigError("method.max_q_value", f"must be a positive number, got {m!r}")
        try:
            torch.device(self.offload_device)
        except (RuntimeError, TypeError) as e:
            raise ConfigError("method.offload_device", f"not a torch device: {self.offload_device!r}") from e
        self.validate_common()

    def own_mask_form(self) -> bool:
        return self.granularity != "token"  # one width across layers needs every layer's attention first

    def qaq_config(self) -> QAQConfig:
        return QAQConfig(float(self.key_error), float(self.value_error), self.min_bits, self.max_bits,
                         self.attn_window, self.granularity, float(self.query_quantile), self.query_history,
                         bool(self.requant), self.offload_device, self.bit_rule, float(self.max_q_value))

    def specs(self, arch: ArchInfo) -> tuple[QuantSpec, QuantSpec]:
        return QuantSpec(8, "token", 0, self.outliers), QuantSpec(8, "token", 0, self.outliers)
