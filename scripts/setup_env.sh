#!/usr/bin/env bash
# Create (or reuse) the project virtual env and install avs with the pinned torch stack.
# Usage: bash scripts/setup_env.sh            -> .venv in the repo root
#        AVS_VENV=/path bash scripts/setup_env.sh
#        bash scripts/setup_env.sh --plan     -> only say what would be done with the env path
#        AVS_MIN_FREE_GB=N (default 10)         -> free space a new env needs on its disk (0: no check)
#
# What is found at the env path decides what happens (nothing is deleted that this script did not make):
#   nothing                           -> create a venv
#   a working venv (bin/python runs)  -> reuse it
#   a dangling symlink                -> remove the link (it holds no data), create a venv
#   a venv this script made, broken   -> recreate it (it carries the marker file .avs-setup-env)
#   anything else (a file, a folder that is not a working venv, a link to one)
#                                     -> stop with exit code 2 and say how to go on
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${AVS_VENV:-$here/.venv}"
py="${PYTHON:-python3}"
marker=".avs-setup-env"
plan_only=false
case "${1:-}" in
  --plan) plan_only=true ;;
  "") ;;
  *) echo "[setup_env] unknown argument '$1' (expected nothing or --plan)" >&2; exit 2 ;;
esac

say() { echo "[setup_env] $*"; }
refuse() { echo "[setup_env] $*" >&2; exit 2; }

# venv_works DIR: its python starts and is a virtual env (sys.prefix != sys.base_prefix)
venv_works() {
  [ -x "$1/bin/python" ] && "$1/bin/python" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' >/dev/null 2>&1
}

action=create
if [ -L "$venv" ] && [ ! -e "$venv" ]; then
  action=relink
  say "found a dangling symlink $venv -> $(readlink "$venv") (its target does not exist on this machine)"
  say "removing the link (it holds no files) and creating a new virtual env there"
elif [ ! -e "$venv" ]; then
  action=create
  say "creating virtual env at $venv"
elif venv_works "$venv"; then
  action=reuse
  say "reusing the virtual env at $venv ($("$venv/bin/python" -c 'import sys; print("Python", sys.version.split()[0])'))"
elif [ -d "$venv" ] && [ ! -L "$venv" ] && [ -f "$venv/$marker" ]; then
  action=recreate
  say "$venv was made by this script but its python no longer runs (moved, or the base interpreter is gone)"
  say "recreating it"
elif [ -d "$venv" ]; then
  refuse "$venv exists but is not a working virtual env (no bin/python that runs), and this script did not make it, so it is left untouched. Move or remove it yourself, or install elsewhere with AVS_VENV=<path> bash scripts/setup_env.sh"
else
  refuse "$venv exists and is not a folder (a file or a link to one); it is left untouched. Move or remove it yourself, or install elsewhere with AVS_VENV=<path> bash scripts/setup_env.sh"
fi

# Room for the install: PyPI's x86_64 torch stack is a CUDA build (the env is about 7.5 GB) and pip
# unpacks its wheels on the way, so a new env wants AVS_MIN_FREE_GB (default 10) free where it goes.
# A full disk otherwise shows up as an OSError deep in pip's output, after minutes of work.
min_free_gb="${AVS_MIN_FREE_GB:-10}"
[[ "$min_free_gb" =~ ^[0-9]+$ ]] || refuse "AVS_MIN_FREE_GB='$min_free_gb' is not a whole number of GB (use 0 to skip the free-space check)"
if [ "$action" != reuse ] && [ "$min_free_gb" -gt 0 ]; then
  probe="$(dirname -- "$venv")"
  while [ ! -d "$probe" ]; do probe="$(dirname -- "$probe")"; done
  free_kb="$(df -Pk -- "$probe" 2>/dev/null | awk 'NR == 2 {print $4}')"
  if [[ "$free_kb" =~ ^[0-9]+$ ]]; then
    free_gb=$(( free_kb / 1048576 ))
    [ "$free_gb" -ge "$min_free_gb" ] || refuse "only $free_gb GB free on the disk holding $probe; a new env needs about $min_free_gb GB (the torch stack is a CUDA build). Free some space, install elsewhere with AVS_VENV=<path>, or set AVS_MIN_FREE_GB to change the threshold"
    say "$free_gb GB free at $probe (a new env needs about $min_free_gb GB)"
  else
    say "could not read the free space at $probe with df; going on without the check"
  fi
fi

if $plan_only; then
  say "plan: $action"
  exit 0
fi

case "$action" in
  relink) rm -- "$venv" ;;
  recreate) rm -rf -- "$venv" ;;
esac
if [ "$action" != reuse ]; then
  "$py" -m venv "$venv"
  echo "made by scripts/setup_env.sh; it may delete and recreate this env if it stops working" > "$venv/$marker"
fi

"$venv/bin/python" -m pip install -q --upgrade pip
# torch/torchvision/torchaudio are pinned together in constraints.txt
"$venv/bin/python" -m pip install -q -c "$here/constraints.txt" -e "$here[test,video,slurm,plot]"
"$venv/bin/python" - <<'PY'
import torch, torchvision, torchaudio
print(f"[setup_env] torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"torchaudio {torchaudio.__version__}, cuda available: {torch.cuda.is_available()}")
PY
