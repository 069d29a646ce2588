"""Every config file composes, and its model, method and task fields validate against their dataclasses."""

import pytest

from kvx.config import build_method, build_model_config, build_task

from .helpers import CONFIGS, compose_cfg


def _names(group):
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize("name", _names("model"))
def test_model_configs(name):
    path = {"gguf": ["model.name_or_path=/x/model.gguf"], "hf": ["model.name_or_path=org/Some-Model"]}.get(name, [])
    cfg = compose_cfg([f"model={name}"] + path)
    mc = build_model_config(cfg.model)
    assert mc.name


@pytest.mark.parametrize("name", _names("method"))
def test_method_configs(name):
    cfg = compose_cfg([f"method={name}"])
    assert build_method(cfg.method).name == cfg.method.name


@pytest.mark.parametrize("name", _names("task"))
def test_task_configs(name):
    extra = ["task.data_files=/x.txt"] if name == "text" else []
    cfg = compose_cfg([f"task={name}"] + extra)
    assert build_task(cfg.task).name


@pytest.mark.parametrize("name", _names("experiment"))
def test_experiment_configs(name):
    cfg = compose_cfg([f"experiment={name}"])
    build_model_config(cfg.model)
    build_method(cfg.method)
    build_task(cfg.task)


@pytest.mark.parametrize("name", _names("sweep"))
def test_sweep_configs(name):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"sweep={name}"], return_hydra_config=True)
    assert cfg.hydra.sweeper.params, f"sweep {name} sets no hydra.sweeper.params"


def test_model_fields():
    cfg = compose_cfg(["model=llama2-7b"])
    mc = build_model_config(cfg.model)
    assert mc.name_or_path == "meta-llama/Llama-2-7b-hf" and not mc.trust_remote_code
    cfg = compose_cfg(["model=random", "model.num_kv_heads=3"])
    with pytest.raises(ValueError, match="model.num_kv_heads"):
        build_model_config(cfg.model)
