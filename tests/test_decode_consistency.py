"""One decode policy: the builder, the loader and eval see the same pixels for the same file.

Transparent images are the case that used to differ (the builder composited
on white, the loader and eval called convert("RGB") and got whatever colour the
transparent pixels stored, usually black): a train/eval mismatch.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from vlp.data_tools.build import image_options
from vlp.data_tools.reencode import process_image
from vlp.eval.image_refs import ImageRef, load_image

from vlp.core.config import ShardsBuildConfig
from vlp.train.loader.batches import TrainTransform

SIZE = 24


def _rgba() -> Image.Image:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8)
    arr[:8, :, 3] = 0  # fully transparent band, storing random colours
    arr[8:16, :, 3] = 128  # half transparent
    arr[16:, :, 3] = 255
    return Image.fromarray(arr, "RGBA")


def _samples() -> dict[str, tuple[bytes, str]]:
    def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        return buf.getvalue()

    rgba = _rgba()
    la = rgba.convert("LA")
    palette = rgba.convert("RGB").quantize(16)
    palette.info["transparency"] = 0  # palette index 0 is transparent
    cmyk = rgba.convert("RGB").convert("CMYK")
    return {
        "RGBA": (encoded(rgba, "PNG"), ".png"),
        "LA": (encoded(la, "PNG"), ".png"),
        "P+transparency": (encoded(palette, "PNG", transparency=0), ".png"),
        "CMYK": (encoded(cmyk, "JPEG", quality=95), ".jpg"),
    }


@pytest.mark.parametrize("kind", ["RGBA", "LA", "P+transparency", "CMYK"])
def test_builder_loader_and_eval_decode_to_identical_pixels(tmp_path, kind):
    data, suffix = _samples()[kind]
    source = Image.open(io.BytesIO(data))
    assert source.mode == kind.split("+")[0]

    # builder: no resize, lossless re-encode, so its output pixels are its decode
    opts = image_options(ShardsBuildConfig(resize_mode="no", encode_format="png", image_size=SIZE))
    built = np.asarray(Image.open(io.BytesIO(process_image(data, suffix, opts).data)))
    # loader: the decode step of the train transform (before crop and augmentation)
    loaded = np.asarray(TrainTransform(image_size=SIZE).decode(data))
    # eval: a benchmark image read from disk
    path = tmp_path / f"image{suffix}"
    path.write_bytes(data)
    evaluated = load_image(ImageRef(str(path)))
    assert isinstance(evaluated, Image.Image), evaluated
    evaluated = np.asarray(evaluated)

    assert built.shape == loaded.shape == evaluated.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(built, loaded)
    np.testing.assert_array_equal(loaded, evaluated)
    if kind in ("RGBA", "LA"):
        # fully transparent pixels are white, whatever colour they stored
        assert (loaded[:8] == 255).all()
        assert not (loaded[16:] == 255).all()
    if kind == "P+transparency":
        index = np.asarray(Image.open(io.BytesIO(data)))
        assert (index == 0).any() and (loaded[index == 0] == 255).all()
