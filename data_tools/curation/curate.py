"""`vlp shards curate`: new shards holding only the pairs that pass the filters, every removal accounted for.

The filters, each optional, in this order; a removed sample gets the reason of
the first one that removes it:

1. no usable image (`no_image`, or the decode reason: `corrupt_image`, ...);
   with embeddings, a NaN or infinite embedding or CLIP score (`non_finite_embedding`);
2. captions: `caption_too_short` (words or characters), `caption_too_long`,
   `other_language` (langdetect; `detail` names the language found);
3. images: `image_too_small`, `aspect_ratio_too_large`;
4. `duplicate`: the same image bytes as an earlier sample of any of the shard
   sets (`matched`: the kept one);
5. `eval_contamination`: the image is a near-duplicate of an image of the
   eval suite `decontaminate_suite` (decontaminate.py: embeddings, then the
   thumbnails of copies.py by default; `matched`: the task and the eval image,
   `score`: the cosine);
6. `semantic_duplicate`: SemDeDup on the image embeddings (dedup.py, streamed
   through cluster_files.py; `matched` and `score`: the kept sample and the
   cosine, `detail`: the rule); with `semdedup_caption_threshold`, only pairs
   whose captions agree too (`semdedup_same_caption`: the same words), with `semdedup_copy_distance` only near-copies;
7. `no_metadata_entry`, `metadata_balance`: MetaCLIP balancing against a
   list of metadata entries (metadata.py; `detail`: the entries matched);
   after dedup, so copies do not inflate an entry's count;
8. `low_clip_score`: below `min_clip_score`, or outside the top
   `clip_score_top` fraction of what is left (one exact global threshold
   over every shard; `score`: the sample's CLIP score).

Decisions are made first, over the metadata of every sample (from `vlp shards
embed`, or read from the shards when no filter needs embeddings); then one
pass over the shards copies each kept sample's tar members unchanged into new
shards and writes removed.jsonl (key, shard, reason, score, matched,
matched_shard, detail).
Every sample the input shards' manifests list is accounted for: one that a shard
does not hold (cut short, broken part way) is `missing_from_shard` in removed.jsonl
(its key unknown). The manifest says rows == written + failed + duplicates, as a build's does
(`source: "curate"`, with the filters and the CLIP threshold used), so `vlp
shards verify` and `vlp train` take the output as they take a build.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm
from vlp.data_tools.curation import cluster_files, copies, dedup, embeddings, filters, metadata
from vlp.data_tools.curation.decontaminate import EvalImages, eval_images, matches
from vlp.data_tools.curation.samples import ShardRef, batches, describe, list_shards, read_samples
from vlp.data_tools.output import BuildOutput
from vlp.data_tools.writer import SHARD_FILE, ShardWriter
from vlp.eval.encoders import load_encoder

from vlp.core import storage
from vlp.core.atomic import json_bytes
from vlp.core.config import CurateConfig
from vlp.core.errors import UserError
from vlp.core.manifest import MANIFEST, Manifest
from vlp.core.ownership import LOCK, MARKER

REMOVED = "removed.jsonl"
METADATA_COUNTS = "metadata_counts.json"  # MetaCLIP balancing: each entry's matches before and after
BATCH = 256  # samples decoded at once when scanning
MISSING = "missing_from_shard"  # listed in a shard's manifest, not readable from the shard (cut short, broken)
FILTER_ORDER = ("unusable_image", "non_finite_embedding", "caption_too_short", "caption_too_long", "other_language", "image_too_small",
                "aspect_ratio_too_large", "duplicate", "eval_contamination", "semantic_duplicate", "no_metadata_entry", "metadata_balance",
                "low_clip_score")


@dataclass
class Removal:
    reason: str
    score: float | None = None
    matched: str | None = None  # the key of the kept sample (or the eval image) it matched
    matched_shard: str | None = None  # and that sample's shard
    detail: str = ""


@dataclass
class Decisions:
    """What happens to every row (rows: every sample of every shard, in shard order)."""

    removed: dict[int, Removal] = field(default_factory=dict)
    clip_threshold: float | None = None
    entry_counts: dict | None = None  # MetaCLIP balancing: {"before": {entry: n}, "after": {...}}
    semdedup: dict | None = None  # clusters, buckets, the largest bucket (cluster_files.Stats)

    def remove(self, mask: np.ndarray, reason: str, **fields) -> None:
        for row in np.nonzero(mask)[0]:
            self.removed.setdefault(int(row), Removal(reason, **fields))

    def alive(self, n: int) -> np.ndarray:
        mask = np.ones(n, bool)
        mask[list(self.removed)] = False
        return mask


@dataclass
class CurateSummary:
    output: str
    rows: int
    kept: int
    reasons: Counter
    shards: int
    clip_threshold: float | None

    def line(self) -> str:
        removed = sum(self.reasons.values())
        why = ", ".join(f"{r}: {n}" for r, n in sorted(self.reasons.items())) or "none"
        ok = "ok" if self.rows == self.kept + removed else "MISMATCH"
        clip = f"; CLIP-score threshold {self.clip_threshold:.4f}" if self.clip_threshold is not None else ""
        return (f"curate: rows={self.rows} kept={self.kept} removed={removed} ({why}) (rows == kept + removed: "
                f"{ok}); {self.shards} shards{clip} -> {self.output}")


def _needs_embeddings(opts: CurateConfig) -> list[str]:
    return [name for name, on in (("min_clip_score", opts.min_clip_score is not None),
                                  ("clip_score_top", opts.clip_score_top is not None),
                                  ("semdedup_threshold", opts.semdedup_threshold is not None),
                                  ("decontaminate_suite", opts.decontaminate_suite is not None),
                                  ("semdedup_caption_threshold", opts.semdedup_caption_threshold is not None))
            if on]


def scan(shards: list[ShardRef], workers: int, progress: bool) -> pa.Table:
    """The metadata of every sample, read from the shards (when no filter needs embeddings)."""
    tables = []
    bar = tqdm(total=sum(s.samples for s in shards), unit="sample", desc="scan", disable=not progress)
    with ThreadPoolExecutor(workers) as pool:
        for shard in shards:
            rows: list[dict] = []
            for batch in batches(read_samples(shard.url), BATCH):
                rows += [row for row, _ in pool.map(describe, batch, range(len(rows), len(rows) + len(batch)))]
            table = pa.Table.from_pylist(rows, schema=embeddings.TABLE_SCHEMA)  # (no thumbnails: not needed)
            tables.append(table.append_column("shard", pa.array(np.full(len(rows), shard.index), pa.int64())))
            bar.update(shard.samples)
    bar.close()
    return pa.concat_tables(tables)


def decide(table: pa.Table, opts: CurateConfig, emb: embeddings.Embeddings | None, urls: list[str],
           evals: EvalImages | None = None) -> Decisions:
    """Every filter in FILTER_ORDER over the whole table (urls: every shard's, by index; evals: the
    decontamination suite's images, embedded)."""
    n = table.num_rows
    keys = table.column("key").to_pylist()
    shard_col = table.column("shard").to_numpy()

    def sample(row: int) -> dict:
        return {"matched": keys[row], "matched_shard": urls[shard_col[row]]}

    d = Decisions()
    errors = table.column("error").to_pylist()
    for row, error in enumerate(errors):
        if error is not None:
            d.removed[row] = Removal(error, detail="the image could not be used")
    scores = table.column("clip_score").to_numpy(zero_copy_only=False)
    if emb is not None:  # a NaN or infinite embedding gives a non-finite score: it can pass no filter honestly
        for row in np.nonzero(~np.isfinite(scores) & d.alive(n))[0]:
            d.removed[int(row)] = Removal("non_finite_embedding", detail="the model gave a NaN or infinite "
                                          "embedding or CLIP score")
    d.remove(filters.caption_too_short(table, opts), "caption_too_short")
    d.remove(filters.caption_too_long(table, opts), "caption_too_long")
    other, languages = filters.other_language(table, opts)
    for row in np.nonzero(other & d.alive(n))[0]:
        d.removed[int(row)] = Removal("other_language", detail=languages[row])
    d.remove(filters.image_too_small(table, opts), "image_too_small")
    d.remove(filters.aspect_ratio_too_large(table, opts), "aspect_ratio_too_large")
    if opts.dedup:
        for row, first in dedup.exact_duplicates(table.column("sha256").to_pylist(), d.alive(n)).items():
            d.removed[row] = Removal("duplicate", **sample(first))
    if evals is not None:
        decontaminate(d, table, opts, emb, evals)
    if opts.semdedup_threshold is not None:
        rows = np.nonzero(d.alive(n))[0]
        k = opts.semdedup_clusters or max(1, round(len(rows) / 1000))
        hashes = table.column("phash").fill_null(0).to_numpy()
        checks = cluster_files.Checks(opts.semdedup_threshold, opts.semdedup_hash_distance,
                                      opts.semdedup_caption_threshold, opts.semdedup_copy_distance,
                                      opts.semdedup_same_caption)
        engine = cluster_files.Engine(opts.engine, opts.ray_address, opts.workers)
        found, stats = cluster_files.semantic_duplicates(emb, rows, scores, hashes, k, checks, engine=engine)
        d.semdedup = {"clusters": k, **dataclasses.asdict(stats)}
        rule = f"image cosine >= {opts.semdedup_threshold}" + (
            f", caption cosine >= {opts.semdedup_caption_threshold}" if opts.semdedup_caption_threshold else "") + (
            ", same caption words" if opts.semdedup_same_caption else "") + (
            f", hash within {opts.semdedup_hash_distance} bits" if opts.semdedup_hash_distance is not None else "") + (
            f", thumbnails within {opts.semdedup_copy_distance} levels" if opts.semdedup_copy_distance is not None
            else "")
        for row, (kept, cosine) in found.items():
            d.removed[row] = Removal("semantic_duplicate", score=round(cosine, 6), detail=rule, **sample(kept))
    if opts.metadata is not None:
        balance_metadata(d, table, opts)
    if opts.min_clip_score is not None or opts.clip_score_top is not None:
        alive = d.alive(n)
        d.clip_threshold = opts.min_clip_score
        if opts.clip_score_top is not None:  # exact: the score of the last pair inside the top fraction
            ranked = np.sort(scores[alive])[::-1]
            keep = max(1, math.ceil(len(ranked) * opts.clip_score_top)) if len(ranked) else 0
            d.clip_threshold = float(ranked[keep - 1]) if keep else None
        if d.clip_threshold is not None:
            low = alive & (scores < d.clip_threshold)
            for row in np.nonzero(low)[0]:
                d.removed[int(row)] = Removal("low_clip_score", score=round(float(scores[row]), 6))
    return d


def balance_metadata(d: Decisions, table: pa.Table, opts: CurateConfig) -> None:
    """MetaCLIP: remove what is left that matches no entry, and the draws an over-full entry loses."""
    rows = np.nonzero(d.alive(table.num_rows))[0]
    captions = table.column("caption").take(rows).to_pylist()
    keys = table.column("key").take(rows).to_pylist()
    entries = metadata.read_entries(opts.metadata, opts.metadata_case_sensitive)
    found, kept, before, after = metadata.balance([c or "" for c in captions], keys, entries, opts.metadata_cap,
                                                  opts.metadata_seed, opts.metadata_case_sensitive)
    for i, row in enumerate(rows):
        if not found[i]:
            d.removed[int(row)] = Removal("no_metadata_entry", detail="the caption holds no metadata entry")
        elif not kept[i]:
            d.removed[int(row)] = Removal("metadata_balance", detail="entries: " + ", ".join(sorted(found[i])[:10]))
    d.entry_counts = {"entries": len(entries), "cap": opts.metadata_cap,
                      "before": dict(before.most_common()), "after": dict(after.most_common())}


def decontaminate(d: Decisions, table: pa.Table, opts: CurateConfig, emb: embeddings.Embeddings,
                  evals: EvalImages) -> None:
    """Remove what is left that matches an eval image; shard by shard, so memory stays one shard's."""
    alive = d.alive(table.num_rows)
    shard_col = table.column("shard").to_numpy()
    hashes = table.column("phash").fill_null(0).to_numpy()
    for shard in np.unique(shard_col):
        rows = np.nonzero(alive & (shard_col == shard))[0]
        thumbs = _thumbnails(emb, rows, "decontaminate_copy_distance") \
            if opts.decontaminate_copy_distance is not None else None
        found = matches(emb.image_embeddings(rows), hashes[rows], evals, opts.decontaminate_threshold,
                        opts.decontaminate_hash_distance, thumbs, opts.decontaminate_copy_distance)
        for i, (name, cosine) in found.items():
            d.removed[int(rows[i])] = Removal("eval_contamination", score=round(cosine, 6), matched=name)


def _thumbnails(emb: embeddings.Embeddings, rows: np.ndarray, option: str) -> np.ndarray:
    """The rows' image thumbnails ((n, copies.SIZE) uint8; each of these rows has an image)."""
    thumbs, present = copies.as_array(emb.thumbnails(rows))
    if not present.all():
        raise UserError(f"{option}: {(~present).sum()} image(s) without a thumbnail in {emb.root}; run `vlp shards "
                        "embed` again")
    return thumbs


def _check_thumbnails(emb: embeddings.Embeddings, opts: CurateConfig) -> None:
    """Before any work: the copy checks asked for need thumbnails, which folders embedded by an older vlp lack."""
    for option, on in (("decontaminate_copy_distance", opts.decontaminate_suite is not None
                        and opts.decontaminate_copy_distance is not None),
                       ("semdedup_copy_distance", opts.semdedup_threshold is not None
                        and opts.semdedup_copy_distance is not None)):
        if on and not emb.has_thumbnails():
            raise UserError(f"{option}: the embeddings in {emb.root} hold no image thumbnails (made by an older "
                            f"vlp); run `vlp shards embed` again, or pass --{option.replace('_', '-')} none "
                            "(embeddings alone decide)")


def suite_for_decontamination(opts: CurateConfig, emb: embeddings.Embeddings) -> EvalImages:
    """The suite's images embedded with the embeddings' model, before any work: a suite none of whose
    images can be read is an error (it would remove nothing, silently); some unreadable are counted."""
    encoder, _ = load_encoder(emb.model_spec())
    evals = eval_images(opts.decontaminate_suite, encoder)
    if not len(evals.names):
        raise UserError(f"--decontaminate-suite {opts.decontaminate_suite}: none of its {evals.failed} images "
                        "could be read, so nothing could be checked against it")
    if evals.failed:
        print(f"curate: {evals.failed} images of the decontamination suite could not be read; "
              f"{len(evals.names)} are checked against", file=sys.stderr)
    return evals


def missing_samples(shards: list[ShardRef], table: pa.Table) -> dict[int, int]:
    """Per shard index: samples its manifest lists beyond those that could be read (a cut or broken shard)."""
    present = np.bincount(table.column("shard").to_numpy(), minlength=len(shards))
    return {s.index: s.samples - int(present[s.index]) for s in shards if s.samples > present[s.index]}


def _refuse_an_input_as_output(output: BuildOutput, shards: list[ShardRef], embeddings_dir: str | None) -> None:
    """Curating into a folder that holds an input would delete or mix the input: refused before any work."""
    def under(url: str) -> bool:
        if output.remote or storage.protocol(url):
            return url.rstrip("/").startswith(output.target.rstrip("/") + "/") or url == output.target
        return Path(url).resolve().is_relative_to(output.local.resolve())

    inputs = [s.url for s in shards] + ([embeddings_dir] if embeddings_dir else [])
    clash = next((url for url in inputs if under(url)), None)
    if clash is not None:
        raise UserError(f"--output {output} holds an input of this curation ({clash}); choose a new --output folder")


def _prepare_output(output: BuildOutput, overwrite: bool) -> None:
    """An owned output (claimed): empty, or a curated folder that --overwrite empties of vlp's own files."""
    names = output.names() - {MARKER, LOCK}
    if names and not overwrite:
        raise UserError(f"{output}: not empty ({len(names)} files); --overwrite replaces a curated folder")
    for name in names:
        if name in (MANIFEST, REMOVED, METADATA_COUNTS) or SHARD_FILE.match(name):
            output.delete(name)
    output.local.mkdir(parents=True, exist_ok=True)  # shards are written here (staged, for a URL output)


def _output_key(key: str, shard: ShardRef, several_sets: bool) -> str:
    """Keys stay as they were; with several shard sets they are prefixed by the set, so they stay unique."""
    return f"{shard.set}_{key}" if several_sets else key


def write(shards: list[ShardRef], table: pa.Table, d: Decisions, opts: CurateConfig, output: BuildOutput,
          progress: bool, missing: dict[int, int]) -> list[dict]:
    """One pass over the shards: kept samples into new shards, removals (and samples the shards' manifests
    list but the shards do not hold) into removed.jsonl."""
    keys, sha256 = table.column("key").to_pylist(), table.column("sha256").to_pylist()
    shard_col = table.column("shard").to_numpy()
    starts = np.searchsorted(shard_col, np.arange(len(shards)))
    several = len({s.set for s in shards}) > 1
    written: list[dict] = []
    removed_lines: list[str] = []
    writer: ShardWriter | None = None

    def finish() -> None:
        nonlocal writer
        if writer is not None and writer.samples:
            stats = writer.close()
            output.publish([f"{writer.name}.tar", f"{writer.name}.parquet", f"{writer.name}_stats.json"])
            written.append({"name": f"{writer.name}.tar", "samples": stats["successes"], "rows": stats["count"]})
        writer = None

    bar = tqdm(total=table.num_rows, unit="sample", desc="curate", disable=not progress)
    for shard in shards:
        start, expected = int(starts[shard.index]), int(np.sum(shard_col == shard.index))
        seen = 0
        for position, sample in enumerate(read_samples(shard.url)):
            if position >= expected or keys[start + position] != sample.key:
                raise UserError(f"{shard.url}: sample {position} is {sample.key!r}, the metadata says "
                                f"{keys[start + position] if position < expected else 'the shard ends'}; the "
                                f"shards changed since they were embedded")
            row, seen = start + position, position + 1
            removal = d.removed.get(row)
            if removal is not None:
                removed_lines.append(json.dumps({"key": sample.key, "shard": shard.url, "reason": removal.reason,
                                                 "score": removal.score, "matched": removal.matched,
                                                 "matched_shard": removal.matched_shard, "detail": removal.detail}, ensure_ascii=False))
                continue
            if writer is None:
                writer = ShardWriter(output.local, len(written), ())
            key = _output_key(sample.key, shard, several)
            writer.add_members(key, sample.members)
            writer.add_record({"row": row, "input": shard.url, "line": None, "key": key, "url": None,
                               "caption": sample.caption, "status": "success", "error_message": None,
                               "detail": None, "sha256": sha256[row],
                               "width": None, "height": None, "original_width": None, "original_height": None})
            if writer.samples >= opts.shard_size:
                finish()
        if seen != expected:
            raise UserError(f"{shard.url}: {seen} samples read, {expected} embedded; the shards changed since")
        for position in range(seen, seen + missing.get(shard.index, 0)):
            removed_lines.append(json.dumps({"key": None, "shard": shard.url, "reason": MISSING, "score": None,
                                             "matched": None, "matched_shard": None,
                                             "detail": f"sample {position} of {shard.samples} listed: the shard "
                                                       f"ends or breaks after {seen}"}))
        bar.update(expected)
    finish()
    bar.close()
    output.write(REMOVED, "".join(line + "\n" for line in removed_lines).encode())
    return written


def curate(opts: CurateConfig, progress: bool = True) -> CurateSummary:
    if not opts.shards or not opts.output:
        raise UserError("vlp shards curate: give SHARDS and --output")
    need = _needs_embeddings(opts)
    if need and not opts.embeddings:
        raise UserError(f"vlp shards curate: {', '.join(need)} need --embeddings (from `vlp shards embed`)")
    if opts.metadata is not None:
        metadata.read_entries(opts.metadata)  # a missing or empty list is an error before any work
    shards = list_shards(opts.shards)
    output = BuildOutput(opts.output)
    _refuse_an_input_as_output(output, shards, opts.embeddings)
    emb = embeddings.load(opts.embeddings, [s.url for s in shards]) if opts.embeddings else None
    if emb is not None:
        _check_thumbnails(emb, opts)
    evals = suite_for_decontamination(opts, emb) if opts.decontaminate_suite is not None else None
    try:
        with output.claim("curated", "vlp shards curate", "choose a new --output folder"):
            _prepare_output(output, opts.overwrite)
            return _curate(opts, shards, emb, evals, output, progress)
    finally:
        output.close()


def _curate(opts: CurateConfig, shards: list[ShardRef], emb: embeddings.Embeddings | None,
            evals: EvalImages | None, output: BuildOutput, progress: bool) -> CurateSummary:
    table = emb.table if emb else scan(shards, 4, progress)
    missing = missing_samples(shards, table)  # every sample the input manifests list is accounted for
    d = decide(table, opts, emb, [s.url for s in shards], evals)
    written = write(shards, table, d, opts, output, progress, missing)
    reasons = Counter(r.reason for r in d.removed.values()) + Counter({MISSING: sum(missing.values())})
    kept = sum(s["samples"] for s in written)
    rows = table.num_rows + sum(missing.values())
    manifest = Manifest.model_validate({
        "rows": rows, "written": kept, "failed": sum(n for r, n in reasons.items() if r != "duplicate"),
        "duplicates": reasons.get("duplicate", 0),
        "failure_reasons": {r: n for r, n in sorted(reasons.items()) if r != "duplicate"},
        "shards": written, "inputs": opts.shards, "source": "curate",
    }).model_dump(mode="json")
    manifest["curation"] = {"order": list(FILTER_ORDER), "clip_threshold": d.clip_threshold,
                            "embeddings": opts.embeddings, "options": opts.model_dump(mode="json")}
    if d.entry_counts is not None:  # per-entry counts beside the manifest: 500k entries do not belong in it
        output.write(METADATA_COUNTS, json_bytes(d.entry_counts))
        manifest["curation"]["metadata"] = {"entries": d.entry_counts["entries"], "cap": opts.metadata_cap,
                                            "entries_matched": len(d.entry_counts["before"]),
                                            "entries_over_cap": sum(n > opts.metadata_cap
                                                                    for n in d.entry_counts["before"].values()),
                                            "counts": METADATA_COUNTS}
    if d.semdedup is not None:
        manifest["curation"]["semdedup"] = d.semdedup
    if evals is not None:
        manifest["curation"]["decontamination"] = {"images": len(evals.names), "unreadable": evals.failed}
    output.write(MANIFEST, json_bytes(manifest))
    return CurateSummary(opts.output, rows, kept, reasons, len(written), d.clip_threshold)
