#!/usr/bin/env bash
# bench_train's model mode, an older tree against this one, alternated in one call on one machine
# (ab_trainer.sh does the same for the trainer; hosts of one kind differ more than most changes).
#
# On the development machine, the older tree as an untracked tarball (it travels with the tree):
#     git archive --format=tar.gz -o ab_base.tgz <commit>
# (or `none` in its place where every run is "new").
# On the GPU host, in the repository root, after `source .gpu/install.sh && export PYTHONPATH=$PWD:$PYTHONPATH`:
#     bash benchmarks/ab_model.sh ab_base.tgz base new base new
# A run is "new" or "base", optionally with more bench_train arguments after colons (values
# without colons), e.g. the one-GPU proxy of several ranks:
#     new:--sync-dense-on-one-rank:--shard-as-on-several-ranks
# Prints each run's table line (samples/s per GPU, step ms, CPU ms, peak and planned GiB). Settings
# (environment): AB_CONFIG (configs/taobao_mm_p90.yaml), AB_NPROC (1), AB_STEPS (300), AB_ARGS
# (bench_train arguments for every run), AB_MODE (model; e2e times the data path too, e.g. with
# AB_ARGS="--gsu-places device_ahead --workers 4"). Logs: $OUT/ab_model_<i>_<run>.log when OUT is set, else /tmp.
set -euo pipefail

base_tgz=$1
shift
root=$PWD
logs=${OUT:-/tmp}
rm -rf /tmp/ab_model_base
mkdir -p /tmp/ab_model_base
# "none": only "new" runs (no older tree to compare).
if [ "$base_tgz" != none ]; then tar xzf "$base_tgz" -C /tmp/ab_model_base; fi

i=0
for run in "$@"; do
  i=$((i + 1))
  IFS=: read -r -a parts <<< "$run"
  case ${parts[0]} in
    new) tree=$root ;;
    base) [ "$base_tgz" != none ] || { echo "a base run needs a base tarball, not none" >&2; exit 2; }
          tree=/tmp/ab_model_base ;;
    *) echo "a run is new or base (then :bench_train arguments), not $run" >&2; exit 2 ;;
  esac
  log=$logs/ab_model_${i}_${parts[0]}.log
  # AB_ARGS is split into words on purpose: several arguments in one setting.
  # shellcheck disable=SC2086
  if (cd "$tree" && PYTHONPATH=$tree:${PYTHONPATH:-} torchrun --nproc_per_node "${AB_NPROC:-1}" \
      benchmarks/bench_train.py --config "${AB_CONFIG:-configs/taobao_mm_p90.yaml}" --modes "${AB_MODE:-model}" \
      --steps "${AB_STEPS:-300}" --warmup 30 ${AB_ARGS:-} "${parts[@]:1}" > "$log" 2>&1); then
    printf '%-60s %s\n' "$run" "$(grep -A1 '^run ' "$log" | tail -n 1)"
  else
    echo "$run: bench_train failed (the end of $log:)"
    tail -n 20 "$log"
  fi
done
