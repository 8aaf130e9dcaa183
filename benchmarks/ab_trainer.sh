#!/usr/bin/env bash
# The trainer itself, an older tree against this one, alternated in one call on one machine (how
# benchmarks/RESULTS.md rows 45-50 compare code: hosts of one kind differ more than most changes).
#
# On the development machine, the older tree as an untracked tarball (it travels with the tree):
#     git archive --format=tar.gz -o ab_base.tgz <commit>
# (or `none` in its place where every run is "new").
# On the GPU host, in the repository root, after `source .gpu/install.sh && export PYTHONPATH=$PWD:$PYTHONPATH`:
#     bash benchmarks/ab_trainer.sh ab_base.tgz new base base new new base
# A run is "new" or "base", optionally with config overrides after colons:
#     new:data.gsu_placement=device_inline   base:data.num_workers=8
# Each run: one pass over 1.2 M make_prepared.py samples of the config (made once), on AB_NPROC GPUs.
# Prints samples/s per GPU after the first log line per run, with a hash of the loss at every log
# line (to 6 decimals): equal hashes, equal training. Logs: $OUT/ab_logs.tgz.
# Settings (environment): AB_CONFIG (configs/taobao_mm_p90.yaml), AB_NPROC (1), AB_DATA (the
# prepared data's folder, /tmp/prep_full), AB_SAMPLES (1200000). E.g. the full vocabulary on two GPUs:
#     AB_CONFIG=configs/taobao_mm_full.yaml AB_NPROC=2 AB_DATA=/tmp/prep_243m bash benchmarks/ab_trainer.sh ab_base.tgz new new:train.compile_mode=graphs
set -euo pipefail

base_tgz=$1
shift
config=${AB_CONFIG:-configs/taobao_mm_p90.yaml}
nproc=${AB_NPROC:-1}
data=${AB_DATA:-/tmp/prep_full}
root=$PWD
rm -rf /tmp/ab_base /tmp/ab_runs
mkdir -p /tmp/ab_base /tmp/ab_runs
# "none": only "new" runs (no older tree to compare).
if [ "$base_tgz" != none ]; then tar xzf "$base_tgz" -C /tmp/ab_base; fi
if [ ! -f "$data/meta.json" ]; then
  python benchmarks/make_prepared.py --config "$config" --out "$data" \
    --samples "${AB_SAMPLES:-1200000}" --test-samples 20000 > /tmp/ab_runs/prepare.log 2>&1
fi

i=0
for run in "$@"; do
  i=$((i + 1))
  IFS=: read -r -a parts <<< "$run"
  who=${parts[0]}
  case $who in
    new) tree=$root ;;
    base) [ "$base_tgz" != none ] || { echo "a base run needs a base tarball, not none" >&2; exit 2; }
          tree=/tmp/ab_base ;;
    *) echo "a run is new or base (then :key=value overrides), not $run" >&2; exit 2 ;;
  esac
  overrides=()
  for override in "${parts[@]:1}"; do overrides+=(--set "$override"); done
  name=${i}_$who
  if ! (cd "$tree" && PYTHONPATH=$tree:${PYTHONPATH:-} torchrun --nproc_per_node "$nproc" -m muse_torchrec.cli train \
      --config "$config" --set data.prepared_dir="$data" --set data.vocab=full \
      --set train.keep_checkpoints=0 --set train.log_every=100 --set train.run_dir=/tmp/ab_runs/$name \
      "${overrides[@]}" > /tmp/ab_runs/$name.log 2>&1); then
    echo "$run: the trainer failed (the end of /tmp/ab_runs/$name.log:)"
    tail -n 20 /tmp/ab_runs/$name.log
    continue
  fi
  python - "$run" /tmp/ab_runs/$name "$nproc" <<'EOF'
import json, sys
from pathlib import Path
run, run_dir, nproc = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
metrics = json.loads((run_dir / "metrics.json").read_text())
losses = [round(json.loads(line)["loss"], 6) for line in (run_dir / "train_log.jsonl").read_text().splitlines()
          if "loss" in json.loads(line)]
per_gpu = metrics["train_samples_per_s_warm"] / nproc
print(f"{run:<40} {per_gpu:>10,.0f} samples/s per GPU   losses {hash(tuple(losses)) & 0xffffffff:08x}")
EOF
done
if [ -n "${OUT:-}" ]; then tar czf "$OUT/ab_logs.tgz" -C /tmp ab_runs; fi
