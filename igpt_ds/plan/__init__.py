"""Capacity before a run: bytes per GPU of a training layout (`memory`, which also gives the default engine policy a
run without a DeepSpeed JSON gets), the training planner over every layout and GPU count, and what evaluating a
model costs. Imports eval/ and below.
"""
