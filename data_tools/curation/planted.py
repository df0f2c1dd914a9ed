"""Synthetic pairs with planted defects, and the truth about them: what curation should find.

`plant(root, n, ...)` writes n clean synthetic pairs (vlp.data_tools.synth), then
plants three kinds of defect and records each in truth.json:

- mismatched: a fraction of the rows get another row's caption (rotated within
  the chosen rows, so every one of them describes a different image);
- near_duplicate: new rows whose image is another row's image cropped (to
  `crop` = 96-99% of each side by default, at a random offset), resized back and
  re-encoded as JPEG at quality 70-90, with that row's caption; truth names
  both rows of each pair;
- eval: new rows holding images of an eval suite's tasks, as they are, with a
  plain caption; truth names the row and the eval image.

It also records the clean rows that already are an eval image, pixel for pixel
(`eval_twins`: a real set may hold some), which curation should remove too.

`plant_rows` plants the same defects into given rows (a real image set).

The result is a pairs.csv for `vlp shards build`; bench/curation.py and
tests/test_curation.py score curation against truth.json.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image
from vlp.data_tools.curation.decontaminate import suite_images
from vlp.data_tools.synth import generate
from vlp.eval.image_refs import load_image

from vlp.core.images import decode_rgb

TRUTH = "truth.json"


def _rotate_captions(rows: list[dict], chosen: np.ndarray) -> list[int]:
    """Give each chosen row the next one's caption; rows whose caption did not change are not defects."""
    captions = [rows[i]["caption"] for i in chosen]
    for i, text in zip(chosen, captions[1:] + captions[:1], strict=True):
        rows[i]["caption"] = text
    return [int(i) for i, old in zip(chosen, captions, strict=True) if rows[i]["caption"] != old]


def _near_copy(image: Image.Image, rng: np.random.Generator, path: Path, crop: tuple[float, float]) -> None:
    w, h = image.size
    scale = rng.uniform(*crop)
    cw, ch = round(w * scale), round(h * scale)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    crop = image.convert("RGB").crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.BICUBIC)
    crop.save(path, "JPEG", quality=int(rng.integers(70, 91)))


def eval_suite_images(suite: str, count: int, rng: np.random.Generator) -> list[tuple[str, Image.Image]]:
    """`count` distinct images drawn from every task of the suite: (task: where, image)."""
    pool = [(name, ref) for name, ref in suite_images(suite) if ref.crop is None]
    picked = rng.choice(len(pool), size=min(count, len(pool)), replace=False)
    out = []
    for i in sorted(picked):
        name, ref = pool[i]
        image = load_image(ref)
        if isinstance(image, Image.Image):
            out.append((f"{name}: {ref.describe()}", image))
    return out


def _pixels_key(image: Image.Image) -> tuple:
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return rgb.size, hashlib.sha256(rgb.tobytes()).digest()


def _eval_twins(root: Path, rows: list[dict], suite: str) -> list[dict]:
    """Clean rows whose image is, pixel for pixel, an image of the eval suite (a real set may hold some: OpenMoji
    draws many emoji the same in colour and in black): copies of eval images that curation should remove, so
    not good pairs. Decided on the source pixels, independently of the copy signal curation uses."""
    evals = {}
    for name, ref in suite_images(suite):
        image = load_image(ref)
        if isinstance(image, Image.Image):
            evals.setdefault(_pixels_key(image), f"{name}: {ref.describe()}")
    twins = []
    for row, r in enumerate(rows):
        path = root / r["url"]
        where = evals.get(_pixels_key(decode_rgb(path.read_bytes(), path.suffix)))
        if where is not None:
            twins.append({"row": row, "image": where})
    return twins


def plant(root: str | Path, n: int, seed: int = 0, image_size: int = 64, mismatched: float = 0.2,
          near_duplicates: int = 50, eval_suite: str | None = "default", eval_images: int = 30,
          crop: tuple[float, float] = (0.96, 0.99)) -> Path:
    """Write root/pairs.csv (clean synthetic rows, then planted ones) and root/truth.json; return the CSV path."""
    root = Path(root)
    csv_path = generate(root, n=n, seed=seed, image_size=image_size, progress=False)
    with open(csv_path, newline="") as fh:
        rows = [{"url": r["url"], "caption": r["caption"]} for r in csv.DictReader(fh)]
    return plant_rows(root, rows, seed, mismatched, near_duplicates, eval_suite, eval_images, crop)


def plant_rows(root: str | Path, rows: list[dict], seed: int = 0, mismatched: float = 0.2,
               near_duplicates: int = 50, eval_suite: str | None = "default", eval_images: int = 30,
               crop: tuple[float, float] = (0.96, 0.99)) -> Path:
    """The same defects planted into given clean rows (url: a path, absolute or under root; caption), for
    real image sets; writes root/pairs.csv and root/truth.json."""
    root = Path(root)
    csv_path = root / "pairs.csv"
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = [{"url": r["url"], "caption": r["caption"]} for r in rows]
    n = len(rows)
    rng = np.random.default_rng([seed, 7])
    chosen = rng.choice(n, size=int(n * mismatched), replace=False)
    truth: dict = {"clean_rows": n, "mismatched": _rotate_captions(rows, chosen), "near_duplicate": [], "eval": [],
                   "eval_twins": _eval_twins(root, rows, eval_suite) if eval_suite else []}
    for j, source in enumerate(rng.choice(n, size=near_duplicates, replace=False)):
        name = f"images/near{j:05d}.jpg"
        path = root / rows[source]["url"]
        _near_copy(decode_rgb(path.read_bytes(), path.suffix), rng, root / name, crop)  # transparency on white
        truth["near_duplicate"].append([int(source), len(rows)])
        rows.append({"url": name, "caption": rows[source]["caption"]})
    if eval_suite and eval_images:
        for j, (where, image) in enumerate(eval_suite_images(eval_suite, eval_images, rng)):
            name = f"images/eval{j:05d}.png"
            image.save(root / name, "PNG")
            truth["eval"].append({"row": len(rows), "image": where})
            rows.append({"url": name, "caption": "a picture"})
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["url", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    (root / TRUTH).write_text(json.dumps(truth, indent=1))
    return csv_path


def score(csv_dir: str | Path, build_dir: str | Path, curated_dir: str | Path) -> dict:
    """How much of each planted defect curation removed, and how many good pairs it removed with them.

    Rows map to sample keys through the build's per-shard parquet records; a
    near-duplicate pair counts as found when either of its rows was removed as
    a (semantic) duplicate of the other, or when both were removed as copies of
    an eval image (decontamination runs first and takes both: the set keeps
    neither; counted apart as `near_duplicates_as_eval_copies`). Good pairs:
    clean rows neither mismatched, nor part of a near-duplicate pair, nor an eval
    image's twin (`eval_twins` in truth.json: pixel for pixel an eval image; how
    many of them went is `eval_twins_removed`).
    """
    truth = json.loads((Path(csv_dir) / TRUTH).read_text())
    key_of = {}
    for path in sorted(Path(build_dir).glob("*.parquet")):
        table = pq.read_table(path, columns=["row", "key", "status"])
        key_of.update({r: k for r, k, s in zip(*(table.column(c).to_pylist() for c in ("row", "key", "status")),
                                               strict=True) if s == "success"})
    removed = {}
    for line in (Path(curated_dir) / "removed.jsonl").read_text().splitlines():
        entry = json.loads(line)
        removed[entry["key"]] = entry
    mismatched = [r for r in truth["mismatched"] if r in key_of]
    pairs = [(a, b) for a, b in truth["near_duplicate"] if a in key_of and b in key_of]
    in_pairs = {r for pair in pairs for r in pair}
    twins = {t["row"] for t in truth.get("eval_twins", []) if t["row"] in key_of}
    good = [r for r in range(truth["clean_rows"])
            if r in key_of and r not in in_pairs and r not in set(mismatched) and r not in twins]

    def gone(row: int, *reasons: str) -> bool:
        entry = removed.get(key_of[row])
        return entry is not None and (not reasons or entry["reason"] in reasons)

    def deduplicated(a: int, b: int) -> bool:
        dup = ("semantic_duplicate", "duplicate")
        return (gone(a, *dup) and removed[key_of[a]]["matched"] == key_of[b]) or (
            gone(b, *dup) and removed[key_of[b]]["matched"] == key_of[a])

    def as_eval_copies(a: int, b: int) -> bool:
        return not deduplicated(a, b) and gone(a, "eval_contamination") and gone(b, "eval_contamination")

    evals = [e["row"] for e in truth["eval"] if e["row"] in key_of]
    return {
        "mismatched_removed": sum(gone(r) for r in mismatched) / max(1, len(mismatched)),
        "good_removed": sum(gone(r) for r in good) / max(1, len(good)),
        "near_duplicates_removed": sum(deduplicated(a, b) or as_eval_copies(a, b) for a, b in pairs)
        / max(1, len(pairs)),
        "near_duplicates_as_eval_copies": sum(as_eval_copies(a, b) for a, b in pairs),
        # an eval copy that is also a training image's exact copy goes as `duplicate` (the first is kept, and
        # that one is the contamination): either reason counts
        "eval_removed": sum(gone(r, "eval_contamination", "duplicate") for r in evals) / max(1, len(evals)),
        "eval_twins_removed": sum(gone(r, "eval_contamination", "duplicate") for r in twins) / max(1, len(twins)),
        "counts": {"mismatched": len(mismatched), "good": len(good), "near_duplicate_pairs": len(pairs),
                   "eval": len(evals), "eval_twins": len(twins)},
        # what took the good pairs that went: the filter to loosen
        "good_removed_by": dict(Counter(removed[key_of[r]]["reason"] for r in good if gone(r)).most_common()),
    }
