"""Sample images and complete the bottom halves of real ones with the KV-cache decoder; see igpt_ds.eval.sampling.

    python launcher/sample.py --checkpoint runs/digits --shards demo_out/shards --out demo_out/samples
    deepspeed --num_gpus 8 launcher/sample.py --checkpoint runs/igpt_s --shards data/imagenet32 --top_k 40

Writes <out>/completions.png (original | given half | completions), unconditional.png, tokens.npz and
TensorBoard images. Errors: one line, exit 2.
"""

from igpt_ds.cli import run_job

if __name__ == "__main__":
    run_job("sample")
