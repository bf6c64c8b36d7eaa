"""Convert HF ImageGPT directories to and from igpt-ds consolidated checkpoints; import colour palettes.

    python -m data_tools.convert_hf from-hf HF_DIR OUT_DIR [--palette kmeans_centers.npy]
    python -m data_tools.convert_hf to-hf CKPT_DIR HF_DIR
    python -m data_tools.convert_hf import-palette SRC OUT.npy

(or `igpt-convert-hf ...`). from-hf takes the palette from --palette, else from the `clusters` in HF_DIR's
preprocessor_config.json / config.json. import-palette reads kmeans_centers.npy, an HF JSON file or
an HF directory. An existing output is replaced only with --overwrite. User errors print one line
on stderr and exit 2; outputs are written to a temporary path and renamed, never left half-written.
Conversion rules and the HF/igpt-ds loss alignment: igpt_ds/checkpoint/hf_interop.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from igpt_ds.checkpoint.hf_interop import convert_from_hf, convert_to_hf, find_clusters, read_palette
from igpt_ds.config import ConfigError
from igpt_ds.data.palette import save_palette


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.out.exists() and not args.overwrite:
            raise ConfigError(f"{args.out} exists; pass --overwrite to replace it")
        if args.command == "from-hf":
            cfg = convert_from_hf(args.src, args.out, palette=args.palette)
            palette = args.palette or find_clusters(args.src) or "none (pass --palette)"
            print(
                f"wrote {args.out}: {cfg.n_layer} layers, n_embd {cfg.n_embd}, n_px {cfg.n_px}, "
                f"n_vocab {cfg.n_vocab}, bias {cfg.bias}, palette from {palette}"
            )
        elif args.command == "to-hf":
            print(f"wrote {convert_to_hf(args.src, args.out)}")
        else:
            palette = read_palette(args.src)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            save_palette(args.out, palette)
            print(f"wrote {args.out}: {len(palette)} colours")
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="igpt-convert-hf", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    from_hf = commands.add_parser("from-hf", help="HF ImageGPT directory -> consolidated checkpoint")
    from_hf.add_argument("src", type=Path, metavar="HF_DIR")
    from_hf.add_argument("out", type=Path, metavar="OUT_DIR")
    from_hf.add_argument("--palette", type=Path, help="kmeans_centers.npy or HF JSON with clusters")
    to_hf = commands.add_parser("to-hf", help="consolidated checkpoint -> HF ImageGPT directory")
    to_hf.add_argument("src", type=Path, metavar="CKPT_DIR")
    to_hf.add_argument("out", type=Path, metavar="HF_DIR")
    palette = commands.add_parser("import-palette", help="kmeans_centers.npy / HF clusters -> palette .npy")
    palette.add_argument("src", type=Path, metavar="SRC")
    palette.add_argument("out", type=Path, metavar="OUT.npy")
    for command in (from_hf, to_hf, palette):
        command.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return parser


if __name__ == "__main__":
    sys.exit(main())
