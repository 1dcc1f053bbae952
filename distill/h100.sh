#!/usr/bin/env bash
# The whole synthetic experiment on one GPU, in order (distill/RESULTS.md): VAE, teacher, stage-1 student and the
# part-1 table; then stage 2 and the consistency baseline from that student; then the any-step evaluation.
#   bash distill/h100.sh [OUT [SIZE [EXPERIMENT OPTIONS]]]   # e.g. runs/h100 gpu --vae runs/h100-1/stage1/model
# OUT defaults to runs/h100 (the configs' folder), SIZE to gpu. Another OUT gets copies of the configs pointing at
# it; SIZE tiny also cuts their steps to 2 (a smoke test).
set -euo pipefail
out=${1:-runs/h100}
size=${2:-gpu}
shift $(($# < 2 ? $# : 2))
python -m distill.experiment "$out" --size "$size" "$@"
for task in stage2 consistency; do
  python - "$out" "$size" "$task" <<'PY'
import json, sys
out, size, task = sys.argv[1:]
cfg = json.loads(open(f"distill/configs/h100_{task}.json").read().replace("runs/h100", out))
if size == "tiny":
    cfg.update(steps=2, batch_size=2, log_every=1, save_every=2, stage2={"budgets": [2]} if task == "stage2" else {})
    cfg = {k: v for k, v in cfg.items() if v != {}}
open(f"{out}/{task}.json", "w").write(json.dumps(cfg, indent=2))
PY
  torchrun --nproc_per_node=1 -m distill.train "$out/$task.json"
done
if [ "$size" = tiny ]; then
  python -m distill.evaluate "$out" --budgets 1 2 --drift 1 2
else
  python -m distill.evaluate "$out"
fi
