"""`kivi`: KIVI-style asymmetric quantization: keys per channel, values per token, a full-precision residual window.

Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache" (ICML 2024). Keys are grouped
per channel over blocks of `group_size` tokens (outlier channels stay within their own group), values per token in
groups of `group_size` channels (at most the head dimension); the most recent tokens stay in full precision.
Tokens leave the residual window in blocks of `group_size` once at least `residual` newer tokens are held
(kvx/cache/quantized.py), so between `residual` and `residual + group_size - 1` tokens are in full precision.
The quantizer is kvx's mid-rise uniform quantizer (2^b cells over each group's range, zero and scale at 16 bits).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvx.cache.quantized import QuantSpec
from kvx.methods.base import ArchInfo
from kvx.methods.quantization import QuantMethod, check_int
from kvx.registry import METHODS


@METHODS.register("kivi")
@dataclass
class KIVI(QuantMethod):
    name: str = "kivi"
    bits: int = 2  # KIVI uses 2 or 4; 1..15 packed, 16 = full precision
    group_size: int = 32  # tokens per key group; channels per value group (capped at head_dim)
    residual: int = 128  # fewest recent tokens held in full precision
    outliers: float = 0.0  # fraction of each group held exactly (KIVI itself keeps none)
    evict: dict | None = None  # an eviction method's config, e.g. {name: h2o, budget: 64}

    def validate(self) -> None:
        check_int(self.bits, "method.bits", 1, 16)
        check_int(self.group_size, "method.group_size", 1)
        self.validate_common()

    def residual_block(self) -> int:
        return self.group_size

    def specs(self, arch: ArchInfo) -> tuple[QuantSpec, QuantSpec]:
        vg = min(self.group_size, arch.head_dim)
        return (QuantSpec(self.bits, "channel", self.group_size, self.outliers),
                QuantSpec(self.bits, "token", vg, self.outliers))
