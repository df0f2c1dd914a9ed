"""Fuzz vlp's input readers for a set time; report executions and every uncaught exception.

    python bench/fuzz.py --target rows --seconds 600       # one target
    python bench/fuzz.py --seconds 60                      # every target, 60 s each

Targets (each calls the functions the commands call, on files it writes):

    rows      CSV / TSV / JSONL / Parquet inputs (plain and .gz) -> open_inputs + iter_rows +
              caption normalisation (what `vlp shards build` does before fetching)
    manifest  a shard folder whose manifest.json is hostile -> resolve_source (the loader),
              verify_shards, inspect_shards
    tar       hostile tar shards (mutated bytes, crafted member names and types) -> resolve_source
              without a manifest, the training loader's read_shard + decode, eval's read_shard,
              verify_shards
    config    YAML run files and key=value overrides -> vlp.core.config.load for every command schema
    suite     eval suite YAML and the public-format dataset files it names -> load_suite, then each
              task's load() and inputs()
    embeddings  an embed output with one hostile file -> embeddings.load, the gathered embeddings,
              curation's decisions
    removed   a curated folder whose removed.jsonl is hostile -> verify_shards, inspect_shards
    model_config  `model.config_file` JSON -> check_model
    tokenizer `model.tokenizer` folder (Hugging Face files) -> make_tokenizer and tokenising
    deepspeed_config  `train.deepspeed_config` JSON -> the checks and the merged DeepSpeed config
    listing   object-store keys (moto's S3 server in-process) -> listing and mirroring, which must stay in
              its cache folder

"Uncaught" means what would reach a user as a traceback: anything but vlp's one-line errors
(UserError, and RowFailure where a row or sample is refused). Each distinct crash (exception type
and the line that raised it) is printed once, with the failing input saved under --crash-dir.
Inputs come from hypothesis: structured values (hostile names, wrong types, odd unicode) and byte
mutations (flips, truncations, insertions) of valid seed files vlp itself makes. Exit status 1 if
anything crashed.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import shutil
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from vlp.data_tools.captions import normalise_caption
from vlp.data_tools.curation import embeddings
from vlp.data_tools.inspection import inspect_shards
from vlp.data_tools.readers import iter_rows, open_inputs
from vlp.data_tools.synth import make_pair
from vlp.data_tools.verify import verify_shards
from vlp.eval.suite import parse_suite
from vlp.eval.synthetic import materialise
from vlp.eval.tasks import TASKS
from vlp.eval.tasks.base import Context
from vlp.eval.wds import read_shard as eval_read_shard

from vlp.core.config import COMMAND_SCHEMAS, DataSource, load
from vlp.core.errors import RowFailure, UserError
from vlp.train.loader.batches import TrainTransform
from vlp.train.loader.reading import read_shard
from vlp.train.loader.sources import resolve_source

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
from baselines import RESULTS, provenance, write_result  # noqa: E402

ALLOWED = (UserError, RowFailure)


class TimeUp(Exception):
    """Raised inside the hypothesis test when the time is spent (not a finding)."""


# ------------------------------------------------------------------ generic strategies

# Text that breaks parsers: delimiters, quotes, newlines, NUL, surrogates' neighbours, RTL marks.
NASTY = st.sampled_from(["", ",", "\t", '"', "'", "\n", "\r\n", "\x00", "\\", "..", "/", "../../etc/passwd",
                         "\u202e", "\ufeff", "💥", "nan", "inf", "-1", "1e999", "null", "{", "[", "~", "pipe:ls",
                         "a" * 5000])
TEXT = st.one_of(st.text(max_size=40), NASTY)
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True), TEXT)
JSONISH = st.recursive(SCALAR, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                       st.dictionaries(TEXT, kids, max_size=4)), max_leaves=12)


@st.composite
def mutated(draw, seed: bytes) -> bytes:
    """`seed` with a few byte-level edits: flips, deletions, insertions, truncation."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(0, 6))):
        if not data:
            break
        op = draw(st.sampled_from(["flip", "delete", "insert", "truncate", "zero"]))
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "delete":
            del data[pos: pos + draw(st.integers(1, 64))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "truncate":
            del data[pos:]
        else:
            data[pos: pos + 512] = bytes(min(512, len(data) - pos))
    return bytes(data)


@st.composite
def tree_edit(draw, value):
    """A JSON-like value with random subtrees replaced, dropped or retyped."""
    if isinstance(value, dict) and value and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(value)))
        out = dict(value)
        choice = draw(st.integers(0, 3))
        if choice == 0:
            del out[key]
        elif choice == 1:
            out[key] = draw(JSONISH)
        else:
            out[key] = draw(tree_edit(value[key]))
        if draw(st.integers(0, 5)) == 0:
            out[draw(TEXT)] = draw(JSONISH)
        return out
    if isinstance(value, list) and value and draw(st.booleans()):
        out = list(value)
        i = draw(st.integers(0, len(out) - 1))
        out[i] = draw(st.one_of(JSONISH, tree_edit(out[i])))
        return out
    if draw(st.integers(0, 3)) == 0:
        return draw(JSONISH)
    return value


# ------------------------------------------------------------------ seeds vlp makes itself


def _png(seed: int) -> bytes:
    _scene, _caption, image = make_pair(seed, 0, 32)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _shard_bytes(n: int = 2, base: int = 0) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(base, base + n):
            for ext, data in [("png", _png(i)), ("txt", f"caption {i}".encode()),
                              ("json", json.dumps({"key": f"{i:09d}", "caption": f"caption {i}"}).encode())]:
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _manifest(names_counts: list[tuple[str, int]]) -> dict:
    return {"format": "webdataset", "shards": [{"name": n, "samples": c} for n, c in names_counts],
            "samples": sum(c for _n, c in names_counts)}


# ------------------------------------------------------------------ targets


class Target:
    name = ""

    def __init__(self, work: Path):
        self.work = work

    def strategy(self) -> st.SearchStrategy:
        raise NotImplementedError

    def run(self, case) -> None:
        raise NotImplementedError

    def fresh(self) -> Path:
        """An empty folder for one execution."""
        folder = self.work / "case"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder


class Rows(Target):
    name = "rows"
    KINDS = ["csv", "tsv", "jsonl", "parquet"]

    def strategy(self):
        cell = st.one_of(TEXT, st.integers().map(str), st.binary(max_size=20).map(lambda b: b.decode("latin-1")))
        header = st.lists(st.sampled_from(["url", "caption", "width", "x", "", "url"]) | TEXT, max_size=5)
        table = st.tuples(header, st.lists(st.lists(cell, max_size=6), max_size=8))
        records = st.lists(st.one_of(st.dictionaries(st.sampled_from(["url", "caption", "k"]) | TEXT, SCALAR | JSONISH,
                                                     max_size=4), JSONISH), max_size=8)
        return st.tuples(st.sampled_from(self.KINDS), st.booleans(), table, records, st.integers(0, 2),
                         st.binary(max_size=200))

    def _text_table(self, kind: str, table) -> bytes:
        sep = "\t" if kind == "tsv" else ","
        header, rows = table
        lines = [sep.join(header)] + [sep.join(r) for r in rows]
        return "\n".join(lines).encode("utf-8", "surrogatepass")

    def _parquet(self, table) -> bytes:
        import pyarrow as pa
        import pyarrow.parquet as pq

        header, rows = table
        names = list(dict.fromkeys(h for h in header if h)) or ["url"]
        columns = {n: [r[i] if i < len(r) else None for r in rows] for i, n in enumerate(names)}
        out = io.BytesIO()
        pq.write_table(pa.table(columns), out)
        return out.getvalue()

    def run(self, case) -> None:
        kind, gz, table, records, mode, junk = case
        if kind == "jsonl":
            data = "\n".join(json.dumps(r) for r in records).encode()
        elif kind == "parquet":
            data = self._parquet(table)
        else:
            data = self._text_table(kind, table)
        if mode == 1:  # byte-mutated: a random cut and a splice of junk
            cut = len(junk) % (len(data) + 1)
            data = data[:cut] + junk + data[cut:]
        elif mode == 2:
            data = data[: len(data) // 2]
        if gz:
            data = gzip.compress(data) if mode != 2 else gzip.compress(data)[:-5]
        path = self.fresh() / f"pairs.{kind}{'.gz' if gz else ''}"
        path.write_bytes(data)
        inputs = open_inputs([str(path)], "url", "caption", ())
        for row in iter_rows(inputs, "url", "caption", ()):
            if row.error is None:
                try:
                    normalise_caption(row.caption, 512, 10_000)
                except RowFailure:
                    pass


class Manifest(Target):
    name = "manifest"

    def __init__(self, work: Path):
        super().__init__(work)
        self.shards = {"00000.tar": _shard_bytes(2, 0), "00001.tar": _shard_bytes(1, 2)}
        self.seed = _manifest([("00000.tar", 2), ("00001.tar", 1)])

    def strategy(self):
        return st.one_of(tree_edit(self.seed).map(lambda m: json.dumps(m).encode()),
                         mutated(json.dumps(self.seed, indent=1).encode()), st.binary(max_size=64))

    def run(self, case) -> None:
        folder = self.fresh()
        for name, data in self.shards.items():
            (folder / name).write_bytes(data)
        (folder / "manifest.json").write_bytes(case)
        _each(lambda: resolve_source(DataSource(shards=str(folder)), 0),
              lambda: verify_shards(folder, progress=False),
              lambda: inspect_shards(folder, samples=2))


class Tar(Target):
    name = "tar"
    NAMES = ["000000001.png", "000000001.txt", "../evil.txt", "/abs/x.png", "a/b/000000002.jpg", "noext",
             ".hidden.png", "000000003.", "x.y.z.txt", "000000001.json", "__key__.txt", "ünï.png", "a" * 200 + ".txt"]

    def __init__(self, work: Path):
        super().__init__(work)
        self.seed = _shard_bytes(3)
        self.png = _png(7)
        self.transform = TrainTransform(image_size=16)

    def _crafted(self, members) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for name, kind, payload in members:
                info = tarfile.TarInfo(name)
                if kind == "file":
                    data = self.png if payload == b"png" else payload
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                else:
                    info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "link": tarfile.LNKTYPE,
                                 "fifo": tarfile.FIFOTYPE}[kind]
                    info.linkname = "/etc/passwd"
                    tar.addfile(info)
        return out.getvalue()

    def strategy(self):
        member = st.tuples(st.sampled_from(self.NAMES) | TEXT.filter(bool),
                           st.sampled_from(["file", "file", "file", "dir", "symlink", "link", "fifo"]),
                           st.sampled_from([b"png", b"", b"caption", b"{\"a\": 1}", b"\xff\xfe"]) | st.binary(max_size=40))
        crafted = st.lists(member, max_size=8).map(self._crafted)
        return st.one_of(mutated(self.seed), crafted, st.binary(max_size=600))

    def run(self, case) -> None:
        folder = self.fresh()
        shard = folder / "00000.tar"
        shard.write_bytes(case)
        _each(lambda: resolve_source(DataSource(shards=str(folder)), 0),
              lambda: self._train_read(str(shard)),
              lambda: eval_read_shard(shard))
        (folder / "manifest.json").write_text(json.dumps(_manifest([("00000.tar", 3)])))
        _each(lambda: verify_shards(folder, progress=False), lambda: inspect_shards(folder, samples=2))

    def _train_read(self, url: str) -> None:
        # The loader decodes each sample under a catch-all and replaces what fails (counted):
        # reading the shard itself must never raise.
        for sample in read_shard(url, 0, 8):
            if sample is not None:
                try:
                    self.transform(next(v for k, v in sample.items() if k in ("png", "jpg", "jpeg", "webp")), 0)
                except (RowFailure, StopIteration, OSError, ValueError):
                    pass


class Config(Target):
    name = "config"

    def __init__(self, work: Path):
        super().__init__(work)
        root = Path(__file__).resolve().parent.parent
        self.seeds = [p.read_bytes() for p in sorted((root / "configs").glob("*.yaml"))]
        self.structured = [yaml.safe_load(s) or {} for s in self.seeds]
        self.keys = ["data.sources", "model.name", "optim.lr", "optim.min_lr", "train.steps", "train.batch_size",
                     "loss.kind", "train.resume", "train.output_dir", "demo.synth_samples", "launch.nodes",
                     "workers", "image_size", "threads", "batch_size", "suite", "only", "nope", "a.b.c.d"]

    def strategy(self):
        doc = st.one_of(st.sampled_from(self.structured).flatmap(tree_edit).map(
            lambda d: yaml.safe_dump(d, allow_unicode=True).encode("utf-8", "surrogatepass")),
            st.sampled_from(self.seeds).flatmap(mutated), st.binary(max_size=100))
        override = st.tuples(st.sampled_from(self.keys) | TEXT, st.one_of(TEXT, SCALAR.map(str))).map("=".join)
        return st.tuples(doc, st.lists(override, max_size=3), st.sampled_from(sorted(COMMAND_SCHEMAS)))

    def run(self, case) -> None:
        doc, overrides, command = case
        path = self.fresh() / "run.yaml"
        path.write_bytes(doc)
        with contextlib.redirect_stderr(io.StringIO()):  # the empty-file warning, thousands of times
            load(COMMAND_SCHEMAS[command], path, overrides)


class Suite(Target):
    name = "suite"

    def __init__(self, work: Path):
        super().__init__(work)
        self.ctx = Context(cache_dir=work / "cache")
        self.datasets = []  # (task type, dataset spec, {file: bytes})
        small = {"zeroshot_classification": {"attribute": "shape", "n": 2}, "retrieval": {"n": 3},
                 "counting": {"n": 3}, "sugarcrepe": {"n": 3}, "aro_relation": {"n": 3},
                 "aro_attribution": {"n": 3}, "aro_order": {"n": 3}, "winoground": {"n": 2}}
        for kind, params in small.items():
            task = TASKS[kind].Spec.model_validate({"name": "t", "type": kind,
                                                    "dataset": {"format": "synthetic", **params}})
            spec = materialise(kind, task.dataset, work / "seed-cache")
            self.datasets.append((kind, spec, _text_files(Path(spec["path"]))))
        csv_dir = work / "seed-csv"
        csv_dir.mkdir(parents=True, exist_ok=True)
        (csv_dir / "zs.csv").write_text("image,label\na.png,circle\nb.png,square\n")
        (csv_dir / "ret.tsv").write_text("image\tcaption\na.png\ta red circle\nb.png\ta square\n")
        for kind, name in [("zeroshot_classification", "zs.csv"), ("retrieval", "ret.tsv")]:
            spec = {"format": "csv", "path": str(csv_dir / name)}
            self.datasets.append((kind, spec, _text_files(csv_dir / name)))

    def strategy(self):
        def edit(item):
            kind, spec, files = item
            file_edits = st.fixed_dictionaries({k: st.one_of(st.just(v), st.just(v), mutated(v), _json_edit(v))
                                                for k, v in files.items()})
            task = {"name": "t", "type": kind, "dataset": spec}
            return st.tuples(st.just(kind), tree_edit({"name": "fuzz", "tasks": [task]}), file_edits)
        return st.sampled_from(self.datasets).flatmap(edit)

    def run(self, case) -> None:
        _kind, suite, files = case
        folder = self.fresh()
        tasks = suite.get("tasks") if isinstance(suite, dict) else None
        task = tasks[0] if isinstance(tasks, list) and tasks and isinstance(tasks[0], dict) else None
        dataset = task.get("dataset") if task else None
        if isinstance(dataset, dict) and isinstance(dataset.get("path"), str):
            # The dataset's text files, edited, in a fresh folder; images stay where the seed has them.
            source = Path(dataset["path"])
            root = folder / "data"
            if source.is_dir():
                shutil.copytree(source, root, ignore=shutil.ignore_patterns("*.json", "*.jsonl", "*.txt", "*.csv"),
                                symlinks=True)
            for rel, data in files.items():
                target = root / rel if source.is_dir() else folder / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            dataset["path"] = str(root if source.is_dir() else folder / source.name)
        text = yaml.safe_dump(suite, allow_unicode=True).encode("utf-8", "surrogatepass")
        path = folder / "suite.yaml"
        path.write_bytes(text)
        parsed = parse_suite(yaml.safe_load(path.read_bytes()), str(path))
        for spec in parsed.tasks:
            instance = TASKS[spec.type](spec, self.ctx)
            instance.load()
            instance.inputs()


class Embeddings(Target):
    """An embed output (embed.json, image/text .npy, metadata parquet) with one file hostile -> load, the
    embeddings curation gathers, and curation's decisions."""

    name = "embeddings"

    def __init__(self, work: Path):
        super().__init__(work)
        import numpy as np

        self.urls = [str(work / "shards" / f"{i:05d}.tar") for i in range(2)]
        self.seed_dir = work / "seed-emb"
        rng = np.random.default_rng(0)
        embeddings.write_meta(self.seed_dir, {"model": {"source": "vlp-micro", "weights": None, "random_init": True,
                                                        "name": "vlp-micro"}, "sets": ["x"],
                                              "shards": [{"index": i, "set": 0, "url": u, "samples": 3}
                                                         for i, u in enumerate(self.urls)]})
        for i in range(2):
            vecs = rng.standard_normal((3, 8)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            rows = [{"key": f"{i}{j:08d}", "position": j, "caption": "a thing", "clip_score": 0.5, "sha256": f"{j}",
                     "width": 8, "height": 8, "phash": j, "error": None} for j in range(3)]
            embeddings.write_shard(self.seed_dir, i, vecs, vecs, rows)
        self.files = {str(p.relative_to(self.seed_dir)): p.read_bytes() for p in sorted(self.seed_dir.rglob("*"))
                      if p.is_file() and not p.name.startswith(".")}

    def strategy(self):
        def edit(name):
            data = self.files[name]
            variants = [mutated(data), st.binary(max_size=200), st.just(data[: len(data) // 2])]
            if name.endswith(".json"):
                variants.append(tree_edit(json.loads(data)).map(lambda d: json.dumps(d).encode()))
            return st.tuples(st.just(name), st.one_of(*variants))
        return st.sampled_from(sorted(self.files)).flatmap(edit)

    def run(self, case) -> None:
        import numpy as np
        from vlp.data_tools.curation.curate import decide

        from vlp.core.config import CurateConfig

        name, data = case
        root = self.fresh() / "emb"
        shutil.copytree(self.seed_dir, root)
        (root / name).write_bytes(data)
        emb = embeddings.load(root, self.urls)
        emb.image_embeddings(np.arange(emb.table.num_rows))
        decide(emb.table, CurateConfig(shards=["x"], output="o", clip_score_top=0.5), emb, self.urls)


class Removed(Target):
    """A curated folder whose removed.jsonl is hostile -> verify_shards, inspect_shards."""

    name = "removed"

    def __init__(self, work: Path):
        super().__init__(work)
        from vlp.data_tools.build import build_shards
        from vlp.data_tools.curation.curate import curate
        from vlp.data_tools.synth import generate

        from vlp.core.config import CurateConfig, ShardsBuildConfig

        src = work / "seed-shards"
        csv_path = generate(work / "seed-pairs", n=6, seed=2, image_size=32, progress=False)
        build_shards(ShardsBuildConfig(inputs=[str(csv_path)], output=str(src), image_size=32, workers=0),
                     progress=False)
        self.curated = work / "seed-curated"
        curate(CurateConfig(shards=[str(src)], output=str(self.curated), dedup=True), progress=False)
        self.seed = (self.curated / "removed.jsonl").read_bytes() or b'{"key": "1", "reason": "duplicate"}\n'

    def strategy(self):
        line = st.dictionaries(st.sampled_from(["key", "shard", "reason", "score", "matched"]) | TEXT,
                               SCALAR | JSONISH, max_size=5).map(lambda d: json.dumps(d).encode())
        return st.one_of(mutated(self.seed), st.lists(line, max_size=6).map(b"\n".join), st.binary(max_size=300))

    def run(self, case) -> None:
        folder = self.fresh() / "curated"
        shutil.copytree(self.curated, folder)
        (folder / ".vlp-lock").unlink(missing_ok=True)
        (folder / "removed.jsonl").write_bytes(case)
        _each(lambda: verify_shards(folder, progress=False), lambda: inspect_shards(folder, samples=2))


class ModelConfigFile(Target):
    """`model.config_file`: an open_clip model JSON of the user's -> the checks `vlp train` runs on it first."""

    name = "model_config"

    def __init__(self, work: Path):
        super().__init__(work)
        root = Path(__file__).resolve().parent.parent
        self.seed = json.loads((root / "vlp" / "core" / "model_configs" / "vlp-micro.json").read_text())

    def strategy(self):
        return st.one_of(tree_edit(self.seed).map(lambda d: json.dumps(d).encode()),
                         mutated(json.dumps(self.seed).encode()), st.binary(max_size=100))

    def run(self, case) -> None:
        from vlp.core.config import ModelConfig
        from vlp.core.models import check_model

        path = self.fresh() / "my-model.json"
        path.write_bytes(case)
        check_model(ModelConfig(config_file=str(path)))


class TokenizerFolder(Target):
    """`model.tokenizer`: a Hugging Face tokenizer folder of the user's -> vlp's tokenizer on captions."""

    name = "tokenizer"

    def __init__(self, work: Path):
        super().__init__(work)
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]", "a", "red", "circle", "two"])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                       bos_token="[BOS]", eos_token="[EOS]")
        self.seed_dir = work / "seed-tokenizer"
        fast.save_pretrained(str(self.seed_dir))
        self.files = {p.name: p.read_bytes() for p in sorted(self.seed_dir.iterdir()) if p.is_file()}

    def strategy(self):
        def edit(name):
            data = self.files[name]
            variants = [mutated(data), st.binary(max_size=200), st.just(b"")]
            if name.endswith(".json"):
                variants.append(tree_edit(json.loads(data)).map(lambda d: json.dumps(d).encode()))
            return st.tuples(st.just(name), st.one_of(*variants))
        return st.sampled_from(sorted(self.files)).flatmap(edit)

    def run(self, case) -> None:
        from vlp.core.config import ModelConfig
        from vlp.core.models import make_tokenizer

        name, data = case
        folder = self.fresh() / "tok"
        shutil.copytree(self.seed_dir, folder)
        (folder / name).write_bytes(data)
        with contextlib.redirect_stderr(io.StringIO()):
            tokenizer = make_tokenizer(ModelConfig(name="vlp-micro", tokenizer=str(folder)))
            tokenizer(["a red circle", "two", ""])


class DeepSpeedConfig(Target):
    """`train.deepspeed_config`: a DeepSpeed JSON of the user's -> the checks and the merged config."""

    name = "deepspeed_config"

    def __init__(self, work: Path):
        super().__init__(work)
        root = Path(__file__).resolve().parent.parent
        self.seeds = [json.loads(p.read_text()) for p in sorted((root / "launch").glob("ds_*.json"))]

    def strategy(self):
        return st.one_of(st.sampled_from(self.seeds).flatmap(tree_edit).map(lambda d: json.dumps(d).encode()),
                         st.sampled_from(self.seeds).map(lambda d: json.dumps(d).encode()).flatmap(mutated),
                         st.binary(max_size=100))

    def run(self, case) -> None:
        from vlp.core.config import RunConfig
        from vlp.train.dsconfig import check_deepspeed_config, deepspeed_config

        path = self.fresh() / "ds.json"
        path.write_bytes(case)
        cfg = RunConfig.model_validate({"train": {"deepspeed_config": str(path)}})
        check_deepspeed_config(cfg)
        deepspeed_config(cfg, 2)


class Listing(Target):
    """An object-store prefix with hostile keys (moto's S3 server in this process) -> listing, reading, and
    mirroring into a cache folder, which must never be left."""

    name = "listing"

    def __init__(self, work: Path):
        super().__init__(work)
        import logging
        import os

        import boto3
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request otherwise
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x",
                          AWS_DEFAULT_REGION="us-east-1", AWS_MAX_ATTEMPTS="1")
        self.client = boto3.client("s3")
        self.bucket = 0

    def strategy(self):
        key = st.one_of(st.sampled_from(["a.json", "../x", "../../etc/x", "/abs", "a//b", "a/./b", "a\\..\\b",
                                         ".", "..", "a/../../b", "x" * 300, "ü/ñ.txt", "a/b/c.png"]), TEXT.filter(bool))
        return st.lists(st.tuples(key, st.binary(max_size=30)), min_size=1, max_size=5)

    def run(self, case) -> None:
        from vlp.core import storage

        self.bucket += 1
        bucket = f"fuzz{self.bucket}"
        self.client.create_bucket(Bucket=bucket)
        for key, data in case:
            try:
                self.client.put_object(Bucket=bucket, Key=f"set/{key}", Body=data)
            except Exception:  # a key the store itself refuses: not vlp's input
                pass
        cache = self.fresh() / "cache"
        _each(lambda: storage.names(f"s3://{bucket}/set"), lambda: storage.mirror(f"s3://{bucket}/set", cache))
        outside = [p for p in self.fresh().parent.rglob("*") if p.is_file() and cache not in p.parents]
        if outside:
            raise AssertionError(f"the mirror wrote outside its cache: {outside[:3]}")


def _text_files(path: Path) -> dict[str, bytes]:
    """A dataset's small text files by relative name (the file itself when `path` is a file)."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*"))
            if f.suffix in (".json", ".jsonl", ".txt", ".csv") and f.stat().st_size < 200_000}


@st.composite
def _json_edit(draw, data: bytes) -> bytes:
    try:
        if data.lstrip().startswith((b"{", b"[")):
            return json.dumps(draw(tree_edit(json.loads(data)))).encode()
        lines = [json.loads(line) for line in data.splitlines() if line.strip()]
    except ValueError:
        return data
    if not lines:
        return data
    i = draw(st.integers(0, len(lines) - 1))
    lines[i] = draw(tree_edit(lines[i]))
    return "\n".join(json.dumps(x) for x in lines).encode()


def _each(*calls) -> None:
    """Run every call; a one-line error from one does not stop the others; anything else propagates."""
    for call in calls:
        try:
            call()
        except ALLOWED:
            pass


TARGETS = {t.name: t for t in (Rows, Manifest, Tar, Config, Suite, Embeddings, Removed, ModelConfigFile,
                                TokenizerFolder, DeepSpeedConfig, Listing)}


# ------------------------------------------------------------------ driver


def fuzz(target: Target, seconds: float, crash_dir: Path) -> tuple[int, dict[str, str]]:
    deadline = time.monotonic() + seconds
    executions = 0
    crashes: dict[str, str] = {}

    @settings(max_examples=10**9, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(target.strategy())
    def one(case):
        nonlocal executions
        if time.monotonic() > deadline:
            raise TimeUp
        executions += 1
        try:
            target.run(case)
        except ALLOWED:
            pass
        except Exception as err:  # a finding: what a user would see as a traceback
            frame = traceback.extract_tb(err.__traceback__)[-1]
            where = f"{type(err).__name__} at {Path(frame.filename).name}:{frame.lineno}"
            if where not in crashes:
                crashes[where] = f"{err!s:.200}"
                crash_dir.mkdir(parents=True, exist_ok=True)
                (crash_dir / f"{target.name}-{len(crashes)}.txt").write_text(
                    f"{where}\n{traceback.format_exc()}\ninput:\n{case!r:.20000}\n")

    while time.monotonic() < deadline:  # a strategy can run out of fresh examples: go round again
        try:
            one()
        except TimeUp:
            break
    return executions, crashes


COLUMNS = ["target", "executions", "seconds", "uncaught exceptions", "where", "date", "commit"]


def _merged(rows: list[list]) -> list[list]:
    """The result file's rows with this run's replacing the same targets' (older rows without a date go)."""
    path = RESULTS / "fuzz.json"
    old = json.loads(path.read_text())["tables"][0] if path.is_file() else {"columns": [], "rows": []}
    kept = {r[0]: r for r in old["rows"]} if old["columns"] == COLUMNS else {}
    kept.update({r[0]: r for r in rows})
    return [kept[name] for name in TARGETS if name in kept]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", choices=sorted(TARGETS), action="append",
                        help="target to fuzz (repeat for several; default: all)")
    parser.add_argument("--seconds", type=float, default=60.0, help="time per target")
    parser.add_argument("--crash-dir", type=Path, default=Path("fuzz-crashes"))
    args = parser.parse_args()
    failed = False
    rows = []
    with tempfile.TemporaryDirectory(prefix="vlp-fuzz-") as tmp:
        for name in args.target or list(TARGETS):
            start = time.monotonic()
            target = TARGETS[name](Path(tmp) / name)
            executions, crashes = fuzz(target, args.seconds, args.crash_dir)
            took = time.monotonic() - start
            print(f"{name}: {executions} executions in {took:.0f} s, {len(crashes)} uncaught exception(s)",
                  flush=True)
            for where, message in crashes.items():
                print(f"  {where}: {message}", flush=True)
            run = provenance()
            rows.append([name, executions, f"{took:.0f}", len(crashes), "; ".join(crashes) or "-", run["date"],
                         run["commit"]])
            failed |= bool(crashes)
    write_result("fuzz", "Fuzzing every reader of outside input", [{
        "columns": COLUMNS, "rows": _merged(rows)}], order=90,
        notes="Each target's row is its latest run (targets are run a few at a time: `--target` repeated).")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
