"""Checks of a composed config that fail early, before any data is loaded, naming the keys.

`check_config(cfg)` raises `ConfigError` for impossible or unsafe combinations (docs/reliability.md lists
each case and its test). `override_hints(argv)` explains a rejected override with the nearest valid names.
"""

from __future__ import annotations

import difflib
import math
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from avs.config_checks_avss import check_semantic
from avs.data.audio import EMBEDDING_DIM
from avs.data.layout import LAYOUTS, labelled_frames_name
from avs.data.options import check_data_options
from avs.engine.rundir import CHECKPOINT_DIR, LAST_CKPT
from avs.errors import ConfigError, MissingFileError  # noqa: F401  (ConfigError, MissingFileError re-exported)
from avs.models.build import check_loss_terms, model_capabilities
from avs.models.segmentor import Capabilities

AMP_CHOICES = ("auto", "off", "false", "False", "none", "None", "bf16", "fp16")
# Keys that became config groups: what to write instead.
MOVED_KEYS = {
    "trainer.schedule": "the lr schedule is the config group scheduler=constant|cosine|poly (configs/scheduler/)",
}


# --------------------------------------------------------------------------------------------
# composed-config checks
# --------------------------------------------------------------------------------------------
def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError for combinations that cannot work (see docs/reliability.md)."""
    _check_resolvable(cfg)
    data, model, trainer = cfg.data, cfg.model, cfg.trainer
    if "seed" in cfg:
        _integer(cfg.seed, "seed")
    _check_targets(cfg)
    caps = model_capabilities(model)
    _check_data(data)
    check_semantic(cfg, caps)
    _check_model(cfg, data, model, caps)
    check_loss_terms(model, caps)
    _check_trainer(trainer)
    _check_latent_remedies(model, trainer, caps)
    if cfg.get("eval") is not None:
        _check_eval(cfg.eval, model, caps)


def _check_resolvable(cfg: DictConfig) -> None:
    """Every value resolves: `???` placeholders and broken interpolations are reported by key."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as exc:
        key = exc.full_key or "?"
        raise ConfigError(
            f"config key {key} must be set (it is '???'): pass {key}=<value> on the command line"
        ) from None
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        msg = str(getattr(exc, "msg", exc))
        ref = re.search(r"Missing mandatory value: ([\w.]+)", msg)
        if ref:  # e.g. model.init_from: ${s4_checkpoint} with s4_checkpoint: ???
            raise ConfigError(
                f"config key {key} must be set: it takes its value from {ref.group(1)}, which is '???' "
                f"(pass {ref.group(1)}=<value> or {key}=<value>)"
            ) from None
        raise ConfigError(f"config key {key} does not resolve: {msg}") from None


def _number(value: Any, key: str) -> float:
    """`value` as a finite float, or ConfigError "key: expected a number, got 'abc'"."""
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return out


def _integer(value: Any, key: str) -> int:
    """`value` as an int, or ConfigError "key: expected an integer, got 'abc'"."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    try:
        out = float(value) if not isinstance(value, int) else value
    except ValueError:
        raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if isinstance(out, float) and not out.is_integer():
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    return int(out)


def _positive_int(value: Any, key: str, minimum: int = 1) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}") from None
    if out < minimum or (isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return out


_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


def _check_targets(cfg: DictConfig, node: Any = None, path: str = "") -> None:
    """Every `_target_` node sets only parameters its class or function takes (else a TypeError at build time)."""
    import inspect

    from hydra.utils import get_object

    node = cfg if node is None else node
    if not isinstance(node, DictConfig):
        return
    target = node.get("_target_") if "_target_" in node else None
    if isinstance(target, str):
        try:
            obj = get_object(target)
        except Exception as exc:  # noqa: BLE001  (import errors of any kind)
            raise ConfigError(f"{path or '<root>'}._target_={target}: cannot be imported ({exc})") from None
        try:
            params = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            params = None
        if hasattr(obj, "config_keys"):  # a segmentor: its constructor chain's parameters and its CONFIG_KEYS
            params = obj.config_keys()
        elif params is not None and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            params = None
        if params is not None:
            skip = _HYDRA_KEYS | ({"priority"} if path.startswith("hooks.") else set())  # avs.engine.hook_config
            unknown = [k for k in node.keys() if k not in skip and k not in params]
            if unknown:
                where = path or "<root>"
                raise ConfigError(
                    f"{', '.join(f'{where}.{k}' for k in unknown)}: not parameters of {target} (the {where} config); "
                    f"they were set for another choice of {where.split('.')[0]}, "
                    "e.g. by an experiment overlay written for "
                    f"it: choose that one, or remove them (~{where}.{unknown[0]})"
                )
    for key in node.keys():
        if key in ("hydra", "paths"):
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            _check_targets(cfg, child, f"{path}.{key}" if path else str(key))


def _check_data(data: DictConfig) -> None:
    if data.subset not in LAYOUTS and data.subset != "avss":
        raise ConfigError(f"data.subset must be 's4', 'ms3' or 'avss', got {data.subset!r}")
    size = _positive_int(data.image_size, "data.image_size")
    if size % 32 != 0:
        raise ConfigError(f"data.image_size={size} must be a positive multiple of 32 (the backbone's output stride)")
    _positive_int(data.num_frames, "data.num_frames")
    _positive_int(data.batch_size, "data.batch_size")
    _positive_int(data.eval_batch_size, "data.eval_batch_size")
    _positive_int(data.num_workers, "data.num_workers", minimum=0)
    check_data_options(data.audio_source, data.on_error)
    flip = _number(data.flip_prob or 0.0, "data.flip_prob")
    if not 0.0 <= flip <= 1.0:
        raise ConfigError(f"data.flip_prob={flip} must lie in [0, 1]")


def _check_model(cfg: DictConfig, data: DictConfig, model: DictConfig, caps: Capabilities) -> None:
    if model.get("motion") is not None and int(data.num_frames) < 2:
        raise ConfigError(f"model.motion needs data.num_frames >= 2 (got {data.num_frames}); set model.motion=null")
    use_audio = bool(model.get("use_audio", True))
    if data.audio_source != "embedding" and use_audio and model.get("audio_encoder") is None:
        raise ConfigError(
            "model.audio_encoder is null but data.audio_source gives log-mel audio: "
            "set audio=vggish|tiny or data.audio_source=embedding"
        )
    if data.audio_source == "embedding" and use_audio:
        _check_embedding_audio(model)
    if caps.audio_required and not use_audio:
        hint = " or model.latent.variant=visual_only" if caps.latent else ""
        raise ConfigError(f"{caps.audio_required} but model.use_audio=false: set model.use_audio=true{hint}")
    projector = model.get("projector")
    mask_mode = str(model.get("projector_mask", "auto"))
    if caps.projector:
        all_labelled = data.subset != "avss" and labelled_frames_name(str(data.subset), "train") == "all"  # layout.py
        if mask_mode == "gt" and not all_labelled:
            raise ConfigError(
                f"model.projector_mask=gt needs all frames labelled; {data.subset} trains on frame 0 only "
                "(use auto or pred)"
            )
        gt_used = mask_mode == "gt" or (mask_mode == "auto" and all_labelled)
        if projector.get("legacy_raw_logits", False) and gt_used:
            raise ConfigError(
                f"model.projector.legacy_raw_logits=true is an S4 option (the AVS-BG S4 code pooled raw logits); "
                f"with data.subset={data.subset} and model.projector_mask={mask_mode} the projector pools the "
                "ground-truth mask and the flag would silently do nothing: drop it or set model.projector_mask=pred"
            )
    weights = model.get("loss_weights") or {}
    auto = model.get("auto_weights") or {}
    for term, w in weights.items():
        if w == "auto":
            table = auto.get(term) if auto else None
            if table is None or data.subset not in table:
                raise ConfigError(
                    f"model.loss_weights.{term}=auto needs model.auto_weights.{term}.{data.subset} "
                    f"(data.subset={data.subset}); set it or give model.loss_weights.{term} a number"
                )
        else:
            try:
                value = float(w)
            except (TypeError, ValueError):
                raise ConfigError(f"model.loss_weights.{term} must be a number or 'auto', got {w!r}") from None
            if not math.isfinite(value):
                raise ConfigError(f"model.loss_weights.{term}={w} must be finite")
    init_from = model.get("init_from")
    if init_from and not Path(str(init_from)).expanduser().is_file():
        raise MissingFileError(
            f"model.init_from={init_from}: file not found (give an avs checkpoint, e.g. <S4 run>/checkpoints/best.ckpt)"
        )


def check_kl_warmup(steps: Any, start: Any, cycle_steps: Any) -> int:
    """The one rule of `trainer.kl_warmup` (config check and KLWarmupHook) -> steps; ConfigError naming the key."""
    steps = _positive_int(steps or 0, "trainer.kl_warmup.steps", minimum=0)
    cycle = _positive_int(cycle_steps or 0, "trainer.kl_warmup.cycle_steps", minimum=0)
    start = _number(start or 0.0, "trainer.kl_warmup.start")
    if not 0.0 <= start <= 1.0:
        raise ConfigError(f"trainer.kl_warmup.start={start} must lie in [0, 1] (a fraction of the kl weight)")
    if cycle and cycle < max(steps, 1):
        raise ConfigError(f"trainer.kl_warmup.cycle_steps={cycle} must be 0 or >= trainer.kl_warmup.steps={steps}")
    return steps


def _check_latent_remedies(model: DictConfig, trainer: DictConfig, caps: Capabilities) -> None:
    """model.latent.free_bits, trainer.kl_warmup and trainer.record_latent_kl (docs/ecmvae_notes.md)."""
    from avs.models.latent_parts import FREE_BITS_DIVERGENCES

    latent = model.latent if caps.latent else None
    variant = str(latent.variant) if latent is not None else None
    has_kl = "kl" in caps.loss_terms
    free_bits = _number(latent.get("free_bits", 0.0) or 0.0, "model.latent.free_bits") if latent is not None else 0.0
    if free_bits < 0:
        raise ConfigError(f"model.latent.free_bits={free_bits} must be >= 0 (nats per dimension; 0 = off)")
    if free_bits > 0 and not has_kl:
        raise ConfigError(f"model.latent.free_bits={free_bits}: variant=ae has no KL term to floor; set it to 0")
    divergence = str(latent.divergence) if latent is not None else None
    if free_bits > 0 and variant == "factorised" and divergence not in FREE_BITS_DIVERGENCES:
        raise ConfigError(
            f"model.latent.free_bits={free_bits} floors a divergence per dimension, but divergence={divergence} "
            f"is a sampled estimate that does not split over dimensions: use one of {list(FREE_BITS_DIVERGENCES)}"
        )
    warmup = trainer.get("kl_warmup") or {}
    steps = check_kl_warmup(warmup.get("steps", 0), warmup.get("start", 0.0), warmup.get("cycle_steps", 0))
    if steps and not has_kl:
        raise ConfigError(
            f"trainer.kl_warmup.steps={steps} ramps the kl loss weight, but model {model.get('name')!r} has no KL "
            "term (no latent, or variant=ae): set trainer.kl_warmup.steps=0"
        )
    if bool(trainer.get("record_latent_kl", False)) and not caps.latent:
        raise ConfigError(
            f"trainer.record_latent_kl=true records the latent's per-dimension KL, but model {model.get('name')!r} "
            "has no latent part: set it to false"
        )


def _check_embedding_audio(model: DictConfig) -> None:
    """data.audio_source=embedding feeds cached 128-d VGGish embeddings and skips the audio network.

    So the network must be the frozen VGGish the cache was made with (or none): a trainable encoder
    (audio=tiny, or VGGish with trainable=true) would never run nor learn, and its unused parameters
    break DDP's gradient reduction at the second step; and model.audio_dim must be 128.
    """
    enc = model.get("audio_encoder")
    if enc is not None:
        target = str(enc.get("_target_", ""))
        if not target.endswith("VGGish"):
            raise ConfigError(
                f"data.audio_source=embedding feeds cached {EMBEDDING_DIM}-d VGGish embeddings and skips the audio "
                f"network, but model.audio_encoder is {target.rsplit('.', 1)[-1] or enc} (trained with the model, "
                "never run on embeddings): set audio=vggish (frozen), or data.audio_source=logmel to train this encoder"
            )
        if bool(enc.get("trainable", False)):
            raise ConfigError(
                "data.audio_source=embedding skips the audio network, but audio.trainable=true asks to fine-tune "
                "VGGish (its parameters would get no gradient; DDP fails at the second step): set "
                "audio.trainable=false, or data.audio_source=logmel to fine-tune it"
            )
    dim = model.get("audio_dim", EMBEDDING_DIM)
    if int(dim) != EMBEDDING_DIM:
        raise ConfigError(
            f"data.audio_source=embedding feeds {EMBEDDING_DIM}-d VGGish embeddings but model.audio_dim={dim}: "
            f"set model.audio_dim={EMBEDDING_DIM} (and audio=vggish), or data.audio_source=logmel"
        )


def _check_trainer(trainer: DictConfig) -> None:
    split = str(trainer.select_split)
    if split not in ("val", "test"):
        raise ConfigError(f"trainer.select_split must be 'val' (or 'test' with allow_test_selection), got {split!r}")
    if split == "test" and not trainer.allow_test_selection:
        raise ConfigError(
            "trainer.select_split=test selects checkpoints on the test split; this is refused unless "
            "trainer.allow_test_selection=true is set explicitly (the AVS-BG release did this; see docs/protocols.md)"
        )
    if str(trainer.amp) not in AMP_CHOICES:
        raise ConfigError(f"trainer.amp must be auto|off|bf16|fp16, got {trainer.amp!r}")
    _positive_int(trainer.grad_accum, "trainer.grad_accum")
    _positive_int(trainer.max_consecutive_nonfinite, "trainer.max_consecutive_nonfinite")
    for key in ("checkpoint_every_steps", "interrupt_after_steps", "max_steps", "epochs", "log_every_steps"):
        _positive_int(trainer[key] or 0, f"trainer.{key}", minimum=0)
    if int(trainer.max_steps or 0) == 0 and int(trainer.epochs or 0) < 1:
        raise ConfigError(
            f"trainer.epochs must be >= 1 (got {trainer.epochs}), or give the length as trainer.max_steps > 0: "
            "a run of 0 steps would report the numbers of an untrained model"
        )
    _positive_int(trainer.val_every_epochs, "trainer.val_every_epochs")
    for key in ("lr", "weight_decay", "grad_clip"):
        if key in trainer and _number(trainer.get(key) or 0, f"trainer.{key}") < 0:
            raise ConfigError(f"trainer.{key}={trainer.get(key)} must be >= 0")
    allow = trainer.get("resume_allow_changes") or []
    if not isinstance(allow, (list, ListConfig)) or not all(isinstance(k, str) and k for k in allow):
        raise ConfigError(
            f"trainer.resume_allow_changes must be a list of config keys, e.g. [trainer.lr], got {allow!r}"
        )
    steps = trainer.get("debug_nan_steps") or []
    if not isinstance(steps, (list, ListConfig)) or not all(isinstance(s, int) and s >= 1 for s in steps):
        raise ConfigError(f"trainer.debug_nan_steps must be a list of step numbers >= 1, got {steps!r}")
    if str(trainer.find_unused_parameters) not in ("auto", "True", "False", "true", "false"):
        raise ConfigError(
            f"trainer.find_unused_parameters must be auto|true|false, got {trainer.find_unused_parameters!r}"
        )
    resume = trainer.get("resume")
    if resume not in (None, "", "auto"):
        p = Path(str(resume)).expanduser()
        if not (p.is_file() or (p / CHECKPOINT_DIR / LAST_CKPT).is_file() or (p / LAST_CKPT).is_file()):
            raise MissingFileError(
                f"trainer.resume={resume}: neither a checkpoint file nor a run directory holding "
                f"{CHECKPOINT_DIR}/{LAST_CKPT} (use trainer.resume=auto to continue the current run dir)"
            )


def _check_eval(ecfg: DictConfig, model: DictConfig, caps: Capabilities) -> None:
    protocols = list(ecfg.protocols or [])
    if protocols and ecfg.get("protocol") not in protocols:
        raise ConfigError(f"eval.protocol={ecfg.get('protocol')} must be one of eval.protocols={protocols}")
    samples = _positive_int(ecfg.num_samples, "eval.num_samples")
    if samples > 1 and not caps.latent:
        raise ConfigError(
            f"eval.num_samples={samples} draws latent samples but model.latent is null "
            f"(model {model.get('name')!r} is deterministic): use eval.num_samples=1 or a latent model"
        )
    _positive_int(ecfg.legacy_batch_size, "eval.legacy_batch_size")


# --------------------------------------------------------------------------------------------
# input files named by the config (checked before any model is built)
# --------------------------------------------------------------------------------------------
def _weight_files(node: Any, path: str) -> list[tuple[str, str]]:
    """(key, file) of every weight file a `_target_` node below `node` will read at build time."""
    out: list[tuple[str, str]] = []
    if not isinstance(node, DictConfig):
        return out
    pretrained = node.get("pretrained") if "pretrained" in node else None
    if "_target_" in node and (pretrained is True or str(pretrained).lower() in ("file", "true")):
        if node.get("weights_path"):
            out.append((f"{path}.weights_path", str(node.weights_path)))
        if node.get("postprocess") and node.get("pca_path"):
            out.append((f"{path}.pca_path", str(node.pca_path)))
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            out += _weight_files(child, f"{path}.{key}")
    return out


def check_files(cfg: DictConfig) -> None:
    """Raise MissingFileError, naming the key, for a missing data root (non-synthetic data) or weight file."""
    data = cfg.data
    root = Path(str(data.root)).expanduser()
    if not data.get("synthetic") and not root.is_dir():
        raise MissingFileError(
            f"data.root={data.root}: no such folder (give the AVSBench-object folder that holds "
            f"{'Single-source' if data.subset == 's4' else 'Multi-sources'}/, e.g. data.root=/path/to/AVSBench-object "
            "or AVS_AVSBENCH_ROOT=...; check it with scripts/check_data.py)"
        )
    seen = set()
    no_audio = not bool(cfg.model.get("use_audio", True))  # the model then builds no audio encoder
    for name in ("backbone", "audio", "model"):
        for key, file in _weight_files(cfg.get(name), name) if cfg.get(name) is not None else []:
            if no_audio and (name == "audio" or key.startswith("model.audio_encoder.")):
                continue
            if file in seen:
                continue  # model.audio_encoder is a copy of audio
            seen.add(file)
            if not Path(file).expanduser().is_file():
                raise MissingFileError(
                    f"{key}={file}: weight file not found (put it there, point paths.weights_dir / AVS_WEIGHTS_DIR "
                    f"at the folder holding it, or set {key.rsplit('.', 1)[0]}.pretrained "
                    "to null/false for random init)"
                )


# --------------------------------------------------------------------------------------------
# multirun sweeps: every job's config and files, before the first job starts
# --------------------------------------------------------------------------------------------
def is_multirun(argv: list[str]) -> bool:
    """True when the command line asks Hydra for a sweep (-m / --multirun / hydra.mode=MULTIRUN)."""
    return any(a in ("-m", "--multirun") or a.replace(" ", "") == "hydra.mode=MULTIRUN" for a in argv)


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The override list of every job of a basic sweep (the product of the `a=1,2` values); [] if unparsable."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("-")])
    except Exception:  # noqa: BLE001  (a syntax error: Hydra's own message says where)
        return []
    axes: list[list[str]] = []
    for o in parsed:
        key = o.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            continue
        if o.is_sweep_override():
            axes.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([o.input_line])
    return [list(job) for job in itertools.product(*axes)]


def check_sweep(overrides: list[str], config_name: str = "train", config_dir: str | Path | None = None) -> int:
    """Compose every job of a sweep and run `check_config` and `check_files` on it -> the number of jobs.

    The first failing job raises its error (ConfigError / MissingFileError) with the job's overrides
    in front of the message, so a sweep with a bad value or a missing file stops before any job runs.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from avs.config import CONFIG_DIR

    root = Path(config_dir) if config_dir is not None else CONFIG_DIR
    jobs = sweep_jobs(overrides)
    # hydra.searchpath=[file:///...] finds a researcher's own configs (docs/adding_a_method.md): every job uses it
    searchpath = [o for o in overrides if o.split("=", 1)[0] == "hydra.searchpath"]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(Path(root).resolve()), version_base="1.3"):
            for i, job in enumerate(jobs):
                try:
                    cfg = compose(config_name, overrides=searchpath + job)
                except Exception:  # noqa: BLE001  (a rejected override: Hydra reports it, with hints)
                    return i
                try:
                    check_config(cfg)
                    check_files(cfg)
                except (ConfigError, MissingFileError) as exc:
                    raise type(exc)(
                        f"sweep job #{i} of {len(jobs)} ({' '.join(job)}): {exc}; no job was started"
                    ) from None
    finally:
        GlobalHydra.instance().clear()
    return len(jobs)


# --------------------------------------------------------------------------------------------
# command-line override hints
# --------------------------------------------------------------------------------------------
def config_keys(cfg: DictConfig | ListConfig, prefix: str = "") -> list[str]:
    """Every dotted key path of `cfg` (nodes and leaves), without resolving interpolations."""
    out: list[str] = []
    if isinstance(cfg, DictConfig):
        for k in cfg.keys():
            path = f"{prefix}{k}"
            out.append(path)
            node = cfg._get_node(k)
            if isinstance(node, (DictConfig, ListConfig)) and not node._is_missing() and not node._is_none():
                if isinstance(node, DictConfig):
                    out += config_keys(node, path + ".")
    return out


def suggest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Nearest candidates to `name` (difflib), best first; also matches on the last dotted component."""
    candidates = [c for c in dict.fromkeys(candidates) if not name.startswith(c + ".")]  # no ancestors
    best = difflib.get_close_matches(name, candidates, n=n, cutoff=0.6)
    parent, _, leaf = name.rpartition(".")
    siblings = [c for c in candidates if c.rpartition(".")[0] == parent]
    for c in difflib.get_close_matches(leaf, [s.rpartition(".")[2] for s in siblings], n=n, cutoff=0.5):
        full = f"{parent}.{c}" if parent else c
        if full not in best:
            best.append(full)
    return best[:n]


def _group_option_hints(root: Path, key: str, values: list[str]) -> list[str]:
    """One hint per value that names no config file of group `key`, with the nearest options (an old per-subset
    experiment name gets its merged overlay plus data=<subset>)."""
    options = sorted(p.stem for p in (root / key).glob("*.yaml"))
    hints = []
    for v in values:
        if v in options or v == "null":
            continue
        near = suggest(v, options)
        stem, _, subset = v.rpartition("_")
        if key == "experiment" and subset in ("s4", "ms3") and stem in options:  # the merged s4/ms3 overlays
            near = [f"{stem} data={subset}"]
        mean = f"; did you mean {' or '.join(f'{key}={s}' for s in near)}?" if near else ""
        hints.append(f"'{key}={v}': no config {key}/{v}.yaml{mean} (options: {', '.join(options)})")
    return hints


def _known_keys(root: Path, config_name: str, groups: list[str]) -> list[str] | None:
    """Every key of `config_name` composed with the group choices `groups`; None when it does not compose."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(root.resolve()), version_base="1.3"):
            cfg = compose(config_name, overrides=groups)
    except Exception:
        return None
    finally:
        GlobalHydra.instance().clear()
    return config_keys(cfg)


def _unknown_key_hint(key: str, line: str, known: list[str]) -> str | None:
    """The hint for override `line` setting `key`: where a moved key went, or the nearest known keys."""
    if key in known:
        return None
    msg = f"unknown config key '{key}' (in '{line}')"
    if key in MOVED_KEYS:
        return f"{msg}: {MOVED_KEYS[key]}"
    near = suggest(key, known)
    if near:
        msg += f"; did you mean {' or '.join(repr(s) for s in near)}?"
    return msg + f" A new key ('+{line}') is accepted only where it is read: under model or a _target_ node."


def override_hints(overrides: list[str], config_name: str = "train", config_dir: str | Path | None = None) -> list[str]:
    """Explain each command-line override that names an unknown key or group option, with suggestions.

    Returns one message per bad override (empty when every override is valid or the list does not
    parse). Keys added with `+`/`++`, deletions and `hydra.*` overrides are not checked.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from avs.config import CONFIG_DIR

    root = Path(config_dir) if config_dir is not None else CONFIG_DIR
    try:
        parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("-")])
    except Exception:  # a syntax error: Hydra's own message says where
        return []
    hints: list[str] = []
    groups: list[str] = []
    keys: list[tuple[str, str]] = []
    for o in parsed:
        key = o.key_or_group
        if o.is_add() or o.is_force_add() or o.is_delete() or key == "hydra" or key.startswith(("hydra.", "hydra/")):
            continue
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        if (root / key).is_dir():
            bad = _group_option_hints(root, key, values)
            hints += bad
            if not bad:
                groups.append(f"{key}={values[0]}")
        else:
            keys.append((key, o.input_line or key))
    known = _known_keys(root, config_name, groups) if keys else None
    if known is None:
        return hints
    return hints + [h for key, line in keys if (h := _unknown_key_hint(key, line, known)) is not None]


@contextmanager
def hints_on_rejection(user_args: list[str], config_name: str = "train") -> Iterator[None]:
    """Around a Hydra main: when Hydra rejects the command line (exit code 1), print `hint:` lines for
    the overrides it could not place (`override_hints`), then let the exit go on."""
    try:
        yield
    except SystemExit as exc:
        if exc.code == 1:  # Hydra's exit code for a rejected override (and for errors in the run)
            for hint in override_hints([a for a in user_args if "=" in a], config_name=config_name):
                print(f"hint: {hint}", file=sys.stderr)
        raise
