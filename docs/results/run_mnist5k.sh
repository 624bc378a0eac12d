#!/usr/bin/env bash
# The mnist5k results table of docs/losses.md: CE alone, online KD, cached KD and energy_kd, dkd, dist,
# cskd from one cache, 3 seeds each. Rerunning continues where it stopped (train --resume, precompute
# reuses a complete cache). CPU only; about an hour on 2 shared cores.
#
#   docs/results/run_mnist5k.sh [OUT]        # default OUT: results-mnist5k
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # tiny nets: one thread each is fastest, and on a shared box by far
OUT=${1:-results-mnist5k}
KD=${KDCACHE:-kdcache}
DATA=(--dataset mnist5k --size 16 --quiet)
STUDENT=(--model resnet8 --epochs 5 --batch-size 128 --lr 0.05)

# 1. the teacher: resnet20 (16/32/64 channels, 0.27 M parameters) at 16x16, trained once with CE
[ -f "$OUT/teacher/model.pt" ] || "$KD" train "${DATA[@]}" --model resnet20 --epochs 8 --lr 0.1 --out "$OUT/teacher"

# 2. the cache: 8 recorded rrc+flip views per sample, dense float16 logits and energies
CACHE=$("$KD" precompute --dataset mnist5k --teacher resnet20 --weights "$OUT/teacher/model.pt" --teacher-size 16 \
        --views 8 --out "$OUT/caches" --quiet | sed -n 's/.*train with --cache //p')

# 3. students: resnet8 (16/32/64 channels, 0.08 M parameters), 5 epochs, the same recipe for every loss
student() {  # NAME SEED OPTIONS...
    local name=$1 seed=$2; shift 2
    "$KD" train "${DATA[@]}" "${STUDENT[@]}" --seed "$seed" --out "$OUT/runs/$name-s$seed" --resume "$@" >/dev/null
}
for seed in 0 1 2; do
    student ce        "$seed" --loss ce
    student online-kd "$seed" --loss kd --online-teacher resnet20 --weights "$OUT/teacher/model.pt"
    student kd        "$seed" --loss kd --cache "$CACHE"
    student energy_kd "$seed" --loss energy_kd --cache "$CACHE"
    student dkd       "$seed" --loss dkd -p warmup=1 --cache "$CACHE"  # warm-up of 20 epochs scaled to 5: none
    student dist      "$seed" --loss dist --cache "$CACHE"
    student cskd      "$seed" --loss cskd --cache "$CACHE"
done

# 4. tables (runs.md) and plots (curves.png, energy.png)
"$KD" report "$OUT"/runs/* --out "$OUT/report" --cache "$CACHE"
"$KD" eval --model resnet20 --weights "$OUT/teacher/model.pt" --dataset mnist5k --size 16
