"""The index of a shard: one pass over its tar headers, grouping members into samples as webdataset does, gives each
sample's key, raw ``.cls`` text and the offset and size of its image; decoding the images once with PIL
(``check_images``) adds the ones that do not decode. ``DaliShardLoader`` reads its samples through it, and
``verify.check_label_counts`` counts labels from it. No DALI or torch import.

Index cache: the header pass costs one read of the headers (and of the tiny ``.cls`` members), the decode check one
more pass; the result is kept as JSON in ``index_dir`` (default ``$XDG_CACHE_HOME/bigltr/dali_index`` or
``~/.cache/bigltr/dali_index``), one file per shard named by a hash of its absolute path, size and mtime, so a
rewritten shard is indexed again. Nothing is written into the data folder.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tarfile
from typing import Optional

from bigltr.atomic import write_text_atomic

from .labels import parse_label
from .plan import IMAGE_KEYS

__all__ = ["default_index_dir", "check_images", "load_shard_index", "sample_label"]

_log = logging.getLogger(__name__)

_INDEX_VERSION = 2  # 2: "bad", the images PIL cannot decode
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key/extension split (first dot of basename)


def default_index_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "bigltr", "dali_index")


def _scan_shard(path: str) -> dict:
    """One pass over a tar's headers: samples (consecutive members with the same key, like webdataset) with the
    offset and size of their image, their raw ``.cls`` text, and what could not be used.

    Returns ``{"samples": [[key, cls_text|None, ext|None, offset, size, member], ...], "error": str|None}``; a
    sample without image has ext None, one without ``.cls`` has cls_text None. Scanning stops at the first
    unreadable header or a member that ends past the end of the file (a truncated copy); ``error`` says so.
    """
    size = os.path.getsize(path)
    samples: list[list] = []
    cur: Optional[dict] = None
    error = None

    def close(group):
        if group is None:
            return
        ext = next((e for e in IMAGE_KEYS if e in group["members"]), None)
        off, n, member = group["members"][ext] if ext else (0, 0, "")
        samples.append([group["key"], group.get("cls"), ext, off, n, member])

    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isreg():
                    continue
                if m.offset_data + m.size > size:
                    # like webdataset: the sample's complete members so far still form a (partial) sample
                    error = f"member {m.name} ends at byte {m.offset_data + m.size}, past the end of the file ({size})"
                    break
                match = _KEY_RE.match(m.name)
                if match is None:
                    continue  # no extension: webdataset ignores such members too
                key, ext = match.group(1), match.group(2).lower()
                if cur is None or cur["key"] != key:
                    close(cur)
                    cur = {"key": key, "members": {}}
                if ext == "cls":
                    cur["cls"] = tf.extractfile(m).read().decode("utf-8", "replace")
                else:
                    cur["members"][ext] = (m.offset_data, m.size, m.name)
    except (tarfile.TarError, EOFError, OSError) as e:
        error = f"{type(e).__name__}: {e}"
    close(cur)
    return {"samples": samples, "error": error}


def sample_label(row: list, j: int, bad: dict, where: str, num_classes: int) -> tuple[Optional[int], Optional[str]]:
    """The label of sample ``j`` of a shard index (``row`` = its ``samples[j]``, ``bad`` = the index's decode
    failures or ``{}``), as both index readers (DaliShardLoader, BalancedShardLoader) judge it: ``(label, None)`` when
    usable, ``(None, why)`` when it has no image, no ``.cls`` or an image that does not decode (ShardLoader's wording,
    ``where`` = "<shard>: sample <key>"). A bad label is a DataError (``parse_label``), as in every reader."""
    _key, text, ext = row[0], row[1], row[2]
    if ext is None or text is None:
        return None, f"{where}: " + ("no .cls label" if text is None else
                                     f"no image ({', '.join('.' + e for e in IMAGE_KEYS)})")
    label = parse_label(text, where, num_classes)
    if str(j) in bad:
        return None, f"{where}: .{ext} does not decode ({bad[str(j)]})"
    return label, None


def _index_path(index_dir: str, shard: str) -> str:
    st = os.stat(shard)
    h = hashlib.sha1(f"{os.path.abspath(shard)}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:24]
    return os.path.join(index_dir, f"{h}.json")


def _describe(exn: BaseException) -> str:
    """One-line text of an exception (ShardLoader's wording; some PIL/zlib errors have an empty message)."""
    text = " ".join(str(exn).split())
    return f"{type(exn).__name__}: {text}" if text else type(exn).__name__


def _decode_one(blob: bytes) -> Optional[str]:
    """None when PIL fully decodes ``blob`` (ShardLoader's test of an image), else the error in one line."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as img:
            img.load()
    except Exception as e:  # PIL raises many types for bad data (OSError, SyntaxError, ValueError, ...)
        return _describe(e)
    return None


def check_images(path: str, samples: list, threads: int = 1) -> dict[str, str]:
    """Decode every image of one shard with PIL, as ShardLoader does before it uses a sample; return
    ``{str(position): error}`` for the samples whose image does not decode.

    DALI's own decoders can crash the process (a segmentation fault, not an exception) on some damaged images,
    e.g. a PNG signature followed by zeros, so such samples must never reach DALI. PIL's full decode is also
    exactly the test the torch path applies, so both pipelines skip (and count) the same samples.
    """
    rows = [(j, s[3], s[4]) for j, s in enumerate(samples) if s[2] is not None]
    bad: dict[str, str] = {}

    def run(part):
        out = {}
        with open(path, "rb") as f:
            for j, off, n in part:
                f.seek(off)
                blob = f.read(n)
                err = _decode_one(blob) if len(blob) == n else f"member ends past the end of the file ({path})"
                if err is not None:
                    out[str(j)] = err
        return out

    threads = max(1, min(int(threads), len(rows) // 256 or 1))  # PIL releases the GIL while it decodes
    if threads == 1:
        return run(rows)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        for part in pool.map(run, [rows[t::threads] for t in range(threads)]):
            bad.update(part)
    return bad


def load_shard_index(shard: str, index_dir: str, *, decode_check: bool = False, threads: int = 1) -> dict:
    """The scan of ``shard`` from the cache, made (and cached atomically) on first use.

    ``decode_check``: also know which images do not decode (``data["bad"]``: ``{str(position): error}``),
    decoding them once with PIL (:func:`check_images`) and caching the result with the scan; without it
    ``data["bad"]`` may be None (not checked yet), which is all the label check at start-up needs.
    """
    cache = _index_path(index_dir, shard)
    data = None
    try:
        with open(cache, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("version") != _INDEX_VERSION or data.get("path") != os.path.abspath(shard):
            data = None
    except (OSError, ValueError):
        data = None
    if data is not None and (data.get("bad") is not None or not decode_check):
        return data
    if data is None:
        data = {"version": _INDEX_VERSION, "path": os.path.abspath(shard), **_scan_shard(shard), "bad": None}
    if decode_check:
        data["bad"] = check_images(shard, data["samples"], threads)
    try:
        write_text_atomic(cache, json.dumps(data, separators=(",", ":")))  # atomic: ranks may index at once
    except OSError as e:  # a read-only cache folder costs a re-scan next time, nothing else
        _log.warning("cannot write the DALI index cache %s (%s); shards are re-indexed every run", cache, e)
    return data
