#!/usr/bin/env bash
# The GPU pass: the model tests' parity cases on CUDA (fp32, bf16, int8/nf4 with the head in fp32), prefix sharing
# on the 8B shape (GRPO and best-of-16 speed-up), and the engine on the 8B shape in bf16 and int8 (tokens/s, MFU,
# memory). Needs torch with CUDA, transformers, pytest and bitsandbytes; not Ray (rmserve is imported from the
# checkout, not installed). Writes logs and JSON under $OUT (default bench-results/gpu).
#
#   bash benchmarks/gpu_pass.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# Import rmserve from this checkout through the same package-dir mapping pyproject.toml declares.
src=$(mktemp -d)/src && mkdir -p "$src/rmserve"
for part in model serve client benchmarks; do ln -s "$PWD/$part" "$src/rmserve/$part"; done
export PYTHONPATH="$src:${PYTHONPATH:-}"
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
$PY -c "import torch, transformers, bitsandbytes as b; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'bitsandbytes', b.__version__)" | tee -a "$OUT/device.txt"

echo "== parity on CUDA"
RMSERVE_TEST_DEVICE=cuda timeout "${PARITY_TIMEOUT:-240}" $PY -m pytest -q -s -p no:cacheprovider \
  tests/unit/model/test_parity.py tests/unit/model/test_prefix_sharing.py tests/unit/model/test_batching_and_precision.py \
  2>&1 | tee "$OUT/parity.log" | grep -E "passed|failed|error|agreement|max \|" | tail -20

echo "== prefix sharing, 8B shape, bf16"
timeout "${PREFIX_TIMEOUT:-180}" $PY -m rmserve.benchmarks.prefix --config 8B-shape --dtype bf16 --groups 16 \
  --max-batch-tokens 65536 --repeats 3 --json "$OUT/prefix-8b.json" 2>&1 | grep -v Warning | tee "$OUT/prefix.log"

echo "== engine, 8B shape, bf16 then int8"
for run in 8B-shape:bf16 8B-shape:int8; do
  timeout "${ENGINE_TIMEOUT:-200}" $PY -m rmserve.benchmarks.engine --runs "$run" --items 128 --repeats 2 \
    --json "$OUT/engine-${run#8B-shape:}.json" 2>&1 | grep -v Warning | tail -8 | tee -a "$OUT/engine.log"
done
