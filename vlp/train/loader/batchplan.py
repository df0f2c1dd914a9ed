"""Batches from a B3 plan (`vlp shards mine-batches`): whole communities of mutually hard samples.

Each epoch, the communities are put in a seeded order and their samples, community after
community (a community's own samples in a seeded order too), are cut into global batches of
`batch_size * world_size`: a batch holds a few whole communities, so most of its negatives are
hard ones. Then a share `data.batch_plan_random` of the epoch's batches, chosen by the same seed,
pool their samples and deal them out again at random (hard batches only would teach the fine
distinctions and lose the easy ones; B3 mixes in random batches for this). Rank r takes the r-th
`batch_size` samples of every global batch, so the contrastive batch, gathered over the ranks, is
the mined one; every rank has the same number of batches.

Everything is a function of (plan, seed, epoch): batch k of an epoch is known without reading
anything before it, which is exact resume. The samples of a batch are scattered over the shards,
read one by one by seeking in local tar shards (remote shards would be read through to each sample:
refused).
"""

from __future__ import annotations

import io
import json
import os

import numpy as np

from vlp.core import storage
from vlp.core.errors import UserError
from vlp.train.loader.plan import PlanSpec
from vlp.train.loader.reading import read_shard
from vlp.train.loader.sources import Shard

PLAN_FORMAT = "vlp-batch-plan/1"


def _same_shard(url: str) -> str:
    return url if storage.protocol(url) or url.startswith("pipe:") else os.path.abspath(url)


class BatchPlan:
    """A mined plan matched to the run's shards."""

    def __init__(self, path: str, shards: list[Shard], community: np.ndarray, random_share: float):
        self.path, self.shards, self.community, self.random_share = path, shards, community, random_share
        self.starts = np.cumsum([0] + [s.samples for s in shards])
        self._epoch: tuple[int, int, np.ndarray] | None = None  # (epoch, global batch, its batches), cached

    @classmethod
    def load(cls, path: str, sources: list[list[Shard]], random_share: float) -> BatchPlan:
        """The plan at `path`, for exactly the run's shards, or a one-line error."""
        try:
            source = io.BytesIO(storage.read_bytes(path)) if storage.protocol(path) else path  # local: no size cap
            with np.load(source, allow_pickle=False) as data:
                header = json.loads(data["header"].tobytes())
                community = data["community"].astype(np.int64)
        except FileNotFoundError:
            raise UserError(f"config key 'data.batch_plan': {path}: no such file") from None
        except Exception as err:  # not an npz, or not ours: numpy and json raise many kinds
            raise UserError(f"config key 'data.batch_plan': {path}: not a `vlp shards mine-batches` plan "
                            f"({type(err).__name__})") from None
        if not isinstance(header, dict) or header.get("format") != PLAN_FORMAT:
            raise UserError(f"config key 'data.batch_plan': {path}: not a `vlp shards mine-batches` plan")
        run = {_same_shard(s.url): s for shards in sources for s in shards}
        planned = []
        for entry in header.get("shards", []):
            shard = run.get(_same_shard(str(entry.get("url"))))
            if shard is None or shard.samples != entry.get("samples"):
                raise UserError(f"config key 'data.batch_plan': {path} was mined for other shards ({entry.get('url')} "
                                f"is not among data.sources with {entry.get('samples')} samples); mine them again")
            if storage.protocol(shard.url) or shard.url.startswith("pipe:"):
                raise UserError(f"config key 'data.batch_plan': needs local shards ({shard.url} is remote)")
            planned.append(shard)
        if len(planned) != len(run) or len(community) != sum(s.samples for s in planned):
            raise UserError(f"config key 'data.batch_plan': {path} covers {len(planned)} of the run's {len(run)} "
                            f"shards; mine the whole of data.sources")
        return cls(path, planned, community, random_share)

    def steps(self, spec: PlanSpec) -> int:
        """Batches per rank per epoch: whole global batches of the planned samples."""
        steps = len(self.community) // (spec.batch_size * spec.world_size)
        if steps == 0:
            raise UserError(f"config key 'data.batch_plan': {len(self.community)} samples make no global batch of "
                            f"{spec.batch_size * spec.world_size}")
        return steps

    def epoch_batches(self, spec: PlanSpec, epoch: int) -> np.ndarray:
        """(steps, global batch) sample rows of the epoch: whole communities, then a share dealt at random."""
        size = spec.batch_size * spec.world_size
        if self._epoch is not None and self._epoch[:2] == (epoch, size):
            return self._epoch[2]
        rng = np.random.default_rng([spec.seed, epoch, 0xB3])
        place = rng.permutation(int(self.community.max(initial=-1)) + 1)  # each community's place in the epoch
        order = np.lexsort((rng.random(len(self.community)), place[self.community]))
        steps = self.steps(spec)
        batches = order[:steps * size].reshape(steps, size)
        mixed = np.sort(rng.choice(steps, size=round(self.random_share * steps), replace=False))
        if len(mixed):
            batches[mixed] = rng.permutation(batches[mixed].ravel()).reshape(len(mixed), size)
        self._epoch = (epoch, size, batches)
        return batches

    def rank_rows(self, spec: PlanSpec, epoch: int, index: int) -> np.ndarray:
        """This rank's sample rows of batch `index`."""
        batch = self.epoch_batches(spec, epoch)[index]
        return batch[spec.rank * spec.batch_size:(spec.rank + 1) * spec.batch_size]

    def read(self, spec: PlanSpec, epoch: int, index: int) -> list[dict | None]:
        """This rank's samples of batch `index` (None where one is missing), each read by seeking."""
        out = []
        for row in self.rank_rows(spec, epoch, index):
            shard = int(np.searchsorted(self.starts, row, side="right")) - 1
            out += read_shard(self.shards[shard].url, int(row - self.starts[shard]), 1)
        return out
