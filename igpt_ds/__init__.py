"""igpt-ds: distributed Image GPT pretraining, probing, fine-tuning and sampling on DeepSpeed."""

__version__ = "0.1.0"
