"""Reliability and security units: config checks, override hints, atomic checkpoints, untrusted files,
output-path guard, stop signals, the distributed sampler's padding (docs/reliability.md)."""

from __future__ import annotations

import ast
import errno
import os
import pickle
import re
import signal
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from avs.config import PROJECT_ROOT
from avs.config_checks import ConfigError, check_config, override_hints, suggest
from avs.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from avs.engine.sampler import ResumableSampler
from avs.engine.signals import StopSignal
from avs.evaluation.outputs import OutputPathError, check_output_path, save_pred_masks
from tests.conftest import compose_cfg, run_script, tiny_overrides

# ----------------------------------------------------------------------------- bad configs
BAD_CONFIGS = [
    (["data.image_size=100"], r"data\.image_size=100 must be a positive multiple of 32"),
    (["model=avsbg", "data.num_frames=1"], r"model\.motion needs data\.num_frames >= 2"),
    (["eval.num_samples=3"], r"eval\.num_samples=3 .*model\.latent is null"),
    (["model=ecmvae", "model.use_audio=false"], r"model\.latent\.variant=factorised .*model\.use_audio=false"),
    (
        ["model=avsbg", "model.projector.legacy_raw_logits=true"],
        r"model\.projector\.legacy_raw_logits=true is an S4 option",
    ),
    (
        ["model=avsbg", "data=synth_s4", "model.projector_mask=gt"],
        r"model\.projector_mask=gt needs all frames labelled",
    ),
    (["trainer.select_split=test"], r"trainer\.select_split=test .*allow_test_selection"),
    (["~model.auto_weights.avm.ms3"], r"model\.loss_weights\.avm=auto needs model\.auto_weights\.avm\.ms3"),
    (["model.loss_weights.seg=nan"], r"model\.loss_weights\.seg=nan must be finite"),
    (["trainer.grad_accum=0"], r"trainer\.grad_accum must be an integer >= 1"),
    (["trainer.max_consecutive_nonfinite=0"], r"trainer\.max_consecutive_nonfinite must be an integer >= 1"),
    (["trainer.debug_nan_steps=[0]"], r"trainer\.debug_nan_steps must be a list of step numbers >= 1"),
    (["trainer.amp=fp8"], r"trainer\.amp must be auto\|off\|bf16\|fp16"),
    (["data.batch_size=0"], r"data\.batch_size must be an integer >= 1"),
    (["data.on_error=ignore"], r"data\.on_error must be 'raise' or 'skip'"),
    (["eval.protocol=iou"], r"eval\.protocol=iou must be one of eval\.protocols"),
    (
        ["experiment=avsbench_tpavi_pvt_ms3_from_s4"],
        r"config key model\.init_from must be set: it takes its value from s4_checkpoint",
    ),
]


@pytest.mark.parametrize("overrides,message", BAD_CONFIGS, ids=[o[0][-1] for o in BAD_CONFIGS])
def test_impossible_config_fails_naming_the_key(overrides, message, tmp_path):
    cfg = compose_cfg("train", tiny_overrides(tmp_path) + overrides)
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.init_from=/nonexistent/best.ckpt"], r"model\.init_from=/nonexistent/best\.ckpt: file not found"),
        (["trainer.resume=/nonexistent/run"], r"trainer\.resume=/nonexistent/run: neither a checkpoint file nor a run"),
    ],
)
def test_a_missing_file_named_by_a_config_key_is_a_missing_file_error(overrides, message, tmp_path):
    """README exit codes: a file or folder a config key names is missing -> 5, not a config error (2)."""
    from avs.errors import ExitCode, MissingFileError

    with pytest.raises(MissingFileError, match=message) as info:
        check_config(compose_cfg("train", tiny_overrides(tmp_path) + overrides))
    assert info.value.exit_code == ExitCode.MISSING_FILE


def test_config_error_comes_before_any_data_or_model(tmp_path, monkeypatch):
    """The Trainer checks first: no dataset is built, no model is instantiated, nothing is written."""
    import avs.engine.trainer as T

    def boom(*a, **k):
        raise AssertionError("built before the config check")

    monkeypatch.setattr("avs.models.build.build_model", boom)
    cfg = compose_cfg("train", tiny_overrides(tmp_path / "nodata") + ["data.image_size=48"])
    with pytest.raises(ConfigError, match="data.image_size=48"):
        T.Trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "nodata").exists() and not (tmp_path / "run").exists()


def test_valid_tiny_config_passes(tmp_path):
    for model in ("tpavi", "ecmvae", "avsbg", "ecmvae_bg"):
        check_config(compose_cfg("train", tiny_overrides(tmp_path) + [f"model={model}"]))


# ----------------------------------------------------------------------------- override hints
def test_override_hints_suggest_the_nearest_key_and_group_option():
    hints = override_hints(
        [
            "trainer.lrr=1",
            "data.batch_sise=3",
            "model=ecmvea",
            "seed=1,2",
            "+trainer.new_key=1",
            "trainer.lr=0.1",
            "data=synth_s4,synth_ms3",
        ]
    )
    assert len(hints) == 3, hints
    assert "'trainer.lrr'" in hints[1] and "did you mean 'trainer.lr'" in hints[1]
    assert "did you mean 'data.batch_size'" in hints[2]
    assert hints[0].startswith("'model=ecmvea'") and "model=ecmvae" in hints[0]
    assert override_hints(["model=avsbg", "model.projector.hidden=8", "~model.motion"]) == []


def test_override_hint_sees_keys_of_the_chosen_group():
    # model.latent.* exists only once model=ecmvae is chosen; the hint composes with the group choice
    assert override_hints(["model=ecmvae", "model.latent.latent_dim=8"]) == []
    assert "model.latent" in override_hints(["model=tpavi", "model.latent.latent_dm=8"])[0]


def test_suggest_skips_ancestors():
    assert suggest("trainer.lrr", ["trainer", "trainer.lr", "data.lr"]) == ["trainer.lr"]


def test_train_script_prints_hint_for_unknown_key(tmp_path):
    proc = run_script("train.py", ["trainer.lrr=1"], tmp_path)
    assert proc.returncode == 1
    assert "Key 'lrr' is not in struct" in proc.stderr
    assert "hint: unknown config key 'trainer.lrr'" in proc.stderr and "did you mean 'trainer.lr'" in proc.stderr


# ----------------------------------------------------------------------------- atomic checkpoints
def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["replace", "fsync"])
def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch, where):
    import avs.utils.io as io_mod

    path = tmp_path / "ckpt" / "last.ckpt"
    first = {"step": 1, "w": torch.arange(6.0)}
    save_checkpoint(path, first)
    monkeypatch.setattr(io_mod.os, where, _disk_full)
    with pytest.raises(CheckpointError, match=r"No space left on device.*previous file, if any, is intact"):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(6)})
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], first["w"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temp file left behind


def test_truncated_checkpoint_is_refused_with_its_path(tmp_path):
    path = tmp_path / "last.ckpt"
    save_checkpoint(path, {"step": 3, "w": torch.ones(100)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_checkpoint(path)


# ----------------------------------------------------------------------------- untrusted files
class _Payload:
    """Unpickling this object would create `marker` (what a malicious file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_checkpoint_does_not_run_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"model": {"w": torch.zeros(1)}, "config": "{}", "x": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(path)
    assert not marker.exists()
    # every entry point that reads checkpoints goes through load_checkpoint
    from avs.evaluation.checkpoint import evaluate_checkpoint

    ecfg = compose_cfg("eval", [f"checkpoint={path}", f"paths.log_dir={tmp_path}/logs"])
    with pytest.raises(CheckpointError):
        evaluate_checkpoint(ecfg, tmp_path / "out")
    assert not marker.exists()


def test_malicious_pkl_does_not_run_code(tmp_path):
    from avs.data.safe_pickle import UnsafePickleError, load_logmel_pkl

    marker = tmp_path / "pwned"
    path = tmp_path / "clip.pkl"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UnsafePickleError, match="refusing to unpickle global '(io|builtins).open'"):
        load_logmel_pkl(path)
    assert not marker.exists()


def _sources() -> list[Path]:
    return sorted(p for d in ("avs", "scripts") for p in (PROJECT_ROOT / d).rglob("*.py"))


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return ""  # e.g. model.to(dev).eval(): rooted in a call, not a module or builtin
    parts.append(node.id)
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else "<expr>"
    return None


def test_no_eval_exec_shell_or_raw_pickle_in_the_code():
    """Static audit (ast): no eval/exec/shell=True/os.system; pickle only in safe_pickle; safe loaders only."""
    bad = []
    for path in _sources():
        rel = path.relative_to(PROJECT_ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("Unpickler", "load", "loads")
                and _dotted(node.value) in ("pickle", "cPickle", "dill")
                and rel != "avs/data/safe_pickle.py"
            ):
                bad.append(f"{rel}:{node.lineno}: raw pickle {_dotted(node)}")
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            where = f"{rel}:{node.lineno}: {name}"
            if name in (
                "eval",
                "exec",
                "compile",
                "os.system",
                "os.popen",
                "yaml.load",
                "yaml.unsafe_load",
                "marshal.loads",
            ):
                bad.append(where)
            if _kw(node, "shell") not in (None, False):
                bad.append(where + " shell=True")
            if name == "torch.load" and _kw(node, "weights_only") is not True:
                bad.append(where + " without weights_only=True")
            if name in ("np.load", "numpy.load") and _kw(node, "allow_pickle") not in (None, False):
                bad.append(where + " allow_pickle")
    assert bad == []


# ----------------------------------------------------------------------------- outputs never overwrite inputs
def test_output_path_inside_dataset_is_refused(tmp_path):
    root = tmp_path / "avsbench"
    gt = root / "Multi-sources" / "ms3_data" / "gt_masks"
    gt.mkdir(parents=True)
    ckpt = tmp_path / "best.ckpt"
    ckpt.write_bytes(b"x")
    for out in (gt, root, root / "new_folder"):
        with pytest.raises(OutputPathError, match="inside the input"):
            check_output_path(out, [root, ckpt])
    with pytest.raises(OutputPathError):
        check_output_path(ckpt, [root, ckpt])
    link = tmp_path / "innocent"
    link.symlink_to(gt)
    with pytest.raises(OutputPathError):
        check_output_path(link / "pred", [root])
    assert check_output_path(tmp_path / "eval_out", [root, ckpt, None]) == (tmp_path / "eval_out").resolve()


def test_save_pred_masks_refuses_dataset_folder_and_id_escapes(tmp_path):
    class DS:
        root = tmp_path / "data"

    DS.root.mkdir()
    batch = {"video_id": ["v1"], "category": [""]}
    logits = torch.zeros(1, 2, 1, 8, 8)
    with pytest.raises(OutputPathError):
        save_pred_masks(DS.root / "gt_masks", DS(), batch, logits)
    with pytest.raises(OutputPathError, match="outside"):
        save_pred_masks(tmp_path / "out", DS(), {"video_id": ["../../escape"], "category": [""]}, logits)
    written = save_pred_masks(tmp_path / "out", DS(), batch, logits)
    assert [p.name for p in written] == ["v1_1.png", "v1_2.png"]


def test_eval_refuses_save_masks_into_the_dataset(tmp_path):
    from avs.evaluation.checkpoint import evaluate_checkpoint

    root = tmp_path / "data_root"
    (root / "gt_masks").mkdir(parents=True)
    train_cfg = compose_cfg("train", tiny_overrides(tmp_path))
    cfg_yaml = OmegaConf.to_yaml(train_cfg, resolve=True).replace(str(train_cfg.data.root), str(root))
    ckpt = tmp_path / "best.ckpt"
    save_checkpoint(ckpt, {"model": {}, "config": cfg_yaml})
    ecfg = compose_cfg("eval", [f"checkpoint={ckpt}", "save_masks=true", f"paths.log_dir={tmp_path}/logs"])
    with pytest.raises(OutputPathError, match="gt_masks"):
        evaluate_checkpoint(ecfg, root / "gt_masks")


# ----------------------------------------------------------------------------- stop signals
def test_stop_signal_sets_flag_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        assert stop.installed and not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM keeps the first request
        assert stop.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_second_sigint_aborts_at_once():
    with pytest.raises(KeyboardInterrupt):
        with StopSignal() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.name == "SIGINT"
            os.kill(os.getpid(), signal.SIGINT)


# ----------------------------------------------------------------------------- distributed sampler
@pytest.mark.parametrize("n,world", [(7, 2), (2, 4), (1, 3), (8, 4)])
def test_sampler_shards_are_equal_and_cover_every_index(n, world):
    shards = [list(ResumableSampler(n, shuffle=True, seed=3, num_replicas=world, rank=r)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == -(-n // world)
    assert sorted(set(sum(shards, []))) == list(range(n))
    with pytest.raises(ValueError, match="rank"):
        ResumableSampler(n, num_replicas=world, rank=world)
