#!/usr/bin/env bash
# The GPU pass: the model tests' parity cases on CUDA (fp32, bf16, int8/nf4 with the head in fp32), prefix sharing
# on the 8B shape (GRPO and best-of-16 speed-up), the engine on the 8B shape in bf16 (tokens/s, MFU, memory), then
# the whole HTTP server on the GPU through the in-process runtime (`rmserve serve --runtime inprocess`: no Ray) against
# the naive server (benchmarks/baseline_server.py) on the same GPU, the load generator on the same machine:
#   qwen    a Qwen3-0.6B-shape checkpoint (bf16, random weights), ≈ 300-token PPO items at 64 and 128 clients:
#           items/s and p99 (target ≥ 1,200 items/s at p99 ≤ 500 ms), and the engine alone on the same items;
#   http8b  an 8B-shape checkpoint (bf16, random weights, 16 GB written to $CKPT_DIR): PPO items (512 + 512 median)
#           at 64 clients, items/s through HTTP ÷ the engine alone on the same items (target ≥ 90 %); then GRPO-8
#           samples one per request through HTTP with prefix sharing on and off (`--prefix-sharing off`);
#   int8    the engine on the 8B shape in int8 (bitsandbytes; it writes its own 16 GB checkpoint: the dearest
#           section, last, so the deadline drops it first).
# Needs torch with CUDA, transformers and pytest; not Ray (rmserve is imported from the checkout through a symlinked
# package dir on PYTHONPATH, not installed; `rmserve serve` runs as `python -m rmserve.serve.cli.main serve`).
#
# THE DEVICE CALL (a GPU session: one `run`, ≈ 9.5 of the 15 device minutes; the script stops itself by DEADLINE_S):
#   1. once, here (needs the network):  bash benchmarks/gpu_pass.sh prepare-wheels
#      → .gpu-wheels/ (≈ 16 MB, ignored through .git/info/exclude): pip download --no-deps of this venv's versions of
#      fastapi starlette uvicorn h11 pydantic annotated-types typing-inspection annotated-doc anyio idna certifi httpx
#      httpcore typing-extensions prometheus-client click opentelemetry-api (py3-none-any), pydantic-core and pyyaml
#      for CPython 3.11 and 3.12 (cp311/, cp312/: the box had 3.12.3 in 2026-11, the script takes its own), and
#      bitsandbytes slimmed to its CPU and CUDA 13 libraries (43 → 7 MB); plus the demo model's cache (rmserve-cache/:
#      every bench checkpoint's tokenizer, 0.8 MB), so the box does not train it again. No sniffio: anyio 4.16 needs none.
#   2. run(command="PYTHONUNBUFFERED=1 bash benchmarks/gpu_pass.sh", timeout_s=600, carry=[".gpu-wheels"])
#      The script installs them itself: pip install --no-index --no-deps --target /tmp/rmserve-site.XXXX
#      .gpu-wheels/*.whl .gpu-wheels/cpXY/*.whl, first on PYTHONPATH after the checkout.
# What comes back ($OUT, re-packed after every section): summary.txt (every headline line) and gpu-pass.tgz (every
# log and JSON: device.txt, parity.log, prefix*.{log,json}, engine*.{log,json}, server-*/{server-*.json,.md,logs/}).
# A rerun of what did not run, on the still-warm machine (it stays warm 30 s): the same call with SECTIONS="..." in
# front of `bash` (checkpoints under /tmp are reused there).
#
# Sections (SECTIONS, in this order), the cap of each command (s) and the expected time on one H100 (estimates, not
# measured: the H200 run of 2026-11-29 had the 8B engine at 25 items/s and 42 parity cases):
#   setup    -      ≈ 20   wheels, device.txt, the no-Ray import check
#   parity   90     ≈ 60   pytest on CUDA (42 cases)
#   prefix   90     ≈ 60   8B, bf16, 8 groups (was 16), fastest of 2 (was 3)
#   engine   60     ≈ 30   8B, bf16, 128 PPO items, fastest of 2
#   qwen     45+150 ≈ 110  checkpoint 1.2 GB (≈ 10), engine alone (≈ 15), 2 servers up (≈ 30), 4 points ≤ 10 s each
#   http8b   90+240 ≈ 200  checkpoint 16 GB (≈ 30), engine alone on 188 items (≈ 45), 3 servers up (≈ 80), 5 points
#   int8     120    ≈ 120  8B int8 (64 items, 1 run): writes its own 16 GB, quantises while loading
# ≈ 480 s before int8: int8 gets what is left before the deadline (skipped under 20 s); a second call with
# SECTIONS=int8 if device time remains.
# Knobs: DEADLINE_S (560: each command's timeout, SIGKILL margin included, ends by it), SECTIONS, PYTHON (python3),
# RESULTS (bench-results/gpu), CKPT_DIR (/tmp/rmserve-gpu-pass), HTTP8B_LAYERS (32; fewer: a quicker checkpoint of
# the 8B width, which the summary then names), GPU_PASS_SMOKE=1 (every section's command on a CPU in ≈ 3 minutes: tiny
# models, `--quick` points, pytest --collect-only, a `ray` stub that fails on import), e.g.
#   GPU_PASS_SMOKE=1 PYTHON=.venv/bin/python bash benchmarks/gpu_pass.sh
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=.gpu-wheels

prepare_wheels() {
  # The wheels the GPU box lacks (its image: Python 3.12, torch, transformers, no fastapi/uvicorn/pydantic/bitsandbytes),
  # pinned to this environment's versions (tested together here); binary ones for CPython 3.11 and 3.12 in their own
  # folders; bitsandbytes slimmed to its CPU and CUDA 13 libraries (43 MB → 7 MB; the box's torch is cu130); the
  # demo model's cache (its tokenizer is every bench checkpoint's), so the box does not train it again.
  set -e
  local pure="fastapi starlette uvicorn h11 pydantic annotated-types typing-inspection annotated-doc anyio idna certifi
    httpx httpcore typing-extensions prometheus-client click opentelemetry-api"
  local binary="pydantic-core pyyaml"
  pins() { $PY -c 'import sys; from importlib.metadata import version as v; print(" ".join(f"{n}=={v(n)}" for n in sys.argv[1:]))' "$@"; }
  local get="$PY -m pip download -q --no-deps --only-binary=:all: --implementation cp --platform manylinux_2_28_x86_64
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
  rm -rf "$WHEELS" && mkdir -p "$WHEELS/cp311" "$WHEELS/cp312" "$WHEELS/rmserve-cache"
  # shellcheck disable=SC2046,SC2086
  $get --python-version 3.12 -d "$WHEELS" $(pins $pure)
  for v in 11 12; do
    # shellcheck disable=SC2046,SC2086
    $get --python-version "3.$v" -d "$WHEELS/cp3$v" $(pins $binary)
  done
  local tmp && tmp=$(mktemp -d)
  # shellcheck disable=SC2046,SC2086
  $get --python-version 3.12 -d "$tmp" $(pins bitsandbytes)
  $PY - "$tmp"/bitsandbytes-*.whl "$WHEELS" <<'EOF'
import base64, hashlib, re, sys, zipfile
from pathlib import Path
src, out = Path(sys.argv[1]), Path(sys.argv[2])
keep = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")  # the box's torch is 2.11+cu130
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out / src.name, "w", zipfile.ZIP_DEFLATED) as zout:
    names = [n for n in zin.namelist() if not re.search(r"libbitsandbytes_\w+\.so$", n) or keep.search(n)]
    record = next(n for n in names if n.endswith(".dist-info/RECORD"))
    lines = []
    for name in names:
        if name == record:
            continue
        data = zin.read(name)
        zout.writestr(zin.getinfo(name), data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{name},sha256={digest},{len(data)}")
    zout.writestr(record, "\n".join(lines + [f"{record},,"]) + "\n")
EOF
  rm -rf "$tmp"
  local demo && demo=$($PY -c 'from rmserve.model.demo import ensure_demo_model; print(ensure_demo_model())')
  cp -r "$demo" "$WHEELS/rmserve-cache/"
  grep -qx '/.gpu-wheels/' "$(git rev-parse --git-dir)/info/exclude" 2>/dev/null ||
    { mkdir -p "$(git rev-parse --git-dir)/info" && echo '/.gpu-wheels/' >>"$(git rev-parse --git-dir)/info/exclude"; }
  du -sh "$WHEELS" && find "$WHEELS" -name '*.whl' | sort
}
if [ "${1:-}" = "prepare-wheels" ]; then
  PY=${PYTHON:-.venv/bin/python}
  prepare_wheels
  exit
fi

START=$SECONDS
DEADLINE=${DEADLINE_S:-560}
SMOKE=${GPU_PASS_SMOKE:-0}
R=${RESULTS:-bench-results/gpu}
CKPT=${CKPT_DIR:-/tmp/rmserve-gpu-pass}
LAYERS=${HTTP8B_LAYERS:-32}
SECTIONS=${SECTIONS:-"parity prefix engine qwen http8b int8"}
if [ "$SMOKE" = 1 ]; then  # the same commands on tiny models (pytest only collects), in seconds on a CPU
  QWEN=tiny-qwen3 BIG=tiny-1L QUICK=--quick DEVICE=cpu R=${RESULTS:-bench-results/gpu-smoke} CKPT=${CKPT_DIR:-$(mktemp -d)}
  PARITY_ARGS=--collect-only PREFIX_MODEL="--config tiny-1L --dtype fp32 --groups 1 --max-batch-tokens 4096 --repeats 1"
  ENGINE_BF16=tiny-1L:fp32 ENGINE_INT8=tiny-1L:bf16
else
  QWEN=Qwen3-0.6B-shape BIG=8B-shape QUICK= DEVICE=cuda
  PARITY_ARGS= PREFIX_MODEL="--config 8B-shape --dtype bf16 --groups 8 --max-batch-tokens 65536 --repeats 2"
  ENGINE_BF16=8B-shape:bf16 ENGINE_INT8=8B-shape:int8
fi
mkdir -p "$R" "$CKPT"
R=$(cd "$R" && pwd)
SUMMARY=$R/summary.txt
: >"$SUMMARY"
export PYTHONUNBUFFERED=1
say() { echo "$*" | tee -a "$SUMMARY"; }
pack() {  # on the device machine ($OUT set): every result in one archive, the summary beside it (≤ 8 files come back)
  [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ] || return 0
  tar -czf "$OUT/gpu-pass.tgz" -C "$R" . && cp "$SUMMARY" "$OUT/summary.txt"
}
wanted() { case " $SECTIONS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
budget() {  # the timeout of a command capped at $1 s: what is left before the deadline, less the stop margin
  local left=$((DEADLINE - (SECONDS - START) - 45))
  echo $(($1 < left ? $1 : left))
}
limited() {  # limited CAP NAME LOG CMD...: CMD under `timeout` (skipped when under 20 s are left), its output (less
  # transformers' warnings) shown and written to LOG; its status and time in the summary; returns its status
  local t name=$2 log=$3 rc began=$SECONDS
  t=$(budget "$1")
  shift 3
  if [ "$t" -lt 20 ]; then
    say "$name: skipped ($((SECONDS - START))s in, the deadline is ${DEADLINE}s)" | tee "$log"
    return 99
  fi
  { timeout -k 45 "$t" "$@" 2>&1; echo $? >"$R/.rc"; } | grep --line-buffered -v Warning | tee "$log"
  rc=$(cat "$R/.rc")
  say "$name: rc $rc$([ "$rc" = 124 ] && echo ' (timed out)') after $((SECONDS - began))s (cap ${t}s)"
  return "$rc"
}

# rmserve from this checkout through the same package-dir mapping pyproject.toml declares.
src=$(mktemp -d)/src && mkdir -p "$src/rmserve"
for part in model serve client benchmarks; do ln -s "$PWD/$part" "$src/rmserve/$part"; done
site=
if [ -d "$WHEELS" ]; then  # the carried wheels, for this interpreter
  site=$(mktemp -d /tmp/rmserve-site.XXXX)
  abi=$($PY -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$WHEELS"/*.whl \
    "$WHEELS/$abi"/*.whl || say "wheels: install failed ($abi)"
  mkdir -p /tmp/rmserve-cache && cp -rn "$WHEELS/rmserve-cache/." /tmp/rmserve-cache/
  export RMSERVE_CACHE_DIR=${RMSERVE_CACHE_DIR:-/tmp/rmserve-cache}
fi
stub=
if [ "$SMOKE" = 1 ]; then  # a Ray that cannot be imported, as on the GPU box
  stub=$(mktemp -d) && mkdir "$stub/ray" && echo 'raise ImportError("no Ray here (GPU-pass smoke)")' >"$stub/ray/__init__.py"
fi
export PYTHONPATH="$src${site:+:$site}${stub:+:$stub}${PYTHONPATH:+:$PYTHONPATH}"

echo "== setup"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
  $PY -c "import bitsandbytes as b; print('bitsandbytes', b.__version__)" 2>&1 | tail -1
  $PY -c "import fastapi, uvicorn, pydantic, starlette, httpx; print('fastapi', fastapi.__version__, 'uvicorn', \
uvicorn.__version__, 'pydantic', pydantic.__version__, 'starlette', starlette.__version__, 'httpx', httpx.__version__)"
  $PY -c "import sys, rmserve.serve.inprocess.server, rmserve.serve.cli.main; \
bad = [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]; assert not bad, bad; print('in-process path: no ray')"
} 2>&1 | tee "$R/device.txt"
cat "$R/device.txt" >>"$SUMMARY"
pack

if wanted parity; then
  echo "== parity on CUDA"
  # shellcheck disable=SC2086
  RMSERVE_TEST_DEVICE=$DEVICE limited 90 parity "$R/parity.log" $PY -m pytest -q -s -p no:cacheprovider $PARITY_ARGS \
    tests/unit/model/test_parity.py tests/unit/model/test_prefix_sharing.py \
    tests/unit/model/test_batching_and_precision.py >/dev/null
  grep -E "passed|failed|error|agreement|max \||collected" "$R/parity.log" | tail -20 | tee -a "$SUMMARY"
  pack
fi

if wanted prefix; then
  echo "== prefix sharing, 8B shape, bf16"
  # shellcheck disable=SC2086
  limited 90 prefix "$R/prefix.log" $PY -m rmserve.benchmarks.prefix $PREFIX_MODEL --json "$R/prefix-8b.json"
  tail -n 13 "$R/prefix.log" >>"$SUMMARY"
  pack
fi

engine() {  # engine CONFIG:PRECISION CAP ITEMS REPEATS
  local precision=${1##*:}
  limited "$2" "engine $1" "$R/engine-$precision.log" $PY -m rmserve.benchmarks.engine --runs "$1" --items "$3" \
    --repeats "$4" --json "$R/engine-$precision.json"
  grep -E "^${1%%:*}:" "$R/engine-$precision.log" | tail -2 >>"$SUMMARY"
  pack
}
if wanted engine; then
  echo "== engine, 8B shape, bf16"
  engine "$ENGINE_BF16" 60 128 2
fi

http() {  # http NAME CKPT_CAP BENCH_CAP CONFIG LAYERS PLAN: write CONFIG's checkpoint, then the servers on PLAN
  local name=$1 config=$4 layers=$5 plan=$6 dir="$CKPT/$1" began=$SECONDS
  local depth=()
  [ -n "$layers" ] && depth=(--layers "$layers")
  echo "== $name: $config${layers:+ ($layers layers)} checkpoint, bf16, built on $DEVICE"
  if [ ! -f "$dir/.complete" ]; then
    limited "$2" "$name checkpoint" "$R/checkpoint-$name.log" $PY -m rmserve.benchmarks.models "$config" \
      --out "$dir" --dtype bf16 --device "$DEVICE" "${depth[@]}" || return
    touch "$dir/.complete"
  fi
  say "$name checkpoint: $config${layers:+ with $layers layers}, $(du -sh "$dir" | cut -f1) in $((SECONDS - began))s"
  echo "== $name: rmserve --runtime inprocess vs the naive server, plan $plan"
  # shellcheck disable=SC2086
  limited "$3" "$name servers" "$R/server-$name.log" $PY -m rmserve.benchmarks.server --model "$dir" --dtype bf16 \
    --runtime inprocess --plan "$plan" --repeats 1 $QUICK --out "$R/server-$name"
  grep -E "^engine alone|^server | vs |did not start|Error|error" "$R/server-$name.log" | tail -30 >>"$SUMMARY"
  pack
}
if wanted qwen; then
  http qwen 45 150 "$QWEN" "" ppo-300
fi
if wanted http8b; then
  layers=
  if [ "$SMOKE" != 1 ] && [ "$LAYERS" != 32 ]; then layers=$LAYERS; fi
  http http8b 90 240 "$BIG" "$layers" ppo-grpo
  [ "$SMOKE" = 1 ] || rm -rf "${CKPT:?}/http8b"  # 16 GB: the int8 run writes its own
fi

if wanted int8; then
  echo "== engine, 8B shape, int8"
  engine "$ENGINE_INT8" 120 64 1
fi

say "gpu pass: done in $((SECONDS - START))s (sections: $SECTIONS)"
rm -f "$R/.rc"
pack
[ "$SMOKE" = 1 ] && [ -z "${CKPT_DIR:-}" ] && rm -rf "$CKPT"
exit 0
