"""Results are filed under the model that ran: the name derives from model.name_or_path unless model.name is given."""

import shutil

import pytest

from kvx.config import build_model_config
from kvx.models import ModelConfig, name_from_path
from kvx.runner import run

from .helpers import compose_cfg


@pytest.mark.parametrize("overrides, name", [
    ([], "stories260k"),
    (["model=llama2-7b"], "llama2-7b"),
    (["model=llama2-7b", "model.name_or_path=org/Foo-1B"], "Foo-1B"),
    (["model.name_or_path=/data/models/my-model/"], "my-model"),
    (["model=hf", "model.name_or_path=Qwen/Qwen2.5-0.5B"], "Qwen2.5-0.5B"),
    (["model=gguf", "model.name_or_path=/a/tiny.Q4_K_M.gguf"], "tiny.Q4_K_M"),
    (["model.name_or_path=/data/models/my-model", "model.name=mine"], "mine"),
    (["model=random"], "random"),
])
def test_name_from_config(overrides, name):
    assert build_model_config(compose_cfg(overrides).model).name == name


def test_name_in_code():
    assert ModelConfig(name_or_path="meta-llama/Llama-2-7b-hf").name == "Llama-2-7b-hf"
    assert ModelConfig(name_or_path="x", gguf_file="weights.gguf").name == "weights"
    assert ModelConfig(name="given", name_or_path="a/b").name == "given"
    assert name_from_path("/m/stories260k/") == "stories260k"


def test_hf_file_takes_dtype_and_device_from_the_machine():
    mc = build_model_config(compose_cfg(["model=hf", "model.name_or_path=org/M"]).model)
    assert (mc.dtype, mc.device) == ("auto", "auto")


def test_run_lands_under_the_folder_name(tmp_path, assets):
    folder = tmp_path / "my-model"
    shutil.copytree(assets / "models" / "stories260k", folder)
    res = run(compose_cfg([f"results_dir={tmp_path / 'out'}", f"model.name_or_path={folder}", "task.max_tokens=300",
                           "progress=false"]))
    assert res.run_dir.relative_to(tmp_path / "out").parts[:4] == ("runs", "tinystories", "my-model", "full")
    assert res.metrics["model"] == "my-model"
