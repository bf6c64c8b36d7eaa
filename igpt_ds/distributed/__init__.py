"""Processes and ranks: what every job needs before and around its collectives.

`process_group` starts the process group under any launcher and binds each rank's device; `rank_env` reads what
each launcher (DeepSpeed's, torchrun, Slurm, mpirun) tells a rank; `supervisor` runs every entry point as a worker
that a launcher's signals reach and its exit stops; `stop` turns signals into one decision every rank takes at the
same step; `rank0` does work that is the same on every rank once and shares it. Imports the top-level modules only.
"""
