"""The network and what defines its training: the iGPT Transformer (reads like the paper), the AR and BERT objectives
and their masks, the KV cache of incremental decoding, the pipeline layout of the same layers, FLOPs per token, and
inference precision. torch and DeepSpeed's pipeline module only; imports the config.
"""
