#!/usr/bin/env bash
# Create (or reuse) the project virtual env and install avs with the pinned torch stack.
# Usage: bash scripts/setup_env.sh            -> .venv in the repo root
#        AVS_VENV=/path bash scripts/setup_env.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${AVS_VENV:-$here/.venv}"
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup_env] creating virtual env at $venv"
  "$py" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip
# torch/torchvision/torchaudio are pinned together in constraints.txt
"$venv/bin/python" -m pip install -q -c "$here/constraints.txt" -e "$here[test,video,slurm]"
"$venv/bin/python" - <<'PY'
import torch, torchvision, torchaudio
print(f"[setup_env] torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"torchaudio {torchaudio.__version__}, cuda available: {torch.cuda.is_available()}")
PY
