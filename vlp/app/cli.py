"""The `vlp` command: the one entry point, one subcommand per job, one handler for user errors.

Flags and help come from the config schemas (vlp.core.config, through
vlp.app.flags), so each default exists once. Every command takes
`--config FILE.yaml` and `key=value` overrides (dotted for nested keys).
Command modules are imported only when their command runs, so `vlp --help`
and `vlp shards ...` never load torch or DeepSpeed, and a config error is
reported before any heavy import happens.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import yaml

from vlp import __version__
from vlp.app.flags import add_flags, describe_text, given, split_overrides
from vlp.app.foreign_flags import translate
from vlp.core.config import (
    COMMAND_SCHEMAS,
    CompareConfig,
    ConfigError,
    CurateConfig,
    DemoRunConfig,
    EmbedConfig,
    EvalConfig,
    ExportConfig,
    IndexConfig,
    InspectConfig,
    LaunchRunConfig,
    MineBatchesConfig,
    RunConfig,
    ShardsBuildConfig,
    ShardsRetryConfig,
    SynthConfig,
    VerifyConfig,
    dump_config,
    load,
)
from vlp.core.errors import UserError
from vlp.core.ownership import FolderLock, claim

Handler = Callable[[argparse.Namespace], int]


def _config(args: argparse.Namespace, schema, positional: str | None = None):
    """The command's config: defaults <- --config YAML <- key=value overrides <- flags."""
    words = list(getattr(args, positional, []) or []) if positional else list(getattr(args, "overrides", []))
    overrides, rest = split_overrides(words, schema)
    overrides += getattr(args, "set", None) or []
    flags = given(args, schema)
    if positional and rest:
        many = schema.model_fields[positional].annotation is not str
        flags[positional] = rest if many or len(rest) > 1 else rest[0]
    elif rest:
        raise UserError(f"not a key=value override: {rest[0]!r} (see `vlp config show --describe`)")
    try:
        return load(schema, args.config, overrides, flags)
    except ConfigError as err:  # name the flag the user typed, when it was one
        message = str(err)
        for name in flags:
            message = message.replace(f"key '{name}'", f"key '{name}' (--{name.replace('_', '-')})", 1)
        raise ConfigError(message) from None


# ------------------------------------------------------------------ handlers


def _train(args: argparse.Namespace) -> int:
    cfg = _config(args, RunConfig)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    from vlp.train.trainer import train

    evaluate = None
    if cfg.train.evaluates:  # the eval package (and its plotting library) costs start-up
        from vlp.app.evalhook import periodic_eval

        evaluate = periodic_eval(cfg)
    train(cfg, evaluate)
    return 0


def _demo(args: argparse.Namespace) -> int:
    cfg = _config(args, DemoRunConfig)
    from vlp.app.demo import run_demo, summary

    print(summary(run_demo(cfg)))
    return 0


def _launch(args: argparse.Namespace) -> int:
    if args.overrides[:1] == ["init"]:  # `vlp launch init DIR`: no run config involved
        if len(args.overrides) != 2:
            raise UserError("usage: vlp launch init DIR (a new or empty folder for the copies)")
        from vlp.app.launch import init

        print(init(args.overrides[1]))
        return 0
    cfg = _config(args, LaunchRunConfig)
    from vlp.app.launch import describe, run_this_node

    if args.dry_run:
        print(describe(cfg, args.config, args.overrides))
        return 0
    run_this_node(cfg, args.config, args.overrides)  # replaces this process
    return 0


def _export(args: argparse.Namespace) -> int:
    cfg = _config(args, ExportConfig, positional="checkpoint")
    if not cfg.out:
        raise UserError("vlp export: --out FILE.safetensors (or --out DIR with --format open_clip-dir) is required")
    if cfg.tokenizer and cfg.format != "open_clip-dir":
        raise UserError("vlp export: --tokenizer goes with --format open_clip-dir")
    from vlp.train.export import export, export_open_clip_dir

    source = _one(cfg.checkpoint, "a checkpoint, run folder or .safetensors")
    if cfg.format == "open_clip-dir":
        out, name = export_open_clip_dir(source, cfg.out, cfg.tokenizer)
        print(f"wrote {out}/ (open_clip model {name!r}; open_clip.create_model_and_transforms('local-dir:{out}'))")
    else:
        out, name = export(source, cfg.out)
        print(f"wrote {out} (open_clip model {name!r})")
    return 0


def _build(args: argparse.Namespace) -> int:
    cfg = _config(args, ShardsBuildConfig, positional="inputs")
    from vlp.data_tools.build import build_shards

    summary = build_shards(cfg, progress=not cfg.quiet)
    print(summary.line())
    if summary.rows and not summary.written:  # a build that wrote nothing did not work, whatever the reasons
        print(f"vlp: error: no row was written: all {summary.rows} failed or were duplicates (failures.jsonl "
              f"in {cfg.output} has each row's reason)", file=sys.stderr)
        return 1
    return 0


def _retry(args: argparse.Namespace) -> int:
    cfg = _config(args, ShardsRetryConfig, positional="output")
    if not cfg.output:
        raise UserError("vlp shards retry: give the output folder of a finished `vlp shards build`")
    from vlp.data_tools.build import retry_shards

    tried, summary = retry_shards(cfg, progress=not cfg.quiet)
    print(f"retry: {tried} row(s) fetched again ({', '.join(cfg.reasons)})" if tried else
          "retry: no row's latest record failed for a reason retried")
    print(summary.line())
    return 0


def _embed(args: argparse.Namespace) -> int:
    cfg = _config(args, EmbedConfig, positional="shards")
    from vlp.core.distributed import detect_env
    from vlp.data_tools.curation.embed import embed

    env = detect_env()
    print(embed(cfg, progress=not cfg.quiet).line(cfg.out, env.rank, env.world_size))
    return 0


def _curate(args: argparse.Namespace) -> int:
    cfg = _config(args, CurateConfig, positional="shards")
    from vlp.data_tools.curation.curate import curate

    print(curate(cfg, progress=not cfg.quiet).line())
    return 0


def _mine_batches(args: argparse.Namespace) -> int:
    cfg = _config(args, MineBatchesConfig, positional="shards")
    from vlp.data_tools.curation.batchmine import mine

    print(mine(cfg).line())
    return 0


def _inspect(args: argparse.Namespace) -> int:
    cfg = _config(args, InspectConfig, positional="dir")
    from vlp.data_tools.inspection import inspect_shards

    print(inspect_shards(_one(cfg.dir, "a shard folder"), samples=cfg.samples))
    return 0


def _verify(args: argparse.Namespace) -> int:
    cfg = _config(args, VerifyConfig, positional="dir")
    from vlp.data_tools.verify import verify_shards

    result = verify_shards(_one(cfg.dir, "a shard folder"), progress=not cfg.quiet)
    print(result.line())
    return 0 if result.ok else 1


def _index(args: argparse.Namespace) -> int:
    cfg = _config(args, IndexConfig, positional="dir")
    from vlp.data_tools.index import index_shards

    print(index_shards(_one(cfg.dir, "a shard folder"), overwrite=cfg.overwrite).line())
    return 0


def _synth(args: argparse.Namespace) -> int:
    cfg = _config(args, SynthConfig)
    if not cfg.out:
        raise UserError("vlp shards synth: --out DIR is required")
    from vlp.data_tools.synth import generate

    claim(cfg.out, "synth", "vlp shards synth", "choose a new --out folder")  # never over a user's files
    with FolderLock(cfg.out):
        csv_path = generate(cfg.out, n=cfg.n, seed=cfg.seed, image_size=cfg.image_size, workers=cfg.workers)
    print(f"wrote {cfg.n} synthetic pairs: {csv_path}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    cfg = _config(args, EvalConfig)
    from vlp.core.distributed import get_rank
    from vlp.eval.runner import run

    report = run(cfg)
    if get_rank() == 0:
        for name, s in report["summary"].items():
            value = "n/a" if s["value"] is None else f"{s['value']:.4f}"
            print(f"{name:<28} {s['metric']:<28} {value}")
        print(f"wrote {os.path.join(cfg.out, 'report.json')} and {os.path.join(cfg.out, 'report.html')}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    cfg = _config(args, CompareConfig, positional="reports")
    from vlp.eval.compare import compare

    text, html_path = compare(cfg.reports[0], cfg.reports[1], cfg.out)
    print(text)
    print(f"wrote {html_path}")
    return 0


def _config_show(args: argparse.Namespace) -> int:
    schema = COMMAND_SCHEMAS[args.name]
    if args.describe:
        print(f"{args.name}: {schema.__doc__.strip().splitlines()[0]}\n")
        print(describe_text(schema))
    else:
        print(yaml.safe_dump(schema().model_dump(mode="json"), sort_keys=False), end="")
    return 0


def _one(value: str, what: str) -> str:
    if not value:
        raise UserError(f"give {what}")
    return value


# ------------------------------------------------------------------ parsers


def _command(sub, name: str, func: Handler, schema, help: str, examples: list[str], *, flags: bool,
             overrides: bool = True) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with the schema's keys (or flags) and examples."""
    epilog = _examples(examples)
    if not flags:
        epilog = f"config keys (key=value overrides, dotted):\n{describe_text(schema)}\n\n{epilog}"
    p = sub.add_parser(name, help=help, description=(schema.__doc__ or help).strip(), epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config file (keys as in `vlp config show`)")
    if flags:
        add_flags(p, schema)
        p.add_argument("--set", action="append", metavar="key=value", help="override a key (repeatable)")
    elif overrides:
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.set_defaults(func=func)
    return p


def _examples(lines: list[str]) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlp", description="CLIP-style image-text pretraining",
                                     epilog=_examples(["vlp demo", "vlp train --config configs/default.yaml",
                                                       "vlp eval --model runs/demo --suite default --out reports/demo"]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"vlp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    shards = sub.add_parser("shards", help="build, index, inspect and verify webdataset shards",
                            epilog=_examples(["vlp shards build pairs.csv --output shards/",
                                              "vlp shards verify shards/", "vlp shards synth --out data/synth"]),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    ssub = shards.add_subparsers(dest="shards_command", required=True, metavar="SUBCOMMAND")
    _command(ssub, "build", _build, ShardsBuildConfig, "raw image/text pairs -> webdataset shards", [
        "vlp shards build pairs.csv --output shards/ --image-size 256",
        "vlp shards build a.parquet b.jsonl.gz photos/ --output shards/ --keep-cols license,width",
        "vlp shards build --config build.yaml shard_size=5000"], flags=True)
    _command(ssub, "inspect", _inspect, InspectConfig, "counts, histograms and sample captions of a shard folder",
             ["vlp shards inspect shards/", "vlp shards inspect shards/ --samples 20"], flags=True)
    _command(ssub, "retry", _retry, ShardsRetryConfig, "fetch again the rows a build failed on for a passing "
             "reason (timeouts, 429, 5xx), into new shards", [
                 "vlp shards retry shards/", "vlp shards retry shards/ --timeout 30 --host-concurrency 4"], flags=True)
    _command(ssub, "verify", _verify, VerifyConfig, "read every sample back and check it against manifest.json",
             ["vlp shards verify shards/", "vlp shards verify data/demo/shards --quiet"], flags=True)
    _command(ssub, "index", _index, IndexConfig, "write manifest.json for img2dataset's (or any) webdataset tars", [
        "vlp shards index laion-subset/   # img2dataset output: .tar, .parquet, _stats.json per shard",
        "vlp shards index tars/ --overwrite && vlp shards verify tars/"], flags=True)
    _command(ssub, "embed", _embed, EmbedConfig, "image/text embeddings and CLIP score of every sample", [
        "vlp shards embed shards/ --model runs/demo --out emb/",
        "vlp shards embed s3://bucket/shards --model ViT-B-32 --weights b32.bin --out emb/ --batch-size 512",
        "torchrun --nproc_per_node 8 -m vlp shards embed shards/ --model runs/demo --out emb/"], flags=True)
    _command(ssub, "curate", _curate, CurateConfig, "keep only the pairs that pass the filters; removed.jsonl", [
        "vlp shards curate shards/ --output curated/ --embeddings emb/ --clip-score-top 0.3",
        "vlp shards curate shards/ --output curated/ --embeddings emb/ --semdedup-threshold 0.95 "
        "--min-clip-score 0.28",
        "vlp shards curate a/ b/ --output curated/ --min-words 2 --languages en   # exact dedup across a/ and b/"],
        flags=True)
    _command(ssub, "mine-batches", _mine_batches, MineBatchesConfig, "B3: communities of mutually hard samples "
             "from a teacher's embeddings, for data.batch_plan", [
                 "vlp shards mine-batches shards/ --embeddings emb/ --out shards/batch_plan.npz --cluster-size 32",
                 "vlp train --config configs/default.yaml data.batch_plan=shards/batch_plan.npz"], flags=True)
    _command(ssub, "synth", _synth, SynthConfig, "synthetic shape/caption pairs (the embedded default)",
             ["vlp shards synth --out data/synth --n 10000 --seed 0",
              "vlp shards synth --out data/synth128 --n 2000 --image-size 128 && "
              "vlp shards build data/synth128/pairs.csv --output data/synth128/shards"], flags=True)

    ev = _command(sub, "eval", _eval, EvalConfig, "evaluate a model on a suite: report.json + report.html", [
        "vlp eval --model runs/demo --suite default --out reports/demo",
        "vlp eval --model ViT-B-32 --weights weights.bin --suite eval/suites/public.yaml --out reports/b32",
        "vlp eval compare reports/untrained reports/demo"], flags=True)
    esub = ev.add_subparsers(dest="eval_command", metavar="SUBCOMMAND")
    _command(esub, "compare", _compare, CompareConfig, "two reports side by side with deltas; writes compare.html",
             ["vlp eval compare reports/a reports/b --out reports/",
              "vlp eval compare reports/untrained/report.json reports/demo/report.json"], flags=True)

    p = _command(sub, "train", _train, RunConfig, "pretrain a dual encoder under DeepSpeed", [
        "vlp train --config configs/default.yaml",
        "vlp train --config configs/demo.yaml train.samples=200000 optim.lr=1e-3",
        "torchrun --nproc_per_node 8 -m vlp train --config configs/vit-b-16-gpu.yaml"], flags=False)
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    p = _command(sub, "demo", _demo, DemoRunConfig, "synthetic data -> shards -> trained tiny model -> report", [
        "vlp demo", "vlp demo train.micro_batch_size=64", "vlp demo --config configs/demo.yaml demo.pairs=20000"],
        flags=False)
    p.set_defaults(config="configs/demo.yaml")  # the shipped preset unless ./configs/demo.yaml exists

    p = _command(sub, "launch", _launch, LaunchRunConfig, "start this machine's part of a run on the config's cluster", [
        "vlp launch --config configs/vit-b-16-gpu.yaml launch.launcher=torchrun launch.nodes=2 --dry-run",
        "vlp launch --config configs/vit-b-16-gpu.yaml launch.launcher=slurm launch.nodes=4 launch.procs_per_node=8",
        "vlp launch init mycluster   # editable copies of configs/ and launch/; vlp uses them when run there"],
        flags=False)
    p.add_argument("--dry-run", action="store_true", help="print every node's command instead of running this one's")

    _command(sub, "export", _export, ExportConfig, "write a checkpoint's weights in a form stock open_clip loads", [
        "vlp export runs/demo --out model.safetensors",
        "vlp export runs/demo --format open_clip-dir --out exported/demo   # local-dir:exported/demo",
        "vlp export runs/demo/checkpoints/step_00000750 --out step750.safetensors"], flags=True)

    p = sub.add_parser("config", help="print a command's config keys (with types, defaults, descriptions)",
                       epilog=_examples(["vlp config show train --describe", "vlp config show eval"]),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    csub = p.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    show = csub.add_parser("show", help="the defaults as YAML, or every key described",
                           epilog=_examples(["vlp config show train --describe", "vlp config show shards > build.yaml"]),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    show.add_argument("name", choices=sorted(COMMAND_SCHEMAS), help="which command's schema")
    show.add_argument("--describe", action="store_true", help="one line per key: type = default, description")
    show.set_defaults(func=_config_show)
    return parser


def _take_local_rank(argv: list[str]) -> list[str]:
    """The DeepSpeed launcher inserts --local_rank=N before our subcommand; honour it via LOCAL_RANK."""
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
    words = _take_local_rank(list(sys.argv[1:] if argv is None else argv))
    try:
        if words[:1] in (["train"], ["launch"], ["demo"]):  # open_clip_train's flags, as its users type them
            rest, overrides = translate(words[1:], words[0])
            words = [words[0], *overrides, *rest]  # before any option: argparse takes positionals first
        elif words[:2] == ["shards", "build"]:  # img2dataset's
            rest, overrides = translate(words[2:], "build")
            words = [*words[:2], *overrides, *rest]
        args = parser.parse_args(words)
        func: Handler = args.func
        return func(args) or 0
    except UserError as err:
        print(f"vlp: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
