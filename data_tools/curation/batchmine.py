"""B3 batch mining ("Breaking the Batch Barrier"): communities of mutually hard samples, from a teacher.

    vlp shards mine-batches shards/ --embeddings emb/ --out plan.npz --cluster-size 32
    vlp train ... data.batch_plan=plan.npz

A contrastive batch teaches only as much as its negatives are hard; random batches of a large
set hold few. From a teacher's embeddings (`vlp shards embed`):

1. Rank: for every sample's image, every other sample's caption by cosine. The `skip` nearest are
   left out (at the top are the same concept under another name: false negatives), the next
   `neighbors` become edges of a similarity graph, weighted by their cosine.
2. Communities: Leiden (leidenalg on igraph) partitions the graph into communities of at most
   `cluster_size` samples, each one samples that are hard negatives for each other.
3. The plan file keeps each sample's community; the loader (vlp.train.loader.batchplan) makes each
   epoch's batches from whole communities in a seeded order, a fraction of them random.

A sample the teacher could not embed (a corrupt image) is a community of its own: it is still
trained on, in whatever batch its community lands.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from vlp.data_tools.curation import embeddings
from vlp.data_tools.curation.samples import list_shards

from vlp.core import storage
from vlp.core.atomic import atomic_file
from vlp.core.config import MineBatchesConfig
from vlp.core.errors import UserError
from vlp.train.loader.batchplan import PLAN_FORMAT


@dataclass
class MineSummary:
    samples: int
    communities: int
    largest: int
    out: str

    def line(self) -> str:
        return (f"batch plan: {self.samples} samples in {self.communities} communities (largest {self.largest}); "
                f"wrote {self.out}")


def hard_neighbours(images: np.ndarray, texts: np.ndarray, skip: int, neighbors: int,
                    chunk: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edges (i, j, cosine): for each image i, the captions j ranked skip+1 .. skip+neighbors among the others."""
    n = len(images)
    take = min(neighbors, max(0, n - 1 - skip))
    if take == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    src, dst, weight = [], [], []
    for lo in range(0, n, chunk):
        sims = images[lo:lo + chunk] @ texts.T
        rows = np.arange(len(sims))
        sims[rows, lo + rows] = -np.inf  # a sample's own caption is its positive, not a negative
        top = np.argpartition(-sims, skip + take - 1, axis=1)[:, :skip + take]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
        ranked = np.take_along_axis(top, order, axis=1)[:, skip:]
        src.append(np.repeat(lo + rows, take))
        dst.append(ranked.ravel())
        weight.append(np.take_along_axis(sims, ranked, axis=1).ravel())
    return np.concatenate(src), np.concatenate(dst), np.concatenate(weight).astype(np.float32)


def communities(n: int, src: np.ndarray, dst: np.ndarray, weight: np.ndarray, cluster_size: int,
                seed: int) -> np.ndarray:
    """Each node's community (0..k-1), at most `cluster_size` nodes each, by Leiden on the weighted graph."""
    try:
        import igraph
        import leidenalg
    except ImportError:
        raise UserError("vlp shards mine-batches needs igraph and leidenalg: pip install 'vlp[mine]'") from None
    graph = igraph.Graph(n=n, edges=np.stack([src, dst], axis=1).tolist(), directed=False)
    # cosines may be negative in a weak teacher; modularity needs non-negative weights, and only the order matters
    graph.es["weight"] = (weight - min(0.0, float(weight.min(initial=0.0)))).tolist()
    graph.simplify(combine_edges="max")  # i->j and j->i are one edge
    partition = leidenalg.find_partition(graph, leidenalg.ModularityVertexPartition, weights="weight",
                                         max_comm_size=cluster_size, seed=seed)
    return capped(np.asarray(partition.membership, dtype=np.int64), cluster_size)


def capped(member: np.ndarray, cluster_size: int) -> np.ndarray:
    """Communities over the cap cut into runs of `cluster_size` (leidenalg's cap holds while nodes move
    between communities, not always when it aggregates them), renumbered 0..k-1."""
    order = np.argsort(member, kind="stable")
    sorted_member = member[order]
    first = np.searchsorted(sorted_member, sorted_member)  # where each node's community starts in the order
    part = (np.arange(len(member)) - first) // cluster_size
    out = np.empty_like(member)
    out[order] = np.unique(np.stack([sorted_member, part], axis=1), axis=0, return_inverse=True)[1].ravel()
    return out


def mine(opts: MineBatchesConfig) -> MineSummary:
    if not opts.shards or not opts.embeddings or not opts.out:
        raise UserError("vlp shards mine-batches: give SHARDS, --embeddings (from `vlp shards embed`) and --out")
    shards = list_shards(opts.shards)
    _refuse_an_input_as_output(opts.out, [s.url for s in shards], opts.embeddings)
    emb = embeddings.load(opts.embeddings, [s.url for s in shards])
    starts = np.cumsum([0] + [s.samples for s in shards])
    table = emb.table
    rows = starts[table.column("shard").to_numpy()] + table.column("position").to_numpy()
    if len(rows) != starts[-1] or len(np.unique(rows)) != len(rows):
        raise UserError(f"{opts.embeddings}: embeds {len(rows)} samples, the shards hold {starts[-1]}: embed them again")
    good = np.asarray([e is None for e in table.column("error").to_pylist()])
    index = np.arange(len(rows))[good]
    images, texts = emb.image_embeddings(index), emb.text_embeddings(index)
    src, dst, weight = hard_neighbours(images, texts, opts.skip_nearest, opts.neighbors)
    member = np.empty(starts[-1], dtype=np.int64)
    found = communities(len(index), src, dst, weight, opts.cluster_size, opts.seed)
    member[rows[index]] = found
    lone = rows[~good]  # no embedding: a community each
    member[lone] = found.max(initial=-1) + 1 + np.arange(len(lone))
    write_plan(opts.out, shards, member, {"cluster_size": opts.cluster_size, "skip_nearest": opts.skip_nearest,
                                          "neighbors": opts.neighbors, "seed": opts.seed,
                                          "embeddings": str(Path(opts.embeddings).resolve())})
    sizes = np.bincount(member)
    return MineSummary(int(starts[-1]), len(sizes), int(sizes.max(initial=0)), opts.out)


def _refuse_an_input_as_output(out: str, shard_urls: list[str], embeddings_dir: str) -> None:
    """The plan is one local file: never a shard, never inside the embeddings it is mined from."""
    if storage.protocol(out):
        raise UserError(f"vlp shards mine-batches: --out {out}: a local file (copy it to object storage after)")
    target = Path(out).resolve()
    if str(target) in {str(Path(u).resolve()) for u in shard_urls if not storage.protocol(u)} or \
            target.is_relative_to(Path(embeddings_dir).resolve()):
        raise UserError(f"vlp shards mine-batches: --out {out} is one of its inputs (a shard, or inside "
                        f"--embeddings); choose another file")


def write_plan(out: str, shards, member: np.ndarray, settings: dict) -> None:
    """The plan file: its format, the shards (url, samples) in row order, and each row's community."""
    header = {"format": PLAN_FORMAT, "shards": [{"url": s.url, "samples": s.samples} for s in shards], **settings}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as f:
        np.savez(f, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
                 community=member.astype(np.int32 if member.max(initial=0) < 2**31 else np.int64))
