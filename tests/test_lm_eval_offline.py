"""lm-eval offline and without setup: `import kvx` alone registers the "kvx" model (lazily), and lm-eval's own
local-file mechanism (a task YAML with dataset_path: json + data_files) reads the assets' HellaSwag; with the full
cache our numbers equal lm-eval's own HF model on that task."""

import json
import os
import subprocess
import sys

import pytest

from .helpers import REPO

SCRIPT = """
import json, sys
import kvx
lazy = "kvx.tasks.harness" not in sys.modules
import lm_eval
from lm_eval.tasks import TaskManager

tm = TaskManager(include_path="kvx/tasks/lm_eval_tasks", include_defaults=False)
kw = dict(tasks=["hellaswag_local"], limit=6, task_manager=tm, bootstrap_iters=0, log_samples=True)
ours = lm_eval.simple_evaluate(model="kvx", model_args="model=stories260k", **kw)
ref = lm_eval.simple_evaluate(model="hf", model_args="pretrained={path},device=cpu", **kw)
h2o = lm_eval.simple_evaluate(model="kvx", model_args="model=stories260k,method=h2o,budget=16", **kw)
def lls(r):
    return {{s["doc_id"]: [x[0] for x in s["filtered_resps"]] for s in r["samples"]["hellaswag_local"]}}
print(json.dumps({{"lazy": lazy, "ours": ours["results"]["hellaswag_local"], "ref": ref["results"]["hellaswag_local"],
                   "ours_ll": lls(ours), "ref_ll": lls(ref), "h2o_ll": lls(h2o),
                   "inds": [s["doc"]["ind"] for s in ref["samples"]["hellaswag_local"]]}}))
"""


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="2")


def test_simple_evaluate_after_import_kvx_reads_local_files(assets):
    path = assets / "models" / "stories260k"
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(path=path)], cwd=REPO, env=_env(), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["lazy"]  # import kvx registered the name without loading the harness module
    assert sorted(res["inds"]) == [json.loads(line)["ind"] for line in
                                   open(assets / "hellaswag" / "validation_first1000.jsonl")][:6]
    assert res["ours"]["acc,none"] == res["ref"]["acc,none"]
    assert res["ours"]["acc_norm,none"] == res["ref"]["acc_norm,none"]
    for doc, lls in res["ref_ll"].items():
        assert res["ours_ll"][doc] == pytest.approx(lls, abs=2e-3)
    assert any(res["h2o_ll"][d] != pytest.approx(res["ours_ll"][d], abs=1e-4) for d in res["ours_ll"])


@pytest.mark.slow
def test_hub_task_offline_names_the_local_files_way():
    out = subprocess.run([sys.executable, "-m", "kvx.tasks.harness_cli", "--model", "kvx", "--model_args",
                          "model=stories260k", "--tasks", "hellaswag", "--limit", "2"], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode != 0 and "--include_path kvx/tasks/lm_eval_tasks --tasks hellaswag_local" in out.stderr
