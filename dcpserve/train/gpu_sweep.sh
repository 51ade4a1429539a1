#!/usr/bin/env bash
# Train one demo-model variant per GPU in parallel and keep the best (by the training script's own
# sparse-attention accuracy at 1K/4K/8K):
#   bash dcpserve/train/gpu_sweep.sh OUT_DIR MINUTES "VARIANT_ARGS_0" "VARIANT_ARGS_1" ...
# OUT_DIR gets the best run's model.safetensors, config.json, tokenizer.json, train_log.json and
# sweep.json (every variant's arguments, steps and accuracy).
set -u
out=$1; minutes=$2; shift 2
runs=/tmp/dcpserve-sweep; rm -rf "$runs"; mkdir -p "$runs" "$out"
i=0
for v in "$@"; do
  CUDA_VISIBLE_DEVICES=$i PYTHONUNBUFFERED=1 python -m dcpserve.train.train --out "$runs/$i" --minutes "$minutes" $v \
    > "$runs/$i.log" 2>&1 &
  i=$((i + 1))
done
wait
python - "$runs" "$out" "$@" <<'PY'
import json, os, shutil, sys
runs, out, variants = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = []
for i, v in enumerate(variants):
    path = os.path.join(runs, str(i), "train_log.json")
    if not os.path.exists(path):
        print(f"variant {i} ({v}) failed:\n" + open(os.path.join(runs, f"{i}.log")).read()[-3000:])
        continue
    log = json.load(open(path))
    acc = log["eval_accuracy"]
    vals = [x for per_facts in acc.values() for x in per_facts.values()]
    rows.append({"variant": i, "args": v, "eval": acc, "mean": sum(vals) / len(vals),
                 "steps": {s["name"]: s["steps"] for s in log["stages"]}})
    print(f"variant {i} [{v}]: steps {rows[-1]['steps']} accuracy {acc}")
best = max(rows, key=lambda r: r["mean"])
print("best:", best)
for f in ("model.safetensors", "config.json", "tokenizer.json", "train_log.json"):
    shutil.copy(os.path.join(runs, str(best["variant"]), f), out)
json.dump({"variants": rows, "best": best["variant"]}, open(os.path.join(out, "sweep.json"), "w"), indent=1)
PY
