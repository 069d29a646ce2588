"""`less`: an eviction policy plus a learned constant-size low-rank state that absorbs every evicted token.

Dong et al., 2024, "Get More with LESS: Synthesizing Recurrence with KV Cache Compression for Efficient LLM
Inference" (ICML 2024). `base` is the nested config of any eviction method (for example
`{name: h2o, budget: 64}` or `{name: streaming_llm, budget: 64, sink: 4}`): it decides what is kept, exactly as it
would alone; each layer's store is a `LowRankStore` (kvx/cache/lowrank.py) that folds what the policy evicts into
H, z per KV head. phi and psi come from a kernels folder written by `scripts/train_less.py`:

    <kernels>/record.json             model, policy, budget, rank/hidden and training config (format below)
    <kernels>/layer_<i>.safetensors   FeatureMaps weights of layer i (metadata: that layer's training losses)

Kernels are trained for one model and one policy configuration; loading them for another fails with a ConfigError.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvx.cache.lowrank import FeatureMaps, LowRankStore
from kvx.errors import ConfigError
from kvx.methods.base import ArchInfo, Method, NestedMethod
from kvx.registry import METHODS

FORMAT = "kvx-less-kernels/1"
RECORD = "record.json"


def layer_file(folder: Path, layer: int) -> Path:
    return Path(folder) / f"layer_{layer}.safetensors"


def model_key(name_or_path: str) -> str:
    """What identifies a model across machines: the last component of its hub id or folder."""
    return Path(str(name_or_path).rstrip("/")).name


def build_policy_method(values: Any, field_name: str = "method.base") -> Method:
    """Build and validate the eviction method LESS completes; errors name `method.base.<field>`."""
    from kvx.config import build_nested_method

    def refuse(name: str) -> str | None:
        if name == "less":
            return "LESS cannot complete itself; give an eviction method (h2o, streaming_llm, ...)"
        return None

    return build_nested_method(values, field_name, refuse, evicts_nothing="evicts nothing, so LESS would have "
                               "nothing to absorb; give an eviction method (h2o, streaming_llm, ...)")


def policy_record(method: Method) -> dict:
    """The policy's config as recorded with trained kernels (and compared on load)."""
    out = {}
    for k, v in method.describe().items():
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        out[k] = v
    return out


def policy_diff(have: dict, want: dict, cls: type) -> dict:
    """Fields on which a recorded policy and the asked one differ, as {field: (recorded, asked)}. A field the record
    lacks (added to the method since) counts as its default value."""
    defaults = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    defaults = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in defaults.items()}
    out = {}
    for k in sorted(set(want) | set(have)):
        h = have.get(k, defaults.get(k))
        w = want.get(k, defaults.get(k))
        if h != w:
            out[k] = (h, w)
    return out


def read_record(folder: Path) -> dict:
    path = Path(folder) / RECORD
    if not path.is_file():
        raise ConfigError("method.kernels", f"{folder} holds no {RECORD}: not a LESS kernels folder written by "
                                            "scripts/train_less.py")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError("method.kernels", f"{path} is corrupt (not valid JSON): retrain with scripts/train_less.py") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ConfigError("method.kernels", f"{path}: unknown format {record.get('format')!r} (expected {FORMAT})")
    return record


def save_layer(folder: Path, layer: int, maps: FeatureMaps, metrics: dict) -> Path:
    """Write one layer's phi/psi weights (safetensors; the layer's training metrics go in its metadata)."""
    from safetensors.torch import save_file

    path = layer_file(folder, layer)
    tensors = {k: v.detach().cpu().contiguous().float() for k, v in maps.state_dict().items()}
    meta = {"format": FORMAT, "layer": str(layer), "geometry": json.dumps(maps.geometry()),
            "metrics": json.dumps(metrics, default=float)}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_layer(folder: Path, layer: int) -> tuple[FeatureMaps, dict]:
    from safetensors import safe_open

    path = layer_file(folder, layer)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        geo = json.loads(meta.get("geometry", "{}"))
        maps = FeatureMaps(geo["n_heads"], geo["n_kv_heads"], geo["head_dim"], geo["rank"], geo["hidden"])
        maps.load_state_dict(tensors)
    except Exception as e:  # noqa: BLE001  safetensors raises its own SafetensorError on a truncated or corrupt file
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError("method.kernels", f"{path} is corrupt or not a LESS feature-map file ({why}): "
                                            "retrain with scripts/train_less.py") from None
    maps.eval().requires_grad_(False)
    return maps, json.loads(meta.get("metrics", "{}"))


def resolve_folder(path: str) -> Path:
    from kvx.assets import REPO_ROOT

    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists():
        p = REPO_ROOT / p
    return p


@METHODS.register("less")
@dataclass
class LESS(NestedMethod, Method):
    name: str = "less"
    base: dict = field(default_factory=dict)  # the eviction method's config, e.g. {name: h2o, budget: 64}
    kernels: str | None = None  # folder written by scripts/train_less.py
    rank: int = 8  # R: features of phi/psi (must match the kernels)
    hidden: int | None = None  # hidden width of phi/psi; null: whatever the kernels were trained with

    compresses = True

    def __post_init__(self) -> None:
        self._maps: list[FeatureMaps] | None = None
        self._record: dict | None = None

    # the base policy decides the mask form, token losses, the policy and the engine hooks (NestedMethod) ----------
    def build_inner(self) -> Method:
        return build_policy_method(self.base)

    @property
    def policy_method(self) -> Method:
        return self.inner

    # configuration -------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        self.validate_inner()
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError("method.rank", f"must be a positive int, got {self.rank!r}")
        if self.hidden is not None and (isinstance(self.hidden, bool) or not isinstance(self.hidden, int) or self.hidden <= 0):
            raise ConfigError("method.hidden", f"must be a positive int or null, got {self.hidden!r}")
        if self._maps is not None:
            return
        if not self.kernels:
            raise ConfigError("method.kernels", "no kernels folder: train phi/psi for this model and policy with "
                                                "scripts/train_less.py and set method.kernels to its out_dir")
        folder = resolve_folder(self.kernels)
        if folder.is_dir():  # early check of the policy; the model is checked once it is loaded
            self._check_record(read_record(folder), folder)

    def _check_record(self, record: dict, folder: Path) -> None:
        want = policy_record(self.policy_method)
        have = record.get("policy", {})
        diff = policy_diff(have, want, type(self.policy_method))
        if diff:
            raise ConfigError(
                "method.base",
                f"the kernels in {folder} were trained for policy {have}, not {want} (trained vs asked: {diff}); "
                "train kernels for this policy with scripts/train_less.py",
            )
        if int(record["rank"]) != self.rank:
            raise ConfigError("method.rank", f"the kernels in {folder} have rank {record['rank']}, not {self.rank}")
        if self.hidden is not None and int(record["hidden"]) != self.hidden:
            raise ConfigError("method.hidden", f"the kernels in {folder} have hidden {record['hidden']}, not {self.hidden}")

    def set_feature_maps(self, maps: list[FeatureMaps]) -> LESS:
        """Use these phi/psi (one FeatureMaps per layer) instead of a kernels folder."""
        self._maps = list(maps)
        return self

    @property
    def feature_maps(self) -> list[FeatureMaps] | None:
        return self._maps

    def check_arch(self, arch: ArchInfo) -> None:
        super().check_arch(arch)
        if self._maps is None:
            self._maps = self._load(arch)
        if len(self._maps) != arch.n_layers:
            raise ConfigError("method.kernels", f"{len(self._maps)} layers of feature maps for a model with "
                                                f"{arch.n_layers} layers")
        for i, m in enumerate(self._maps):
            got = (m.n_heads, m.n_kv_heads, m.head_dim)
            want = (arch.n_heads, arch.n_kv_heads, arch.head_dim)
            if got != want:
                raise ConfigError("method.kernels", f"layer {i}: feature maps for (heads, kv heads, head_dim) = {got}, "
                                                    f"the model has {want}")
            if m.rank != self.rank:
                raise ConfigError("method.rank", f"layer {i}: the feature maps have rank {m.rank}, not {self.rank}")

    def _load(self, arch: ArchInfo) -> list[FeatureMaps]:
        if not self.kernels:
            raise ConfigError("method.kernels", "no kernels folder: train phi/psi with scripts/train_less.py")
        folder = resolve_folder(self.kernels)
        if not folder.is_dir():
            raise ConfigError("method.kernels", f"{folder} does not exist: train phi/psi for this model and policy "
                                                "with scripts/train_less.py (its out_dir is the kernels folder)")
        record = read_record(folder)
        self._check_record(record, folder)
        model = record.get("model", {})
        geo = (model.get("n_layers"), model.get("n_heads"), model.get("n_kv_heads"), model.get("head_dim"))
        want = (arch.n_layers, arch.n_heads, arch.n_kv_heads, arch.head_dim)
        trained_for = model.get("name_or_path", "?")
        if geo != want:
            raise ConfigError("method.kernels", f"the kernels in {folder} were trained for {trained_for} (layers, "
                                                f"heads, kv heads, head_dim = {geo}); this model has {want}")
        if arch.model_id and model.get("name_or_path") and model_key(arch.model_id) != model_key(trained_for):
            raise ConfigError("method.kernels", f"the kernels in {folder} were trained for model {trained_for!r}, "
                                                f"not {arch.model_id!r}")
        missing = [i for i in range(arch.n_layers) if not layer_file(folder, i).is_file()]
        if missing:
            raise ConfigError("method.kernels", f"{folder} lacks the feature maps of layers {missing} (train them with "
                                                "scripts/train_less.py from_layer=... to_layer=...)")
        self._record = record
        return [load_layer(folder, i)[0] for i in range(arch.n_layers)]

    # per layer -------------------------------------------------------------------------------------------------------
    def make_store(self, layer_idx: int, arch: ArchInfo):
        if self._maps is None:
            self.check_arch(arch)
        return LowRankStore(self.policy_method.make_store(layer_idx, arch), self._maps[layer_idx])

    def state_bytes_per_head(self, arch: ArchInfo) -> int:
        """Bytes of one KV head's state (H and z, float32 whatever the model's dtype)."""
        return (self.rank * arch.head_dim + self.rank) * 4

    def baseline_plus_tokens(self, arch: ArchInfo) -> int:
        """Baseline+'s extra tokens: as many cached tokens (keys and values at the model's dtype) as the state's
        bytes hold, rounded down. The state stays float32 (it sums many evicted tokens), so at fp16 it holds about
        twice the tokens it would at equal dtype: 8 for rank 8 and head_dim 128, not 4."""
        return self.state_bytes_per_head(arch) // (2 * arch.head_dim * arch.dtype_bytes)
