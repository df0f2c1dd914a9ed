"""The `vlp` command: one entry point, one subcommand per job.

Subcommands import their modules lazily so `vlp shards ...` does not pay for
importing torch and DeepSpeed, and a config error is reported before any
heavy import happens.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from vlp.errors import UserError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted config overrides")


def _train(args: argparse.Namespace) -> int:
    from vlp.config import dump_config, load_config

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    try:
        from vlp.train import train
    except ImportError as err:  # the trainer lands with its own issue
        raise UserError(f"the trainer is not available in this build ({err})") from None
    train(cfg)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from vlp.config import load_config
    from vlp.demo import run_demo, summary

    cfg = load_config(args.config, args.overrides)
    result = run_demo(cfg)
    print(summary(result))
    return 0


def _export(args: argparse.Namespace) -> int:
    from vlp.export import export

    out, name = export(args.checkpoint, args.out)
    print(f"wrote {out} (open_clip model {name!r})")
    return 0


def _launch(args: argparse.Namespace) -> int:
    from vlp.config import load_config
    from vlp.launch import describe

    cfg = load_config(args.config, args.overrides)
    if not args.dry_run:
        raise UserError("only --dry-run is supported: vlp launch prints the commands, it does not run them")
    print(describe(cfg, args.config, args.overrides))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlp", description="CLIP-style image-text pretraining")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from data_tools.cli import add_shards_parser

    add_shards_parser(sub)

    from eval.cli import add_eval_parser

    add_eval_parser(sub)

    p = sub.add_parser("train", help="pretrain a dual encoder under DeepSpeed")
    _add_config_args(p)
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_train)

    p = sub.add_parser("demo", help="synthetic data -> shards -> trained tiny model -> eval report")
    p.add_argument("--config", default="configs/demo.yaml", help="run preset (default: configs/demo.yaml)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted config overrides")
    p.set_defaults(func=_demo)

    p = sub.add_parser("export", help="write a checkpoint's weights as an open_clip safetensors file")
    p.add_argument("checkpoint", help="a checkpoint folder, a run folder (newest checkpoint) or a .safetensors")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.set_defaults(func=_export)

    p = sub.add_parser("launch", help="print the per-node launch commands for the config's cluster")
    _add_config_args(p)
    p.add_argument("--dry-run", action="store_true", help="print the commands (the only mode)")
    p.set_defaults(func=_launch)
    return parser


def _take_local_rank(argv: list[str]) -> list[str]:
    """The DeepSpeed launcher inserts --local_rank=N before our subcommand; honour it via LOCAL_RANK."""
    import os

    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_take_local_rank(list(sys.argv[1:] if argv is None else argv)))
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args) or 0
    except UserError as err:
        print(f"vlp: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
