"""Pixels as tokens, on disk and on their way to the device: the k-means palette, memory-mapped shards (opened and
checked once for every rank), the resumable sampler and the one row split, and batches read ahead in a background
thread and pinned. Imports distributed/ and the top-level modules.
"""
