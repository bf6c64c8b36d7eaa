"""Linear probes per layer + k-layer concatenation + raw-pixel baseline on extracted features; see igpt_ds.eval.probe.

    python launcher/linear_probe.py --features demo_out/features
    deepspeed --num_gpus 8 launcher/linear_probe.py --features runs/igpt_l/features

All ranks fit every probe together, each holding 1/world of the feature rows; rank 0 prints the table and
writes <features>/probe/{probe.json,probe.png,tensorboard/} (or `--out`); probe.json after every probe, and
a rerun skips finished ones. Errors: one line, exit 2.
"""

from igpt_ds.cli import run_job

if __name__ == "__main__":
    run_job("linear_probe")
