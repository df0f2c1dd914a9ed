"""The layout `vlp shards embed` writes and `vlp shards curate` reads (clip-retrieval's, per shard).

    EMB/embed.json                       the model, the shard sets, every shard (index, set, url, samples)
    EMB/img_emb/img_emb_00000.npy        float16 (samples, dim), L2-normalised, in the shard's sample order
    EMB/text_emb/text_emb_00000.npy      the same for the captions
    EMB/metadata/metadata_00000.parquet  key, position, caption, clip_score, sha256, width, height, phash, thumb, url, error

One file triple per input shard, numbered by the shard's index in embed.json.
The metadata file is written last: its presence marks the shard complete, so
an interrupted embed run (or one rank of it) resumes at the first shard
without one. `clip_score` is the cosine of the image and caption embeddings
(NaN where the image could not be decoded: `error` says why, and curation
removes the sample with that reason).
"""

from __future__ import annotations

import functools
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from vlp.eval.encoders import ModelSpec, resolve_model

from vlp.core.atomic import write_atomic, write_json
from vlp.core.errors import UserError, first_line
from vlp.core.smallfiles import read_small

FORMAT = "vlp-embeddings/1"
META = "embed.json"
METADATA_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("position", pa.int64()),  # the sample's index in its shard
    ("caption", pa.string()),
    ("clip_score", pa.float32()),
    ("sha256", pa.string()),  # of the image member's bytes (exact dedup)
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("phash", pa.int64()),  # perceptual hash of the image (phash.py): confirms copies of eval images
    ("thumb", pa.binary()),  # 16x16 RGB thumbnail (copies.py): the near-copy signal; null in older folders
    ("url", pa.string()),  # the image's source, from the sample's json (as clip-retrieval's metadata has it)
    ("error", pa.string()),  # null, or why the sample has no embedding (no_image, corrupt_image, ...)
])


# what curation holds in memory for every sample: the metadata without thumbnails, which it reads a shard at a
# time when a copy check needs them (768 bytes a sample would be most of the table), and without URLs (unused)
TABLE_SCHEMA = pa.schema([f for f in METADATA_SCHEMA if f.name not in ("thumb", "url")])


def img_path(root: Path, shard: int) -> Path:
    return root / "img_emb" / f"img_emb_{shard:05d}.npy"


def text_path(root: Path, shard: int) -> Path:
    return root / "text_emb" / f"text_emb_{shard:05d}.npy"


def metadata_path(root: Path, shard: int) -> Path:
    return root / "metadata" / f"metadata_{shard:05d}.parquet"


def _npy_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def write_shard(root: Path, shard: int, image: np.ndarray, text: np.ndarray, rows: list[dict]) -> None:
    """One shard's arrays, then its metadata (the completion mark), each atomically."""
    for path in (img_path(root, shard), text_path(root, shard), metadata_path(root, shard)):
        path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(img_path(root, shard), _npy_bytes(image.astype(np.float16)))
    write_atomic(text_path(root, shard), _npy_bytes(text.astype(np.float16)))
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=METADATA_SCHEMA), sink)
    write_atomic(metadata_path(root, shard), sink.getvalue().to_pybytes())


def write_meta(root: Path, meta: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / META, {"format": FORMAT, **meta})


def read_meta(root: Path) -> dict:
    try:
        meta = json.loads(read_small(root / META, "embeddings metadata"))
    except FileNotFoundError:
        raise UserError(f"{root}: no {META} (not a `vlp shards embed` output)") from None
    except (OSError, ValueError) as err:
        raise UserError(f"{root / META}: not readable JSON ({type(err).__name__})") from None
    except RecursionError:
        raise UserError(f"{root / META}: nested too deeply") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{root / META}: not a {FORMAT} file")
    shards, model = meta.get("shards"), meta.get("model")
    if not isinstance(model, dict) or not isinstance(shards, list) or not all(
            isinstance(sh, dict) and type(sh.get("index")) is int and isinstance(sh.get("url"), str)
            and type(sh.get("samples")) is int and sh["samples"] >= 0 for sh in shards) or [
            sh["index"] for sh in shards] != list(range(len(shards))):
        raise UserError(f"{root / META}: its model or shard list is not as `vlp shards embed` writes it")
    return meta


@dataclass
class Embeddings:
    """Everything curation needs of an embed output, in shard order (metadata in memory, arrays mapped)."""

    root: Path
    meta: dict
    table: pa.Table  # every sample's metadata, plus `shard` (its index)

    def model_spec(self) -> ModelSpec:
        """The model these were embedded with (to embed more images alike: eval images for decontamination)."""
        m = self.meta["model"]
        if not isinstance(m.get("source"), str) or not isinstance(m.get("weights"), str | None):
            raise UserError(f"{self.root / META}: names no model to embed with")
        return resolve_model(m["source"], m["weights"], bool(m.get("random_init")))

    def image_embeddings(self, rows: np.ndarray) -> np.ndarray:
        """float32 image embeddings of the given global row numbers (read shard by shard from the mapped files)."""
        return self._gather(img_path, rows)

    def text_embeddings(self, rows: np.ndarray) -> np.ndarray:
        """float32 caption embeddings of the given global row numbers."""
        return self._gather(text_path, rows)

    def has_thumbnails(self) -> bool:
        """Whether every shard's metadata holds image thumbnails (folders embedded before them do not)."""
        return all("thumb" in pq.read_schema(metadata_path(self.root, s["index"])).names for s in self.meta["shards"])

    def thumbnails(self, rows: np.ndarray) -> list[bytes | None]:
        """The image thumbnails (copies.py) of the given global row numbers, read shard by shard."""
        shard_of, starts = self._layout
        out: list[bytes | None] = [None] * len(rows)
        for shard in np.unique(shard_of[rows]):
            mine = np.nonzero(shard_of[rows] == shard)[0]
            column = pq.read_table(metadata_path(self.root, int(shard)), columns=["thumb"]).column("thumb")
            for i, value in zip(mine, column.take(rows[mine] - starts[shard]).to_pylist(), strict=True):
                out[i] = value
        return out

    @functools.cached_property
    def _layout(self) -> tuple[np.ndarray, np.ndarray]:
        """(each row's shard, each shard's first row and one past its last): rows are in shard order."""
        shard_of = self.table.column("shard").to_numpy()
        return shard_of, np.searchsorted(shard_of, np.arange(len(self.meta["shards"]) + 1))

    def _gather(self, path_of, rows: np.ndarray) -> np.ndarray:
        shard_of, starts = self._layout
        out = None
        for shard in np.unique(shard_of[rows]):
            mine = np.nonzero(shard_of[rows] == shard)[0]
            array = _load_array(path_of(self.root, int(shard)), int(starts[shard + 1] - starts[shard]))
            if out is None:
                out = np.zeros((len(rows), array.shape[1]), dtype=np.float32)
            out[mine] = array[rows[mine] - starts[shard]]
        return out if out is not None else np.zeros((0, 0), np.float32)


def load(root: str | Path, shard_urls: list[str]) -> Embeddings:
    """An embed output for exactly these shards (in this order), complete, or a one-line error."""
    root = Path(root)
    meta = read_meta(root)
    listed = [s["url"] for s in meta["shards"]]
    if listed != shard_urls:
        raise UserError(f"{root}: embeddings of other shards ({len(listed)} listed in {META}, {len(shard_urls)} "
                        f"given; first difference: {_first_difference(listed, shard_urls)})")
    missing = [s["index"] for s in meta["shards"] if not metadata_path(root, s["index"]).exists()]
    if missing:
        raise UserError(f"{root}: {len(missing)} shard(s) not embedded yet (first: {missing[0]}); run the same "
                        f"`vlp shards embed` again to finish")
    tables = []
    for s in meta["shards"]:
        table = _read_metadata(metadata_path(root, s["index"]))  # the samples the shard held when embedded
        tables.append(table.append_column("shard", pa.array(np.full(table.num_rows, s["index"]), pa.int64())))
    return Embeddings(root, meta, pa.concat_tables(tables))


def _first_difference(a: list[str], b: list[str]) -> str:
    for x, y in zip(a, b, strict=False):
        if x != y:
            return f"{x} vs {y}"
    return "one list is longer"


def _load_array(path: Path, rows: int) -> np.ndarray:
    """An embeddings file, memory-mapped: a float (rows, dim) array, or a one-line error naming the file."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"{path}: missing; run `vlp shards embed` again to write it") from None
    except Exception as err:  # a cut or foreign .npy: numpy raises ValueError, OSError, SyntaxError (its header)
        raise UserError(f"{path}: not a readable .npy array ({type(err).__name__}); embed this shard again") from None
    if array.ndim != 2 or array.dtype.kind != "f" or array.shape[0] != rows or not array.shape[1]:
        raise UserError(f"{path}: holds a {array.dtype} array of shape {array.shape}, not {rows} float embeddings; "
                        "embed this shard again")
    return array


def _read_metadata(path: Path) -> pa.Table:
    """A shard's metadata table, checked against METADATA_SCHEMA, or a one-line error naming the file."""
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise UserError(f"{path}: missing; run `vlp shards embed` again to write it") from None
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError and more for a broken file
        raise UserError(f"{path}: not a readable parquet file ({type(err).__name__}); embed this shard again") from None
    try:
        return table.select(TABLE_SCHEMA.names).cast(TABLE_SCHEMA)
    except (KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as err:
        raise UserError(f"{path}: not vlp's embedding metadata ({first_line(err)[:120]})") from None
