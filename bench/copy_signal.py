"""The near-copy signals, measured: how far copies are from their original, and distinct images from each other.

    python bench/copy_signal.py [--sets synthetic,emoji,openmoji] [--n 1500] [--work /tmp/vlp-bench-real]

For each set of images (synthetic: the generator's scenes at 64 px; emoji: Twemoji's 64 px
drawings; openmoji: OpenMoji's colour drawings, both from the package registries as
bench/real_sets.py fetches them), every image gets three copies, each then stored the way
`vlp shards build` stores it by default (its resize and JPEG encoding):

- re-encoded: the image itself;
- resized: scaled to 3/4 and back up;
- crop: 96-99% of each side at a random offset, resized back, JPEG quality 70-90 (the planted
  near-duplicates of vlp.data_tools.curation.planted).

Distinct pairs: each image and its nearest other image of the set by that signal (the hardest
case: icon sets hold variants that differ in a detail or a colour). For each signal (the
thumbnail distance of copies.py in grey levels; the pHash of phash.py in bits) it prints the
copies' distances (median, 99th percentile, max) and the nearest distinct pairs' (min, 1st and
5th percentiles), and what the defaults do: the share of copies within them, and of images
whose nearest distinct image is within them (a false copy).
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
from baselines import markdown, write_result  # noqa: E402
from vlp.data_tools.build import image_options  # noqa: E402
from vlp.data_tools.curation import copies  # noqa: E402
from vlp.data_tools.curation.decontaminate import copy_distances, view_thumbnails  # noqa: E402
from vlp.data_tools.curation.phash import distances, phash  # noqa: E402
from vlp.data_tools.reencode import process_image  # noqa: E402

from vlp.core.config import COPY_DISTANCE, ShardsBuildConfig  # noqa: E402
from vlp.core.images import decode_rgb  # noqa: E402

PHASH_BITS = 10  # the hash distance the docs suggested before thumbnails (semdedup); decontamination used 2-12
COPIES = ("re-encoded", "resized", "crop")


def images(set_name: str, n: int, work: Path) -> list[Image.Image]:
    if set_name == "synthetic":
        from vlp.data_tools.synth import make_pair

        return [make_pair(7, i, 64)[2] for i in range(n)]
    import real_sets

    real_sets.SETS[set_name](work)  # fetched and prepared on first use
    data = work / ("data" if set_name == "emoji" else "data-openmoji")
    with open(data / "train.csv", newline="") as fh:
        paths = [row["url"] for row in csv.DictReader(fh)][:n]
    return [decode_rgb(Path(p).read_bytes(), Path(p).suffix) for p in paths]


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def copy_of(image: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """The copy, as the builder would store it (its default resize and encoding)."""
    w, h = image.size
    if kind == "resized":
        image = image.resize((w * 3 // 4, h * 3 // 4), Image.Resampling.LANCZOS).resize((w, h),
                                                                                          Image.Resampling.BICUBIC)
    elif kind == "crop":
        scale = rng.uniform(0.96, 0.99)
        cw, ch = round(w * scale), round(h * scale)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        image = image.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.BICUBIC)
    data = _jpeg(image, int(rng.integers(70, 91))) if kind == "crop" else _png(image)
    stored = process_image(data, ".jpg" if kind == "crop" else ".png", BUILD)
    return decode_rgb(stored.data, "." + stored.ext)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


BUILD = image_options(ShardsBuildConfig(output="x", image_size=64))


def nearest_distinct(thumbs: np.ndarray, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each image's distance to its nearest other image: by thumbnail, by pHash, and by thumbnail with a crop
    undone (copies.aligned_distance, among the ALIGNED_AMONG nearest by plain thumbnail)."""
    n = len(thumbs)
    near_t, near_h, near_a = np.full(n, np.inf), np.full(n, 64), np.full(n, np.inf)
    for i in range(n):
        d = copies.distance(thumbs, thumbs[i][None])
        d[i] = np.inf
        near_t[i] = d.min()
        near_a[i] = copies.aligned_distance(thumbs[i], thumbs[np.argsort(d)[:ALIGNED_AMONG]]).min()
        h = distances(hashes, np.full(n, hashes[i]))
        h[i] = 64
        near_h[i] = h.min()
    return near_t, near_h, near_a


def nearest_distinct_by_rule(originals: list[Image.Image], thumbs: np.ndarray) -> np.ndarray:
    """Each image's distance to its nearest other image as decontamination measures a training image against an
    eval image (decontaminate.copy_distances: the other's views, or the two aligned), among the ALIGNED_AMONG
    nearest by plain thumbnail."""
    views = np.stack([view_thumbnails(im) for im in originals])
    near = np.full(len(originals), np.inf)
    for i in range(len(originals)):
        d = copies.distance(thumbs, thumbs[i][None])
        d[i] = np.inf
        near[i] = copy_distances(thumbs[i], views[np.argsort(d)[:ALIGNED_AMONG]]).min()
    return near


ALIGNED_AMONG = 20  # aligned distance is at most the plain one: the nearest by it is almost always among these


def measure(set_name: str, n: int, work: Path, seed: int = 0) -> list[list]:
    rng = np.random.default_rng(seed)
    originals = images(set_name, n, work)
    thumbs = np.stack([np.frombuffer(copies.thumbnail(im), np.uint8) for im in originals])
    hashes = np.array([phash(im) for im in originals], dtype=np.int64)
    rows = []
    for kind in COPIES:
        made = [copy_of(im, kind, rng) for im in originals]
        ct = np.stack([np.frombuffer(copies.thumbnail(im), np.uint8) for im in made])
        ch = np.array([phash(im) for im in made], dtype=np.int64)
        dt, dh = copies.distance(ct, thumbs), distances(ch, hashes)
        rows.append([set_name, f"copy: {kind}", len(made), *_spread(dt, high=True), *_spread(dh, high=True),
                     f"{np.mean(dt <= COPY_DISTANCE):.1%}", f"{np.mean(dh <= PHASH_BITS):.1%}"])
        if kind == "crop":  # decontamination compares with every view of the eval image, its crops included
            dv = np.array([copies.distance(ct[i][None], np.stack([np.frombuffer(v, np.uint8)
                                                                  for v in copies.views(im)])).min()
                           for i, im in enumerate(originals)])
            rows.append([set_name, "copy: crop, nearest eval view", len(made), *_spread(dv, high=True), "-", "-",
                         "-", f"{np.mean(dv <= COPY_DISTANCE):.1%}", "-"])
            # SemDeDup has both images' thumbnails only: the crop undone on them
            da = np.array([copies.aligned_distance(ct[i], thumbs[i][None])[0] for i in range(len(made))])
            rows.append([set_name, "copy: crop, aligned thumbnails", len(made), *_spread(da, high=True), "-", "-",
                         "-", f"{np.mean(da <= COPY_DISTANCE):.1%}", "-"])
            # decontamination's rule (decontaminate.copy_distances): the nearer of the two
            rule = np.minimum(dv, da)
            rows.append([set_name, "copy: crop, decontamination's rule", len(made), *_spread(rule, high=True), "-",
                         "-", "-", f"{np.mean(rule <= COPY_DISTANCE):.1%}", "-"])
    nt, nh, na = nearest_distinct(thumbs, hashes)
    rows.append([set_name, "nearest distinct", len(originals), *_spread(nt, high=False), *_spread(nh, high=False),
                 f"{np.mean(nt <= COPY_DISTANCE):.1%}", f"{np.mean(nh <= PHASH_BITS):.1%}"])
    rows.append([set_name, "nearest distinct, aligned thumbnails", len(originals), *_spread(na, high=False), "-",
                 "-", "-", f"{np.mean(na <= COPY_DISTANCE):.1%}", "-"])
    nr = nearest_distinct_by_rule(originals, thumbs)
    rows.append([set_name, "nearest distinct, decontamination's rule", len(originals), *_spread(nr, high=False),
                 "-", "-", "-", f"{np.mean(nr <= COPY_DISTANCE):.1%}", "-"])
    return rows


def _spread(values: np.ndarray, high: bool) -> list[str]:
    """Copies: median, 99th percentile, max (how far they can be); distinct: min, 1st, 5th percentile."""
    qs = (50, 99, 100) if high else (0, 1, 5)
    return [f"{np.percentile(values, q):.1f}" for q in qs]


COLUMNS = ["set", "pairs", "n", "thumb a", "thumb b", "thumb c", "pHash a", "pHash b", "pHash c",
           f"within thumb {COPY_DISTANCE:g}", f"within pHash {PHASH_BITS}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sets", default="synthetic,emoji,openmoji")
    p.add_argument("--n", type=int, default=1500)
    p.add_argument("--work", type=Path, default=Path("/tmp/vlp-bench-real"))
    a = p.parse_args()
    rows = [row for s in a.sets.split(",") for row in measure(s, a.n, a.work)]
    table = {"title": "Copy vs distinct: thumbnail distance (grey levels) and pHash distance (bits)",
             "columns": COLUMNS, "rows": rows}
    print(markdown(table))
    write_result("copy_signal", "Near-copy signals: copies vs distinct images", [table], order=62,
                 about="a, b, c: for copies the median, 99th percentile and max distance to the original; for the "
                 "nearest distinct image the min, 1st and 5th percentile. Copies are stored as `vlp shards build` "
                 "stores them (64 px, its JPEG). 'within': the share at or under the default (thumbnail: "
                 "decontamination's default copy distance; pHash: 10 bits).")


if __name__ == "__main__":
    main()
