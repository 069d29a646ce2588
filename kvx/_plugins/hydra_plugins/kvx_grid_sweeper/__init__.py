"""Hydra sweeper plugin `grid`: a union of Cartesian grids (see kvx/grid.py). Hydra finds plugins by this package."""

from hydra_plugins.kvx_grid_sweeper.grid_sweeper import GridSweeper

__all__ = ["GridSweeper"]
