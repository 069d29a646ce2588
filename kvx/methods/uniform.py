"""`uniform`: fixed-width quantization of keys and values, packed, with per-token or per-channel groups.

The baseline of the quantization papers (e.g. KIVI, Liu et al., 2024, ICML; QAQ, Dong et al., 2024,
arXiv:2403.04643, whose "uniform" rows quantize every token at the same width). Each of keys and values has a bit
width (`bits`, overridden by `key_bits` / `value_bits`; 16 = held exactly) and an axis: `token` groups
`group_size` consecutive channels of one token (null or more than the head: the whole head), `channel` groups one channel over blocks of
`group_size` tokens. `residual` recent tokens stay in full precision; `outliers` (a fraction, both ends together)
of each group are held exactly. Storage: kvx/cache/quantized.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvx.cache.quantized import QuantSpec
from kvx.errors import ConfigError
from kvx.methods.base import ArchInfo
from kvx.methods.quantization import QuantMethod, check_axis, check_int
from kvx.registry import METHODS


@METHODS.register("uniform")
@dataclass
class Uniform(QuantMethod):
    name: str = "uniform"
    bits: int = 4  # 1..15 packed, 16 = full precision
    key_bits: int | None = None  # null: bits
    value_bits: int | None = None  # null: bits
    key_axis: str = "token"  # token | channel
    value_axis: str = "token"
    group_size: int | None = None  # channels per group (token axis; capped at head_dim) / tokens per group (channel)
    residual: int = 0  # most recent tokens held in full precision
    outliers: float = 0.0  # fraction of each group held exactly
    evict: dict | None = None  # an eviction method's config, e.g. {name: streaming_llm, budget: 64}

    def validate(self) -> None:
        check_int(self.bits, "method.bits", 1, 16)
        for f in ("key_bits", "value_bits"):
            if getattr(self, f) is not None:
                check_int(getattr(self, f), f"method.{f}", 1, 16)
        check_axis(self.key_axis, "method.key_axis")
        check_axis(self.value_axis, "method.value_axis")
        if self.group_size is not None:
            check_int(self.group_size, "method.group_size", 1)
        elif "channel" in (self.key_axis, self.value_axis):
            raise ConfigError("method.group_size", "channel groups need a block size in tokens (e.g. 32)")
        self.validate_common()

    def residual_block(self) -> int:
        return int(self.group_size) if "channel" in (self.key_axis, self.value_axis) else 1

    def specs(self, arch: ArchInfo) -> tuple[QuantSpec, QuantSpec]:
        kb = self.bits if self.key_bits is None else self.key_bits
        vb = self.bits if self.value_bits is None else self.value_bits
        def group(axis: str) -> int:
            if axis == "channel":
                return int(self.group_size)
            return min(self.group_size or arch.head_dim, arch.head_dim)

        return (QuantSpec(kb, self.key_axis, group(self.key_axis), self.outliers),
                QuantSpec(vb, self.value_axis, group(self.value_axis), self.outliers))
