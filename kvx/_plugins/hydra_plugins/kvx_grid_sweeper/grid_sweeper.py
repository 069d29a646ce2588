"""The `grid` sweeper: Hydra's basic sweeper over a union of grids (`hydra.sweeper.params` + `hydra.sweeper.grids`).

Selected with `override /hydra/sweeper: grid` (configs/hydra/sweeper/grid.yaml). Launching goes through whatever
launcher is configured (local, submitit_local, submitit_slurm), one job per run, as with the basic sweeper.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from omegaconf import OmegaConf

from kvx.grid import expand

log = logging.getLogger(__name__)


class GridSweeper(BasicSweeper):
    def __init__(self, max_batch_size: int | None = None, params: dict | None = None,
                 grids: Sequence[dict] | None = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.grids = [OmegaConf.to_container(g) if OmegaConf.is_config(g) else dict(g) for g in (grids or [])]

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        params = OmegaConf.to_container(self.params) if OmegaConf.is_config(self.params) else dict(self.params)
        jobs = expand(params, self.grids, arguments, config_loader=self.hydra_context.config_loader)
        self.overrides = list(self.split_overrides_to_chunks(jobs, self.max_batch_size))
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        log.info(f"grid sweeper: {len(jobs)} runs")
        returns = []
        initial_job_idx = 0
        while not self.is_done():
            batch = self.get_job_batch()
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=initial_job_idx)
            for r in results:
                _ = r.return_value  # raises if the job failed
            initial_job_idx += len(batch)
            returns.append(results)
        return returns
