"""What the quantized methods (uniform, kivi, qaq) share: the policy that drives a QuantizedStore, composition with
an eviction policy, and the fields and checks common to the three.

A quantized method's store is a `kvx.cache.quantized.QuantizedStore`; its per-layer policy is a `QuantPolicy`
(flush the residual window before attention, feed QAQ the attention weights, plan bits after the forward). With
`evict` set (any eviction method's config, e.g. `{name: streaming_llm, budget: 64, sink: 4}` or
`{name: h2o, budget: 64}`), that method's policy decides what is kept, exactly as it would alone, over the
quantized store: `ComposedPolicy` runs the eviction policy's hooks first, then the quantization's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from kvx.cache.dense import DenseStore
from kvx.cache.quantized import BitBoard, QAQConfig, QuantizedStore, QuantSpec
from kvx.errors import ConfigError
from kvx.methods.base import ArchInfo, LayerPolicy, Method

QUANT_METHODS = ("uniform", "kivi", "qaq")


class QuantPolicy(LayerPolicy):
    """Drives a QuantizedStore: flush before attention, observe queries and attention (QAQ), plan bits after the
    forward. It asks for no attention weights: QAQ's store computes them beside its output.

    Against anything else (the IndexStore of masked mode) it does nothing: the store's masked_attention quantizes
    the window itself."""

    def before_attend(self, store, t: int) -> None:
        if isinstance(store, QuantizedStore):
            store.flush()

    def observe(self, store, q, probs) -> None:
        if isinstance(store, QuantizedStore):
            store.observe(q, probs)

    def end_step(self, store) -> None:
        if isinstance(store, QuantizedStore):
            store.plan()


class ComposedPolicy(LayerPolicy):
    """An eviction policy over a quantized store: every hook runs the eviction policy first, then the quantization's
    (so tokens are evicted before the residual window is flushed, and never quantized only to be dropped)."""

    def __init__(self, evict: LayerPolicy, quant: QuantPolicy):
        self.evict, self.quant = evict, quant
        self.needs_probs = bool(evict.needs_probs or quant.needs_probs)

    def before_attend(self, store, t):
        self.evict.before_attend(store, t)
        self.quant.before_attend(store, t)

    def observe(self, store, q, probs):
        self.evict.observe(store, q, probs)
        self.quant.observe(store, q, probs)

    def on_append(self, store, t):
        self.evict.on_append(store, t)
        self.quant.on_append(store, t)

    def observe_token_nll(self, store, nll):
        self.evict.observe_token_nll(store, nll)
        self.quant.observe_token_nll(store, nll)

    def end_step(self, store):
        self.evict.end_step(store)
        self.quant.end_step(store)


def build_evict_method(values: Any, field_name: str = "method.evict") -> Method | None:
    """Build and validate the eviction method a quantized method runs under; errors name `method.evict.<field>`."""
    from kvx.config import build_nested_method

    if values is None or (isinstance(values, dict) and not values):
        return None

    def refuse(name: str) -> str | None:
        if name in QUANT_METHODS:
            return f"{name!r} quantizes; give an eviction method (h2o, streaming_llm, ...)"
        return None

    return build_nested_method(values, field_name, refuse, expected="null or an eviction method's config",
                               evicts_nothing="evicts nothing; give an eviction method or evict: null")


def check_int(value, field: str, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ConfigError(field, f"must be an int {rng}, got {value!r}")


def check_fraction(value, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ConfigError(field, f"must be a fraction in [0, 1), got {value!r}")


def check_axis(value, field: str) -> None:
    if value not in ("token", "channel"):
        raise ConfigError(field, f"must be 'token' or 'channel', got {value!r}")


@dataclass
class QuantMethod(Method, ABC):
    """Base of the quantized methods. Subclasses define `specs(arch)` and, for QAQ, `qaq_config()`."""

    compresses = True

    def __post_init__(self) -> None:
        self._evict: Method | None = None
        self._evict_built = False
        self._board: BitBoard | None = None

    # the eviction method, if any ------------------------------------------------------------------------------
    @property
    def evict_method(self) -> Method | None:
        if not self._evict_built:
            self._evict = build_evict_method(getattr(self, "evict", None))
            self._evict_built = True
        return self._evict

    @property
    def has_mask_form(self) -> bool:  # type: ignore[override]
        ev = self.evict_method
        return self.own_mask_form() and (ev is None or ev.has_mask_form)

    @property
    def needs_token_nll(self) -> bool:  # type: ignore[override]
        ev = self.evict_method
        return ev is not None and ev.needs_token_nll

    def own_mask_form(self) -> bool:
        return True

    def validate_common(self) -> None:
        check_int(getattr(self, "residual", 0), "method.residual", 0)
        check_fraction(getattr(self, "outliers", 0.0), "method.outliers")
        self._evict_built = False
        ev = self.evict_method
        budget = getattr(ev, "budget", None)
        held = int(getattr(self, "residual", 0)) + self.residual_block()
        if isinstance(budget, int) and not isinstance(budget, bool) and held > budget:
            raise ConfigError("method.residual", f"residual {self.residual} + {self.residual_block() - 1} (tokens "
                                                 f"leave the residual window in blocks of {self.residual_block()}) "
                                                 f"exceeds method.evict.budget={budget}: no token would ever be "
                                                 "quantized; lower the residual")

    def residual_block(self) -> int:
        """Tokens leave the full-precision window in blocks of this many (channel groups), once `residual` newer
        ones are held."""
        return 1

    def check_arch(self, arch: ArchInfo) -> None:
        ev = self.evict_method
        if ev is not None:
            ev.check_arch(arch)
            if type(ev.make_store(0, arch)) is not DenseStore:
                raise ConfigError("method.evict.name", f"{ev.name!r} holds its own storage; it cannot run over a "
                                                       "quantized store")
        D = arch.head_dim
        for field_name, spec in zip(self.spec_fields(), self.specs(arch)):
            if spec.axis == "token" and D % spec.channels_per_group(D):
                raise ConfigError(field_name, f"channels per group ({spec.group}) must divide head_dim={D}")

    def spec_fields(self) -> tuple[str, str]:
        return "method.group_size", "method.group_size"

    @abstractmethod
    def specs(self, arch: ArchInfo) -> tuple[QuantSpec, QuantSpec]:
        """How keys and values are quantized (bits, grouping axis, group size)."""

    def qaq_config(self) -> QAQConfig | None:
        return None

    # storage and policy ----------------------------------------------------------------------------------------
    def make_store(self, layer_idx: int, arch: ArchInfo):
        ks, vs = self.specs(arch)
        qc = self.qaq_config()
        board = None
        if qc is not None and qc.granularity == "token":
            if layer_idx == 0 or self._board is None:  # a cache builds its layers in order: one board per cache
                self._board = BitBoard(arch.n_layers)
            board = self._board
        return QuantizedStore(ks, vs, getattr(self, "residual", 0), qc, board, layer_idx,
                              getattr(self, "residual_rule", "grouped"))

    def make_policy(self, layer_idx: int, arch: ArchInfo, seq_len: int | None) -> LayerPolicy:
        quant = QuantPolicy()  # QAQ's store computes the attention weights it needs itself
        ev = self.evict_method
        if ev is None:
            return quant
        inner = ev.make_policy(layer_idx, arch, seq_len)
        return quant if inner is None else ComposedPolicy(inner, quant)

    # engine hooks pass through to the eviction method --------------------------------------------------------------
    def _evict_hook(self, name: str):
        ev = self.evict_method
        return None if ev is None else getattr(ev, name, None)

    def bind(self, engine) -> None:
        hook = self._evict_hook("bind")
        if hook is not None:
            hook(engine)

    def max_chunk(self, cache) -> int | None:
        hook = self._evict_hook("max_chunk")
        return None if hook is None else hook(cache)

    def before_forward(self, engine, cache, t: int) -> None:
        hook = self._evict_hook("before_forward")
        if hook is not None:
            hook(engine, cache, t)
