#!/usr/bin/env bash
# The main job on the bundled base (all-MiniLM-L6-v2) and the example adapters: install, inspect an
# adapter, merge each into the base in fp32, and classify a sentence with the merged models.
# (`edgelora export` takes this place when it lands.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
EL=.venv/bin/edgelora
$EL inspect examples/adapters/sst2
for task in sst2 agnews; do
    $EL merge --adapter "examples/adapters/$task" --output "out/$task-merged" --force
done
.venv/bin/python examples/classify.py out/sst2-merged "a gorgeous, witty, seductive movie" "the plot is a dull mess"
.venv/bin/python examples/classify.py out/agnews-merged "Stocks fell as oil prices rose to a record high" \
    "The striker scored twice in the final minutes"
