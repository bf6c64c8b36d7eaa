"""Training on DeepSpeed: the engine (the DeepSpeed JSON, its policy, optimizer and schedule), the one training loop,
pretraining and fine-tuning (its Tasks), the live probe, metrics, and what a run writes beside its checkpoints.
Imports every stage above it.
"""
