"""Where data lives: a local path or an object-storage URL, behind one small interface (fsspec).

Shards, manifests and build inputs may sit in a local folder or in an object store
(`s3://` through s3fs; `gs://`, `az://` with their fsspec packages; OBJECT_PROTOCOLS). Credentials and endpoints come from where those libraries look (for S3: the
`AWS_*` environment variables such as `AWS_ENDPOINT_URL`, `~/.aws`, fsspec's config);
vlp passes none of its own. http(s) URLs are read-only and go through `vlp.core.fetch`
(images) or webdataset's own reader (shards), not through here.

Object stores have no rename: a file is written with one PUT and appears whole or not at
all, which gives the same guarantee vlp's local writes get from write-then-rename.
Every storage failure becomes one line naming the URL and the cause
(`s3://b/x.tar: no such bucket 'b'`), never a library traceback.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import fsspec

from vlp.core.atomic import json_bytes, write_atomic
from vlp.core.confine import inside, relative_name
from vlp.core.errors import UserError, first_line
from vlp.core.object_stream import open_object
from vlp.core.ownership import MARKER, marker
from vlp.core.smallfiles import DEFAULT_LIMIT, read_small

URL = re.compile(r"^([a-z][a-z0-9+.-]*)://")
# The object stores vlp reads and writes through fsspec. An allowlist: fsspec also speaks ftp, ssh,
# smb, ... and a reference like ftp://host/x.png must stay an unsupported scheme, never a connection.
OBJECT_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")


def protocol(path: str | Path) -> str | None:
    """'s3' for s3://..., None for a local path (file:// counts as local)."""
    m = URL.match(str(path))
    return None if m is None or m.group(1) == "file" else m.group(1)


def is_object_url(path: str | Path) -> bool:
    """A URL of a store vlp can list and write (s3://, gs://, ...), not http(s) or a local path."""
    return protocol(path) in OBJECT_PROTOCOLS


def join(base: str, name: str) -> str:
    """`base/name` for a URL or a local path."""
    return posixpath.join(base.rstrip("/"), name) if protocol(base) else str(Path(base) / name)


def _fs(url: str):
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:  # no fsspec implementation for the protocol
        raise UserError(f"{url}: cannot open {protocol(url)}:// URLs ({first_line(err)[:200]}); for s3:// "
                        "pip install 'vlp[s3]'") from None


def describe(url: str, err: BaseException) -> str:
    """One line: the URL and what went wrong, in the store's terms."""
    text = first_line(err)[:200]
    name = type(err).__name__
    bucket = url.split("://", 1)[-1].split("/", 1)[0]
    if isinstance(err, FileNotFoundError):
        if "bucket" in text.lower() and "not exist" in text.lower() or "NoSuchBucket" in text:
            return f"{url}: no such bucket {bucket!r}"
        return f"{url}: no such file"
    if isinstance(err, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return f"{url}: access denied ({text})"
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionRefusedError"):
        return f"{url}: cannot reach the storage endpoint ({text})"
    if "SlowDown" in text or "503" in text or "ServiceUnavailable" in text:
        return f"{url}: the store kept answering 503 Slow Down after retries ({text})"
    return f"{url}: {name}: {text}"


@contextmanager
def errors_in_one_line(url: str, keep_missing: bool = False) -> Iterator[None]:
    """Turn any storage error inside the block into a one-line UserError naming `url`
    (FileNotFoundError passes through with `keep_missing`, for the caller to phrase)."""
    try:
        yield
    except UserError:
        raise
    except FileNotFoundError as err:
        if keep_missing:
            raise
        raise UserError(describe(url, err)) from None
    except Exception as err:  # s3fs / botocore / aiohttp raise many types; all are storage errors here
        raise UserError(describe(url, err)) from None


def read_bytes(path: str | Path) -> bytes:
    """A whole file, local or remote (a missing one raises FileNotFoundError for the caller to phrase)."""
    path = str(path)
    if not protocol(path):
        return read_small(path)
    fs, inner = _fs(path)
    with errors_in_one_line(path, keep_missing=True):
        size = fs.info(inner).get("size") or 0
        if size > DEFAULT_LIMIT:
            raise UserError(f"{path}: larger than {DEFAULT_LIMIT >> 20} MiB; refused")
        return fs.cat_file(inner)


def write_bytes(path: str | Path, data: bytes) -> None:
    """A whole file, all or nothing: one PUT to an object store, write-then-rename locally."""
    path = str(path)
    if not protocol(path):
        write_atomic(path, data)
        return
    fs, inner = _fs(path)
    with errors_in_one_line(path):
        fs.pipe_file(inner, data)


def exists(path: str | Path) -> bool:
    path = str(path)
    if not protocol(path):
        return Path(path).exists()
    fs, inner = _fs(path)
    with errors_in_one_line(path):
        return fs.exists(inner)


def names(url: str) -> list[str]:
    """The file names directly under a URL 'folder' (an empty list if there is none)."""
    fs, inner = _fs(url)
    fs.invalidate_cache(inner)  # another process may have written since this one listed
    with errors_in_one_line(url):
        try:
            return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(inner, detail=False))
        except FileNotFoundError:
            bucket = inner.split("/", 1)[0]
            if not fs.exists(bucket):
                raise UserError(f"{url}: no such bucket {bucket!r}") from None
            return []


def delete(url: str) -> None:
    fs, inner = _fs(url)
    with errors_in_one_line(url):
        fs.rm_file(inner)


def info(url: str) -> dict:
    """size, and a version marker (ETag or mtime) for telling two versions of an input apart."""
    fs, inner = _fs(url)
    with errors_in_one_line(url, keep_missing=True):  # a missing image is a row's failure, not the build's
        meta = fs.info(inner)
    return {"path": url, "size": meta.get("size"), "version": str(meta.get("ETag") or meta.get("mtime") or "")}


def open_read(url: str) -> IO[bytes]:
    """A streaming reader (webdataset's gopen handler for object-storage URLs): one GET per
    open on S3 (vlp.core.object_stream), 8 MiB ranged reads on other stores."""
    fs, inner = _fs(url)
    with errors_in_one_line(url):
        if "s3" in fs.protocol:
            return open_object(fs, inner)
        return fs.open(inner, "rb", block_size=8 << 20)


def mirror(url: str, root: Path) -> Path:
    """A local copy of an object or a whole prefix: root/<protocol>/<bucket>/<key...>.

    For readers that need random access to local files (eval sets: images inside tars
    read by offset, JSON next to image folders). An object is fetched again only when
    its ETag changed; each lands whole (write-then-rename) so a crash leaves no half file.
    """
    fs, inner = _fs(url)
    inner = inner.rstrip("/")
    # Keys come from the store's listing: each must stay under the prefix asked for, and the
    # mirror under the cache (a key `p/../../x` would otherwise choose where it is written).
    name = relative_name(inner, f"{url}: object path")
    local = inside(root, posixpath.join(protocol(url), name), f"{url}: object path")
    with errors_in_one_line(url):
        found = fs.find(inner, detail=True)
        if not found:
            raise UserError(f"{url}: no such file or folder")
        for path, meta in found.items():
            rel = "." if path.rstrip("/") == inner else _key_under(path, inner, url)
            dest = local if rel == "." else inside(local, rel, f"{url}: object key")
            key = name if rel == "." else posixpath.join(name, rel)
            stamp = inside(root, posixpath.join(".stamps", protocol(url), key) + ".etag", f"{url}: object key")
            version = str(meta.get("ETag") or meta.get("size"))
            if dest.exists() and stamp.exists() and stamp.read_text() == version:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(dest, fs.cat_file(path))
            stamp.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(stamp, version)
    return local


def _key_under(path: str, prefix: str, url: str) -> str:
    """The part of a listed key below `prefix`, refused if the key is not plainly under it."""
    if not path.startswith(prefix + "/"):
        raise UserError(f"{url}: the listing holds {path!r}, which is not under the prefix; refused")
    return relative_name(path[len(prefix) + 1:], f"{url}: object key")


def gopen_object_url(url: str, mode: str = "rb", bufsize: int = 8192, **kw) -> IO[bytes]:
    """webdataset's gopen handler for object-storage URLs (registered by vlp.core.wds_stores)."""
    return open_read(url)


def claim_url(url: str, kind: str, command: str, hint: str) -> None:
    """vlp.core.ownership's `claim` for an object-storage prefix: the marker is an object; a store gives no lock."""
    present = set(names(url))
    if MARKER in present:
        try:
            mark = json.loads(read_bytes(join(url, MARKER)))
        except ValueError:
            mark = None
        if not isinstance(mark, dict) or mark.get("kind") != kind:
            found = mark.get("kind") if isinstance(mark, dict) else "unreadable"
            raise UserError(f"{url} holds vlp {found!r} output, not {kind}; {hint}")
        return
    if present:
        raise UserError(f"{url} is not empty and was not made by vlp; {hint}")
    write_bytes(join(url, MARKER), json_bytes(marker(kind, command)))
