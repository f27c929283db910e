"""Read the proxy benchmark's tracked results file (docs/results/proxy_runs.jsonl) as tables read a run dir.

The runner writes one line per finished run (avs/proxy/results.py) and, beside the file, the
protocol of each version as `proxy_protocol_v<version>.yaml` (with its ceilings). This module
turns the lines of one protocol version into the `(protocol, results)` pair of `load_protocol`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from avs.tables.proxy import ProtocolNotFound, Results, _check_names, read_jsonl
from avs.tables.proxy_listening import listening_values
from avs.tables.runs import TableError


def protocol_file(results: Path, version: Any) -> Path:
    """The protocol snapshot of `version` beside a results file."""
    return results.parent / f"proxy_protocol_v{version}.yaml"


def _row_values(row: dict[str, Any]) -> dict[str, float | None]:
    test, val = row.get("test") or {}, row.get("val") or {}
    values: dict[str, float | None] = {"miou": test.get("miou"), "fscore": test.get("fscore")}
    values.update({"val_miou": val.get("miou"), "val_fscore": val.get("fscore"), "miou_se": test.get("miou_se")})
    values.update(row.get("latent") or {"kl": None, "active_dims": None, "auroc": None, "auroc_entropy": None})
    values.update(listening_values(row.get("listening")))
    return values


def load_results_file(path: str | Path, version: Any = None) -> tuple[DictConfig, Results]:
    """(protocol, results) of the lines of protocol `version` (default: the highest) in a results file."""
    path = Path(path)
    rows = [row for _, row in read_jsonl(path)]
    versions = sorted({r.get("protocol_version") for r in rows if r.get("protocol_version") is not None})
    if version is None:
        if not versions:
            raise TableError(f"{path}: no line with a protocol_version")
        version = versions[-1]
    snapshot = protocol_file(path, version)
    if not snapshot.is_file():
        raise ProtocolNotFound(f"{snapshot}: no protocol of version {version} beside {path.name}")
    protocol = OmegaConf.load(snapshot)
    for key, default in (("methods", []), ("claims", []), ("targets", {}), ("metric", "miou"), ("ceilings", {})):
        if protocol.get(key) is None:
            protocol[key] = default
    _check_names(protocol, snapshot)
    results: Results = {}
    for row in rows:
        if row.get("protocol_version") == version:
            results.setdefault((row["subset"], row["cell"]), {})[int(row["seed"])] = _row_values(row)
    return protocol, results
