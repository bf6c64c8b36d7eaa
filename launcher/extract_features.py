"""Extract frozen iGPT features (mean-pooled LN(h^l) of every layer) for linear probes; see igpt_ds.eval.features.

    python launcher/extract_features.py --checkpoint runs/digits --shards demo_out/shards --out demo_out/features
    deepspeed --num_gpus 8 launcher/extract_features.py --checkpoint runs/igpt_l --shards data/cifar10 \\
        --out runs/igpt_l/features --layers '[16,20,24,28,32]'

`--checkpoint` takes a run folder, a DeepSpeed checkpoint of either layout or a consolidated folder.
Writes <out>/<split>/: each rank's parts (parts/NNNNN/features.npy, pixels.npy), labels.npy, and index.json
once complete (layout: igpt_ds.eval.features, docs/evaluation.md). A rerun keeps finished parts. Errors: one line,
exit 2.
"""

from igpt_ds.cli import run_job

if __name__ == "__main__":
    run_job("extract_features")
