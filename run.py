"""Run one experiment: `python run.py model=stories260k method=h2o method.budget=64 task=tinystories`.

Exit status: 0; 1 with one line `kvx: error: ...` on bad input; 130 on Ctrl-C; after a `-m` sweep, the number of
points that failed (each reported in one line, recorded in the sweep folder, and listed in the final table).
"""

import sys

import hydra
from omegaconf import DictConfig

import kvx.config  # noqa: F401  (registers the ${kvx.assets:} resolver)
from kvx.errors import KVXError


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Returns the `objective` value (kvx/objective.py) for sweepers such as Optuna; None when it is null."""
    from kvx.objective import objective_value
    from kvx.runner import run
    from kvx.sweeps import in_multirun, record, sweep_group

    sweeping = in_multirun()
    if sweeping and cfg.get("logger") is not None and cfg.logger.get("group", "") is None:
        cfg.logger.group = sweep_group()  # the runs of one sweep are grouped in W&B
    try:
        result = run(cfg)
        value = objective_value(cfg, result.metrics)
    except KVXError as e:
        if not sweeping:
            raise SystemExit(f"kvx: error: {e}") from None
        print(f"kvx: error: {e}", file=sys.stderr)  # this point failed; the sweep goes on
        record(cfg, error=str(e))
        return None
    if sweeping:
        record(cfg, result)
    elif result.wandb_dir is not None:
        print(f"[kvx] W&B offline run: wandb sync {result.wandb_dir}")
    return value


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        from kvx.errors import INTERRUPTED

        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)
    from kvx.sweeps import exit_status

    sys.exit(exit_status())
