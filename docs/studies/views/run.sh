#!/usr/bin/env bash
# The views study of docs/studies/views/README.md end to end on 2 CPU ranks: a 500-image training set of the mnist5k
# digits -> shards without views and with 8 views of each training image (the paper's crops, and milder ones) ->
# the same AR pretraining on each (1,000 steps at batch 64: 128 epochs) -> features of every layer + linear probes
# -> docs/studies/views/{results.json,results.md,val_loss.png,probe_layers.png} (report.py).
# Needs `make install` (mlxtend comes with it). About 35 minutes on 2 idle cores; outputs under studies_out/views/.
# A rerun skips what is done.
set -euo pipefail
cd "$(dirname "$0")/../../.."
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
out=studies_out/views
step() { printf '\n== %s\n' "$*"; date; }

step "source: 50 training digits a class, mnist5k's val and test"
[ -f $out/src.npz ] || { mkdir -p $out; python docs/studies/views/make_source.py $out/src.npz; }

# arm: name, igpt-build-shards flags
arms=("crop:--views 0" "views8:--views 8" "views8-mild:--views 8 --view-short-side 224 256")
for arm in "${arms[@]}"; do
  name=${arm%%:*}; flags=${arm#*:}
  step "$name: shards ($flags)"
  [ -f $out/shards-$name/manifest.json ] || igpt-build-shards $out/src.npz --out $out/shards-$name --n-px 14 --k 16 \
    --workers 2 $flags
  step "$name: AR pretraining"
  deepspeed --num_gpus 2 launcher/pretrain.py --config study_mnist5k --data.shards $out/shards-$name \
    --train.run_root $out/runs --train.name $name --train.ds_config ds_configs/cpu.json --train.max_steps 1000 \
    --train.eval_every 50 --train.probe_every 0 --train.save_every 500 --train.log_every 50
  step "$name: features of every layer, linear probes"
  [ -f $out/features/$name/probe/probe.json ] || {
    python launcher/extract_features.py --checkpoint $out/runs/$name --shards $out/shards-$name --out $out/features/$name
    python launcher/linear_probe.py --features $out/features/$name
  }
done

for name in views8 crop; do
  step "$name: low-data probes (10, 50, 250 labels, 5 subsets each)"
  [ -f $out/lowdata/$name/probe.json ] || python launcher/linear_probe.py --features $out/features/$name \
    --label_budgets "[10, 50, 250]" --repeats 5 --concat_k 0 --out $out/lowdata/$name
done

for L in 4 8; do
  step "views8: attentive probe of layer $L (trunk frozen, 300 steps)"
  [ -f $out/runs/attentive-l$L/results.json ] || deepspeed --num_gpus 2 launcher/finetune.py --config finetune_mnist5k \
    --train.init_from $out/runs/views8 --data.shards $out/shards-views8 --train.run_root $out/runs \
    --train.name attentive-l$L --train.ds_config ds_configs/cpu.json --finetune.head attentive \
    --finetune.gen_weight 0 --finetune.probe_layer $L --finetune.shift 0 --finetune.patience 0 --optim.lr 1e-2 \
    --finetune.head_lr_mult 1 --train.max_steps 300
done

step "report"
python docs/studies/views/report.py --out-root $out
