"""`kivi`: KIVI-style asymmetric quantization: keys per channel, values per token, a full-precision residual window.

Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache" (ICML 2024). Keys are grouped
per channel over blocks of `group_size` tokens (outlier channels stay within their own group), values per token in
groups of `group_size` channels (at most the head dimension); the most recent tokens stay in full precision.
`residual_rule: kivi` (default, as the official code): 0..R-1 full-precision keys (when R are held, all R are
quantized at once; R a multiple of group_size) and exactly R full-precision values (the oldest is quantized as a new
one arrives). `residual_rule: grouped`: keys and values leave together in blocks of `group_size` once at least
`residual` newer tokens are held (R to R + group_size - 1 in full precision). The quantizer is kvx's mid-rise
uniform quantizer (2^b cells over each group's range, zero and scale at 16 bits); codes are held at a fixed width.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvx.cache.quantized import QuantSpec
from kvx.errors import ConfigError
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
    outliers: float = 0.0  # share of the elements held exactly (KIVI itself keeps none)
    residual_rule: str = "kivi"  # kivi: 0..R-1 keys and exactly R values in full precision | grouped: see above
    evict: dict | None = None  # an eviction method's config, e.g. {name: h2o, budget: 64}

    def validate(self) -> None:
        check_int(self.bits, "method.bits", 1, 16)
        check_int(self.group_size, "method.group_size", 1)
        if self.residual_rule not in ("kivi", "grouped"):
            raise ConfigError("method.residual_rule", f"must be kivi or grouped, got {self.residual_rule!r}")
        if self.residual_rule == "kivi" and isinstance(self.residual, int) and self.residual % self.group_size:
            raise ConfigError("method.residual", f"must be a multiple of group_size={self.group_size} under "
                                                 f"residual_rule kivi (keys leave R at a time), got {self.residual}")
        self.validate_common()

    def residual_block(self) -> int:
        return 1 if self.residual_rule == "kivi" else self.group_size

    def specs(self, arch: ArchInfo) -> tuple[QuantSpec, QuantSpec]:
        vg = min(self.group_size, arch.head_dim)
        return (QuantSpec(self.bits, "channel", self.group_size, self.outliers),
                QuantSpec(self.bits, "token", vg, self.outliers))
