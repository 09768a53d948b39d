#!/usr/bin/env bash
# The main job on the bundled base (all-MiniLM-L6-v2) and the example adapters (SST-2, AG News):
# install, then `edgelora export` -> one verified deployment folder per target, then use it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
EL=.venv/bin/edgelora
$EL inspect examples/adapters/sst2
# No arguments: bundled base + examples/adapters/* -> out/cpu-fp32 (base engine, deltas, baked task
# engines, each verified against PyTorch; report.json / report.md)
$EL export --force
# int8 for a laptop CPU, with task accuracy of engine and PyTorch on a labelled sample
$EL export --target cpu-int8 --eval sst2=examples/data/sst2-dev-500.tsv --force
# latency side by side: base engine, baked task engines, PEFT unmerged in PyTorch, the runtime after a swap
$EL bench out/cpu-int8 --rounds 4
# the on-device runtime (numpy + onnxruntime): swap tasks in place, classify, a mixed-task batch
$EL run out/cpu-fp32 --task agnews --text "Stocks fell as oil prices rose to a record high"
.venv/bin/python examples/runtime_tasks.py out/cpu-fp32
.venv/bin/python examples/classify_engine.py out/cpu-int8 sst2 "a gorgeous, witty, seductive movie" \
    "the plot is a dull mess"
.venv/bin/python examples/classify_engine.py out/cpu-int8 agnews "Stocks fell as oil prices rose to a record high" \
    "The striker scored twice in the final minutes"
