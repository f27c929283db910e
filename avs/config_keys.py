"""Which config keys change a run's results: the one classification that resume and tables read.

A key is *result-neutral* when its value cannot change the numbers a run computes: where files are,
how the run is watched (progress, logging, TensorBoard), how it is executed (workers, device,
compile, channels_last), when it stops on faults, what it measures on the side. Every other key is
*result-affecting*. Resuming (`avs/engine/resume_check.py`) refuses a changed result-affecting key by
name; tables (`avs/tables/keys.py`) never split rows by a result-neutral key.

Patterns are `fnmatch` patterns; a pattern covers the key and everything below it. Result-neutral
patterns win over result-affecting ones (`*.weights_path` inside `model`). Whole nodes are listed as
result-affecting only where every key below them is by construction part of what is computed (the
network: `model`, `backbone`, `audio`); mixed nodes (`trainer`, `data`, `eval`, the top level and
the scripts' options) list key by key, so a new key there must be classified here
(`tests/unit/test_config_keys.py` composes every config and fails on an unclassified leaf).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

RESULT_NEUTRAL_KEYS: tuple[str, ...] = (
    "task_name",  # the run's name
    "hydra",
    "paths",  # where files are; the data they lead to is compared through data.root
    "runtime",  # how the process runs (runtime.allocator: glibc malloc tuning), never what it computes
    "published",  # the paper's reference numbers and row labels, never computed
    "*.weights_path",  # pretrained files are read at init only; a resumed run takes every weight from the checkpoint
    "*.pca_path",
    "data.num_workers",
    "data.pin_memory",
    "data.persistent_workers",
    "data.eval_batch_size",  # per-clip metrics; the legacy per-batch protocol reads eval.legacy_batch_size
    "data.synthetic.name",  # a directory name: data.root (which includes it) is the compared location
    "data.release",  # the name of the data release (recorded in metrics.json); data.root and data.subset are compared
    "trainer.resume",
    "trainer.resume_allow_changes",
    "trainer.device",
    "trainer.progress",
    "trainer.tensorboard",
    "trainer.log_every_steps",
    "trainer.checkpoint_every_steps",
    "trainer.interrupt_after_steps",
    "trainer.max_consecutive_nonfinite",  # when to give up; a non-finite step is skipped either way
    "trainer.debug_nan_steps",
    "trainer.test_at_end",  # whether the test split is measured at the end; training is unchanged
    "trainer.compile",
    "trainer.compile_backend",
    "trainer.cudnn_benchmark",
    "trainer.channels_last",
    "trainer.find_unused_parameters",
    "trainer.record_latent_kl",  # a measurement on val; training is unchanged
    "trainer.epochs_by_subset",  # only its entry for data.subset reaches trainer.epochs, which is compared
    "trainer.allow_missing_hooks",  # permits a trimmed hooks group; the hooks themselves are compared
    "eval.evaluators",  # a user's own measurements on the side; training and the metrics are unchanged
    "results_file",  # where the proxy's per-run lines go
    # options of the scripts (configs/*.yaml) that say where output goes or how it is shown / executed
    "device",
    "progress",
    "out",
    "out_dir",
    "output_dir",
    "overwrite",
    "force",
    "dry_run",
    "workers",
    "threads",
    "num_threads",
    "keep_last_checkpoint",
    "save_masks",
    "save_default",
    "contact_sheet",
    "overlay",
    "tile_height",
)

RESULT_KEYS: tuple[str, ...] = (
    # the network: every key below these nodes builds part of the model
    "model",
    "backbone",
    "audio",
    "seed",
    "hooks",  # a hook may change training (KL warm-up, a user's own): compared as a whole
    "version",  # the proxy protocol's version
    "standins",  # the pinned stand-in hashes of the proxy protocol
    "simd",  # the SIMD level of torch's CPU kernels (proxy, pretraining): float sums round in another order
    "listening",  # the proxy's listening pass (shuffled-audio seed)
    "profile_parts",
    "s4_checkpoint",  # the S4 weights an MS3 run starts from (also in model.init_from)
    "eval.legacy_batch_size",
    "eval.num_samples",
    "eval.protocol",
    "eval.protocols",
    *(
        f"data.{k}"
        for k in (
            "audio_source",
            "batch_size",
            "embedding_dir",
            "flip_prob",
            "image_size",
            "legacy_unknown_colours",
            "metric_protocol",  # AVSS: the default of eval.protocol (checkpoint selection)
            "metric_protocols",
            "name",
            "num_classes",
            "num_frames",
            "on_error",
            "pad_short_audio",
            "root",
            "sources",
            "subset",
            "synthetic",
            "train_crop",
        )
    ),
    *(
        f"trainer.{k}"
        for k in (
            "allow_test_selection",
            "amp",
            "deterministic",
            "drop_last",
            "epochs",
            "fused_optimizer",
            "grad_accum",
            "grad_clip",
            "hooks",
            "kl_warmup",
            "lr",
            "max_steps",
            "optimizer",
            "scheduler",
            "select_metric",
            "select_split",
            "sync_bn",
            "val_every_epochs",
            "weight_decay",
        )
    ),
    # options of the scripts (configs/*.yaml) that choose what they compute
    *(
        "ablation_seeds atol audio_file audio_input audio_seed base batch_size ceilings cells checkpoint claims "
        "compare continue_recorded data_clips demo "
        "demo_fps demo_seconds demo_size profile profile_amp profile_flops profile_models profile_modes reproduce "
        "dense_spacing extra_overrides format graph_breaks image_size init_from mask_resolution memory methods metric "
        "metrics_frames metrics_size name num_checks num_clips num_frames num_samples only only_seeds only_subsets "
        "pairs params_only quick recheck repeats sampling seeds short_audio split splits stride subsets targets tasks "
        "threshold toy toy_overrides tsne tsne_clips uncertainty vggish video visual warmup"
    ).split(),
)


def matches(key: str, patterns: Iterable[str]) -> bool:
    """True when a pattern names `key` or one of its parent nodes."""
    return any(fnmatch.fnmatchcase(key, p) or fnmatch.fnmatchcase(key, p + ".*") for p in patterns)


def is_result_neutral(key: str) -> bool:
    return matches(key, RESULT_NEUTRAL_KEYS)


def classify(key: str) -> str | None:
    """'neutral' | 'result' | None (not classified: add the key to one of the two lists)."""
    if is_result_neutral(key):
        return "neutral"
    return "result" if matches(key, RESULT_KEYS) else None
