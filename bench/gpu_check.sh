#!/usr/bin/env bash
# GPU speed check (issue 6): full vs MoECa vs ToCa vs FORA on S/2-8E2A and XL/2-8E2A shapes (random
# weights, bf16, batch 8, 50 rectified-flow steps). Needs one CUDA GPU; about 5-7 minutes on an H100.
# Not part of the tests or CI. Options are passed to bench/gpu_check.py (see --help), e.g.
#   bench/gpu_check.sh --out bench/results --repeats 3
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if ! "$PY" -c "import importlib.util as u; assert u.find_spec('moeca.policy.baselines') and u.find_spec('moeca.replay')" 2>/dev/null; then
  # not installed: expose the repository folders as the moeca namespace package (no pip, no network)
  shim="$(mktemp -d)"
  trap 'rm -rf "$shim"' EXIT
  mkdir -p "$shim/moeca"
  for d in models tracer analysis policy replay bench data cli; do ln -s "$PWD/$d" "$shim/moeca/$d"; done
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -m moeca.bench.gpu_check "$@"
