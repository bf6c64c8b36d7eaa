"""The command line shared by the entry points: `--config preset.yaml` plus dotted overrides, run supervised.

`--help` on any entry point lists every field of its configuration (section, type, default, docstring).

Precedence (igpt_ds.config): dataclass defaults < `--config` YAML < `--key=value` overrides. A
configuration or input error (`ConfigError`: missing or incompatible checkpoint, shards tokenised with
another palette than the checkpoint's, split without labels, layers out of range, ...; `ShardError`:
missing split, damaged shard) prints one line on stderr ("igpt-<job>: error: ...") and exits with status 2, on
every rank.

A run that cannot go on (`RunError`: training diverged, a disk filled up, a rank stopped answering within
train.dist_timeout_s) prints one line saying what happened and what to do, and exits with status 3; nothing good
was overwritten, and rerunning resumes from the last good checkpoint once the cause is fixed.

Exit status: 0 when the job finished; 2 for a configuration or input error; 3 for a run that could not go on;
128 + the signal number when
SIGTERM / SIGINT / SIGUSR1 (or the launcher's exit) stopped a training run after it saved a checkpoint
(143, 130, 138: what a process ended by that signal reports), so schedulers see a run that is not done;
rerunning the command resumes it.

Every entry point runs under `igpt_ds.distributed.supervisor`: the launched process supervises a detached worker that
runs the job, so a launcher's quick SIGKILL cannot interrupt a checkpoint. `run_entry(...)` is what a
launcher script calls; it imports the job's module in the worker only.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
import typing
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def main(cls: type[T], run: Callable[[T], Any], description: str, argv: list[str] | None = None,
         error_prefix: str = "error", prog: str | None = None) -> int:  # fmt: skip
    """Parse argv into `cls`, call `run(cfg)`; the exit status (see the module docstring).

    `--help` lists every field of `cls` (type, default, docstring). A run with a `train` section also takes
    the flags every DeepSpeed script takes (`deepspeed.add_config_arguments`): `--deepspeed_config FILE`,
    the same as `--train.ds_config FILE`, and `--deepspeed`, accepted and implied (the engine is always
    DeepSpeed's).
    """
    from igpt_ds.config import ConfigError, RunError, TrainConfig, instantiate, make_parser, parse_args, record_origins
    from igpt_ds.data.shards import ShardError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser(cls, description, prog)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by older DeepSpeed launchers
    deepspeed_flags = typing.get_type_hints(cls).get("train") is TrainConfig
    if deepspeed_flags:
        parser.add_argument("--deepspeed", action="store_true", help="Accepted as in any DeepSpeed script; implied.")
        parser.add_argument(
            "--deepspeed_config", type=str, metavar="FILE", help="DeepSpeed JSON; the same as --train.ds_config FILE."
        )
    try:
        try:
            ns = parse_args(parser, argv)
            cfg = instantiate(parser, ns, cls)
            if deepspeed_flags and ns.deepspeed_config:
                if "train.ds_config" in {a[2:].split("=", 1)[0] for a in argv}:
                    raise ConfigError("--deepspeed_config and --train.ds_config both given; keep one")
                cfg.train.ds_config = ns.deepspeed_config
                argv = argv + [f"--train.ds_config={ns.deepspeed_config}"]  # its origin: a flag
            record_origins(cfg, argv)
        except ConfigError as e:
            print(f"{error_prefix}: {e}", file=sys.stderr)
            return 2
        try:
            result = run(cfg)
        except (ConfigError, ShardError) as e:
            print(f"{error_prefix}: {e}", file=sys.stderr)
            return 2
        except RunError as e:
            print(f"{error_prefix}: {e}", file=sys.stderr)
            return 3
        except OSError as e:
            from igpt_ds.atomic import WRITE_ERRNOS

            if e.errno not in WRITE_ERRNOS:
                raise
            where = f"{e.filename}" if e.filename else "an output"  # a write() carries no file name
            print(f"{error_prefix}: cannot use {where} ({e.strerror}); free space there or fix its permissions, "
                  "then rerun the same command (finished work is kept)", file=sys.stderr)  # fmt: skip
            return 3
        except Exception as e:
            line = stalled_line(e)
            if line is None:
                raise
            print(f"{error_prefix}: {line}", file=sys.stderr)
            return 3
    finally:
        if "torch.distributed" in sys.modules:  # not imported when parsing failed
            from igpt_ds.distributed.process_group import shutdown

            shutdown()
    stopped_by = result.get("stopped_by", 0) if isinstance(result, dict) else 0
    return 128 + int(stopped_by) if stopped_by else 0


def stalled_line(error: BaseException) -> str | None:
    """The one line of a job whose collective failed because a rank stalled past train.dist_timeout_s or went
    away, naming the ranks that do not answer a roll call (`distributed.process_group.unanswering_ranks`); None
    for any other error."""
    import torch.distributed as dist

    from igpt_ds.distributed.process_group import lost_peer, unanswering_ranks

    how = lost_peer(error) if dist.is_initialized() else None
    if how is None:
        return None
    missing = unanswering_ranks()
    who = ("rank 0, the rendezvous host, stopped answering" if missing is None
           else f"rank(s) {', '.join(map(str, missing))} stopped answering" if missing
           else "every rank answers now (a transient stall)")  # fmt: skip
    what = "waited longer than train.dist_timeout_s" if how == "timeout" else "lost a peer"
    return (f"a collective {what}; {who} (a rank that ended says why in its own output; a hung one: check its "
            "node); rerun the same command to resume from the last checkpoint")  # fmt: skip


def run_entry(module: str, config: str, job: str, description: str, error_prefix: str = "error",
              argv: list[str] | None = None, prog: str | None = None) -> None:  # fmt: skip
    """An entry point's `__main__`: `job` of `module` on `config` (both names in `module`), supervised; exits."""
    from igpt_ds.distributed.supervisor import supervised

    def worker() -> int:
        mod = importlib.import_module(module)
        return main(getattr(mod, config), getattr(mod, job), description, argv, error_prefix, prog)

    sys.exit(supervised(worker))


# Every entry point: (module, config class, job function, description). A distributed job runs supervised
# (igpt_ds.distributed.supervisor); the planners run in the launched process. Errors read
# "igpt-<job>: error: ...", as the console script is named (and as igpt-build-shards writes them).
JOBS = {
    "pretrain": ("igpt_ds.train.pretrain", "PretrainConfig", "train", "iGPT pretraining on DeepSpeed"),
    "finetune": ("igpt_ds.train.finetune", "FinetuneConfig", "finetune",
                 "Fine-tune a pretrained iGPT for classification"),
    "extract_features": ("igpt_ds.eval.features", "ExtractConfig", "extract",
                         "Extract frozen iGPT features for linear probes"),
    "linear_probe": ("igpt_ds.eval.probe", "ProbeConfig", "linear_probe",
                     "Logistic-regression probes on frozen iGPT features"),
    "sample": ("igpt_ds.eval.sampling", "SampleConfig", "sample", "iGPT samples and image completions"),
    "plan": ("igpt_ds.plan.training", "PlanConfig", "report",
             "iGPT capacity planner: memory, communication, step time"),
    "plan_eval": ("igpt_ds.plan.evaluation", "EvalPlanConfig", "report",
                  "Cost of evaluating iGPT models: disk, memory per rank, probe FLOPs"),
}  # fmt: skip
UNSUPERVISED = {"plan", "plan_eval"}


def run_job(name: str, argv: list[str] | None = None) -> None:
    """Run entry point `name` of JOBS (or `plan`) on `argv` (default: the command line's arguments); exits."""
    module, config, job, description = JOBS[name]
    prefix = f"{program(name)}: error"
    if name in UNSUPERVISED:
        mod = importlib.import_module(module)
        sys.exit(main(getattr(mod, config), getattr(mod, job), description, argv, prefix, program(name)))
    run_entry(module, config, job, description, prefix, argv, program(name))


def program(job: str) -> str:
    """The console script of entry point `job`: igpt-pretrain, igpt-linear-probe, ..."""
    return "igpt-" + job.replace("_", "-")


# Console scripts (setup.py): igpt-pretrain, igpt-finetune, ... run one process; under a launcher use
# `deepspeed --module igpt_ds pretrain ...` or the checkout's launcher/*.py scripts.
pretrain = functools.partial(run_job, "pretrain")
finetune = functools.partial(run_job, "finetune")
extract_features = functools.partial(run_job, "extract_features")
linear_probe = functools.partial(run_job, "linear_probe")
sample = functools.partial(run_job, "sample")
plan = functools.partial(run_job, "plan")
plan_eval = functools.partial(run_job, "plan_eval")
