"""Input rows: CSV, TSV, Parquet, JSONL (each optionally .gz) and image folders.

Everything the builder reads becomes a `Row`, numbered in input order. A row
that cannot even be parsed (a CSV record with the wrong number of fields, a
JSONL line that is not an object) still becomes a Row, carrying the reason in
`error`, so it is counted and reported like any other failure.

Problems with an input as a whole (missing file, unknown format, missing
column) are found by `open_inputs` before any work starts and raised as a
one-line `UserError`. An input that breaks part way (a truncated .gz, a
damaged Parquet row group) cannot take the build down either: its readable
rows are kept and one `unreadable_input` row stands for the rest of it.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vlp.core.errors import UserError
from vlp.core.images import IMAGE_SUFFIXES

# Captions can be absurdly long; the builder rejects those with a reason,
# which needs the csv module to read them instead of raising.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

TABLE_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
SIDECAR_SUFFIXES = {".txt", ".json"}  # in image folders: captions and metadata, not rows


@dataclass
class Row:
    """One input record on its way to a shard (or to failures.jsonl)."""

    index: int  # global row number across all inputs, from 0
    source: str  # input file (or folder) it came from
    line: int  # record number inside that source, from 1 (a line number for text formats)
    ref: str | None  # image reference as written: a path, file:// or http(s) URL
    base_dir: str  # where relative paths are resolved
    caption: str | None  # raw caption; may hold surrogates where the bytes were not UTF-8
    extra: dict = field(default_factory=dict)  # --keep-cols values
    error: str | None = None  # set when the record itself is malformed
    detail: str = ""
    slot: int | None = None  # its position in a retry's rows (vlp.data_tools.history); None: by its index


@dataclass(frozen=True)
class InputFile:
    path: Path
    kind: str  # csv | tsv | parquet | jsonl | folder
    gz: bool
    origin: str | None = None  # the object-storage URL `path` is a local copy of

    @property
    def name(self) -> str:
        return self.origin or str(self.path)

    @property
    def base(self) -> str:
        """Where its relative image paths resolve: the input's folder (a URL prefix for a copied input)."""
        if self.origin:
            return self.origin.rsplit("/", 1)[0]
        return str(self.path if self.kind == "folder" else self.path.parent)


def _kind_of(path: Path) -> tuple[str, bool]:
    if path.is_dir():
        return "folder", False
    suffixes = [s.lower() for s in path.suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    if gz:
        suffixes = suffixes[:-1]
    kind = TABLE_SUFFIXES.get(suffixes[-1] if suffixes else "")
    if kind is None:
        allowed = ", ".join(sorted(TABLE_SUFFIXES))
        raise UserError(f"input {path}: unknown format (expected a folder or one of {allowed}, optionally .gz)")
    return kind, gz


def _open_text(inp: InputFile):
    # surrogateescape keeps undecodable bytes, so one bad caption is a failed
    # row with a reason instead of a crash of the whole file.
    raw = gzip.open(inp.path, "rb") if inp.gz else open(inp.path, "rb")  # noqa: SIM115
    return io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")


def _parquet_file(inp: InputFile):
    import pyarrow.parquet as pq

    if not inp.gz:
        return pq.ParquetFile(inp.path)
    # Parquet needs random access: unpack the .gz into a temporary file first.
    tmp = tempfile.TemporaryFile()
    with gzip.open(inp.path, "rb") as src:
        while chunk := src.read(1 << 20):
            tmp.write(chunk)
    tmp.seek(0)
    return pq.ParquetFile(tmp)


def _columns(inp: InputFile) -> list[str] | None:
    """The input's column names, or None where they vary by record (JSONL, folders)."""
    if inp.kind in ("csv", "tsv"):
        with _open_text(inp) as fh:
            reader = csv.reader(fh, delimiter="\t" if inp.kind == "tsv" else ",")
            header = next(reader, None)
        if not header:
            raise UserError(f"input {inp.path}: empty file, no header row")
        return header
    if inp.kind == "parquet":
        return list(_parquet_file(inp).schema_arrow.names)
    return None


def expand_table_folders(paths: list[str]) -> list[str]:
    """A folder of tables (img2dataset's url_list folder: parquet, CSV, JSONL files) stands for its tables, in
    name order; a folder of images stays one input; a folder holding both is refused (which was meant?)."""
    out = []
    for text in paths:
        path = Path(text)
        if not path.is_dir():
            out.append(text)
            continue
        files = [p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")]
        tables = [p for p in files if _table_kind(p) is not None]
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        if tables and images:
            raise UserError(f"input {path}: holds both tables ({tables[0].name}) and images ({images[0].name}); give "
                            "the tables as inputs, or a folder of images alone")
        out += [str(p) for p in tables] if tables else [text]
    return out


def _table_kind(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return TABLE_SUFFIXES.get(suffixes[-1]) if suffixes else None


def open_inputs(paths: list[str], url_col: str, caption_col: str, keep_cols: tuple[str, ...],
                origins: dict[str, str] | None = None, flags: dict[str, str] | None = None) -> list[InputFile]:
    """Check every input before work starts: exists, readable, known format, has the columns.

    `origins` maps local copies of object-storage inputs to their URLs (data_tools.output)."""
    if not paths:
        raise UserError("no input given")
    inputs = []
    for text in expand_table_folders(paths):
        path = Path(text)
        if not path.exists():
            raise UserError(f"input {path}: no such file or folder")
        if not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
            raise UserError(f"input {path}: not readable (permission denied)")
        kind, gz = _kind_of(path)
        inp = InputFile(path, kind, gz, (origins or {}).get(text))
        try:
            columns = _columns(inp)
        except UserError:
            raise
        except Exception as err:  # corrupt gzip / parquet footer / unreadable bytes
            raise UserError(f"input {path}: cannot be read as {kind}{' (gz)' if gz else ''}: {err}") from None
        if columns is not None:
            for col, flag in [(url_col, "--url-col"), (caption_col, "--caption-col")] + [
                (c, (flags or {}).get(c, "--keep-cols")) for c in keep_cols
            ]:
                if col not in columns:
                    raise UserError(
                        f"input {path}: no column {col!r} ({flag}); columns are: {', '.join(columns)}"
                    )
        inputs.append(inp)
    return inputs


# ------------------------------------------------------------------ rows


def _table_rows(inp: InputFile, url_col: str, caption_col: str, keep_cols: tuple[str, ...]):
    """(line, ref, caption, extra, error, detail) for CSV/TSV files."""
    with _open_text(inp) as fh:
        # strict: a broken quote is a malformed row, not a field that swallows the rest of the file
        reader = csv.reader(fh, delimiter="\t" if inp.kind == "tsv" else ",", strict=True)
        header = next(reader)
        width = len(header)
        pos = {name: i for i, name in enumerate(header)}
        while True:
            try:
                record = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                yield reader.line_num, None, None, {}, "malformed_row", str(err)
                continue
            if not record:  # blank line: not a record
                continue
            if len(record) != width:
                detail = f"expected {width} fields, got {len(record)}"
                yield reader.line_num, None, None, {}, "malformed_row", detail
                continue
            extra = {c: record[pos[c]] for c in keep_cols}
            yield reader.line_num, record[pos[url_col]], record[pos[caption_col]], extra, None, ""


def _jsonl_rows(inp: InputFile, url_col: str, caption_col: str, keep_cols: tuple[str, ...]):
    with _open_text(inp) as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                yield line_no, None, None, {}, "malformed_row", f"invalid JSON: {err.msg}"
                continue
            if not isinstance(obj, dict):
                yield line_no, None, None, {}, "malformed_row", "line is not a JSON object"
                continue
            if url_col not in obj:
                yield line_no, None, None, {}, "malformed_row", f"no field {url_col!r}"
                continue
            ref = obj.get(url_col)
            caption = obj.get(caption_col)
            extra = {c: obj.get(c) for c in keep_cols}
            yield line_no, None if ref is None else str(ref), None if caption is None else str(caption), extra, None, ""


def _as_text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="surrogateescape")
    return str(value)


def _parquet_rows(inp: InputFile, url_col: str, caption_col: str, keep_cols: tuple[str, ...]):
    pf = _parquet_file(inp)
    columns = list(dict.fromkeys([url_col, caption_col, *keep_cols]))
    line = 0
    for batch in pf.iter_batches(batch_size=4096, columns=columns):
        data = batch.to_pydict()
        for i in range(batch.num_rows):
            line += 1
            extra = {c: data[c][i] for c in keep_cols}
            yield line, _as_text(data[url_col][i]), _as_text(data[caption_col][i]), extra, None, ""


def _folder_rows(inp: InputFile):
    """Every non-sidecar file under the folder is a row; its caption is the same-stem .txt."""
    files = sorted(
        p for p in inp.path.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in SIDECAR_SUFFIXES
    )
    for line, img in enumerate(files, start=1):
        txt = img.with_suffix(".txt")
        ref = str(img.relative_to(inp.path))
        if not txt.is_file():
            yield line, ref, None, {}, "missing_caption", f"no {txt.name} next to the image"
            continue
        caption = txt.read_bytes().decode("utf-8", errors="surrogateescape")
        yield line, ref, caption, {}, None, ""


def iter_rows(
    inputs: list[InputFile], url_col: str, caption_col: str, keep_cols: tuple[str, ...]
) -> Iterator[Row]:
    """All rows of all inputs, in order, numbered globally from 0."""
    index = 0
    for inp in inputs:
        if inp.kind == "folder":
            records = _folder_rows(inp)
        else:
            reader = _parquet_rows if inp.kind == "parquet" else _jsonl_rows if inp.kind == "jsonl" else _table_rows
            records = reader(inp, url_col, caption_col, keep_cols)
        for line, ref, caption, extra, error, detail in _until_unreadable(records, inp):
            yield Row(index, inp.name, line, ref, inp.base, caption, extra, error, detail)
            index += 1


def _until_unreadable(records: Iterator[tuple], inp: InputFile) -> Iterator[tuple]:
    """The reader's records; if the file breaks part way, one failure record for the rest of it."""
    line = 0
    try:
        for record in records:
            line = record[0]
            yield record
    except UserError:
        raise
    except Exception as err:  # truncated gzip, damaged parquet pages, a file gone mid-build
        detail = f"{inp.path} could not be read after record {line}: {type(err).__name__}: {err}"
        yield line + 1, None, None, {}, "unreadable_input", detail[:500]
