"""The grid sweeper's expansion (kvx/grid.py) and the objective run.py returns (kvx/objective.py), as pure functions."""

import pytest
from omegaconf import OmegaConf

from kvx.errors import ConfigError
from kvx.grid import expand
from kvx.objective import baseline_config, objective_value

GRIDS = [
    {"method": "full"},
    {"method": "h2o,tova", "method.budget": "32,64"},
    {"method": "sirllm", "method.budget": [32, 64], "task.mode": "stream"},
]
PARAMS = {"task.mode": "masked,stream"}


def _sets(runs):
    return [frozenset(r) for r in runs]


def test_union_of_grids():
    runs = expand(PARAMS, GRIDS)
    expected = [{f"task.mode={m}", "method=full"} for m in ("masked", "stream")]
    expected += [{f"task.mode={m}", f"method={x}", f"method.budget={b}"}
                 for m in ("masked", "stream") for x in ("h2o", "tova") for b in (32, 64)]
    expected += [{"task.mode=stream", "method=sirllm", f"method.budget={b}"} for b in (32, 64)]
    assert _sets(runs) == [frozenset(e) for e in expected]


def test_no_grids_is_the_basic_sweeper():
    assert expand({"a": "1,2", "b": "x"}) == [["a=1", "b=x"], ["a=2", "b=x"]]
    assert expand(None, None, ["seed=3"]) == [["seed=3"]]


def test_repeats_are_dropped():
    runs = expand({}, [{"method": "full"}, {"method": "full,h2o"}])
    assert runs == [["method=full"], ["method=h2o"]]


def test_arguments_select_replace_or_extend():
    # values the grids sweep: select those runs (sirllm's stream-only grid disappears under task.mode=masked)
    runs = expand(PARAMS, GRIDS, ["task.mode=masked"])
    assert all("task.mode=masked" in r for r in runs) and not any("method=sirllm" in r for r in runs)
    assert len(runs) == 1 + 4
    runs = expand(PARAMS, GRIDS, ["method=h2o", "method.budget=32"])
    assert _sets(runs) == [frozenset({f"task.mode={m}", "method=h2o", "method.budget=32"}) for m in ("masked", "stream")]
    # a value they do not sweep replaces the key where it is swept (full keeps no budget)
    runs = expand(PARAMS, GRIDS, ["method.budget=16"])
    assert {r for run in runs for r in run if r.startswith("method.budget")} == {"method.budget=16"}
    assert ["task.mode=masked", "method=full"] in runs
    # a selected value leaves out the grids that do not sweep its key (they run at another value)
    grids = [{"method": "qaq", "method.key_error": "0.5,2.0"}, {"method": "qaq", "method.min_bits": 2}]
    assert _sets(expand({}, grids, ["method.key_error=2.0"])) == [frozenset({"method=qaq", "method.key_error=2.0"})]
    # any other key applies to every run; a prefixed key meets its plain twin
    runs = expand(PARAMS, GRIDS, ["task.max_tokens=600", "+seed=1"])
    assert len(runs) == 2 + 8 + 2 and all("task.max_tokens=600" in r and "+seed=1" in r for r in runs)


def test_interpolations_and_quotes_pass_through():
    runs = expand({}, [{"method.key_error": "0.1,0.2", "method.value_error": "${method.key_error}"}])
    assert runs == [["method.key_error=0.1", "method.value_error=${method.key_error}"],
                    ["method.key_error=0.2", "method.value_error=${method.key_error}"]]


def test_range_sweeps_expand():
    assert expand({"seed": "range(0,3)"}) == [["seed=0"], ["seed=1"], ["seed=2"]]


# ---------------------------------------------------------------------------------------------------------------------
def _cfg(objective):
    return OmegaConf.create({"method": {"name": "qaq", "key_error": 0.1}, "task": {"name": "t"}, "objective": objective})


def test_objective_null_and_metric():
    assert objective_value(_cfg(None), {"ppl": 3.5}) is None
    assert objective_value(_cfg("ppl"), {"ppl": 3.5}) == 3.5
    with pytest.raises(ConfigError, match="objective: metric 'acc' is not in the run's metrics; numeric metrics: ppl"):
        objective_value(_cfg("acc"), {"ppl": 3.5, "mode": "masked"})


def test_objective_constraint_against_baseline():
    seen = []

    def fake_run(cfg):
        seen.append(OmegaConf.to_container(cfg))
        return type("R", (), {"metrics": {"acc": 0.60, "cache_bytes_peak": 1000}})()

    spec = {"metric": "compression", "baseline": {"method": {"name": "full"}},
            "constraint": {"metric": "acc", "max_drop": 0.01, "penalty": 1000.0}}
    # within the allowed drop: the compression itself
    assert objective_value(_cfg(spec), {"acc": 0.595, "cache_bytes_peak": 125}, fake_run) == pytest.approx(8.0)
    assert seen[0]["method"] == {"name": "full"} and seen[0]["objective"] is None and seen[0]["task"] == {"name": "t"}
    # 3 points below: 8 - 1000 * (0.03 - 0.01)
    v = objective_value(_cfg(spec), {"acc": 0.57, "cache_bytes_peak": 125}, fake_run)
    assert v == pytest.approx(8.0 - 20.0)
    # a metric that should stay low (ppl) and a relative bound
    spec2 = {"metric": "acc", "baseline": {"method": {"name": "full"}},
             "constraint": {"metric": "acc", "max_drop": 0.1, "relative": True}}
    assert objective_value(_cfg(spec2), {"acc": 0.57, "cache_bytes_peak": 1}, fake_run) == pytest.approx(0.57)
    spec3 = {"metric": "acc", "baseline": {"method": {"name": "full"}},
             "constraint": {"metric": "acc", "max_drop": 0.0, "higher_is_better": False, "penalty": 10}}
    assert objective_value(_cfg(spec3), {"acc": 0.70, "cache_bytes_peak": 1}, fake_run) == pytest.approx(0.70 - 1.0)
    with pytest.raises(ConfigError, match="objective.baseline"):
        objective_value(_cfg({"metric": "compression"}), {"cache_bytes_peak": 1})
    with pytest.raises(ConfigError, match="objective.wrong"):
        objective_value(_cfg({"metric": "acc", "wrong": 1}), {"acc": 1.0})


def test_baseline_config_keeps_interpolations():
    cfg = OmegaConf.create({"a": 1, "b": "${a}", "method": {"name": "qaq"}, "objective": "x"})
    base = baseline_config(cfg, {"method": {"name": "full"}})
    assert base.b == 1 and base.method == {"name": "full"} and base.objective is None
