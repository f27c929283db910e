"""The proxy benchmark's protocol: which runs it makes and where they live.

A protocol (configs/proxy_benchmark.yaml, copied resolved to ``<out_dir>/protocol.yaml``) names
the seeds, the subsets, the overrides every run shares (``base``) and the cells (a method or an
ablation, each a list of overrides). One run = (subset, cell, seed) in
``<out_dir>/<subset>/<cell>/seed<k>``. ``init_from`` ({subset: source subset}) starts every run of a
subset from the val-selected checkpoint of the same cell and seed on the source subset (S4 -> MS3, the
AVSBench ``--load_s4_params`` protocol): the runner starts such a run only after its source finished.
docs/reproducing.md, "Proxy benchmark", describes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from avs.engine.rundir import BEST_CKPT, CHECKPOINT_DIR
from avs.errors import ConfigError

PROTOCOL_FILE = "protocol.yaml"
CEILINGS_FILE = "ceilings.json"
# one line per worker task: run, task (train / follow-up), exit code, wall seconds, end, workers, threads
RUNS_FILE = "runs.jsonl"
# keys of the protocol that decide what a run computes: an out_dir made with other values is refused
RUN_DEFINING = ("version", "simd", "base", "subsets", "init_from", "cells", "standins")
PROTOCOL_KEYS = (
    "version",
    "simd",
    "standins",
    "seeds",
    "ablation_seeds",
    "subsets",
    "init_from",
    "base",
    "extra_overrides",
    "cells",
    "methods",
    "claims",
    "targets",
    "metric",
    "uncertainty",
)


@dataclass(frozen=True)
class ProxyRun:
    """One training run of the protocol."""

    subset: str
    cell: str
    seed: int
    overrides: tuple[str, ...]
    run_dir: Path
    after: str | None = None  # the run whose checkpoint this one starts from (init_from), by name
    init_checkpoint: Path | None = None  # that run's best.ckpt (the `model.init_from=` override)

    @property
    def name(self) -> str:
        return f"{self.subset}/{self.cell}/seed{self.seed}"

    def checkable_overrides(self) -> tuple[str, ...]:
        """The overrides without `model.init_from` (its file exists only once the source run finished)."""
        return tuple(o for o in self.overrides if not o.startswith(f"{INIT_KEY}="))


INIT_KEY = "model.init_from"


def _strings(node: Any, where: str) -> list[str]:
    if node is None:
        return []
    items = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise ConfigError(f"{where} must be a list of override strings (key=value), got {items!r}")
    return list(items)


def cell_subsets(protocol: DictConfig, cell: str) -> list[str]:
    """The subsets a cell runs on (all of the protocol's unless the cell lists some)."""
    node = protocol.cells[cell]
    wanted = node.get("subsets")
    subsets = list(protocol.subsets.keys())
    if wanted is None:
        return subsets
    unknown = [s for s in wanted if s not in subsets]
    if unknown:
        raise ConfigError(f"cells.{cell}.subsets: {unknown} not among the protocol's subsets {subsets}")
    return list(wanted)


def table_cells(protocol: DictConfig) -> list[str]:
    """The methods and each method's `<method>_no_audio` cell (the listening pairs), in the cells' order."""
    wanted = set(protocol.methods) | {f"{m}_no_audio" for m in protocol.methods}
    return [c for c in protocol.cells if c in wanted]


def cell_seeds(protocol: DictConfig, cell: str) -> list[int]:
    """The seeds a cell runs: its own `seeds`, else `ablation_seeds` for a cell that is neither a method
    nor a method's no-audio pair (when set), else the protocol's `seeds`."""
    node = protocol.cells[cell]
    if node.get("seeds") is not None:
        return [int(k) for k in node.seeds]
    if cell not in set(table_cells(protocol)) and protocol.get("ablation_seeds") is not None:
        return [int(k) for k in protocol.ablation_seeds]
    return [int(k) for k in protocol.seeds]


def init_sources(protocol: DictConfig) -> dict[str, str]:
    """{subset: the subset its runs start from} (`init_from`; empty when the protocol has none)."""
    node = protocol.get("init_from")
    return {str(k): str(v) for k, v in (_plain(node) or {}).items()}


def _validate_init_from(protocol: DictConfig) -> None:
    subsets = list(protocol.subsets.keys())
    sources = init_sources(protocol)
    for target, source in sources.items():
        if target not in subsets or source not in subsets or source == target:
            raise ConfigError(f"init_from.{target}={source}: both must be two different subsets of {subsets}")
        if source in sources:
            raise ConfigError(f"init_from.{target}={source}: {source} itself starts from {sources[source]} (no chains)")
        for cell in protocol.cells:
            where = cell_subsets(protocol, cell)
            if target in where and source not in where:
                raise ConfigError(
                    f"cells.{cell}: runs on {target}, which starts from {source} (init_from), but not on {source}"
                )


def validate(protocol: DictConfig) -> None:
    """Refuse a protocol whose references do not resolve (methods, claims and targets name cells)."""
    for key in ("seeds", "subsets", "cells", "methods"):
        if not protocol.get(key):
            raise ConfigError(f"proxy protocol: `{key}` is missing or empty")
    cells = set(protocol.cells.keys())
    for m in protocol.methods:
        if m not in cells:
            raise ConfigError(f"methods: {m!r} is not a cell (cells: {sorted(cells)})")
    for i, claim in enumerate(protocol.get("claims") or []):
        for side in ("a", "b"):
            if claim.get(side) not in cells:
                raise ConfigError(f"claims[{i}] ({claim.get('name')}): {side}={claim.get(side)!r} is not a cell")
    for c in (protocol.get("targets") or {}).get("kl_cells") or []:
        if c not in cells:
            raise ConfigError(f"targets.kl_cells: {c!r} is not a cell")
    for name in cells:
        _strings(protocol.cells[name].get("overrides"), f"cells.{name}.overrides")
        cell_subsets(protocol, name)
    _validate_init_from(protocol)


def expand(
    protocol: DictConfig, out_dir: Path, context: tuple[str, ...] = (), init_root: Path | None = None
) -> list[ProxyRun]:
    """Every run of the protocol: the methods' runs and their no-audio pairs' first, then the other cells',
    each group seed-major (all of seed 1 before seed 2), so a benchmark stopped early has whole seeds of
    the methods table with their listening pairs.
    `context` (the invocation's `paths.*`, not part of the protocol) goes before each run's seed.
    A subset with an `init_from` source gets `model.init_from=<init_root>/<source>/<cell>/seed<k>/
    checkpoints/best.ckpt` (init_root: out_dir unless given) and names that run in `after`."""
    validate(protocol)
    base = _strings(protocol.get("base"), "base")
    extra = _strings(protocol.get("extra_overrides"), "extra_overrides")
    methods = table_cells(protocol)
    others = [c for c in protocol.cells if c not in set(methods)]
    runs = []
    sources = init_sources(protocol)
    init_root = out_dir if init_root is None else init_root
    all_seeds = sorted({k for c in protocol.cells for k in cell_seeds(protocol, c)})
    for group in (methods, others):
        for seed in all_seeds:
            for subset, subset_overrides in protocol.subsets.items():
                subset_part = _strings(subset_overrides, f"subsets.{subset}")
                for cell in group:
                    if subset not in cell_subsets(protocol, cell) or int(seed) not in cell_seeds(protocol, cell):
                        continue
                    cell_overrides = _strings(protocol.cells[cell].get("overrides"), f"cells.{cell}.overrides")
                    source = sources.get(subset)
                    init = (
                        init_root / source / cell / f"seed{int(seed)}" / CHECKPOINT_DIR / BEST_CKPT if source else None
                    )
                    start = (f"{INIT_KEY}={init}",) if init else ()
                    overrides = (*base, *subset_part, *cell_overrides, *start, *extra, *context, f"seed={int(seed)}")
                    run_dir = out_dir / subset / cell / f"seed{int(seed)}"
                    after = f"{source}/{cell}/seed{int(seed)}" if source else None
                    runs.append(ProxyRun(subset, cell, int(seed), overrides, run_dir, after, init))
    return runs


def protocol_node(cfg: DictConfig) -> DictConfig:
    """The part of the script's config that is the protocol (what protocol.yaml holds)."""
    data = {}
    for k in PROTOCOL_KEYS:
        if k in cfg:
            data[k] = OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
    return OmegaConf.create(data)


def _has_finished_runs(out_dir: Path, cell: str) -> bool:
    return any((d / "metrics.json").is_file() for d in out_dir.glob(f"*/{cell}/seed*"))


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def check_same_protocol(out_dir: Path, protocol: DictConfig) -> None:
    """An out_dir whose finished runs were made with other base / subsets / cell overrides is refused.

    New cells may be added to a protocol dir, and a cell without a finished run may change.
    """
    path = out_dir / PROTOCOL_FILE
    if not path.is_file():
        return
    old = OmegaConf.load(path)
    for key in RUN_DEFINING:
        a, b = (_plain(node.get(key)) for node in (old, protocol))
        if key == "cells" and a is not None and b is not None:
            changed = [c for c in b if c in a and a[c].get("overrides") != b[c].get("overrides")]
            changed = [c for c in changed if _has_finished_runs(out_dir, c)]
            if changed:
                raise ConfigError(
                    f"{path}: cells {changed} have finished runs made with other overrides; use another "
                    "out_dir (runs of two protocols are never mixed in one table)"
                )
        elif a != b:
            raise ConfigError(
                f"{path}: `{key}` differs from this protocol's ({a} there, {b} now); use another out_dir "
                "(runs of two protocols are never mixed in one table)"
            )
