"""`vlp shards embed`: image and caption embeddings of every sample, and its CLIP score.

Any model vlp's evaluation loads works (a run or checkpoint folder, an exported
file, an open_clip name with local weights). Under torchrun or accelerate each
rank takes every WORLD_SIZE-th shard (no process group is needed: ranks write
disjoint files) and runs on its own GPU when there is one. A shard is complete
when its metadata file exists, so a rerun of the same command skips it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from vlp.data_tools.curation import embeddings
from vlp.data_tools.curation.samples import Sample, ShardRef, batches, describe, list_shards, read_samples
from vlp.eval.encoders import Encoder, load_encoder, resolve_model

from vlp.core.config import EmbedConfig
from vlp.core.distributed import detect_env
from vlp.core.errors import UserError
from vlp.core.ownership import claim


@dataclass
class EmbedSummary:
    shards: int = 0  # embedded by this process now
    skipped: int = 0  # complete already
    samples: int = 0
    errors: int = 0
    short: int = 0  # shards that held fewer samples than listed

    def line(self, out: str, rank: int, world: int) -> str:
        who = f"rank {rank}/{world}: " if world > 1 else ""
        return (f"embed: {who}{self.shards} shards embedded ({self.samples} samples, {self.errors} without an "
                f"image embedding), {self.skipped} complete already; {self.short} shards shorter than listed -> {out}")


def _device(choice: str, local_rank: int) -> str:
    if choice == "auto":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    return choice


def _prepare(encoder: Encoder, sample: Sample, position: int) -> tuple[dict, torch.Tensor | None]:
    """A sample's metadata row and its preprocessed image (None when there is no usable image)."""
    row, pixels = describe(sample, position)
    return row, None if pixels is None else encoder.preprocess(pixels)


def embed_shard(encoder: Encoder, shard: ShardRef, batch_size: int, pool: ThreadPoolExecutor
                ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    rows: list[dict] = []
    image_out, text_out = [np.zeros((0, encoder.dim), np.float32)], [np.zeros((0, encoder.dim), np.float32)]
    for batch in batches(read_samples(shard.url), batch_size):
        prepared = list(pool.map(lambda s, i: _prepare(encoder, s, i), batch, range(len(rows), len(rows) + len(batch))))
        image = np.zeros((len(batch), encoder.dim), np.float32)
        ok = [i for i, (_, t) in enumerate(prepared) if t is not None]
        if ok:
            image[ok] = encoder.encode_prepared([prepared[i][1] for i in ok]).numpy()
        text = encoder.encode_texts([r["caption"] for r, _ in prepared]).numpy()
        for i in ok:
            prepared[i][0]["clip_score"] = float(image[i] @ text[i])
        rows += [row for row, _ in prepared]
        image_out.append(image)
        text_out.append(text)
    return np.concatenate(image_out), np.concatenate(text_out), rows


def _absolute(path: str) -> str:
    """A path as absolute (curation reloads the model from another folder); a model name as it is."""
    return str(Path(path).resolve()) if Path(path).exists() else path


def _check_resume(out: Path, meta: dict) -> None:
    """An existing embed output must be of the same model and shards (else its files would be mixed)."""
    old = embeddings.read_meta(out)
    for field in ("model", "shards"):
        if old.get(field) != meta[field]:
            raise UserError(f"{out}: holds embeddings of another {field} ({embeddings.META} differs); give a new "
                            f"--out or delete it")


def embed(opts: EmbedConfig, progress: bool = True) -> EmbedSummary:
    if not opts.shards or not opts.out or not opts.model:
        raise UserError("vlp shards embed: give SHARDS, --out and --model")
    shards = list_shards(opts.shards)
    spec = resolve_model(opts.model, opts.weights, opts.random_init)
    env = detect_env()
    out = Path(opts.out)
    model = {"source": _absolute(opts.model), "weights": _absolute(opts.weights) if opts.weights else None,
             "random_init": opts.random_init, "name": spec.name}
    meta = {"model": model, "sets": opts.shards,
            "shards": [{"index": s.index, "set": s.set, "url": s.url, "samples": s.samples} for s in shards]}
    claim(out, "embeddings", "vlp shards embed", "choose a new --out folder")  # every rank: no process group here
    if (out / embeddings.META).exists():
        _check_resume(out, meta)
    elif env.rank == 0:
        embeddings.write_meta(out, meta)
    mine = [s for s in shards if s.index % env.world_size == env.rank]
    todo = [s for s in mine if not embeddings.metadata_path(out, s.index).exists()]
    summary = EmbedSummary(skipped=len(mine) - len(todo))
    if not todo:
        return summary
    encoder, info = load_encoder(spec, device=_device(opts.device, env.local_rank), batch_size=opts.batch_size,
                                 workers=opts.workers)
    bar = tqdm(total=sum(s.samples for s in todo), unit="sample", desc="embed", disable=not progress)
    with ThreadPoolExecutor(opts.workers) as pool:
        for shard in todo:
            image, text, rows = embed_shard(encoder, shard, opts.batch_size, pool)
            embeddings.write_shard(out, shard.index, image, text, rows)
            summary.shards += 1
            summary.samples += len(rows)
            summary.errors += sum(r["error"] is not None for r in rows)
            summary.short += len(rows) < shard.samples
            bar.update(shard.samples)
    bar.close()
    return summary
