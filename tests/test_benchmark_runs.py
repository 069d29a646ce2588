"""The benchmark task configs through the runner (python run.py task=...): results folders, metrics, artifacts."""

import json
from pathlib import Path

import pytest

from kvx.runner import run

from .helpers import compose_cfg

FIXTURES = Path(__file__).parent / "fixtures" / "longbench"

CASES = {
    "xsum": ["task.limit=1", "task.shots=1", "task.max_new_tokens=8"],
    "cnn_dailymail": ["task.limit=1", "task.shots=1", "task.max_new_tokens=8"],
    "needle": ["task.context_lengths=[200,300]", "task.depths=[0,100]", "task.max_new_tokens=4", "task.limit=3",
               "task.template='{context}\n{question}\nAnswer:'"],
    "longbench": ["task.subtasks=[narrativeqa,trec,qasper_e]", f"task.data_files={FIXTURES}", "task.max_new_tokens=4"],
    "hellaswag": ["task.limit=4", "task.bootstrap_iters=0"],
}
EXPECT = {
    "xsum": ("rouge1", "rouge2", "rougeL"),
    "cnn_dailymail": ("rouge1", "rouge2", "rougeL"),
    "needle": ("exact", "rouge1", "rougeL"),
    "longbench": ("narrativeqa", "trec", "qasper_e", "average", "average_e"),
    "hellaswag": ("hellaswag/acc", "hellaswag/acc_norm"),
}


@pytest.mark.parametrize("task", list(CASES))
@pytest.mark.parametrize("method", ["full", "streaming_llm"])
def test_task_config_runs(tmp_path, task, method):
    extra = ["method.budget=48"] if method == "streaming_llm" else []
    res = run(compose_cfg([f"task={task}", f"method={method}", f"results_dir={tmp_path}", "progress=false",
                           *CASES[task], *extra]))
    for key in EXPECT[task]:
        assert isinstance(res.metrics[key], float), key
    d = res.run_dir
    assert d.parent.parent.parent.name == task and d.parent.name == method
    saved = json.loads((d / "metrics.json").read_text())
    assert all(saved[k] == res.metrics[k] for k in EXPECT[task])
    assert (d / "outputs.jsonl").read_text().strip()
    if task == "needle":
        assert (d / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    if task == "hellaswag":
        assert "hellaswag" in json.loads((d / "lm_eval_results.json").read_text())["results"]
