"""igpt-ds: distributed Image GPT pretraining, probing, fine-tuning and sampling on DeepSpeed.

The package by stage, lowest first; a stage imports its own modules and the stages above it in this list, never
one below (tests/test_architecture.py checks it, and that no module sits outside a stage):

    config.py, atomic.py, host_sync.py   one typed config per run and the DeepSpeed JSON read; atomic writes;
                                         host-device syncs marked and recorded
    distributed/   the process group and each rank's device, the rank environment of every launcher, the supervisor,
                   the stop agreement, work done once by rank 0 and shared
    data/          the palette, memory-mapped shards, the sampler and row splits, batches read ahead
    models/        the Transformer, its objectives and masks, the KV cache, the pipeline layout, FLOPs, inference
                   precision
    checkpoint/    DeepSpeed checkpoints, resume decisions, consolidated weights (in and out), HF/OpenAI interop
    eval/          features and their store, the probe's solver, linear probes, sampling, plots (never imports train/)
    plan/          memory per GPU (and the default engine policy it implies), training and evaluation capacity
    train/         the DeepSpeed engine, the one training loop, pretraining, fine-tuning, the live probe, metrics,
                   the run folder
    cli.py, __main__.py                  every entry point's command line; `python -m igpt_ds JOB`

`python -m igpt_ds.checkpoint RUN OUT` exports a run's weights (igpt_ds/checkpoint/__main__.py).
"""

__version__ = "0.1.0"
