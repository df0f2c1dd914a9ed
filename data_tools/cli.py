"""`vlp shards {build,inspect,verify,synth}` (also `python -m data_tools ...`).

Flags follow img2dataset where it has one (--url-col, --caption-col,
--resize-mode, --image-size, ...), so its users can move over unchanged.
"""

from __future__ import annotations

import argparse
import os


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _add_build(sub) -> None:
    p = sub.add_parser("build", help="raw image/text pairs -> webdataset shards")
    p.add_argument("inputs", nargs="+", help="CSV/TSV/Parquet/JSONL files (optionally .gz) or image folders")
    p.add_argument("--output", "-o", required=True, help="output folder for shards")
    p.add_argument("--url-col", default="url", help="column holding the image path or URL")
    p.add_argument("--caption-col", default="caption", help="column holding the caption")
    p.add_argument("--keep-cols", default="", help="comma-separated extra columns copied into each sample's json")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument(
        "--resize-mode", choices=["no", "border", "keep_ratio", "center_crop"], default="border"
    )
    p.add_argument("--resize-only-if-bigger", action="store_true", help="never upscale")
    p.add_argument("--encode-format", choices=["jpg", "webp", "png"], default="jpg")
    p.add_argument("--encode-quality", type=int, default=95, help="jpg/webp quality, 1-100")
    p.add_argument("--min-image-size", type=int, default=0, help="reject images whose smaller side is below")
    p.add_argument("--max-aspect-ratio", type=float, default=float("inf"), help="reject longer/shorter above")
    p.add_argument("--max-pixels", type=int, default=89_478_485, help="decompression-bomb limit (w*h)")
    p.add_argument("--caption-max-chars", type=int, default=512, help="captions are cut (at a word) to this")
    p.add_argument(
        "--caption-reject-chars", type=int, default=10_000, help="captions longer than this are rejected"
    )
    p.add_argument("--no-dedup", dest="dedup", action="store_false", help="keep exact duplicate images")
    p.add_argument("--shard-size", type=int, default=10_000, help="input rows per shard")
    p.add_argument("--workers", type=int, default=_cores(), help="worker processes (0: in-process)")
    p.add_argument("--threads", type=int, default=16, help="concurrent fetches per worker")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request timeout, seconds")
    p.add_argument("--retries", type=int, default=2, help="retries for transient http errors")
    p.add_argument("--max-bytes", type=int, default=50_000_000, help="largest image file accepted")
    p.add_argument("--overwrite", action="store_true", help="delete an existing build and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_build)


def _build(args: argparse.Namespace) -> int:
    from data_tools.build import BuildOptions, build_shards

    opts = BuildOptions.from_args(args)
    summary = build_shards(args.inputs, args.output, opts, overwrite=args.overwrite, progress=not args.quiet)
    print(summary.line())
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from data_tools.inspection import inspect_shards

    print(inspect_shards(args.dir, samples=args.samples))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from data_tools.verify import verify_shards

    result = verify_shards(args.dir, progress=not args.quiet)
    print(result.line())
    return 0 if result.ok else 1


def _synth(args: argparse.Namespace) -> int:
    from data_tools.synth import generate

    csv_path = generate(args.out, n=args.n, seed=args.seed, image_size=args.image_size, workers=args.workers)
    print(f"wrote {args.n} synthetic pairs: {csv_path}")
    return 0


def add_shards_parser(sub) -> None:
    """Attach `shards` and its subcommands to a parent argparse subparsers object."""
    shards = sub.add_parser("shards", help="build, inspect and verify webdataset shards")
    ssub = shards.add_subparsers(dest="shards_command", required=True, metavar="SUBCOMMAND")
    _add_build(ssub)

    p = ssub.add_parser("inspect", help="counts, histograms and sample captions of a shard folder")
    p.add_argument("dir")
    p.add_argument("--samples", type=int, default=5, help="sample captions to show")
    p.set_defaults(func=_inspect)

    p = ssub.add_parser("verify", help="read every sample back and check it against manifest.json")
    p.add_argument("dir")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_verify)

    p = ssub.add_parser("synth", help="generate synthetic shape/caption pairs (the embedded default)")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=_cores())
    p.set_defaults(func=_synth)


def main(argv: list[str] | None = None) -> int:
    """`python -m data_tools ...`: the same as `vlp shards ...`."""
    import sys

    from vlp.errors import UserError

    parser = argparse.ArgumentParser(prog="python -m data_tools")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_shards_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(["shards", *argv])
    try:
        return args.func(args) or 0
    except UserError as err:
        print(f"vlp: error: {err}", file=sys.stderr)
        return 2
