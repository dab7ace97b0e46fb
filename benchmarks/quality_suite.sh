#!/usr/bin/env bash
# The quality benchmarks behind docs/quality/ (issues 11 and 12). Resumable: re-run to continue.
#
#   bash benchmarks/quality_suite.sh sd3        # tiny-sd3: the issue-11 rows, N = 1000 (2 processes)
#   bash benchmarks/quality_suite.sh sd3-methods # tiny-sd3: the issue-12 method rows, N = 1000
#   bash benchmarks/quality_suite.sh sd3-sweep  # tiny-sd3: SLG / PAG on each block with CFG 3, N = 500
#   bash benchmarks/quality_suite.sh sd3-all    # the three above, one chain per core
#   bash benchmarks/quality_suite.sh methods    # tiny-sd: the issue-12 method rows, N = 1000 (2 processes)
#   bash benchmarks/quality_suite.sh report     # merge each run with paired bootstrap -> docs/quality/
#
# N=... overrides the image count (e.g. N=100 for a smoke run); OUT=... the outputs folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs}
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
bench() { "$PY" -m diffguide.cli.main bench quality --threads 1 "$@"; }

# tiny-sd3 has 4 joint blocks: the SD3.5 presets (SLG b7-9 of 24, PAG b13 of 24) scaled to its
# depth are SLG/TPG b1 and PAG b2; the sweep below measures every block.
SD3_LAYERS=(--layers slg=b1 --pag-layers b2 --tpg-layers b1)

case "${1:-}" in
sd3)  # as two processes (a, b), one per core; 'report' merges them
  "$0" sd3-a & "$0" sd3-b & wait
  ;;
sd3-a)
  bench --model tiny-sd3 --n "${N:-1000}" "${SD3_LAYERS[@]}" --out "$OUT/quality-sd3" \
    --settings cond/none,cond/cfg2,cond/cfg3,cond/cfg5,cond/slg3,cond/cfg3+slg3,cond/pag3
  ;;
sd3-b)
  bench --model tiny-sd3 --n "${N:-1000}" "${SD3_LAYERS[@]}" --out "$OUT/quality-sd3-b" \
    --settings cond/cfg3+pag3,cond/tpg3,cond/cfg3+tpg3,uncond/none,uncond/slg3,uncond/pag3,uncond/tpg3
  ;;
sd3-methods)  # the issue-12 methods on tiny-sd3, as two processes (a, b); 'report' merges them
  "$0" sd3-methods-a & "$0" sd3-methods-b & wait
  ;;
sd3-methods-a)  # (flow model: CFG-Zero*'s zero-init is its own setting)
  bench --model tiny-sd3 --n "${N:-1000}" "${SD3_LAYERS[@]}" --out "$OUT/quality-sd3-methods" \
    --settings cond/cfg_zero_star3,cond/cfg3+prompt_shuffle3 \
    --setting "cond/cfg_zero_star:scale=3,zero_init_steps=0" \
    --setting "cond/apg:scale=5,eta=0,norm_threshold=2.5,momentum=-0.75"
  ;;
sd3-methods-b)
  bench --model tiny-sd3 --n "${N:-1000}" "${SD3_LAYERS[@]}" --out "$OUT/quality-sd3-methods-b" \
    --setting "cond/cfg:scale=5,window=sigma:0.219:0.844" \
    --setting "cond/cfg3+seg:scale=3,layers=b1" \
    --setting "cond/cfg3+uncond_query_shuffle:strength=1,layers=b1"
  ;;
sd3-sweep)  # as two processes (a: CFG 3 and blocks 0-1, b: blocks 2-3); 'report' merges them
  "$0" sd3-sweep-a & "$0" sd3-sweep-b & wait
  ;;
sd3-sweep-a | sd3-sweep-b)
  # SD3_LAYERS only so that cond/cfg3 has the same cache key as in the sd3 run (each sweep term names
  # its own layers); the sweep's CFG 3 is then the first 500 images of that run's
  if [ "$1" = sd3-sweep-a ]; then blocks=(0 1) out="$OUT/quality-sd3-sweep" base=(--settings cond/cfg3)
  else blocks=(2 3) out="$OUT/quality-sd3-sweep-b" base=(); fi
  args=()
  for b in "${blocks[@]}"; do
    args+=(--setting "cond/cfg3+slg:scale=3,layers=b$b" --setting "cond/cfg3+pag:scale=3,layers=b$b")
  done
  bench --model tiny-sd3 --n "${N:-500}" "${SD3_LAYERS[@]}" --out "$out" "${base[@]}" "${args[@]}"
  ;;
sd3-all)  # everything on tiny-sd3, one chain per core
  ("$0" sd3-a && "$0" sd3-methods-a && "$0" sd3-sweep-a) &
  ("$0" sd3-b && "$0" sd3-methods-b && "$0" sd3-sweep-b) &
  wait
  ;;
methods)  # as two processes (a, b), one per core; 'report' merges them
  "$0" methods-a & "$0" methods-b & wait
  ;;
methods-a)
  bench --n "${N:-1000}" --layers slg=mid --out "$OUT/quality-methods" \
    --settings cond/none,cond/cfg2,cond/cfg3,cond/cfg5,cond/cfg3+seg3
  ;;
methods-b)
  bench --n "${N:-1000}" --layers slg=mid --out "$OUT/quality-methods-b" \
    --settings cond/cfg3+slg3,cond/cfg_zero_star3,cond/cfg3+prompt_shuffle3 \
    --setting "cond/apg:scale=5,eta=0,norm_threshold=2.5,momentum=-0.75" \
    --setting "cond/cfg:scale=5,window=sigma:0.28:5.42" \
    --setting "cond/cfg3+uncond_query_shuffle:strength=1" \
    --setting "cond/cfg_zero_star:scale=3,zero_init_steps=0"
  ;;
report)
  rep() { "$PY" -m diffguide.cli.main bench report "$@"; }
  sd3=("$OUT/quality-sd3" "$OUT/quality-sd3-b")
  for m in methods methods-b; do
    [ -f "$OUT/quality-sd3-$m/results.json" ] && sd3+=("$OUT/quality-sd3-$m")
  done
  [ -f "$OUT/quality-sd3-b/results.json" ] && rep "${sd3[@]}" --out docs/quality/sd3
  [ -f "$OUT/quality-sd3-sweep-b/results.json" ] \
    && rep "$OUT/quality-sd3-sweep" "$OUT/quality-sd3-sweep-b" --out docs/quality/sd3-sweep
  [ -f "$OUT/quality-methods-b/results.json" ] && rep "$OUT/quality-methods" "$OUT/quality-methods-b" --out docs/quality/methods
  true
  ;;
*)
  sed -n '2,10p' "$0"; exit 2 ;;
esac
