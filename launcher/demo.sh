#!/usr/bin/env bash
# The main job end to end on the embedded dataset (scikit-learn's 1,797 real 8x8 digits, offline):
#   shards -> 2-rank DeepSpeed pretraining (ZeRO-3) -> frozen features -> linear probe -> completions.
# Run through `make demo` (which installs first). About two minutes on 2 idle CPU cores; every output lands
# in demo_out/. Rerunning resumes the pretraining run and rebuilds the evaluation outputs.
set -euo pipefail
cd "$(dirname "$0")/.."

out=demo_out
run=$out/runs/digits
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  export DS_ACCELERATOR=cpu
fi
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
step() { printf '\n== %s\n' "$*"; }

step "1/5 digits -> palette + memory-mapped shards"
if [ ! -f $out/shards/manifest.json ]; then
  igpt-build-shards digits --out $out/shards --n-px 8 --workers 2
fi
igpt-inspect-shards $out/shards --split train --n 64 --out $out/shards_grid.png

step "2/5 DeepSpeed pretraining, 2 ranks, ZeRO-3 (TensorBoard: tensorboard --logdir $run/tensorboard)"
deepspeed --num_gpus 2 launcher/pretrain.py --config launcher/configs/demo_digits_cpu.yaml

step "3/5 frozen features of every layer"
python launcher/extract_features.py --checkpoint $run --shards $out/shards --out $out/features

step "4/5 linear probe per layer, raw-pixel baseline beside it"
python launcher/linear_probe.py --features $out/features

step "5/5 completions: top half given, bottom half sampled"
python launcher/sample.py --checkpoint $run --shards $out/shards --out $out/samples

cat <<EOF

Done. Outputs:
  shards + manifest      $out/shards/  (grid of decoded samples: $out/shards_grid.png)
  pretraining run        $run/  (checkpoints/, config, ds_config.json)
  TensorBoard            tensorboard --logdir $run/tensorboard  (probe/*: the live probe during pretraining)
  live probe over the run $run/live_probe.png
  probe table and plot   $out/features/probe/probe.json, $out/features/probe/probe.png
  completions            $out/samples/completions.png, $out/samples/unconditional.png
EOF
