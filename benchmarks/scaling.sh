#!/usr/bin/env bash
# Per-GPU throughput on all the host's GPUs against one GPU of the same host, in one call (the
# issue's scaling target: per GPU at least 90 % of one GPU, same per-GPU batch). The parts, run in
# the order named (model and trainer each fill a 10-minute device call; collectives takes about a
# minute and routing less, so name them before tests, whose spawned ranks compile for minutes):
#   model    the model step (bench_train model mode), p90 then full vocabulary, N GPUs / 1 / N / 1
#            (full: N / 1), with each N-GPU p90 run's profiled timeline per rank under $OUT/traces
#   trainer  the trainer end to end (ab_trainer.sh, p90, 1.2 M samples): N / 1 / N / 1
#   tests    tests/test_sharded.py's multi-GPU cases (sharded against the unsharded reference)
#   collectives  bench_collectives.py on all the GPUs: the step's collectives' host time, and the rows'
#            exchange (forward and backward) against the same with local copies
#   routing  bench_routing.py on all the GPUs: the data path's router alone, by phase, full vocabulary
#   profile  the p90 model step on N GPUs then on one, waits for the GPU sleeping (so its CPU time is
#            the host's work), each rank's 20 profiled steps' timeline summarised (trace_summary.py:
#            the GPU's busy, collective and idle time a step, the host's waits); about 4 minutes
#   unique   on N GPUs, the p90 model step alternating each id routed once (train.route_unique_ids)
#            and every id sent, in one process; then bench_routing.py with each; about 4 minutes
# Run on the GPU host, in the repository root, after
# `source .gpu/install.sh && export PYTHONPATH=$PWD:$PYTHONPATH`:
#     bash benchmarks/scaling.sh model          (or: trainer; or: collectives routing tests; or: profile unique tests)
# Prints every run's per-GPU samples/s and the means' ratio N / 1. Logs under $OUT (else /tmp/scaling).
set -euo pipefail

[ $# -gt 0 ] || { echo "scaling.sh: name one or more parts: model, trainer, tests, collectives, routing, profile, unique" >&2; exit 2; }
for part in "$@"; do
  case $part in
    model | trainer | tests | collectives | routing | profile | unique) ;;
    *) echo "scaling.sh: a part is model, trainer, tests, collectives, routing, profile or unique, not $part" >&2; exit 2 ;;
  esac
done
gpus=$(nvidia-smi --list-gpus | wc -l)
out=${OUT:-/tmp/scaling}
mkdir -p "$out"
if [ "$gpus" -lt 2 ]; then
  echo "scaling.sh: $gpus GPU on this host; scaling needs 2 or more" >&2
  exit 2
fi

# Reads "label samples_per_s_per_gpu" lines; prints the means per label and their ratio.
ratio() {
  python3 -c '
import sys
from collections import defaultdict
runs = defaultdict(list)
for line in sys.stdin:
    label, value = line.split()
    runs[label].append(float(value))
means = {label: sum(v) / len(v) for label, v in runs.items()}
for label, values in runs.items():
    print(f"{label:>8} GPU(s): " + " / ".join(f"{v:,.0f}" for v in values) + f" samples/s per GPU (mean {means[label]:,.0f})")
many, one = means.get(sys.argv[1]), means.get("1")
print(f"per GPU on {sys.argv[1]} GPUs / on one: " + ("not computed: runs failed" if not (many and one) else f"{many / one:.1%}"))
' "$gpus"
}

model_runs() {  # config, then the GPU counts of the runs in order
  local config=$1 name nproc i=0
  shift
  for nproc in "$@"; do
    i=$((i + 1))
    name=$(basename "$config" .yaml)_${i}_${nproc}gpu
    local trace=()
    if [ "$nproc" -gt 1 ] && [ "$config" = configs/taobao_mm_p90.yaml ]; then
      trace=(--profile-steps 20 --trace-dir "$out/traces/$name")
    fi
    timeout 150 torchrun --nproc_per_node "$nproc" benchmarks/bench_train.py --config "$config" --modes model \
      --steps 150 --warmup 30 "${trace[@]}" --out "$out/$name.json" > "$out/$name.log" 2>&1 \
      || { echo "$name failed (the end of $out/$name.log:)" >&2; tail -n 15 "$out/$name.log" >&2; continue; }
    python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); print(sys.argv[2], r["model"]["samples_per_s_per_gpu"])' \
      "$out/$name.json" "$nproc"
  done
}

for part in "$@"; do
  case $part in
    model)
      echo "p90 vocabulary, model step:"
      model_runs configs/taobao_mm_p90.yaml "$gpus" 1 "$gpus" 1 | ratio
      echo "full vocabulary, model step:"
      model_runs configs/taobao_mm_full.yaml "$gpus" 1 | ratio
      ;;
    trainer)
      i=0
      for nproc in "$gpus" 1 "$gpus" 1; do
        i=$((i + 1))
        OUT=$out AB_NPROC=$nproc bash benchmarks/ab_trainer.sh none new | awk -v n="$nproc" '/samples\/s per GPU/ {gsub(",", "", $2); print n, $2}'
        mv "$out/ab_logs.tgz" "$out/trainer_${i}_${nproc}gpu.tgz"
      done | ratio
      ;;
    tests)
      python -m pytest -q tests/test_sharded.py -k two_gpus 2>&1 | tail -n 5
      ;;
    collectives)
      torchrun --nproc_per_node "$gpus" benchmarks/bench_collectives.py --out "$out/collectives.json" 2>&1 \
        | grep -A 20 "rank(s); rows"
      ;;
    routing)
      torchrun --nproc_per_node "$gpus" benchmarks/bench_routing.py --config configs/taobao_mm_full.yaml \
        --out "$out/routing.json" 2>&1 | grep -A 12 "^routing over"
      ;;
    profile)
      for nproc in "$gpus" 1; do
        name=profile_${nproc}gpu
        timeout 200 torchrun --nproc_per_node "$nproc" benchmarks/bench_train.py --config configs/taobao_mm_p90.yaml \
          --modes model --steps 150 --warmup 30 --cuda-sync blocking --profile-steps 20 \
          --trace-dir "$out/traces/$name" --out "$out/$name.json" > "$out/$name.log" 2>&1 \
          || { echo "$name failed (the end of $out/$name.log:)" >&2; tail -n 15 "$out/$name.log" >&2; continue; }
        python3 -c 'import json, sys; r = json.load(open(sys.argv[1]))["model"]; print(sys.argv[2], "GPU(s): step", round(r["step_ms"], 2), "ms, CPU", round(r["cpu_ms"], 2), "ms")' \
          "$out/$name.json" "$nproc"
        python benchmarks/trace_summary.py --steps 20 --out "$out/$name.summary.json" "$out/traces/$name"/*
      done
      ;;
    unique)
      name=unique_${gpus}gpu
      timeout 300 torchrun --nproc_per_node "$gpus" benchmarks/bench_train.py --config configs/taobao_mm_p90.yaml \
        --modes model --steps 150 --warmup 30 --out "$out/$name.json" \
        --variant train.route_unique_ids=false --variant train.route_unique_ids=true \
        --variant train.route_unique_ids=false --variant train.route_unique_ids=true > "$out/$name.log" 2>&1 \
        || { echo "$name failed (the end of $out/$name.log:)" >&2; tail -n 15 "$out/$name.log" >&2; }
      [ ! -f "$out/$name.json" ] || python3 -c '
import json, sys
runs = json.load(open(sys.argv[1]))
for name, run in runs.items():
    if name.startswith("model:"):
        overrides, rate = run["overrides"], run["samples_per_s_per_gpu"]
        print(f"{name} {overrides}: {rate:,.0f} samples/s per GPU")
' "$out/$name.json"
      for unique in false true; do
        echo "train.route_unique_ids=$unique:"
        torchrun --nproc_per_node "$gpus" benchmarks/bench_routing.py --config configs/taobao_mm_p90.yaml \
          --set train.route_unique_ids=$unique 2>&1 | grep -A 12 "^routing over"
      done
      ;;
  esac
done
