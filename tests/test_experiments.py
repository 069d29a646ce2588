"""Paper experiments: gpu scale runs the paper's model from the hub, cpu scale runs stories260k on the offline assets,
and every run of each grid builds (model, method and task validate) at both scales."""

import importlib.util
import shutil
import sys

import pytest
from omegaconf import OmegaConf

from kvx.config import build_method, build_model_config, build_task

from .helpers import REPO, compose_cfg

spec = importlib.util.spec_from_file_location("aggregate", REPO / "scripts" / "aggregate.py")
A = importlib.util.module_from_spec(spec)
sys.modules.setdefault("aggregate", A)
spec.loader.exec_module(A)

TABLES = ["eviction_ppl", "qaq_table1", "qaq_table2", "qaq_hellaswag", "needle_grid"]
GPU_MODEL = {"eviction_ppl": "meta-llama/Llama-2-7b-hf", "qaq_table1": "meta-llama/Llama-2-7b-hf",
             "qaq_table2": "meta-llama/Llama-2-7b-hf", "qaq_hellaswag": "meta-llama/Llama-2-7b-hf",
             "needle_grid": "meta-llama/Llama-2-7b-hf"}


def _hydra(overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("name", TABLES)
def test_scales(name):
    gpu = _hydra([f"experiment={name}"])
    cpu = _hydra([f"experiment={name}", "scale=cpu"])
    assert gpu.scale == "gpu" and cpu.scale == "cpu"
    assert gpu.model.name_or_path == GPU_MODEL[name] and gpu.model.device == "auto"
    assert cpu.model.name == "stories260k" and cpu.model.device == "cpu"
    from kvx.assets import assets_dir

    assets = str(assets_dir(check=False))
    assert OmegaConf.to_container(cpu.model, resolve=True)["name_or_path"] == f"{assets}/models/stories260k"
    assert str(OmegaConf.to_container(cpu.task, resolve=True)["data_files"]).startswith(assets)
    for cfg in (gpu, cpu):
        assert cfg.hydra.mode.name == "MULTIRUN"  # one command runs the whole table
        assert cfg.hydra.sweeper._target_.endswith("GridSweeper")
        assert cfg.logger.group == f"{name}-{cfg.scale}"


@pytest.mark.parametrize("name", TABLES)
def test_every_cpu_run_builds(name):
    cells = A.cells(name, "cpu")
    assert len(cells) > 1
    models = {"stories260k", "random"} if name == "qaq_table1" else {"stories260k"}  # random: head_dim-128 bytes
    for _, cfg, rel in cells:
        model = build_model_config(cfg["model"]).name
        assert model in models
        method = build_method(cfg["method"])
        task = build_task(cfg["task"])
        assert task.mode != "masked" or method.has_mask_form, rel
        assert rel.startswith(f"runs/{task.name}/{model}/{method.name}/")


@pytest.mark.slow
@pytest.mark.parametrize("name", A.experiments())
def test_every_run_builds_at_both_scales(name):
    for scale in A.SCALES:
        for _, cfg, rel in A.cells(name, scale):
            build_model_config(cfg["model"])
            method = build_method(cfg["method"])
            task = build_task(cfg["task"])
            assert task.mode != "masked" or method.has_mask_form, rel


def test_cpu_scale_is_the_same_run_as_by_hand():
    """scale is not in the config hash: a cpu-scale run and the same settings typed by hand share a folder."""
    from kvx.config import config_hash

    cell = A.cells("eviction_ppl", "cpu")[2]
    via = compose_cfg(["experiment=eviction_ppl", "scale=cpu", *cell[0]])
    by_hand = compose_cfg([f"method={cell[1]['method']['name']}", f"method.budget={cell[1]['method']['budget']}",
                           "task=tinystories", "task.max_tokens=20000", f"task.mode={cell[1]['task']['mode']}"])
    assert config_hash(via) == config_hash(by_hand)
    assert cell[2].endswith(config_hash(by_hand))


def test_hash_ignores_where_the_checkout_lives(monkeypatch, tmp_path):
    """A path inside the repository (LESS's trained kernels) hashes the same from any checkout."""
    import kvx.assets
    from kvx.config import config_blob, config_hash

    here = compose_cfg(["method=less"])
    kernels = OmegaConf.to_container(here.method, resolve=True)["kernels"]
    assert kernels.startswith(str(REPO))
    h, blob = config_hash(here), config_blob(here)
    assert "${kvx.repo:}/results/less_kernels/" in blob and str(REPO) not in blob
    other = tmp_path / "elsewhere"
    shutil.copytree(kernels, f"{other}{kernels[len(str(REPO)):]}")  # the same files (their digests are hashed)
    moved = compose_cfg(["method=less", f"method.kernels={other}{kernels[len(str(REPO)):]}"])
    assert config_hash(moved) != h
    monkeypatch.setenv("KVX_ASSETS", str(kvx.assets.assets_dir()))  # the data stays where it is
    monkeypatch.setattr(kvx.assets, "REPO_ROOT", other)
    assert config_blob(moved) == blob  # on failure pytest shows where the two texts differ
    assert config_hash(moved) == h


@pytest.mark.parametrize("repo_name", ["0_checkout", "z_checkout"])
def test_hash_does_not_depend_on_how_the_checkout_and_assets_paths_sort(monkeypatch, tmp_path, repo_name):
    """A LESS run names two input files, its kernels (in the checkout) and its data (in the assets). Whether the
    checkout's path sorts before or after the assets' must not change the hash (it did: the inputs were sorted by
    their absolute paths before those were replaced)."""
    import kvx.assets
    from kvx.config import config_hash

    want = config_hash(compose_cfg(["method=less"]))
    here = compose_cfg(["method=less"])
    kernels = OmegaConf.to_container(here.method, resolve=True)["kernels"]
    data = OmegaConf.to_container(here.task, resolve=True)["data_files"]
    assets = tmp_path / "m_assets"  # between the two checkouts' names
    rel = data[len(str(kvx.assets.assets_dir())):]
    (assets / rel.lstrip("/")).parent.mkdir(parents=True)
    shutil.copy2(data, f"{assets}{rel}")
    repo = tmp_path / repo_name
    shutil.copytree(kernels, f"{repo}{kernels[len(str(REPO)):]}")
    monkeypatch.setenv("KVX_ASSETS", str(assets))
    monkeypatch.setattr(kvx.assets, "REPO_ROOT", repo)
    moved = compose_cfg(["method=less"])  # ${kvx.repo:} and ${kvx.assets:} now point at the copies
    assert OmegaConf.to_container(moved.method, resolve=True)["kernels"].startswith(str(repo))
    assert config_hash(moved) == want
