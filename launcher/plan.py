"""Plan a pretraining run on a cluster: memory per GPU, communication, step time, fastest layout (igpt_ds.planner).

    python launcher/plan.py --config launcher/configs/igpt_s_imagenet32.yaml --cluster.gpus '[1,8,64,512,1024]'
    python launcher/plan.py --model.size igpt-xl --model.n_px 64 --train.global_batch 128 \\
        --train.ds_config ds_configs/zero3_bf16.json --cluster.tokens_per_s 530000 --top 10 --json plan.json

Reads the same YAML presets as launcher/pretrain.py plus a `cluster` section (igpt_ds.planner.ClusterConfig);
the DeepSpeed policy JSON (train.ds_config) supplies bucket sizes and the gradient accumulation dtype.
For each GPU count it prints the layout the config describes, then the fastest layouts that fit.
Precedence: dataclass defaults < `--config` YAML < dotted overrides. A configuration error exits 2.
"""

import json
import sys
from pathlib import Path

from igpt_ds.config import DS_CONFIGS_DIR, ConfigError, find_shipped, instantiate, make_parser, parse_args, to_dict
from igpt_ds.engine import default_policy, load_policy, zero_stage
from igpt_ds.planner import Estimate, Knobs, Layout, PlanConfig, Shape, estimate, format_table, plan


def configured_layout(cfg: PlanConfig, policy: dict) -> Layout:
    """The layout the pretraining config itself would run."""
    zero = policy.get("zero_optimization", {})
    offload = "param" if zero.get("offload_param", {}).get("device", "none") != "none" else "none"
    if offload == "none" and zero.get("offload_optimizer", {}).get("device", "none") != "none":
        offload = "optimizer"
    pp = cfg.train.pipeline_stages if cfg.train.layout == "pipeline" else 1
    return Layout(zero_stage(policy), pp, offload, cfg.train.activation_checkpointing, cfg.train.micro_batch)


def planned_policy(cfg: PlanConfig) -> tuple[Path, dict]:
    """The JSON the planned run would use: train.ds_config, else the GPU default for its layout (the planner
    plans GPU runs, whatever machine it runs on)."""
    if cfg.train.ds_config:
        path = find_shipped(cfg.train.ds_config, DS_CONFIGS_DIR, "ds_configs", "train.ds_config")
    else:
        path = DS_CONFIGS_DIR / default_policy("cuda", True, cfg.train.layout)
    return path, load_policy(path)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(PlanConfig, "iGPT capacity planner")
    parser.add_argument("--top", type=int, default=5, help="fastest fitting layouts to list per GPU count")
    parser.add_argument("--json", type=str, help="write every estimate here")
    try:
        args = parse_args(parser, sys.argv[1:] if argv is None else argv)
        cfg = instantiate(parser, args, PlanConfig)
        policy_file, policy = planned_policy(cfg)
        mine = configured_layout(cfg, policy)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    knobs = Knobs.from_policy(policy)
    shape = Shape.of(cfg.model)
    print(
        f"{cfg.model.size} at {cfg.model.n_px}x{cfg.model.n_px}: {shape.params / 1e6:.1f}M parameters, "
        f"global batch {cfg.train.global_batch}, {policy_file} ({knobs})"
    )
    report = {"config": to_dict(cfg), "knobs": to_dict(knobs), "plans": {}}
    for n_gpus, rows in plan(cfg, knobs).items():
        own: Estimate | None = None
        if n_gpus % mine.pp == 0 and cfg.train.global_batch % (mine.micro_batch * n_gpus // mine.pp) == 0:
            own = estimate(shape, mine, n_gpus, cfg.train.global_batch, cfg.cluster, knobs)
        fitting = [e for e in rows if e.fits]
        print(
            f"\n## {n_gpus} GPU{'s' if n_gpus > 1 else ''}: "
            + (
                f"fastest that fits: {fitting[0].layout.name}, micro-batch {fitting[0].layout.micro_batch}, "
                f"{fitting[0].tokens_per_s:,.0f} tokens/s"
                if fitting
                else "no layout fits"
            )
        )
        print(format_table(([own] if own else []) + fitting[: args.top]))
        if own is None:
            print(
                f"(the configured layout {mine.name} with micro-batch {mine.micro_batch} does not divide "
                f"global batch {cfg.train.global_batch} over {n_gpus} GPUs)"
            )
        report["plans"][n_gpus] = {"configured": own.row() if own else None, "all": [e.row() for e in rows]}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
