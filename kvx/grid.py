"""The runs of a sweep or experiment: a union of Cartesian grids of overrides.

`hydra.sweeper.params` is Hydra's basic grid (`key: "v1,v2"`, each key crossed with the others). A table is rarely
one rectangle (the full cache has no budget; a method without a mask form runs in stream mode only), so the `grid`
sweeper (kvx/_plugins/hydra_plugins/kvx_grid_sweeper, selected with `override /hydra/sweeper: grid`) also reads
`hydra.sweeper.grids`: a list of grids, each merged over `params` (its keys win) and expanded on its own; the runs
are the union, in order, without repeats. On the command line, `task.mode=masked` or `method=h2o` (values the
grids sweep) selects those runs (a grid that does not sweep the key is left out), `method.budget=16` (a value they
do not) replaces the budgets where budgets are swept, and any other override (`task.max_tokens=600`) applies to
every run.

    params: {task.mode: "masked,stream"}
    grids:
      - {method: full}
      - {method: "h2o,tova", method.budget: "32,64,128"}
      - {method: sirllm, method.budget: "32,64,128", task.mode: stream}

`expand(params, grids, arguments)` returns one list of override strings per run; scripts/aggregate.py uses it too,
so a table names exactly the runs its experiment launches.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any


def _key(written: str) -> str:
    """A key without Hydra's prefixes (+, ++, ~), so `+a=1` on the command line meets `a` in the grid."""
    return written.split("=", 1)[0].lstrip("+~")


def _parse(lines: list[str], config_loader: Any = None) -> dict[str, tuple[str, list[str]]]:
    """{key: (key as written, [values])} from `key=v1,v2` lines."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create(config_loader=config_loader)
    out: dict[str, tuple[str, list[str]]] = {}
    for line, ov in zip(lines, parser.parse_overrides(list(lines))):
        written = line.split("=", 1)[0]
        if ov.is_sweep_override():
            if not ov.is_discrete_sweep():
                from hydra.errors import HydraException

                raise HydraException(f"the grid sweeper needs a list of values, got {line}")
            values = list(ov.sweep_string_iterator())
        else:
            values = [line.split("=", 1)[1]]  # as written: keeps quotes and ${interpolations} unescaped
        out[_key(written)] = (written, values)
    return out


def expand(
    params: Mapping[str, Any] | None,
    grids: Sequence[Mapping[str, Any]] | None = None,
    arguments: Sequence[str] = (),
    config_loader: Any = None,
) -> list[list[str]]:
    """One list of override strings per run: the union of params x grid_i, in order, without repeats.

    A command-line argument for a key the grids sweep either selects runs (all its values are among the swept ones:
    `task.mode=masked`, `method=h2o`; grids that do not sweep the key are left out) or replaces that key's values where it is swept (`method.budget=16`); an
    argument for any other key applies to every run.
    """
    params = {str(k): _value(v) for k, v in (params or {}).items()}
    maps = []
    for grid in list(grids) if grids else [{}]:
        merged = {**params, **{str(k): _value(v) for k, v in grid.items()}}
        maps.append(_parse([f"{k}={v}" for k, v in merged.items()], config_loader))
    args = _parse(list(arguments), config_loader) if arguments else {}
    for key, (written, values) in args.items():
        swept = [m for m in maps if key in m]
        if not swept:
            for m in maps:
                m[key] = (written, values)
            continue
        known = {v for m in swept for v in m[key][1]}
        select = set(values) <= known
        kept = []
        for m in maps:
            if key in m:
                if select:
                    m[key] = (written, [v for v in m[key][1] if v in values])
                    if not m[key][1]:
                        continue
                else:
                    m[key] = (written, values)
            elif select:  # a grid that does not sweep the key holds none of the selected values
                continue
            kept.append(m)
        maps = kept
    runs: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for m in maps:
        items = list(m.values())
        for combo in itertools.product(*[[f"{w}={v}" for v in vals] for w, vals in items]):
            ident = tuple(sorted(combo))
            if ident not in seen:
                seen.add(ident)
                runs.append(list(combo))
    return runs


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if v is None:
        return "null"
    if isinstance(v, (list, tuple)):  # a YAML list is a sweep over its items
        return ",".join(_value(x) for x in v)
    return str(v)
