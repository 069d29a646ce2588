"""Run one experiment: `python run.py model=stories260k method=h2o method.budget=64 task=tinystories`."""

import hydra
from omegaconf import DictConfig

import kvx.config  # noqa: F401  (registers the ${kvx.assets:} resolver)
from kvx.errors import KVXError


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Returns the `objective` value (kvx/objective.py) for sweepers such as Optuna; None when it is null."""
    from kvx.objective import objective_value
    from kvx.runner import run

    try:
        result = run(cfg)
        return objective_value(cfg, result.metrics)
    except KVXError as e:
        raise SystemExit(f"kvx: error: {e}") from None


if __name__ == "__main__":
    main()
