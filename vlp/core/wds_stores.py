"""webdataset reads shards in object storage: importing this module teaches it vlp's stores.

webdataset opens a shard through its gopen table, which knows files, http(s) and pipe: only; this adds
the object-storage schemes (vlp.core.storage's streaming reader, one GET per shard) in every process that
imports it (the loader's workers are forked from one). A module of its own, imported by the readers of
shards, so that processes which never read a shard (a build's workers) do not import webdataset, and
with it torch: each of them would start seconds later.
"""

from __future__ import annotations

import webdataset

from vlp.core import storage

for _proto in storage.OBJECT_PROTOCOLS:
    webdataset.gopen_schemes.setdefault(_proto, storage.gopen_object_url)
