"""Overrides a script cannot honour are refused by name before Hydra starts, never dropped.

Two kinds reach a script's config without an error from Hydra and would then be ignored:

* a group or key of the *model* on a script that takes the model from a checkpoint (eval.py,
  uncertainty.py, latent_kl.py, visualize.py, demo.py, export.py): `+model=ecmvae`,
  `+backbone.name=x`, ... (`model=ecmvae` itself fails in Hydra, whose hint suggests the `+` form);
* a key added with `+key=` that no code reads: outside a node that is instantiated (`_target_`, whose
  class then checks its arguments: `+trainer.optimizer.amsgrad=true`) or an open node (`model.*`,
  where a method adds its own parts), e.g. `+trainer.lrr=1` or `+data.foo=1`; a new entry of a map whose
  entries are all read (`ENTRY_MAPS`: `+hooks.<name>=`, `+eval.evaluators.<name>=`) is accepted.

* a `data.<key>=` that no data config has, on a script that merges it into the checkpoint's data config.

`check_overrides` raises ConfigError (exit code 2) naming the override and why; `+debug=true` (tracebacks)
is always accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig

from avs.errors import ConfigError

# Groups and keys fixed by a checkpoint: its model and the training config it was made with.
FROM_CHECKPOINT: tuple[str, ...] = (
    "model",
    "backbone",
    "audio",
    "motion",
    "projector",
    "optimizer",
    "scheduler",
    "trainer",
    "experiment",
    "recipe",
)
ALWAYS_ADDABLE: tuple[str, ...] = ("debug",)
# Maps of name -> instantiated node whose every entry is read: `+hooks.<name>={_target_: ...}` adds a hook
# (avs.engine.hook_config), `+eval.evaluators.<name>={_target_: ...}` an evaluator (avs.evaluation).
ENTRY_MAPS: tuple[str, ...] = ("hooks", "eval.evaluators")


def _key(arg: str) -> str:
    return arg.split("=", 1)[0].lstrip("+~")


def _top(key: str) -> str:
    return key.split(".", 1)[0].split("/", 1)[0]


def _instantiated_parent(cfg: Any, key: str) -> bool:
    """True when an existing node on the path of `key` is instantiated (`_target_`): its class checks the key."""
    node = cfg
    for part in key.split(".")[:-1]:
        if not isinstance(node, DictConfig) or part not in node:
            return False
        node = node[part]
        if isinstance(node, DictConfig) and "_target_" in node:
            return True
    return False


def refuse_model_overrides(argv: Sequence[str], script: str) -> None:
    """ConfigError for an override of the model or its training config on a script that loads a checkpoint."""
    for arg in argv:
        if arg.startswith("-") or ("=" not in arg and not arg.startswith("~")):
            continue
        if _top(_key(arg)) in FROM_CHECKPOINT:
            raise ConfigError(
                f"{arg}: {script} takes the model and its training config from the checkpoint, so this override "
                "cannot be honoured; evaluate a checkpoint of the model you want (train it, or import it with "
                "scripts/import_checkpoint.py)"
            )


def refuse_unread_additions(argv: Sequence[str], script: str, config_name: str, open_nodes: Sequence[str] = ()) -> None:
    """ConfigError for a `+key=` that the script's config has no reader for (see the module doc)."""
    added = [a for a in argv if a.startswith("+") and "=" in a]
    added = [a for a in added if _top(_key(a)) not in (*ALWAYS_ADDABLE, *open_nodes)]
    if not added:
        return
    from avs.config import CONFIG_DIR, compose_config

    try:
        cfg = compose_config(config_name, [a for a in argv if "=" in a and a not in added])
    except Exception:  # noqa: BLE001  (a rejected command line: Hydra reports it, with hints)
        return
    for arg in added:
        if (CONFIG_DIR / _key(arg).replace(".", "/")).is_dir():  # a config group appended: Hydra places it
            continue
        if _key(arg).rpartition(".")[0] in ENTRY_MAPS:  # a new entry of a map whose entries are all read
            continue
        if not _instantiated_parent(cfg, _key(arg)):
            raise ConfigError(
                f"{arg}: {script} has no config key {_key(arg)!r} and nothing would read it (it would be "
                "ignored); check the spelling against the config (python " + f"{script} --cfg job)"
            )


def data_keys() -> set[str]:
    """The keys a data config can have: those of every configs/data/**/*.yaml."""
    from omegaconf import OmegaConf

    from avs.config import CONFIG_DIR

    keys: set[str] = set()
    for path in sorted((CONFIG_DIR / "data").rglob("*.yaml")):  # the groups and their bases
        node = OmegaConf.load(path)
        keys.update(str(k) for k in node.keys() if str(k) != "defaults")
    return keys


def refuse_unknown_data_keys(argv: Sequence[str], script: str) -> None:
    """ConfigError for `data.<key>=` where no data config has <key> (it would change nothing that is read)."""
    known = data_keys()
    for arg in argv:
        key = _key(arg)
        if "=" in arg and key.startswith("data.") and key.split(".")[1] not in known:
            raise ConfigError(
                f"{arg}: no data config has the key {key.split('.')[1]!r}, so {script} would ignore it "
                f"(data keys: {', '.join(sorted(known))})"
            )


def check_overrides(
    argv: Sequence[str],
    script: str,
    config_name: str,
    *,
    from_checkpoint: bool = False,
    open_nodes: Sequence[str] = (),
) -> None:
    """Refuse every override `script` would drop: model overrides (when it loads a checkpoint), unread `+key=`."""
    if from_checkpoint:
        refuse_model_overrides(argv, script)
    if "data" in open_nodes:  # a data config merged into the checkpoint's: its keys are checked here
        refuse_unknown_data_keys(argv, script)
    refuse_unread_additions(argv, script, config_name, open_nodes)
