"""State on disk: DeepSpeed checkpoints (save, latest, load, universal conversion, pruning), whether and how a run
resumes, consolidated weights (the exchange format, and the one way weights enter a model, exactly and once for
every rank), export for evaluation, HF/OpenAI interop. Imports models/, data/, distributed/ and the top level.
"""
