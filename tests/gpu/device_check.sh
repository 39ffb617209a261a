#!/usr/bin/env bash
# The device check of issue 16: one call on a lent GPU machine (an H200 here), results
# under $OUT. Installs nothing from the network: the image's python3 has torch, JAX with
# its CUDA plugin, numpy, pandas, pyarrow, scipy, psutil, nvidia-ml-py, click, rich, yaml,
# prometheus_client, pytest (and pytest-xdist). Reads clocks, never sets them: no clock,
# power-limit, MIG or other GPU setting is changed.
#
# Steps, in priority order (the must-show figures first, one step per figure, so a step
# cut at its cap loses one figure and a rerun redoes only that step: the device tool
# empties $OUT between calls, so nothing can be resumed), each under its own `timeout`
# capped by what is left of the whole budget (DEVICE_CHECK_BUDGET_S, default 360 s, of
# which RESERVE_S is kept for collecting and summarizing):
#   setup       install the project (editable, no deps, no index) so the entry points resolve;
#               falls back to an entry-points-only shim on PYTHONPATH; env.json; nvidia-smi
#   gpu-gemm    tests/gpu/bare_matmul.py: bf16 8192^3 harness case vs bare torch.matmul
#   gpu-tp      gpu_check.yaml's composite.tp_decode_step on cuda (graph/eager, batch 1
#               and 32) with the components the planner adds: kappa and J/token
#   gpu-paged   gpu_check.yaml's decode.attention on cuda (paged kernels and contiguous)
#   jax-quick   the quick suite on jax:gpu
#   cuda-tests  tests/probes/test_cuda.py
#   quick       the quick suite on cuda
#   gpu-rest    the rest of tests/gpu/gpu_check.yaml on cuda
#   cuda-marked the other test files that skip without CUDA (found by grep), not slow
# Every suite runs with --rounds 1: the figures need one measurement per case, not the
# run-to-run spread rounds give (the quick suite asks for 3 rounds: about 2.2x the time,
# configs/quick.yaml), and within a round the case order is still shuffled.
# then: collect indicators of runs an interrupted step left without them, `show` each run
# (160 columns: at the 80 of a file, long case ids shrink to identical labels), and
# tests/gpu/summary.py writes $OUT/summary.txt and summary.json.
# STEPS="gpu-paged jax-quick" runs only those steps (a targeted rerun); setup always runs.
# Each step's output: $OUT/<step>.log; timings: $OUT/steps.tsv; runs: $OUT/runs/<run_id>/.
set -u
OUT=${OUT:-/tmp/coherence-device-out}
BUDGET_S=${DEVICE_CHECK_BUDGET_S:-360}
RESERVE_S=${RESERVE_S:-25}
PY=${PYTHON:-python3}
STEPS=${STEPS:-all}
RUNS="$OUT/runs"
mkdir -p "$RUNS"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../.." || exit 2
T0=$(date +%s)
printf 'step\trc\tseconds\tlimit\n' >"$OUT/steps.tsv"

wanted() { [[ $STEPS == all || " $STEPS " == *" $1 "* || $1 == setup ]]; }

# step NAME WANT_S CMD...: CMD under timeout min(WANT_S, budget left - RESERVE_S), its
# output in $OUT/NAME.log, one line in steps.tsv (rc -1: not started, budget spent;
# 124: stopped at its limit, SIGTERM first so a run records its finished cases).
step() {
  local name=$1 want=$2
  shift 2
  wanted "$name" || return 0
  local left=$((BUDGET_S - RESERVE_S - ($(date +%s) - T0)))
  local limit=$((want < left ? want : left))
  if ((limit < 10)); then
    printf '%s\t-1\t0\t0\n' "$name" >>"$OUT/steps.tsv"
    echo "== $name: not started, budget spent ($left s left)"
    return 0
  fi
  local s rc
  s=$(date +%s)
  echo "== $name (limit ${limit}s)"
  timeout -k 15 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - s))" "$limit" >>"$OUT/steps.tsv"
  echo "== $name rc=$rc in $(($(date +%s) - s))s"
  tail -n 4 "$OUT/$name.log"
}

setup() {
  date -u
  nvidia-smi -L
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv
  "$PY" --version
  "$PY" -c 'import torch; print("torch", torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))'
  "$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())' 2>&1 | tail -1
  if ! "$PY" -m pip install -q --no-deps --no-index --no-build-isolation -e .; then
    echo "pip install failed: entry points through a shim on PYTHONPATH"
  fi
  "$PY" -c 'import harness.registry as r; r.discover(); print("probes discovered")'
}

# Entry points without pip: a .dist-info holding pyproject's entry points, the repo and
# it on PYTHONPATH (importlib.metadata finds distributions on sys.path).
shim() {
  local meta="$OUT/.shim"
  mkdir -p "$meta/coherence-0.0.dist-info"
  printf 'Metadata-Version: 2.1\nName: coherence\nVersion: 0.0\n' >"$meta/coherence-0.0.dist-info/METADATA"
  "$PY" - "$meta/coherence-0.0.dist-info/entry_points.txt" <<'PY'
import sys, tomllib
doc = tomllib.load(open("pyproject.toml", "rb"))["project"]
with open(sys.argv[1], "w") as f:
    f.write("[console_scripts]\n" + "".join(f"{k} = {v}\n" for k, v in doc.get("scripts", {}).items()))
    for group, eps in doc.get("entry-points", {}).items():
        f.write(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
PY
  export PYTHONPATH="$PWD:$meta${PYTHONPATH:+:$PYTHONPATH}"
}

export PY
export -f setup
step setup 90 bash -c setup
if ! "$PY" -c 'import harness.registry as r; r.discover()' >/dev/null 2>&1; then
  shim
  "$PY" -c 'import harness.registry as r; r.discover(); print("probes discovered through the shim")' \
    >>"$OUT/setup.log" 2>&1 || echo "probe discovery failed: see setup.log"
fi
"$PY" -m harness.cli env --json >"$OUT/env.json" 2>>"$OUT/setup.log" || echo "env failed: see setup.log"

step gpu-gemm 60 "$PY" -m tests.gpu.bare_matmul --n 8192 --dtype bf16 --device cuda:0 --json "$OUT/gemm_ratio.json"
# The GPU check suite in three runs, each its own step and label (tests/gpu/summary.py
# reads each figure from its label): the TP step (the planner adds its components to
# the same run, which kappa needs), the decode.attention kernels, then the rest after
# the other suites. Together they cover every probe of the suite once.
TP_PROBES=(composite.tp_decode_step)
PAGED_PROBES=(decode.attention)
REST_PROBES=(memory gemm prefill decode.projection decode.layer overhead transfer composite.colocated_request)
GPU_RUN=(-m harness.cli run --suite tests/gpu/gpu_check.yaml --devices cuda --out "$RUNS" -q --no-report --rounds 1)
step gpu-tp 90 "$PY" "${GPU_RUN[@]}" --label device-gpu-tp "${TP_PROBES[@]/#/--probe=}"
step gpu-paged 150 "$PY" "${GPU_RUN[@]}" --label device-gpu-paged "${PAGED_PROBES[@]/#/--probe=}"
step jax-quick 120 "$PY" -m harness.cli run --backend jax --devices jax:gpu --suite quick --out "$RUNS" -q \
  --no-report --rounds 1 --label device-jax-quick
step cuda-tests 75 "$PY" -m pytest -q -rs -p no:cacheprovider tests/probes/test_cuda.py
step quick 120 "$PY" -m harness.cli run --suite quick --devices cuda --out "$RUNS" -q --no-report --rounds 1 \
  --label device-quick
step gpu-rest 90 "$PY" "${GPU_RUN[@]}" --label device-gpu-check-rest "${REST_PROBES[@]/#/--probe=}"
# Other tests that skip without CUDA (the graph, paged-kernel and energy helpers' GPU
# tests among them): whole files, not slow, 4 processes where pytest-xdist is there.
mapfile -t MARKED < <(grep -rlE 'cuda\.is_available\(\)|requires_cuda|mark\.cuda' tests --include='test_*.py' \
  | grep -v -e '^tests/probes/test_cuda.py$' -e '^tests/gpu/' | sort)
XDIST=()
"$PY" -c 'import xdist' 2>/dev/null && XDIST=(-n 4)
if ((${#MARKED[@]})); then
  step cuda-marked 90 "$PY" -m pytest -q -rs -p no:cacheprovider -m 'not slow' "${XDIST[@]}" "${MARKED[@]}"
fi

# A run stopped at its limit has its finished cases but no indicators.json yet.
for run in "$RUNS"/*/; do
  [[ -f $run/indicators.json ]] || timeout 30 "$PY" -m harness.cli collect -q "$run" >>"$OUT/collect.log" 2>&1
done
for run in "$RUNS"/*/; do COLUMNS=160 timeout 20 "$PY" -m harness.cli show "$run"; done >"$OUT/show.txt" 2>&1
nvidia-smi --query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv >>"$OUT/setup.log" 2>&1
printf 'total\t0\t%s\t%s\n' "$(($(date +%s) - T0))" "$BUDGET_S" >>"$OUT/steps.tsv"
timeout 60 "$PY" -m tests.gpu.summary "$OUT" --runs "$RUNS"
echo "device check done in $(($(date +%s) - T0))s; figures in $OUT/summary.txt"
