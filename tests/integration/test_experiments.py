"""Every paper experiment overlay composes over the tiny CPU config and trains one step.

Each overlay (configs/experiment/*.yaml) is composed with `tiny_overrides` applied after it
(synthetic data, pvt_v2_b0, tiny audio encoder, 64 px, T = 3; channels and audio width 32), then
checked and built exactly as the trainer does, and one Adam step is taken on a synthetic batch.
The main overlays (one per method x backbone) take their subset from `data=`. Overlays built on
configs/recipe/ms3_from_s4.yaml (S4 -> MS3 rows, `s4_checkpoint: ???`) are run through the Trainer
with a checkpoint written by the test. Overlays with `hydra.sweeper.params` are expanded like
Hydra's basic sweeper.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationToMissingValueError

from avs.config import CONFIG_DIR
from avs.config_checks import ConfigError, check_config
from avs.engine.build import resolve_loss_weights
from avs.engine.checkpoint import save_checkpoint
from avs.engine.trainer import Trainer
from avs.models.build import build_model
from tests.conftest import compose_cfg, tiny_overrides

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
# CPU proxy overlays (Sounding Shapes), not paper rows.
PROXY_EXPERIMENTS = ("quickstart", "quickstart_avss", "proxy_pretrained", "proxy")
# AVSS overlays: 10-frame semantic clips, covered by tests/integration/test_avss_train.py
AVSS_EXPERIMENTS = ("quickstart_avss",)
PAPER_EXPERIMENTS = [e for e in EXPERIMENTS if e not in PROXY_EXPERIMENTS]
# One overlay per method x backbone; the subset comes from data= (name -> model config).
MAIN_EXPERIMENTS = {
    "avsbench_tpavi_pvt": "tpavi",
    "avsbench_tpavi_r50": "tpavi",
    "avsbg_pvt": "avsbg",
    "avsbg_r50": "avsbg",
    "ecmvae_pvt": "ecmvae",
    "ecmvae_r50": "ecmvae",
    "ecmvae_bg_pvt": "ecmvae_bg",
}
# ECMVAE's TPAVI flavour and the AVS-BG projector need channels == audio width: shrink both together.
SMALL = ["model.channels=32", "model.audio_dim=32", "audio.embed_dim=32"]


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one intra-op thread is fastest, and immune to oversubscribed CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _plain(experiment: str, tmp: Path, hydra_cfg: bool = False):
    return compose_cfg("train", [f"experiment={experiment}", f"paths.data_dir={tmp}"], hydra_cfg=hydra_cfg)


def _needs_init(cfg) -> bool:
    """S4 -> MS3 rows: model.init_from interpolates the mandatory top-level s4_checkpoint (???)."""
    return OmegaConf.is_missing(cfg, "s4_checkpoint")  # False when the key does not exist


def _tiny(experiment: str, data_dir: Path, subset: str, extra: list[str] | None = None):
    """The experiment with the tiny overrides applied after it (the command-line order of the scripts)."""
    return compose_cfg("train", [f"experiment={experiment}", *tiny_overrides(data_dir, subset), *SMALL, *(extra or [])])


def _batch(cfg, batch_size: int = 1) -> dict:
    T, S = int(cfg.data.num_frames), int(cfg.data.image_size)
    g = torch.Generator().manual_seed(0)
    valid = torch.ones(batch_size, T, dtype=torch.bool)
    if cfg.data.subset == "s4":
        valid[:, 1:] = False  # S4 train: only frame 0 is labelled
    masks = (torch.rand(batch_size, T, 1, S, S, generator=g) > 0.6).float() * valid[..., None, None, None]
    return {
        "frames": torch.randn(batch_size, T, 3, S, S, generator=g),
        "masks": masks,
        "mask_valid": valid,
        "audio": torch.randn(batch_size, T, 1, 96, 64, generator=g),
    }


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if e not in AVSS_EXPERIMENTS])
def test_experiment_trains_one_step(experiment, tmp_path):
    base = _plain(experiment, tmp_path)
    extra = ["s4_checkpoint=null"] if _needs_init(base) else []  # init_from: see the test_s4_init_* tests
    if experiment in ("proxy_pretrained", "proxy"):
        extra += _standin_files(tmp_path / "weights", base.audio)
    cfg = _tiny(experiment, tmp_path, str(base.data.subset), extra)
    # the tiny overrides win over the overlay; everything else of the overlay stays
    assert cfg.backbone.name == "pvt_v2_b0" and int(cfg.data.image_size) == 64 and int(cfg.data.num_frames) == 3
    assert cfg.model.name == base.model.name and cfg.data.subset == base.data.subset
    assert OmegaConf.to_container(cfg.model.loss_weights) == OmegaConf.to_container(base.model.loss_weights)
    check_config(cfg)
    weights = resolve_loss_weights(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=1e-3)
    terms = model(_batch(cfg))
    assert terms, "no loss terms"
    for name, value in terms.items():
        assert value.dim() == 0 and torch.isfinite(value), (name, value)
    unweighted = sorted(set(terms) - set(weights))
    assert not unweighted, f"loss terms without a weight in model.loss_weights: {unweighted}"
    loss = sum(weights[k] * v for k, v in terms.items())
    assert math.isfinite(float(loss.detach())) and float(loss.detach()) > 0
    loss.backward()
    opt.step()
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, params)), "the step changed no parameter"
    expected = _expected_terms(experiment)
    if expected is not None:  # the ablation rows switch off exactly the parts they name
        assert set(terms) == expected
    _check_parts(experiment, model)
    model.eval()
    with torch.no_grad():
        out = model(_batch(cfg))
    assert out["logits"].shape == (1, 3, 1, 64, 64)
    assert torch.isfinite(out["logits"]).all()


def _standin_files(weights_dir: Path, audio) -> list[str]:
    """Random-init files where experiment=proxy_pretrained reads its stand-ins -> overrides."""
    from avs.models.audio_encoders import TinyAudioEncoder
    from avs.models.backbones import VisualBackbone

    weights_dir.mkdir(parents=True, exist_ok=True)
    torch.save(VisualBackbone("pvt_v2_b0").body.state_dict(), weights_dir / "standin_pvt_v2_b0_64px.pth")
    encoder = TinyAudioEncoder(int(audio.embed_dim), int(audio.width))
    torch.save(encoder.state_dict(), weights_dir / "standin_tiny_audio.pth")
    return [f"paths.weights_dir={weights_dir}"]


def _expected_terms(experiment: str) -> set[str] | None:
    """Loss terms that the ablation rows must (not) produce, from what each overlay switches off."""
    return {
        "ecmvae_table2_cvae": {"seg_post", "seg_prior", "kl"},  # no audio: no avm, no diff/sic
        "ecmvae_table2_cmvae": {"seg_post", "seg_prior", "kl", "avm"},  # no factorisation: no diff, no sic
        "avsbg_table3_no_audio": {"seg"},  # no avm, no consistency without audio
        "avsbg_table5_no_bg": {"seg", "avm"},
        "avsbg_table5_no_bg_no_motion": {"seg", "avm"},
        "avsbg_table5_tpavi_bg": {"seg", "avm", "consistency"},
    }.get(experiment)


def _check_parts(experiment: str, model) -> None:
    if experiment == "avsbg_table5_tpavi_bg":
        assert model.projector is not None and model.projector.output_proj is not None
    if experiment.endswith("no_motion"):
        assert model.motion is None
    if experiment.endswith("no_bg") or experiment.endswith("no_bg_no_motion"):
        assert model.projector is None
    if experiment == "ecmvae_table2_cvae":
        assert model.fusion is None and not model.use_audio and model.latent.variant == "visual_only"
    if experiment == "ecmvae_table2_cmvae":
        assert model.latent.variant == "no_factor"


def _published_ok(node, where: str) -> None:
    for name, cited in (node.get("by_subset") or {}).items():  # another paper's numbers: it is named
        assert name in ("s4", "ms3", "avss") and cited.get("paper") and cited.get("table"), where
    for subset in ("s4", "ms3", "avss"):
        vals = node.get(subset)
        if vals is None:
            continue
        assert set(vals) == {"miou", "fscore"}, where
        for v in vals.values():
            assert v is None or 0 < float(v) <= 100, where


@pytest.mark.parametrize("experiment", PAPER_EXPERIMENTS)
def test_experiment_states_its_published_target(experiment, tmp_path):
    cfg = _plain(experiment, tmp_path)
    text = (CONFIG_DIR / "experiment" / f"{experiment}.yaml").read_text()
    assert text.startswith("# @package _global_")
    assert "python scripts/train.py" in text  # the command that runs it
    pub = cfg.get("published")
    if experiment.startswith("ecmvae_bg"):
        assert pub is None and "no published number" in text
        return
    assert pub is not None, "paper overlays need a published node (paper, table, row, s4, ms3)"
    for key in ("paper", "table", "row", "protocol", "legacy_batch_size"):
        assert pub.get(key) is not None, key
    pub = OmegaConf.to_container(pub, resolve=True)
    _published_ok(pub, experiment)
    if pub["s4"] is None and pub["ms3"] is None:
        assert "not in our sources" in text
    for row in pub.get("rows") or []:
        _published_ok(row, f"{experiment}: {row['row']}")
        for key in row["match"]:
            assert key == "model.init_from" or OmegaConf.select(cfg, key, throw_on_missing=False) is not None, key
    # the overlay's own legacy batch size is what its paper used
    assert int(cfg.eval.legacy_batch_size) == int(pub["legacy_batch_size"])


def _sweep_jobs(experiment: str, tmp: Path, cli: list[str]) -> list[list[str]]:
    """The job override lists Hydra's basic sweeper makes for `-m experiment=<e> <cli>`: its
    `hydra.sweeper.params` then the command line, a later value of a key replacing an earlier one,
    expanded into the cartesian product of the swept values (through Hydra's public override parser)."""
    cfg = _plain(experiment, tmp, hydra_cfg=True)
    params = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.params or {}).items()]
    axes: dict[str, list[str]] = {}
    for o in OverridesParser.create().parse_overrides(params + [f"experiment={experiment}", *cli]):
        key = o.get_key_element()
        axes.pop(key, None)
        axes[key] = [f"{key}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override() else [o.input_line]
    return [list(job) for job in itertools.product(*axes.values())]


SWEEPS = [e for e in PAPER_EXPERIMENTS if "sweeper:" in (CONFIG_DIR / "experiment" / f"{e}.yaml").read_text()]


@pytest.mark.parametrize("experiment", SWEEPS)
def test_sweep_overlay_expands_to_the_table(experiment, tmp_path):
    cfg = _plain(experiment, tmp_path, hydra_cfg=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert params.get("seed") == "1,2,3"
    jobs = _sweep_jobs(experiment, tmp_path, [])
    assert len(jobs) == math.prod(len(str(v).split(",")) for v in params.values())
    # every swept value reaches the composed job config (first and last job composed for speed)
    for job in (jobs[0], jobs[-1]):
        job_cfg = compose_cfg("train", job + [f"paths.data_dir={tmp_path}"])
        for item in job:
            key, value = item.split("=", 1)
            if key in ("experiment", "data"):
                continue
            got = OmegaConf.select(job_cfg, key, throw_on_missing=False)
            same = str(got).lower() == value.lower() or (got is None and value == "null")
            assert same or float(got) == float(value), item
    # command-line values replace the overlay's sweep of the same key (Hydra's basic sweeper rule)
    cli_jobs = _sweep_jobs(experiment, tmp_path, ["seed=7"])
    assert len(cli_jobs) == len(jobs) // 3 and all("seed=7" in j for j in cli_jobs)


def test_table4_sweep_covers_every_divergence(tmp_path):
    jobs = _sweep_jobs("ecmvae_table4_divergence", tmp_path, [])
    values = {i.split("=", 1)[1] for j in jobs for i in j if i.startswith("model.latent.divergence=")}
    assert values == {"js", "kl", "poe", "moe"}
    assert len(jobs) == 4 * 2 * 3
    subsets = {tuple(sorted(i for i in j if i.startswith("data="))) for j in jobs}
    assert subsets == {("data=s4",), ("data=ms3",)}


INIT_EXPERIMENTS = [
    e for e in PAPER_EXPERIMENTS if "/recipe/ms3_from_s4" in (CONFIG_DIR / "experiment" / f"{e}.yaml").read_text()
]


def test_s4_init_rows_exist_and_demand_a_checkpoint(tmp_path):
    assert len(INIT_EXPERIMENTS) >= 5  # TPAVI x2, AVS-BG x2, ECMVAE Table 6
    ckpt = tmp_path / "s4" / "checkpoints" / "best.ckpt"
    save_checkpoint(ckpt, {"model": {"w": torch.zeros(1)}})
    for e in INIT_EXPERIMENTS:
        cfg = _plain(e, tmp_path)
        assert cfg.data.subset == "ms3" and _needs_init(cfg)
        # the config check stops a run without a checkpoint before anything is built, naming the key
        with pytest.raises(ConfigError, match="s4_checkpoint"):
            check_config(cfg)
        with pytest.raises(InterpolationToMissingValueError, match="s4_checkpoint"):
            cfg.model.get("init_from")
        given = compose_cfg("train", [f"experiment={e}", f"paths.data_dir={tmp_path}", f"s4_checkpoint={ckpt}"])
        assert given.model.init_from == str(ckpt)
        check_config(given)


def _s4_checkpoint(experiment: str, data_dir: Path, tmp: Path) -> tuple[Path, dict]:
    """An "S4 run" of the experiment's model: built under another seed, saved as <run>/checkpoints/best.ckpt."""
    s4_cfg = _tiny(experiment, data_dir, "s4", ["s4_checkpoint=null"])
    torch.manual_seed(1234567)
    state = build_model(s4_cfg).state_dict()
    ckpt = tmp / "s4" / "checkpoints" / "best.ckpt"
    save_checkpoint(ckpt, {"model": state})
    return ckpt, state


@pytest.mark.parametrize("experiment", INIT_EXPERIMENTS)
def test_s4_init_experiment_loads_every_tensor_of_the_checkpoint(experiment, tmp_path):
    ckpt, state = _s4_checkpoint(experiment, tmp_path, tmp_path)
    cfg = _tiny(experiment, tmp_path, "ms3", [f"s4_checkpoint={ckpt}"])
    trainer = Trainer(cfg, tmp_path / "ms3")  # builds the MS3 model (seed 1234/123/42) and loads init_from
    loaded = trainer.model.state_dict()
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k


def test_s4_to_ms3_run_trains_one_step(synth_data_dir, tmp_path):
    """The S4 -> MS3 protocol end to end through the Trainer (one step, val, checkpoints)."""
    experiment = "avsbench_tpavi_pvt_ms3_from_s4"
    ckpt, _ = _s4_checkpoint(experiment, synth_data_dir, tmp_path)
    cfg = _tiny(
        experiment, synth_data_dir, "ms3", [f"s4_checkpoint={ckpt}", "trainer.max_steps=1", "trainer.test_at_end=false"]
    )
    trainer = Trainer(cfg, tmp_path / "ms3")
    result = trainer.fit()
    assert result["steps"] == 1 and all(math.isfinite(v) for v in trainer.loss_history)
    assert (tmp_path / "ms3" / "checkpoints" / "best.ckpt").is_file()


def test_experiment_names_cover_the_paper_rows():
    names = set(EXPERIMENTS)
    expected = set(MAIN_EXPERIMENTS)
    expected |= {f"{m}_{b}_ms3_from_s4" for m, b in itertools.product(("avsbench_tpavi", "avsbg"), ("r50", "pvt"))}
    assert expected <= names, sorted(expected - names)
    per_subset = {n for n in names if n.endswith(("_s4", "_ms3")) and not n.endswith("_from_s4")}
    assert not per_subset, f"the subset of a main overlay is data=, not its name: {sorted(per_subset)}"
    for table in (
        "ecmvae_table2",
        "ecmvae_table3",
        "ecmvae_table4",
        "ecmvae_table5",
        "ecmvae_table6",
        "avsbg_table1",
        "avsbg_table3",
        "avsbg_table4",
        "avsbg_table5",
    ):
        assert any(n.startswith(table) for n in names), table


# ----------------------------------------------------------------------------- SLURM launcher
SLURM_YAML = CONFIG_DIR / "hydra" / "launcher" / "slurm.yaml"
SLURM_KEYS = {
    "partition",
    "gpus_per_node",
    "timeout_min",
    "cpus_per_task",
    "mem_gb",
    "nodes",
    "tasks_per_node",
    "array_parallelism",
    "submitit_folder",
    "setup",
    "additional_parameters",
}


def test_slurm_launcher_yaml_parses_and_has_the_documented_keys():
    conf = OmegaConf.load(SLURM_YAML)
    assert list(conf.defaults) == ["submitit_slurm", "_self_"]
    assert SLURM_KEYS <= set(conf.keys())
    assert int(conf.gpus_per_node) == 1 and int(conf.timeout_min) > 0 and int(conf.mem_gb) > 0
    text = SLURM_YAML.read_text()
    assert 'pip install "avs[slurm]"' in text and "hydra/launcher=slurm" in text
    # the plugin is optional: the default configs still compose without it (nothing selects slurm)
    cfg = compose_cfg("train", ["experiment=ecmvae_table4_divergence"], hydra_cfg=True)
    assert "BasicLauncher" in cfg.hydra.launcher._target_


def test_slurm_launcher_composes_with_the_plugin(tmp_path):
    pytest.importorskip(
        "hydra_plugins.hydra_submitit_launcher",
        reason="hydra-submitit-launcher not installed (pip install 'avs[slurm]')",
    )
    cfg = compose_cfg(
        "train",
        [
            "hydra/launcher=slurm",
            "experiment=ecmvae_table4_divergence",
            "hydra.launcher.partition=gpu",
            f"paths.data_dir={tmp_path}",
        ],
        hydra_cfg=True,
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu" and int(launcher.gpus_per_node) == 1 and int(launcher.cpus_per_task) == 4


@pytest.mark.parametrize("experiment", sorted(MAIN_EXPERIMENTS))
def test_main_overlay_takes_its_subset_from_data(experiment, tmp_path):
    runs = {
        subset: compose_cfg("train", [f"experiment={experiment}", f"data={subset}", f"paths.data_dir={tmp_path}"])
        for subset in ("s4", "ms3", "synth_s4")
    }
    for subset, epochs in (("s4", 15), ("ms3", 30)):
        cfg = runs[subset]
        assert cfg.data.subset == subset and cfg.task_name == f"{experiment}_{subset}"
        assert cfg.model.name == MAIN_EXPERIMENTS[experiment] and int(cfg.trainer.epochs) == epochs
        if cfg.published is not None:  # the paper's number of this run's subset
            assert set(cfg.published[subset]) == {"miou", "fscore"}
    assert runs["synth_s4"].task_name == f"{experiment}_s4" and runs["synth_s4"].data.name == "synth_s4"
    assert compose_cfg("train", [f"experiment={experiment}"]).data.subset == "ms3"  # train.yaml's default
    assert OmegaConf.to_container(runs["s4"].trainer.optimizer) == {"_target_": "torch.optim.Adam", "_partial_": True}
    assert runs["s4"].trainer.scheduler is None  # the papers' constant lr
