#!/usr/bin/env bash
# The synthetic study of docs/reproducing.md at the quickstart budget (Sounding Shapes 160/32/32
# clips, 64 px, random-init PVT-v2-b0, neck width 32, 640 steps), seeds 1-3.
# 33 runs in two queues side by side, one thread each (on a 2-core CPU: ~90 min in all).
#   bash scripts/synthetic_study.sh [out_dir]        (default outputs/synthetic)
# Then the tables: see docs/reproducing.md, "Synthetic study".
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/synthetic}
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# the study was run with the per-tensor Adam (before trainer.fused_optimizer existed): keep it to reproduce it
TRAIN="$PY scripts/train.py -m experiment=quickstart seed=1,2,3 trainer.fused_optimizer=false"

queue_ms3() {
  $TRAIN model=tpavi,ecmvae,avsbg,ecmvae_bg hydra.sweep.dir=$OUT/methods_ms3
  $TRAIN model=avsbg model.use_audio=false hydra.sweep.dir=$OUT/no_audio_ms3
  $TRAIN model=ecmvae model.latent.divergence=kl hydra.sweep.dir=$OUT/ecmvae_kl_ms3
}
queue_s4() {
  $TRAIN data=synth_s4 model=tpavi,ecmvae,avsbg,ecmvae_bg hydra.sweep.dir=$OUT/methods_s4
  $TRAIN data=synth_s4 model=avsbg model.use_audio=false hydra.sweep.dir=$OUT/no_audio_s4
  $TRAIN data=synth_s4 model=tpavi model.use_audio=false hydra.sweep.dir=$OUT/no_audio_tpavi_s4
  $TRAIN model=avsbg model.projector=null hydra.sweep.dir=$OUT/no_bg_ms3
}
mkdir -p "$OUT"
queue_ms3 > "$OUT/queue_ms3.log" 2>&1 &
A=$!
queue_s4 > "$OUT/queue_s4.log" 2>&1 &
B=$!
wait $A; wait $B
echo "synthetic study done: $OUT"
