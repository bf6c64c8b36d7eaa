#!/usr/bin/env bash
# The benchmark matrix of issue 6 on one GPU: which implementation, ZeRO stage and knobs train the
# iGPT-S shape (24 layers, d 512, seq 1024, micro-batch 16, bf16) and iGPT-M fastest, each against
# HF ImageGPT, our plain PyTorch model (eager and torch.compile) measured in the same run.
#
# On the H200 machine (its image has torch + transformers but no deepspeed), from the checkout root,
# after `bash ../shared/device/make-wheels.sh` and `bash bench/gpu_wheels.sh` here have filled .whl/:
#     device run, carry [".whl"], timeout_s 600:  bash bench/gpu_matrix.sh     (into $OUT; 5-7 min)
# On a CPU, the same structure at the tiny shape, as a check of the script (~4 min on 2 cores):
#     OUT=/tmp/matrix bash bench/gpu_matrix.sh --cpu
#
# Groups run in priority order and each is skipped when the time budget (BUDGET_S, default 420 s)
# would be overrun, so a slow machine still returns the headline group. Everything lands in $OUT as
# five files: gpu_matrix.json (all groups), gpu_matrix.md (all tables), gpu_matrix.log, env.txt, gpu_tests.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder that receives the results}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_matrix.log") 2>&1
BUDGET_S=${BUDGET_S:-420}
SCRATCH=$(mktemp -d)

if [[ ${1:-} == --cpu ]]; then
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
    PX=8
    S=(--size igpt-tiny --n-px $PX --micro-batch 4 --precision fp32 --warmup 1 --steps 3)
    M=(--size igpt-mini --n-px 8 --micro-batch 4 --precision fp32 --warmup 1 --steps 3)
    ZERO1=ds_configs/cpu.json MICRO=(2 8) SYNTH=(--synthetic 500 --n-px 8 --steps 20)
    COMPILE=0  # inductor on a shared 2-core CPU takes minutes a peer; the GPU run compiles
else
    if compgen -G ".whl/*.whl" >/dev/null; then  # the line /work/shared/device/make-wheels.sh prints
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl && export PYTHONPATH=/tmp/site || exit
    fi
    PX=32
    S=(--size igpt-s --n-px $PX --micro-batch 16 --precision bf16 --warmup 5 --steps 20)
    M=(--size igpt-m --n-px 32 --micro-batch 16 --precision bf16 --warmup 5 --steps 15)
    ZERO1=ds_configs/zero1_bf16.json MICRO=(8 32) SYNTH=(--synthetic 20000 --n-px 32 --steps 200)
    COMPILE=1
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
ZERO3=ds_configs/zero3_bf16.json
{ nvidia-smi 2>/dev/null; python3 -m pip list 2>/dev/null | grep -Ei '^(torch|deepspeed|transformers|triton) '; } \
    > "$OUT/env.txt"

# 0. The GPU checks (tests/gpu: bf16 autocast, flash SDPA, compile under ZeRO-1, NCCL, cached decoding, and the sync
#    guard: every hot loop under CUDA's sync debug mode), ~2-3 min; they skip themselves without CUDA. Their summary
#    lands in $OUT/gpu_tests.txt, DeepSpeed's own syncs per loop in $OUT/gpu_syncs.md.
echo "== tests/gpu (${SECONDS}s spent)"
OUT=$OUT python3 -m pytest tests/gpu -m gpu -q -p no:cacheprovider -o addopts="" 2>&1 | tee "$OUT/gpu_tests.txt" \
    | tail -n 15

# group NAME SECONDS_ESTIMATE PEERS... -- BENCH_ARGS...: one bench/train_throughput.py run, if time allows.
group() {
    local name=$1 estimate=$2 peers=() args=()
    shift 2
    while [[ $# -gt 0 && $1 != -- ]]; do
        [[ $COMPILE == 0 && $1 == *compile* ]] || peers+=("$1")
        shift
    done
    shift
    args=("$@")
    if (( SECONDS + estimate > BUDGET_S )); then
        echo "== skip $name: ${SECONDS}s spent, ~${estimate}s more would pass the ${BUDGET_S}s budget"
        return
    fi
    echo "== $name (${SECONDS}s spent)"
    python3 bench/train_throughput.py "${args[@]}" --ds-config "$ZERO1" --peers "${peers[@]}" \
        --peer-timeout 180 --out-dir "$SCRATCH" --name "$name"
}

# 1. The anchor of docs/reference.md#measured-anchor, in one run: peers and DeepSpeed's stages at the policies' defaults
#    (zero1_bf16.json is the iGPT-S preset's policy).
group s_headline 120 hf eager compile ds ds:stage=2 "ds:config=$ZERO3" -- "${S[@]}"
# 1b. The pretraining entry point itself (igpt_ds.train.pretrain.train: reader thread, logging, stop flag) on
#     shards of random 32x32 images over a 512-colour palette, against compiled plain PyTorch.
if (( SECONDS + 90 <= BUDGET_S )); then
    python3 -c "import sys; from pathlib import Path; sys.path.insert(0, 'bench'); from data_throughput import \
synthetic_shards; synthetic_shards(2000, $PX, Path('$SCRATCH'), k=512)" >/dev/null || echo "building shards failed"
    group s_trainer 90 compile trainer trainer:compile=1,fused=1 -- "${S[@]}" --shards "$SCRATCH/shards"
fi
# 1c. The default engine policy (a run naming no JSON: igpt_ds.train.engine.choose_policy, the lowest ZeRO stage whose
#     memory estimate fits the GPU) against the stages it could have chosen, through the same entry point.
if (( SECONDS + 120 <= BUDGET_S )) && [[ -d "$SCRATCH/shards" ]]; then
    group s_policy 120 trainer:config=default "trainer:config=$ZERO1" "trainer:config=ds_configs/zero2_bf16.json" \
        "trainer:config=$ZERO3" -- "${S[@]}" --shards "$SCRATCH/shards"
fi
# 2. iGPT-M, the >= 45% MFU target: its preset's zero3 policy, ZeRO-1 fused, ZeRO-3 holding every parameter.
group m_headline 150 eager compile "ds:config=$ZERO3" ds:fused=1 \
    "ds:config=$ZERO3,fused=1,stage3_param_persistence_threshold=1e9" -- "${M[@]}"
# 3. Levers on the DeepSpeed path: fused AdamW, engine.compile, ZeRO-0, ZeRO-3 with a persistence
#    threshold above any layer (no gathers on one GPU), the flash SDPA kernel, activation checkpointing.
group s_levers 130 eager ds:fused=1 ds:fused=1,compile=1 ds:stage=0,fused=1 \
    "ds:config=$ZERO3,fused=1,stage3_param_persistence_threshold=1e9" eager:sdpa=flash eager:ckpt=1 \
    ds:fused=1,ckpt=1 -- "${S[@]}"
# 4. ZeRO-3 knobs one at a time against the zero3 policy (its defaults ran in group 1).
group s_zero3_knobs 80 eager "ds:config=$ZERO3,stage3_param_persistence_threshold=1e5" \
    "ds:config=$ZERO3,stage3_prefetch_bucket_size=5e7" "ds:config=$ZERO3,reduce_bucket_size=5e7" \
    "ds:config=$ZERO3,overlap_comm=false" -- "${S[@]}"
# 5. Micro-batch: smaller and larger than 16 at the iGPT-S shape.
for micro in "${MICRO[@]}"; do
    group "s_micro$micro" 40 eager ds:fused=1 -- "${S[@]}" --micro-batch "$micro"
done
# 6. The data path at this shape: shard reader + sampler, pinned copies to the device.
if (( SECONDS + 30 <= BUDGET_S )); then
    echo "== data (${SECONDS}s spent)"
    python3 bench/data_throughput.py "${SYNTH[@]}" --out-dir "$SCRATCH" --name data
    python3 bench/data_throughput.py "${SYNTH[@]}" --out-dir "$SCRATCH" --name data_bert --objective bert
fi

python3 - "$SCRATCH" "$OUT" <<'EOF'
import json, sys
from pathlib import Path
scratch, out = Path(sys.argv[1]), Path(sys.argv[2])
in_order = lambda pattern: sorted(scratch.glob(pattern), key=lambda p: p.stat().st_mtime)
runs = {p.stem: json.loads(p.read_text()) for p in in_order("*.json")}
(out / "gpu_matrix.json").write_text(json.dumps(runs, indent=1))
tables = [f"## {p.stem}\n\n{p.read_text()}" for p in in_order("*.md")]
(out / "gpu_matrix.md").write_text("\n".join(tables))
print(f"{len(runs)} runs -> {out}/gpu_matrix.json, gpu_matrix.md")
EOF
rm -rf "$SCRATCH"
echo "== done in ${SECONDS}s"
