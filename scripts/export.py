"""Export a checkpoint's inference path to TorchScript or ONNX and check it against the eager model (docs/demo.md).

python scripts/export.py checkpoint=<run dir>/checkpoints/best.ckpt [format=torchscript|onnx] [batch_size=1]
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import avs  # noqa: E402,F401
from avs.config_checks import ConfigError  # noqa: E402
from avs.errors import plain_errors, run_plain  # noqa: E402
from avs.evaluation.outputs import script_out_dir  # noqa: E402
from avs.inference.export import export_checkpoint  # noqa: E402
from avs.script_args import check_overrides  # noqa: E402

log = logging.getLogger("avs.export")


@hydra.main(version_base="1.3", config_path="../configs", config_name="export")
@plain_errors
def main(cfg: DictConfig) -> None:
    if cfg.format not in ("torchscript", "onnx"):
        raise ConfigError(f"format must be 'torchscript' or 'onnx', got {cfg.format!r}")
    out_dir = script_out_dir(cfg.out_dir)
    result = export_checkpoint(cfg, out_dir)
    diff = f"max |exported - eager| = {result.max_abs_diff:.3g}, relative {result.max_rel_diff:.3g}"
    print(f"exported: {result.path} (inputs {result.input_shapes}; {diff})")
    print(f"metadata: {result.meta_path}")


if __name__ == "__main__":
    run_plain(lambda: check_overrides(sys.argv[1:], "scripts/export.py", "export", from_checkpoint=True, open_nodes=()))
    main()
