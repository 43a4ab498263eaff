#!/usr/bin/env bash
# GPU speed check (issues 6, 11): full compute vs FORA, TaylorSeer and MoECa refreshing every 2/3/4 steps on
# the S/2-8E2A and XL/2-8E2A shapes (random weights, bf16, batch 8, 50 rectified-flow steps), full and cached
# runs interleaved, eager and compiled. Needs one CUDA GPU; bounded by --max-seconds (default 420: under 8
# minutes with the final writes). Not part of the tests or CI. Options go to bench/gpu_check.py (see --help):
#   bench/gpu_check.sh --out bench/results --repeats 3
#   bench/gpu_check.sh --dry-run --out /tmp/gpu_check     # tiny shape, 2 steps, on the CPU (the script works)
# HiDream-I1's real transformer shape (diffusers, random weights, bf16; needs the [diffusers] extra):
#   bench/gpu_check.sh --hidream --out bench/results      # see bench/gpu_check_hidream.py --help
#   bench/gpu_check.sh --hidream --dry-run --out /tmp/g   # tiny config on the CPU (the script works)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if ! "$PY" -c "import importlib.util as u; assert u.find_spec('moeca.policy.baselines') and u.find_spec('moeca.replay')" 2>/dev/null; then
  # not installed: expose the repository folders as the moeca namespace package (no pip, no network)
  shim="$(mktemp -d)"
  trap 'rm -rf "$shim"' EXIT
  mkdir -p "$shim/moeca"
  for d in models tracer analysis policy replay bench data cli common integrations; do ln -s "$PWD/$d" "$shim/moeca/$d"; done
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ "${1:-}" = "--hidream" ]; then
  shift
  exec "$PY" -m moeca.bench.gpu_check_hidream "$@"
fi
"$PY" -m moeca.bench.gpu_check "$@"
