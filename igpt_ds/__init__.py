"""igpt-ds: distributed Image GPT pretraining, probing, fine-tuning and sampling on DeepSpeed.

The modules by stage (arrows point down this list: a stage imports the ones above it, never one below;
tests/test_architecture.py checks it):

    foundation   config (one dataclass per run, presets), atomic (atomic writes), host_sync (no host-device sync in
                 hot loops), launchers, distributed (process group, rank-0 decisions, stop agreement), supervisor
    data         palette (k-means colours), shards (memory-mapped pixel shards, samplers, open_shards), prefetch
                 (host batches read ahead, pinned, copied without blocking)
    model        model (IGPT, KV cache, inference precision), pipe (pipeline layout), weights (consolidated
                 safetensors), flops, memory (bytes per GPU of a layout), hf_interop (HF ImageGPT / OpenAI weights)
    run          engine (DeepSpeed JSON, optimizer, schedule), checkpoint, resume (what a checkpoint may resume),
                 run (the run lifecycle both loops share), metrics (TensorBoard), logreg (the probe's data-parallel
                 solver), plots (PNG figures)
    train        trainer (pretraining loop), live_probe (probes during pretraining), finetune (classification
                 fine-tuning), planner (capacity)
    evaluate     features + feature_store (extraction), probe (linear probes), sampling, eval_planner (evaluation
                 capacity)
    entry        cli (every entry point's command line, console scripts), __main__ (python -m igpt_ds JOB)

One flat package on purpose: config, distributed and checkpoint serve every stage, so subpackages would make
most imports cross package lines, and module paths are part of documented commands
(`python -m igpt_ds.checkpoint`, `python -m igpt_ds JOB`).
"""

__version__ = "0.1.0"
