"""Judging a model the paper's way: frozen features and their sharded store, the probe's data-parallel solver (one C
sweep), linear probes, samples and completions, plots. Never imports train/: evaluation runs on checkpoints,
without the training code. Imports checkpoint/ and below.
"""
