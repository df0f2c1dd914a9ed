"""`vlp eval ...` (also `python -m eval ...`).

    vlp eval --model MODEL [--weights FILE | --random-init] [--suite SUITE] --out DIR
    vlp eval compare A/report.json B/report.json [--out DIR]

MODEL is an open_clip model name (with --weights, or --random-init), an
exported .safetensors file, or a checkpoint directory holding model.safetensors.
SUITE is a YAML file or the name of a shipped suite (default: `default`, the
synthetic one that needs no download). Heavy imports happen inside the
handlers, so `vlp --help` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _eval(args: argparse.Namespace) -> int:
    from eval.parallel import rank_and_world
    from eval.runner import RunOptions, run
    from vlp.errors import UserError

    if not args.model:
        raise UserError("vlp eval: --model is required (or use `vlp eval compare A B`)")
    if not args.out:
        raise UserError("vlp eval: --out DIR is required")
    opts = RunOptions(
        model=args.model,
        weights=args.weights,
        random_init=args.random_init,
        suite=args.suite,
        out=Path(args.out),
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        workers=args.workers,
        seed=args.seed,
        only=[n.strip() for n in args.only.split(",") if n.strip()] if args.only else None,
        progress=not args.quiet,
    )
    report = run(opts)
    if rank_and_world()[0] == 0:
        for name, s in report["summary"].items():
            value = "n/a" if s["value"] is None else f"{s['value']:.4f}"
            print(f"{name:<28} {s['metric']:<28} {value}")
        print(f"wrote {opts.out / 'report.json'} and {opts.out / 'report.html'}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from eval.compare import compare

    text, html_path = compare(args.reports[0], args.reports[1], args.compare_out)
    print(text)
    print(f"wrote {html_path}")
    return 0


def add_eval_parser(sub) -> None:
    """Attach `eval` (and `eval compare`) to a parent argparse subparsers object."""
    p = sub.add_parser(
        "eval",
        usage="vlp eval --model MODEL [--weights FILE | --random-init] [--suite SUITE] --out DIR [options]\n"
        "       vlp eval compare A/report.json B/report.json [--out DIR]",
        help="evaluate a model on a suite: report.json + report.html",
        description="Run an evaluation suite (zero-shot, retrieval, counting, compositionality) on one model.",
    )
    p.add_argument("--model", help="open_clip model name, exported .safetensors, or checkpoint directory")
    p.add_argument(
        "--weights", help="local weights file for a model given by name (.safetensors/.pt/.pth/.bin)"
    )
    p.add_argument("--random-init", action="store_true", help="allow a model given by name to run untrained")
    p.add_argument(
        "--suite", default="default", help="suite YAML, or a shipped suite name (default: default)"
    )
    p.add_argument("--out", help="output folder for report.json, report.html, skipped.jsonl")
    p.add_argument(
        "--cache-dir", help="where synthetic sets are written (default: $VLP_CACHE_DIR or ~/.cache/vlp/eval)"
    )
    p.add_argument("--only", help="comma-separated task names to run from the suite")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast on a GPU")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=4, help="threads loading and preprocessing images")
    p.add_argument("--seed", type=int, default=0, help="seed for --random-init")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_eval)

    esub = p.add_subparsers(dest="eval_command", metavar="SUBCOMMAND")
    c = esub.add_parser(
        "compare", prog="vlp eval compare", help="two reports side by side with deltas; writes compare.html"
    )
    c.add_argument("reports", nargs=2, metavar="REPORT", help="report.json files (or folders holding one)")
    c.add_argument(
        "--out",
        dest="compare_out",
        metavar="DIR",
        help="folder for compare.html (default: the working directory)",
    )
    c.set_defaults(func=_compare)


def main(argv: list[str] | None = None) -> int:
    """`python -m eval ...`: the same as `vlp eval ...`."""
    import sys

    from vlp.errors import UserError

    parser = argparse.ArgumentParser(prog="python -m eval")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_eval_parser(sub)
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args) or 0
    except UserError as err:
        print(f"vlp: error: {err}", file=sys.stderr)
        return 2
