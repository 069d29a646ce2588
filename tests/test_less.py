"""LESS (Dong et al., 2024): the low-rank store against the bare policy, the full cache, explicit sums and a float64
formula; stream against masked; kernels folders; training on stories260k."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # the fused decode path runs the Triton kernel interpreted on CPU

import json  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kvx.cache.dense import DenseStore  # noqa: E402
from kvx.cache.lowrank import FeatureMaps, LowRankStore, less_attention_parallel, merge_lowrank  # noqa: E402
from kvx.config import build_method  # noqa: E402
from kvx.engine import Engine  # noqa: E402
from kvx.errors import ConfigError, DataError  # noqa: E402
from kvx.less_train import TrainData, TrainSettings, pack_mask, train_less, training_sequences, unpack_mask  # noqa: E402
from kvx.methods.base import ArchInfo  # noqa: E402
from kvx.methods.full import Full  # noqa: E402
from kvx.methods.less import LESS, load_layer  # noqa: E402
from kvx.registry import METHODS  # noqa: E402

LAMBDA = {"name": "streaming_llm", "budget": 24, "sink": 4}
H2O = {"name": "h2o", "budget": 24}
POLICIES = [LAMBDA] + ([H2O] if "h2o" in METHODS else [])


def random_maps(arch, rank=8, hidden=16, seed=0, strength=0.5):
    """Feature maps with a psi strong enough that the state matters (trained kernels are tested elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    maps = []
    for _ in range(arch.n_layers):
        m = FeatureMaps(arch.n_heads, arch.n_kv_heads, arch.head_dim, rank, hidden, generator=g)
        with torch.no_grad():
            m.psi_scale.fill_(strength)
            m.psi_mix_scale.fill_(0.1)
        maps.append(m.eval().requires_grad_(False))
    return maps


def less_engine(model, tok, base, maps):
    method = LESS(base=dict(base))
    method.set_feature_maps(maps)
    return Engine(model, tok, method)


def policy_engine(model, tok, base):
    return Engine(model, tok, build_method(dict(base)))


def arch_of(model, tok):
    return Engine(model, tok, Full()).arch


# --- the formula ---------------------------------------------------------------------------------------------------
def naive_less(q, ks, vs, phi, H, z, scaling):
    """(phi H + sum exp(q k / sqrt d) v) / (phi z + sum exp(q k / sqrt d)) in float64, unshifted."""
    w = torch.exp(scaling * (ks.double() @ q.double()))
    return (phi.double() @ H.double() + w @ vs.double()) / (phi.double() @ z.double() + w.sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("logit_scale", [1.0, 60.0])
def test_store_attention_equals_float64_formula(dtype, logit_scale):
    """One decode step through LowRankStore (GQA 4:2) against the formula as written, in float64.

    With logit_scale 60 the logits reach ~100s: exp overflows float32/float16, the store does not."""
    torch.manual_seed(0)
    B, Hq, Hkv, D, R, n, m = 2, 4, 2, 8, 4, 12, 5
    maps = FeatureMaps(Hq, Hkv, D, R, 16, generator=torch.Generator().manual_seed(1)).eval().requires_grad_(False)
    with torch.no_grad():
        maps.psi_scale.fill_(1.0)
    store = LowRankStore(DenseStore(), maps)
    k = torch.randn(B, Hkv, n, D).to(dtype)
    v = torch.randn(B, Hkv, n, D).to(dtype)
    pos = torch.arange(n).expand(B, Hkv, n)
    store.append(k, v, pos)
    keep = torch.arange(m, n).expand(B, Hkv, n - m)  # evict the first m tokens
    store.keep(keep)
    q = (torch.randn(B, Hq, 1, D) * logit_scale).to(dtype)
    kn, vn = torch.randn(B, Hkv, 1, D).to(dtype), torch.randn(B, Hkv, 1, D).to(dtype)
    qpos = torch.full((B, 1), n)
    out, _ = store.attend(q, kn, vn, qpos[:, None].expand(B, Hkv, 1), qpos, D**-0.5)
    assert out.dtype == dtype and torch.isfinite(out).all()
    phi = maps.phi(q)  # [B, Hq, 1, R]
    psi = maps.psi(k)  # [B, Hkv, n, R]
    for b in range(B):
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            H = psi[b, kh, :m].double().T @ v[b, kh, :m].double()
            z = psi[b, kh, :m].double().sum(0)
            ks = torch.cat([k[b, kh, m:], kn[b, kh]])
            vs = torch.cat([v[b, kh, m:], vn[b, kh]])
            want = naive_less(q[b, h, 0], ks, vs, phi[b, h, 0], H, z, D**-0.5)
            tol = 1e-5 if dtype == torch.float32 else 2e-3
            torch.testing.assert_close(out[b, h, 0].double(), want, atol=tol, rtol=tol)


def test_merge_parallel_form_equals_float64_formula():
    """The masked (parallel) form against the formula per query, in float64; logits large enough to overflow exp."""
    torch.manual_seed(0)
    B, Hq, Hkv, T, D, R = 1, 4, 2, 10, 8, 4
    maps = FeatureMaps(Hq, Hkv, D, R, 16).eval().requires_grad_(False)
    with torch.no_grad():
        maps.psi_scale.fill_(1.0)
    q, k, v = torch.randn(B, Hq, T, D) * 40, torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = causal & ((torch.arange(T)[:, None] - torch.arange(T)[None] < 3) | (torch.arange(T)[None] < 1))
    allowed = allowed.expand(B, Hkv, 1, T, T)
    evicted = causal & ~allowed
    out = less_attention_parallel(q, k, v, allowed, evicted, 0.35, maps)
    phi, psi = maps.phi(q), maps.psi(k)
    for h in range(Hq):
        kh = h // 2
        for i in range(T):
            ev = evicted[0, kh, 0, i]
            kept = allowed[0, kh, 0, i]
            H = psi[0, kh, ev].double().T @ v[0, kh, ev].double()
            z = psi[0, kh, ev].double().sum(0)
            want = naive_less(q[0, h, i], k[0, kh, kept], v[0, kh, kept], phi[0, h, i], H, z, 0.35)
            torch.testing.assert_close(out[0, h, i].double(), want, atol=1e-5, rtol=1e-5)


def test_merge_without_low_rank_mass_is_the_sparse_output_bit_for_bit():
    sparse = torch.randn(3, 5, 8, dtype=torch.float16)
    lse = torch.randn(3, 5) * 50
    out = merge_lowrank(sparse, lse, torch.zeros(3, 5, 8), torch.zeros(3, 5))
    assert torch.equal(out.to(torch.float16), sparse)


# --- against the bare policy and the full cache ---------------------------------------------------------------------
@pytest.mark.parametrize("base", POLICIES, ids=lambda b: b["name"])
@pytest.mark.parametrize("zero", ["phi", "psi"])
def test_zero_feature_maps_equal_the_bare_policy_exactly(stories, tiny_ids, base, zero):
    model, tok = stories
    arch = arch_of(model, tok)
    maps = random_maps(arch)
    for m in maps:
        with torch.no_grad():
            (m.phi_w2 if zero == "phi" else m.psi_scale).zero_()
    ids = torch.tensor([tiny_ids[:57]])
    less, bare = less_engine(model, tok, base, maps), policy_engine(model, tok, base)
    for mode in ("stream", "masked"):
        got, _ = less.score_window(ids, mode=mode)
        want, _ = bare.score_window(ids, mode=mode)
        assert torch.equal(got, want), mode


@pytest.mark.parametrize("base", POLICIES, ids=lambda b: b["name"])
def test_budget_covering_the_sequence_equals_full(stories, tiny_ids, base):
    model, tok = stories
    maps = random_maps(arch_of(model, tok))
    ids = torch.tensor([tiny_ids[:65]])
    less = less_engine(model, tok, {**base, "budget": 64}, maps)
    full = Engine(model, tok, Full())
    got, _ = less.score_window(ids, mode="masked")
    want, _ = full.score_window(ids, mode="masked")
    assert torch.equal(got, want)
    got, _ = less.score_window(ids, mode="stream")
    want, _ = full.score_window(ids, mode="stream", chunk_size=1)
    assert torch.equal(got, want)


@pytest.mark.parametrize("base", POLICIES, ids=lambda b: b["name"])
@pytest.mark.parametrize("which", ["stories", "random_gqa"])
def test_stream_equals_masked(request, tiny_ids, base, which):
    """Real eviction token by token against the parallel form; the state matters (LESS differs from the policy)."""
    model, tok = request.getfixturevalue(which)
    eng = less_engine(model, tok, base, random_maps(arch_of(model, tok)))
    ids = torch.tensor([tiny_ids[:81]])
    stream, st = eng.score_window(ids, mode="stream")
    masked, sm = eng.score_window(ids, mode="masked")
    torch.testing.assert_close(stream, masked, atol=2e-4, rtol=0)
    bare, _ = policy_engine(model, tok, base).score_window(ids, mode="masked")
    assert (masked - bare).abs().max() > 1e-3
    assert st["cache_bytes_peak"] == sm["cache_bytes_peak"]


def test_state_is_the_explicit_sum_over_evicted_tokens(stories, tiny_ids):
    """After a left-padded batch streams through, H and z equal sum psi(k)^T v and sum psi(k) over exactly the
    tokens the policy evicted (recorded independently from what entered the store; padding never counts)."""
    model, tok = stories
    arch = arch_of(model, tok)
    maps = random_maps(arch)
    eng = less_engine(model, tok, LAMBDA, maps)
    ids = torch.tensor([tiny_ids[:60], [0] * 7 + tiny_ids[100:153]])
    am = torch.ones_like(ids)
    am[1, :7] = 0
    cache = eng.new_cache(2, seq_len=60)
    seen = {i: [] for i in range(arch.n_layers)}
    for i, layer in enumerate(cache.layers):
        inner = layer.store.inner
        orig = inner.append

        def spy(k, v, p, orig=orig, i=i):
            seen[i].append((k.clone(), v.clone(), p.clone()))
            orig(k, v, p)

        inner.append = spy
    eng.prefill(cache, ids, am, chunk_size=1)
    for i, layer in enumerate(cache.layers):
        k = torch.cat([s[0] for s in seen[i]], dim=2).double()
        v = torch.cat([s[1] for s in seen[i]], dim=2).double()
        pos = torch.cat([s[2] for s in seen[i]], dim=2)
        kept_pos = layer.store.pos
        assert layer.store.n == LAMBDA["budget"]
        psi = maps[i].psi(k.float()).double()
        for b in range(2):
            for h in range(arch.n_kv_heads):
                gone = (pos[b, h] >= 0) & ~torch.isin(pos[b, h], kept_pos[b, h].long())
                assert int(gone.sum()) == (60 if b == 0 else 53) - LAMBDA["budget"]
                H = psi[b, h, gone].T @ v[b, h, gone]
                z = psi[b, h, gone].sum(0)
                torch.testing.assert_close(layer.store.H[b, h].double(), H, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(layer.store.z[b, h].double(), z, atol=1e-5, rtol=1e-5)


def test_state_bytes_count_and_stay_constant(stories, tiny_ids):
    model, tok = stories
    arch = arch_of(model, tok)
    eng = less_engine(model, tok, LAMBDA, random_maps(arch))
    state = arch.n_layers * arch.n_kv_heads * (8 * arch.head_dim + 8) * 4
    assert eng.method.state_bytes_per_head(arch) * arch.n_layers * arch.n_kv_heads == state
    cache = eng.new_cache(1, seq_len=80)
    sizes = []
    for t in range(80):
        eng.forward(cache, torch.tensor([[tiny_ids[t]]]))
        states = sum(layer.store.state_nbytes() for layer in cache.layers)
        tokens = sum(layer.store.inner.nbytes() for layer in cache.layers)
        assert cache.nbytes() == states + tokens
        sizes.append(states)
    assert set(sizes) == {state}
    assert tokens == arch.n_layers * arch.n_kv_heads * LAMBDA["budget"] * 2 * arch.head_dim * 4
    # masked mode reports the same bytes: the window's tokens it reads at most plus the state
    _, stats = eng.score_window(torch.tensor([tiny_ids[:81]]), mode="masked")
    assert stats["cache_bytes_peak"] == state + tokens


# --- kernels folders ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, assets):
    """A tiny end-to-end training run on stories260k (TinyStories rows after the evaluation text)."""
    out = tmp_path_factory.mktemp("kernels") / "lambda_b32"
    cfg = {
        "model": {"name": "stories260k", "name_or_path": str(assets / "models" / "stories260k")},
        "method": {"name": "streaming_llm", "budget": 32, "sink": 4},
        "train_data": {"source": "files", "files": [str(assets / "tinystories" / "validation_head.jsonl")],
                       "skip_rows": 200},
        "logger": {"name": "none"},
        "out_dir": str(out), "seq_len": 128, "n_sequences": 12, "collect_batch_size": 6, "hidden": 16,
        "epochs": 3, "lr": 0.02, "lr_step": 2, "batch_size": 2, "val_fraction": 0.25, "progress": False,
    }
    return train_less(cfg), cfg


def test_training_lowers_validation_loss_for_every_layer(trained):
    results, _ = trained
    assert sorted(results["layers"]) == [0, 1, 2, 3, 4]
    for layer, m in results["layers"].items():
        assert m["best_val_loss"] < m["initial_val_loss"], layer
        assert m["best_val_loss"] == min(m["history"]["val"]), layer
        assert m["loss_start"] == 32  # the first query whose window has lost a token


def test_kernels_folder_round_trip(trained, stories, tiny_ids):
    results, cfg = trained
    folder = results["out_dir"]
    record = json.loads(open(f"{folder}/record.json").read())
    assert record["policy"]["budget"] == 32 and record["rank"] == 8 and record["hidden"] == 16
    assert record["model"]["name_or_path"] == "${kvx.assets:}/models/stories260k"
    assert record["training"]["train_data"]["files"] == ["${kvx.assets:}/tinystories/validation_head.jsonl"]
    assert record["budget_tokens"] == [32] * 5
    maps, metrics = load_layer(folder, 2)
    assert metrics["best_val_loss"] == results["layers"][2]["best_val_loss"]
    model, tok = stories
    method = build_method({"name": "less", "base": cfg["method"], "kernels": folder})
    eng = Engine(model, tok, method)
    assert torch.equal(method.feature_maps[2].phi_w1, maps.phi_w1)
    nll, _ = eng.score_window(torch.tensor([tiny_ids[:129]]), mode="masked")
    assert torch.isfinite(nll).all()


def test_kernels_for_another_policy_or_model_fail_clearly(trained, stories, random_gqa, tmp_path):
    results, cfg = trained
    folder = results["out_dir"]
    with pytest.raises(ConfigError, match=r"method.base.*budget"):
        build_method({"name": "less", "base": {**cfg["method"], "budget": 64}, "kernels": folder})
    with pytest.raises(ConfigError, match="method.rank"):
        build_method({"name": "less", "base": cfg["method"], "kernels": folder, "rank": 4})
    model, tok = random_gqa
    with pytest.raises(ConfigError, match="method.kernels.*trained for"):
        Engine(model, tok, build_method({"name": "less", "base": cfg["method"], "kernels": folder}))
    other = tmp_path / "renamed"
    shutil.copytree(folder, other)
    record = json.loads((other / "record.json").read_text())
    record["model"]["name_or_path"] = "meta-llama/Llama-2-7b-hf"
    (other / "record.json").write_text(json.dumps(record))
    model, tok = stories
    with pytest.raises(ConfigError, match="trained for model 'meta-llama/Llama-2-7b-hf'"):
        Engine(model, tok, build_method({"name": "less", "base": cfg["method"], "kernels": str(other)}))
    (other / "layer_3.safetensors").unlink()
    record["model"]["name_or_path"] = "${kvx.assets:}/models/stories260k"
    (other / "record.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"lacks the feature maps of layers \[3\]"):
        Engine(model, tok, build_method({"name": "less", "base": cfg["method"], "kernels": str(other)}))
    with pytest.raises(ConfigError, match="does not exist"):
        Engine(model, tok, build_method({"name": "less", "base": cfg["method"], "kernels": str(tmp_path / "none")}))
    # a folder for one policy refuses a second training run for another
    with pytest.raises(ConfigError, match="out_dir"):
        train_less({**cfg, "method": {**cfg["method"], "budget": 16}, "out_dir": folder})


# --- configuration --------------------------------------------------------------------------------------------------
def test_method_fields_are_validated():
    with pytest.raises(ConfigError, match="method.kernels"):
        build_method({"name": "less", "base": LAMBDA})
    with pytest.raises(ConfigError, match="method.base.name"):
        build_method({"name": "less", "base": {"name": "full"}, "kernels": "x"})
    with pytest.raises(ConfigError, match="method.base.sink"):
        build_method({"name": "less", "base": {**LAMBDA, "sink": 30}, "kernels": "x"})
    with pytest.raises(ConfigError, match="method.base"):
        build_method({"name": "less", "base": {}, "kernels": "x"})
    with pytest.raises(ConfigError, match="method.rank"):
        build_method({"name": "less", "base": LAMBDA, "kernels": "x", "rank": 0})


def test_train_settings_are_validated(assets, tmp_path):
    for field, value in [("val_fraction", 1.0), ("hidden", 0), ("dropout", 1.0), ("lr", 0.0), ("to_layer", 0)]:
        with pytest.raises(ConfigError, match=field):
            TrainSettings(out_dir="x", **{field: value}).validate()
    with pytest.raises(ConfigError, match="train_data.source"):
        TrainData(source="web").validate()
    with pytest.raises(ConfigError, match="train_data.files"):
        TrainData(source="files").validate()


def test_c4_offline_is_a_clear_error(stories, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    _, tok = stories
    with pytest.raises(DataError, match=r"allenai/c4.*train_data=tinystories"):
        training_sequences(TrainData(source="c4"), tok, 128, 4, 0)


def test_training_text_skips_the_evaluation_rows(stories, assets):
    """Rows 0-170 hold the first 60k tokens the TinyStories evaluation reads; the training windows start later."""
    _, tok = stories
    path = str(assets / "tinystories" / "validation_head.jsonl")
    seqs = training_sequences(TrainData(source="files", files=[path], skip_rows=200), tok, 64, 3, 0)
    rows = [json.loads(line)["text"] for line in open(path)]
    first = [tok.bos_token_id] + tok(rows[200], add_special_tokens=False).input_ids
    assert seqs.shape == (3, 64) and seqs[0].tolist() == first[:64]


def test_train_config_composes():
    from hydra import compose, initialize_config_dir

    from .helpers import CONFIGS

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train_less", overrides=["method=h2o", "method.budget=32", "train_data=tinystories"])
    assert cfg.method.name == "h2o" and cfg.train_data.source == "files"
    assert cfg.out_dir == "results/less_kernels/stories260k/h2o_b32"
    TrainSettings(**{k: cfg[k] for k in TrainSettings.__dataclass_fields__}).validate()


def test_pack_mask_round_trip():
    m = torch.rand(3, 2, 13, 13) > 0.5
    assert torch.equal(unpack_mask(pack_mask(m), 13), m)


def test_fused_decode_kernel_equals_reference_store_step():
    """One decode step with the Triton kernel adding the low-rank term (interpreted on CPU) against the torch path."""
    from kvx import kernels

    torch.manual_seed(0)
    B, Hq, Hkv, D, n = 2, 4, 2, 8, 12
    maps = FeatureMaps(Hq, Hkv, D, 4, 16, generator=torch.Generator().manual_seed(1)).eval().requires_grad_(False)
    with torch.no_grad():
        maps.psi_scale.fill_(1.0)
    k, v = torch.randn(B, Hkv, n, D), torch.randn(B, Hkv, n, D)
    q, kn, vn = torch.randn(B, Hq, 1, D) * 3, torch.randn(B, Hkv, 1, D), torch.randn(B, Hkv, 1, D)
    qpos = torch.full((B, 1), n)
    outs = {}
    saved = kernels.backend()
    try:
        for backend in ("ref", "triton"):
            kernels.set_backend(backend)
            store = LowRankStore(DenseStore(), maps)
            store.append(k, v, torch.arange(n).expand(B, Hkv, n))
            store.keep(torch.arange(5, n).expand(B, Hkv, n - 5))
            outs[backend], _ = store.attend(q, kn, vn, qpos[:, None].expand(B, Hkv, 1), qpos, D**-0.5)
    finally:
        kernels.set_backend(saved)
    torch.testing.assert_close(outs["triton"], outs["ref"], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_fused_decode_kernel_path_equals_reference(stories, tiny_ids):
    """Scoring a window token by token with the fused Triton decode path (interpreted: minutes on CPU)."""
    from kvx import kernels

    model, tok = stories
    eng = less_engine(model, tok, LAMBDA, random_maps(arch_of(model, tok)))
    ids = torch.tensor([tiny_ids[:33]])
    saved = kernels.backend()
    try:
        kernels.set_backend("ref")
        want, _ = eng.score_window(ids, mode="stream")
        kernels.set_backend("triton")
        got, _ = eng.score_window(ids, mode="stream")
    finally:
        kernels.set_backend(saved)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


# --- Baseline+ and the state at the run's dtype --------------------------------------------------------------------
def measured_state_per_head(head_dim: int, dtype: torch.dtype, rank: int = 8, n_kv: int = 2) -> int:
    """Bytes one KV head's state holds, measured on a LowRankStore after one eviction at the model's dtype."""
    maps = FeatureMaps(2 * n_kv, n_kv, head_dim, rank, 16).eval().requires_grad_(False)
    store = LowRankStore(DenseStore(), maps)
    kv = torch.randn(1, n_kv, 3, head_dim).to(dtype)
    store.append(kv, kv, torch.arange(3).expand(1, n_kv, 3))
    store.keep(torch.arange(1, 3).expand(1, n_kv, 2))
    assert store.absorbed == n_kv and store.H.dtype == torch.float32
    return store.state_nbytes() // n_kv


def grid_runs(experiment: str, scale: str) -> list[dict]:
    """The method configs and model dtype of every run of an experiment's grid."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from kvx.grid import expand
    from tests.helpers import CONFIGS

    base = [f"experiment={experiment}", f"scale={scale}"]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        root = compose(config_name="config", overrides=base, return_hydra_config=True)
        sweeper = OmegaConf.to_container(root.hydra.sweeper, resolve=True)
        return [OmegaConf.to_container(compose(config_name="config", overrides=job), resolve=True)
                for job in expand(sweeper.get("params"), sweeper.get("grids"), base)]


# Llama-2-7B and 13B: head_dim 128 (4096 / 32 and 5120 / 40 in their hub configs); stories260k: 8
@pytest.mark.parametrize("experiment,scale,head_dim", [("less_llama2_7b", "gpu", 128), ("less_llama2_13b", "gpu", 128),
                                                       ("less_llama2_7b", "cpu", 8)])
def test_baseline_plus_holds_the_bytes_of_the_state_at_the_runs_dtype(experiment, scale, head_dim):
    runs = grid_runs(experiment, scale)
    dtype = getattr(torch, runs[0]["model"]["dtype"])
    per_token = 2 * head_dim * torch.finfo(dtype).bits // 8  # keys and values of one token, one KV head
    extra = measured_state_per_head(head_dim, dtype) // per_token
    arch = ArchInfo(1, 1, 1, head_dim, 4096, torch.finfo(dtype).bits // 8)
    assert LESS().baseline_plus_tokens(arch) == extra == (8 if dtype == torch.float16 else 4)
    for less in (r["method"] for r in runs if r["method"]["name"] == "less"):
        policy = less["base"]["name"]
        budgets = sorted({r["method"]["budget"] for r in runs if r["method"]["name"] == policy
                          and r["task"]["name"] == runs[0]["task"]["name"]})
        assert less["base"]["budget"] + extra in budgets, (policy, budgets)


def test_state_bytes_reach_the_metrics(stories, assets):
    """A perplexity run reports the state's measured bytes, and its size in tokens of the model's dtype."""
    from kvx.tasks.base import RunContext
    from kvx.tasks.perplexity import Perplexity

    model, tok = stories
    arch = arch_of(model, tok)
    eng = less_engine(model, tok, LAMBDA, random_maps(arch))
    task = Perplexity(data_files=str(assets / "tinystories" / "validation_head.jsonl"), max_tokens=200, window=64,
                      mode="masked")
    m = task.run(eng, RunContext()).metrics
    per_head = eng.method.state_bytes_per_head(arch)
    assert m["state_bytes"] == per_head * arch.n_layers * arch.n_kv_heads == measured_state_per_head(8, torch.float32) \
        * arch.n_layers * arch.n_kv_heads
    assert m["state_tokens"] == per_head / (2 * arch.head_dim * 4) == 4.5
    assert "state_bytes" not in Perplexity(data_files=task.data_files, max_tokens=200, window=64).run(
        Engine(model, tok, Full()), RunContext()).metrics


def test_fp16_state_of_thousands_of_large_tokens_stays_finite():
    """At fp16 with large logits and a state that absorbed 4096 tokens of large values, the store's output equals
    the float64 formula: the state stays float32 and the merge never exponentiates a positive number."""
    torch.manual_seed(0)
    B, Hq, Hkv, D, R, n, m = 1, 4, 2, 16, 8, 4096 + 8, 4096
    maps = FeatureMaps(Hq, Hkv, D, R, 16, generator=torch.Generator().manual_seed(1)).eval().requires_grad_(False)
    with torch.no_grad():
        maps.psi_scale.fill_(1.0)
    store = LowRankStore(DenseStore(), maps)
    k = (torch.randn(B, Hkv, n, D) * 4).half()
    v = (torch.randn(B, Hkv, n, D) * 200).half()
    store.append(k, v, torch.arange(n).expand(B, Hkv, n))
    store.keep(torch.arange(m, n).expand(B, Hkv, n - m))
    assert float(store.H.abs().max()) > 65504  # beyond what an fp16 state could hold
    q = (torch.randn(B, Hq, 1, D) * 40).half()  # logits in the hundreds
    kn, vn = torch.randn(B, Hkv, 1, D).half(), torch.randn(B, Hkv, 1, D).half()
    qpos = torch.full((B, 1), n)
    out, _ = store.attend(q, kn, vn, qpos[:, None].expand(B, Hkv, 1), qpos, D**-0.5)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    phi, psi = maps.phi(q), maps.psi(k)
    for h in range(Hq):
        kh = h // (Hq // Hkv)
        H = psi[0, kh, :m].double().T @ v[0, kh, :m].double()
        z = psi[0, kh, :m].double().sum(0)
        want = naive_less(q[0, h, 0], torch.cat([k[0, kh, m:], kn[0, kh]]), torch.cat([v[0, kh, m:], vn[0, kh]]),
                          phi[0, h, 0], H, z, D**-0.5)
        torch.testing.assert_close(out[0, h, 0].double(), want, atol=2e-3 * float(want.abs().max()) + 1e-3, rtol=2e-3)
