"""Training LESS's feature maps phi/psi, one attention layer at a time, on the frozen model.

Dong et al., 2024, "Get More with LESS: Synthesizing Recurrence with KV Cache Compression for Efficient LLM
Inference" (ICML 2024), Section 4 and the training script of its reference code:

1. Collect, for one layer, the queries, keys and values (after RoPE) of the full-cache model on text sequences
   (C4 by default, as in the paper; or local text/jsonl files), together with the mask the eviction policy produces
   in parallel form. The mask comes from running the policy itself through the engine's masked mode (the same code
   as evaluation); the model's other layers keep full attention, so every layer sees the full model's activations.
2. Train phi/psi to minimise the MSE between o_proj(LESS attention) and o_proj(full attention), skipping the first
   positions where the policy keeps every token. Adam (lr 1e-3), StepLR (step 10, gamma 0.5), dropout 0.3,
   batch 2, a 90/10 train/validation split; the weights of the epoch with the best validation loss are kept.
3. Write `layer_<i>.safetensors` and `record.json` to the kernels folder read by `method=less`.

Layers are independent: `from_layer` / `to_layer` split the work across processes writing the same folder.
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kvx.cache.dense import DenseStore
from kvx.cache.lowrank import FeatureMaps, less_attention_parallel, sparse_lse
from kvx.errors import ConfigError, DataError, UnsupportedModelError
from kvx.kernels import reference
from kvx.methods.base import ArchInfo, Method, resolve_tokens
from kvx.methods.less import FORMAT, RECORD, build_policy_method, policy_record, read_record, save_layer
from kvx.tasks.base import read_jsonl, read_text


@dataclass
class TrainData:
    """configs/train_data/*.yaml: where training text comes from."""

    source: str = "c4"  # c4: the hub's allenai/c4 (as in the paper) | files: local .txt / .jsonl files
    files: list[str] = field(default_factory=list)  # source=files: .txt (one document each) or .jsonl (one per row)
    text_field: str = "text"
    skip_rows: int = 0  # documents skipped first (keeps training text disjoint from evaluation text)
    max_rows: int | None = None
    bos_per_document: bool = True  # files: each document starts with BOS; documents are concatenated and cut
    hub_id: str = "allenai/c4"
    hub_files: str = "en/c4-train.00000-of-01024.json.gz"

    def validate(self) -> None:
        if self.source not in ("c4", "files"):
            raise ConfigError("train_data.source", f"must be c4 or files, got {self.source!r}")
        if self.source == "files" and not self.files:
            raise ConfigError("train_data.files", "source=files needs at least one .txt or .jsonl file")
        if self.skip_rows < 0:
            raise ConfigError("train_data.skip_rows", f"must be >= 0, got {self.skip_rows}")
        if self.max_rows is not None and self.max_rows <= 0:
            raise ConfigError("train_data.max_rows", f"must be > 0 or null, got {self.max_rows}")


@dataclass
class TrainSettings:
    """The top-level fields of configs/train_less.yaml."""

    out_dir: str = ""
    seq_len: int | None = None  # tokens per training sequence; null: the model's context
    n_sequences: int = 512
    collect_batch_size: int = 2
    rank: int = 8
    hidden: int = 512
    dropout: float = 0.3
    epochs: int = 40
    lr: float = 1e-3
    lr_step: int = 10
    lr_gamma: float = 0.5
    batch_size: int = 2
    val_fraction: float = 0.1
    from_layer: int = 0
    to_layer: int | None = None  # exclusive; null: the last layer
    precompute_gib: float = 2.0  # precompute each layer's targets when they fit in this many GiB
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        if not self.out_dir:
            raise ConfigError("out_dir", "is empty: give the kernels folder to write")
        for name in ("n_sequences", "collect_batch_size", "rank", "hidden", "epochs", "lr_step", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(name, f"must be a positive int, got {value!r}")
        if self.seq_len is not None and self.seq_len < 2:
            raise ConfigError("seq_len", f"must be >= 2 or null, got {self.seq_len}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout", f"must lie in [0, 1), got {self.dropout}")
        if self.lr <= 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if not 0.0 < self.lr_gamma <= 1.0:
            raise ConfigError("lr_gamma", f"must lie in (0, 1], got {self.lr_gamma}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError("val_fraction", f"must lie in (0, 1), got {self.val_fraction}")
        if self.from_layer < 0:
            raise ConfigError("from_layer", f"must be >= 0, got {self.from_layer}")
        if self.to_layer is not None and self.to_layer <= self.from_layer:
            raise ConfigError("to_layer", f"must be > from_layer={self.from_layer} or null, got {self.to_layer}")


# ---------------------------------------------------------------------------------------------------------------
# training text


def _read_documents(data: TrainData) -> list[str]:
    docs: list[str] = []
    for f in data.files:
        p = Path(f).expanduser()
        if not p.is_file():
            raise DataError(f"train_data.files: {p} does not exist")
        if p.suffix in (".jsonl", ".json"):
            docs += [r[data.text_field] for r in read_jsonl(p, required=[data.text_field], text=[data.text_field])]
        else:
            docs.append(read_text(p))
    docs = docs[data.skip_rows :]
    if data.max_rows is not None:
        docs = docs[: data.max_rows]
    return [d for d in docs if d.strip()]


def training_sequences(data: TrainData, tokenizer, seq_len: int, n: int, seed: int) -> torch.Tensor:
    """[m, seq_len] token ids, m <= n. files: documents (BOS each) concatenated and cut into consecutive windows;
    c4: random windows of random documents longer than seq_len (the paper's sampling)."""
    if data.source == "files":
        docs = _read_documents(data)
        ids: list[int] = []
        bos = tokenizer.bos_token_id
        for d in docs:
            toks = tokenizer(d, add_special_tokens=False).input_ids
            ids += ([bos] if data.bos_per_document and bos is not None else []) + toks
            if len(ids) >= n * seq_len:
                break
        m = min(n, len(ids) // seq_len)
        if m < 2:
            raise DataError(f"train_data: {len(ids)} tokens after skipping {data.skip_rows} documents; need at least "
                            f"2 sequences of seq_len={seq_len}")
        return torch.tensor(ids[: m * seq_len]).view(m, seq_len)
    try:
        import datasets

        ds = datasets.load_dataset(data.hub_id, data_files={"train": data.hub_files}, split="train")
    except Exception as e:  # the hub is unreachable or the files are missing
        raise DataError(
            f"train_data: cannot load {data.hub_id} ({data.hub_files}) from the hub ({type(e).__name__}: {e}); "
            "train on local text instead: train_data=tinystories, or train_data.source=files train_data.files=[...]"
        ) from e
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        for _attempt in range(10000):
            toks = tokenizer(ds[rng.randrange(len(ds))][data.text_field]).input_ids
            if len(toks) > seq_len:
                break
        else:
            raise DataError(f"train_data: found no document longer than seq_len={seq_len} in {data.hub_id}")
        i = rng.randrange(len(toks) - seq_len)
        out.append(toks[i : i + seq_len])
    return torch.tensor(out)


# ---------------------------------------------------------------------------------------------------------------
# collecting one layer's activations and policy masks


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool [..., T] -> uint8 [..., ceil(T / 8)] (8 mask entries a byte)."""
    T = mask.shape[-1]
    pad = (-T) % 8
    m = F.pad(mask.to(torch.uint8), (0, pad)).view(*mask.shape[:-1], -1, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=mask.device)
    return (m * weights).sum(-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, T: int) -> torch.Tensor:
    bits = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=packed.device)
    return ((packed[..., None] & bits) != 0).view(*packed.shape[:-1], -1)[..., :T]


class _Stop(Exception):
    """Raised once the layer of interest has been recorded (the rest of the forward is not needed)."""


class _Recorder(DenseStore):
    """Masked-mode store that records q, k, v and the policy's mask, and answers with full attention."""

    def __init__(self, sink: dict):
        super().__init__()
        self.sink = sink

    def masked_attention(self, q, k, v, allowed, scaling, evicted=None):
        causal = allowed if evicted is None else (allowed | evicted)
        self.sink.update(q=q, k=k, v=v, allowed=allowed, scaling=float(scaling))
        out, _ = reference.attention(q, k, v, None, None, scaling, allowed=causal)
        raise _Stop(out)


class _CollectMethod(Method):
    """Full attention everywhere; at one layer, the policy runs (masked form) and a recorder takes the activations."""

    def __init__(self, policy: Method, layer: int, sink: dict):
        super().__init__(name="less-collect")
        self.policy, self.layer, self.sink = policy, layer, sink

    def make_store(self, layer_idx, arch):
        return _Recorder(self.sink) if layer_idx == self.layer else DenseStore()

    def make_policy(self, layer_idx, arch, seq_len):
        return self.policy.make_policy(layer_idx, arch, seq_len) if layer_idx == self.layer else None


@dataclass
class LayerData:
    q: torch.Tensor  # [N, Hq, T, D]
    k: torch.Tensor  # [N, Hkv, T, D]
    v: torch.Tensor  # [N, Hkv, T, D]
    masks: list[torch.Tensor]  # distinct packed `allowed` masks, each [Hkv, T, ceil(T/8)]
    mask_of: list[int]  # window -> index into masks
    scaling: float

    def allowed(self, idx: list[int]) -> torch.Tensor:
        T = self.q.shape[2]
        return torch.stack([unpack_mask(self.masks[self.mask_of[i]], T) for i in idx])[:, :, None]  # [b, Hkv, 1, T, T]


def collect_layer(model, tokenizer, policy: Method, layer: int, seqs: torch.Tensor, batch_size: int,
                  store_dtype: torch.dtype | None = None, progress=None) -> LayerData:
    """Run the frozen model over seqs [N, T] and record layer `layer`'s q, k, v (after RoPE) and policy mask."""
    from kvx.engine import Engine

    sink: dict = {}
    engine = Engine(model, tokenizer, _CollectMethod(policy, layer, sink))
    qs, ks, vs, mask_of, masks, keys = [], [], [], [], [], {}
    it = range(0, len(seqs), batch_size)
    for s in progress(it, desc=f"layer {layer}: collect", leave=False) if progress else it:
        ids = seqs[s : s + batch_size]
        cache = engine.new_cache(ids.shape[0], seq_len=ids.shape[1], mode="masked")
        try:
            engine.forward(cache, ids)
            raise RuntimeError(f"layer {layer} was never reached")  # pragma: no cover - the recorder always stops
        except _Stop:
            pass
        dt = store_dtype or sink["q"].dtype
        qs.append(sink["q"].to("cpu", dt).clone())
        ks.append(sink["k"].to("cpu", dt).clone())
        vs.append(sink["v"].to("cpu", dt).clone())
        for m in pack_mask(sink["allowed"][:, :, 0]).cpu():  # [Hkv, T, T/8] per window
            key = hash(m.numpy().tobytes())
            j = keys.get(key)
            if j is None or not torch.equal(masks[j], m):
                j = len(masks)
                keys[key] = j
                masks.append(m.clone())
            mask_of.append(j)
    return LayerData(torch.cat(qs), torch.cat(ks), torch.cat(vs), masks, mask_of, sink["scaling"])


def find_o_proj(model, layer: int) -> torch.nn.Module:
    """The output projection of attention layer `layer` (modules with `layer_idx` and `o_proj`, as in Llama)."""
    for m in model.modules():
        if getattr(m, "layer_idx", None) == layer and isinstance(getattr(m, "o_proj", None), torch.nn.Module):
            return m.o_proj
    raise UnsupportedModelError(f"cannot find the attention output projection (o_proj) of layer {layer} in "
                                f"{type(model).__name__}; LESS training supports Llama-style attention modules")


# ---------------------------------------------------------------------------------------------------------------
# fitting one layer


def first_evicting_position(data: LayerData) -> int:
    """The first query position at which the policy has evicted anything (in any window and head)."""
    T = data.q.shape[2]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    first = T
    for m in data.masks:
        ev = (causal & ~unpack_mask(m, T)).any(-1).any(0)  # [T]
        if ev.any():
            first = min(first, int(ev.nonzero()[0]))
    return first


def _batch(data: LayerData, idx: list[int], device) -> tuple[torch.Tensor, ...]:
    q = data.q[idx].to(device, torch.float32)
    k = data.k[idx].to(device, torch.float32)
    v = data.v[idx].to(device, torch.float32)
    T = q.shape[2]
    allowed = data.allowed(idx).to(device)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    return q, k, v, allowed, causal & ~allowed


def _project(o_proj, out: torch.Tensor) -> torch.Tensor:
    B, Hq, T, D = out.shape
    return o_proj(out.transpose(1, 2).reshape(B, T, Hq * D))


class Targets:
    """What the loss needs besides phi/psi, per window: o_proj(full attention) from `start` on, the sparse
    attention output and the log-sum-exp of the kept logits. Precomputed once per layer when they fit in
    `max_bytes`, otherwise computed batch by batch."""

    def __init__(self, data: LayerData, o_proj, start: int, device, max_bytes: float, batch_size: int):
        self.data, self.o_proj, self.start, self.device = data, o_proj, start, device
        N, Hq, T, D = data.q.shape
        hidden = o_proj.out_features if hasattr(o_proj, "out_features") else Hq * D
        need = N * 4 * ((T - start) * hidden + Hq * T * D + Hq * T)
        self.cached = None
        if need <= max_bytes:
            parts = [self.compute(list(range(b, min(b + batch_size, N)))) for b in range(0, N, batch_size)]
            self.cached = tuple(torch.cat([p[i] for p in parts]) for i in range(3))

    @torch.no_grad()
    def compute(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, allowed, _ = _batch(self.data, idx, self.device)
        s, T = self.data.scaling, q.shape[2]
        causal = torch.ones(T, T, dtype=torch.bool, device=self.device).tril()[None, None, None]
        target = _project(self.o_proj, reference.attention(q, k, v, None, None, s, allowed=causal)[0])[:, self.start :]
        sparse, _ = reference.attention(q, k, v, None, None, s, allowed=allowed)
        return target, sparse, sparse_lse(q, k, allowed, s)

    def get(self, idx: list[int]):
        if self.cached is None:
            return self.compute(idx)
        return tuple(t[idx].to(self.device) for t in self.cached)


def layer_loss(maps, targets: Targets, idx: list[int], policy_only: bool = False) -> torch.Tensor:
    """MSE between o_proj(LESS attention) and o_proj(full attention) over positions >= start of windows idx."""
    data = targets.data
    target, sparse, lse = targets.get(idx)
    if policy_only:
        pred = sparse
    else:
        q, k, v, allowed, evicted = _batch(data, idx, targets.device)
        pred = less_attention_parallel(q, k, v, allowed, evicted, data.scaling, maps, sparse_out=sparse, lse=lse)
    return F.mse_loss(_project(targets.o_proj, pred)[:, targets.start :], target)


def evaluate(maps, targets: Targets, idx: list[int], batch_size: int, policy_only: bool = False) -> float:
    was = maps.training
    maps.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(idx), batch_size):
            part = idx[b : b + batch_size]
            total += float(layer_loss(maps, targets, part, policy_only)) * len(part)
            n += len(part)
    maps.train(was)
    return total / max(n, 1)


def fit_layer(data: LayerData, o_proj, settings: TrainSettings, train_idx: list[int], val_idx: list[int],
              layer: int, device, log=None, progress=None) -> tuple[FeatureMaps, dict]:
    """Train phi/psi of one layer; returns the best-validation FeatureMaps and the layer's metrics."""
    _, Hq, T, D = data.q.shape
    Hkv = data.k.shape[1]
    start = first_evicting_position(data)
    if start >= T:
        raise ConfigError("method.budget", f"the policy evicts nothing within seq_len={T} tokens, so LESS has "
                                           "nothing to learn; use a smaller budget or longer sequences")
    gen = torch.Generator().manual_seed(settings.seed * 1000 + layer)
    maps = FeatureMaps(Hq, Hkv, D, settings.rank, settings.hidden, settings.dropout, generator=gen).to(device)
    opt = torch.optim.Adam(maps.parameters(), lr=settings.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=settings.lr_step, gamma=settings.lr_gamma)
    bs = settings.batch_size
    targets = Targets(data, o_proj, start, device, settings.precompute_gib * 2**30, bs)
    policy_val = evaluate(maps, targets, val_idx, bs, policy_only=True)
    initial_val = evaluate(maps, targets, val_idx, bs)
    best, best_epoch, best_state = initial_val, 0, copy.deepcopy(maps.state_dict())
    history = {"train": [], "val": []}
    rng = random.Random(settings.seed * 1000 + layer)
    epochs = range(1, settings.epochs + 1)
    bar = progress(epochs, desc=f"layer {layer}: train", leave=False) if progress else epochs
    t0 = time.perf_counter()
    for epoch in bar:
        maps.train()
        order = list(train_idx)
        rng.shuffle(order)
        total = 0.0
        for b in range(0, len(order), bs):
            part = order[b : b + bs]
            loss = layer_loss(maps, targets, part)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(part)
        sched.step()
        train_loss = total / len(order)
        val_loss = evaluate(maps, targets, val_idx, bs)
        history["train"].append(train_loss)
        history["val"].append(val_loss)
        if val_loss < best:
            best, best_epoch, best_state = val_loss, epoch, copy.deepcopy(maps.state_dict())
        if log is not None:
            log({f"layer_{layer}/train_loss": train_loss, f"layer_{layer}/val_loss": val_loss,
                 f"layer_{layer}/policy_val_loss": policy_val, f"layer_{layer}/lr": sched.get_last_lr()[0],
                 "layer": layer, "epoch": epoch})
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(train=f"{train_loss:.3g}", val=f"{val_loss:.3g}", policy=f"{policy_val:.3g}")
    maps.load_state_dict(best_state)
    maps.eval()
    metrics = {"policy_val_loss": policy_val, "initial_val_loss": initial_val, "best_val_loss": best,
               "best_epoch": best_epoch, "loss_start": start, "train_windows": len(train_idx),
               "val_windows": len(val_idx), "seconds": time.perf_counter() - t0, "history": history}
    return maps.cpu(), metrics


# ---------------------------------------------------------------------------------------------------------------
# the whole run


def portable(obj):
    """obj with the local assets folder written as ${kvx.assets:} in every string (records travel between machines)."""
    from kvx.assets import assets_dir

    if isinstance(obj, str):
        return obj.replace(str(assets_dir(check=False)), "${kvx.assets:}")
    if isinstance(obj, dict):
        return {k: portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable(v) for v in obj]
    return obj


def model_record(model_cfg, arch: ArchInfo) -> dict:
    path = portable(str(model_cfg.name_or_path))
    return {"name": model_cfg.name, "name_or_path": path, "n_layers": arch.n_layers, "n_heads": arch.n_heads,
            "n_kv_heads": arch.n_kv_heads, "head_dim": arch.head_dim, "dtype": model_cfg.dtype}


def budget_tokens(policy: Method, arch: ArchInfo, seq_len: int) -> list[int] | None:
    """Tokens each layer's policy keeps for sequences of seq_len tokens (as recorded with the kernels)."""
    if hasattr(policy, "layer_budget"):
        return [int(policy.layer_budget(i, arch, seq_len)[0]) for i in range(arch.n_layers)]
    budget = getattr(policy, "budget", None)
    if budget is None:
        return None
    return [resolve_tokens(budget, "method.budget", seq_len, arch.max_positions)] * arch.n_layers


def write_record(folder: Path, record: dict) -> None:
    """Create record.json, or check that the folder's record is for the same model, policy and geometry."""
    path = folder / RECORD
    if path.is_file():
        old = read_record(folder)
        for key in ("model", "policy", "rank", "hidden", "seq_len"):
            if old.get(key) != record.get(key):
                raise ConfigError("out_dir", f"{folder} already holds kernels with {key}={old.get(key)}, not "
                                             f"{record.get(key)}; choose another out_dir or remove the folder")
        record = {**old, "training": record["training"], "updated": record["updated"]}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def train_less(cfg: Any) -> dict:
    """Train the feature maps of layers [from_layer, to_layer) and write them to cfg.out_dir.

    cfg: the composed configs/train_less.yaml (model, method = the eviction policy, train_data, logger, settings).
    Returns {"out_dir", "layers": {i: metrics}}."""
    from kvx.config import _plain, build_dataclass, build_model_config
    from kvx.engine import arch_info
    from kvx.models import load_model
    from kvx.tracking import make_logger

    values = _plain(cfg)
    model_cfg = build_model_config(values.get("model"))
    policy = build_policy_method(values.get("method"), "method")
    if not policy.has_mask_form:
        raise ConfigError("method.name", f"{policy.name!r} has no mask form; LESS training needs the parallel mask")
    data_cfg = build_dataclass(TrainData, values.get("train_data") or {}, "train_data")
    data_cfg.validate()
    names = {f for f in TrainSettings.__dataclass_fields__}
    settings = build_dataclass(TrainSettings, {k: v for k, v in values.items() if k in names}, "train")
    settings.validate()
    logger_cfg = values.get("logger") or {"name": "none"}

    torch.manual_seed(settings.seed)
    model, tok = load_model(model_cfg)
    model.requires_grad_(False)
    arch = arch_info(model)
    policy.check_arch(arch)
    device = next(model.parameters()).device
    seq_len = settings.seq_len or arch.max_positions
    to_layer = arch.n_layers if settings.to_layer is None else min(settings.to_layer, arch.n_layers)
    if settings.from_layer >= arch.n_layers:
        raise ConfigError("from_layer", f"must be < the model's {arch.n_layers} layers, got {settings.from_layer}")
    out_dir = Path(settings.out_dir).expanduser()
    record = {
        "format": FORMAT,
        "model": model_record(model_cfg, arch),
        "policy": policy_record(policy),
        "budget_tokens": budget_tokens(policy, arch, seq_len),
        "rank": settings.rank,
        "hidden": settings.hidden,
        "seq_len": seq_len,
        "training": portable({**asdict(settings), "seq_len": seq_len, "train_data": asdict(data_cfg)}),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_record(out_dir, record)

    seqs = training_sequences(data_cfg, tok, seq_len, settings.n_sequences, settings.seed)
    order = list(range(len(seqs)))
    random.Random(settings.seed).shuffle(order)
    n_val = max(1, int(round(settings.val_fraction * len(order))))
    val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])
    if not train_idx:
        raise ConfigError("n_sequences", f"{len(seqs)} sequences leave none for training after the validation split")

    from tqdm.auto import tqdm

    progress = (lambda it, **kw: tqdm(it, dynamic_ncols=True, **kw)) if settings.progress else None
    name = f"less/{model_cfg.name}/{out_dir.name}"
    logger = make_logger(logger_cfg, out_dir, {**values, "record": record}, name)
    results: dict[int, dict] = {}
    try:
        layers = range(settings.from_layer, to_layer)
        for layer in progress(layers, desc="layers") if progress else layers:
            data = collect_layer(model, tok, policy, layer, seqs, settings.collect_batch_size, progress=progress)
            o_proj = copy.deepcopy(find_o_proj(model, layer)).float().requires_grad_(False)
            maps, metrics = fit_layer(data, o_proj, settings, train_idx, val_idx, layer, device,
                                      log=logger.log_metrics, progress=progress)
            metrics["training"] = record["training"]
            save_layer(out_dir, layer, maps, metrics)
            results[layer] = metrics
            logger.log_metrics({f"layer_{layer}/best_val_loss": metrics["best_val_loss"],
                                f"layer_{layer}/policy_val_loss": metrics["policy_val_loss"]})
            del data
    finally:
        logger.finish()
    return {"out_dir": str(out_dir), "layers": results}


def summarize(results: dict) -> str:
    lines = [f"kernels: {results['out_dir']}", "layer  policy_val   initial_val  best_val    best_epoch"]
    for layer, m in sorted(results["layers"].items()):
        lines.append(f"{layer:5d}  {m['policy_val_loss']:.4e}  {m['initial_val_loss']:.4e}  {m['best_val_loss']:.4e}"
                     f"  {m['best_epoch']}")
    return "\n".join(lines)


__all__ = ["TrainData", "TrainSettings", "collect_layer", "fit_layer", "train_less", "training_sequences",
           "pack_mask", "unpack_mask", "first_evicting_position", "summarize"]
