"""Build raw pipeline inputs (OBELICS Parquet, WebDataset tar) and deliberately bad media for tests.

Everything here is deterministic: same corpus in, same bytes out.
"""

from __future__ import annotations

import io
import json
import random
import struct
import tarfile
import wave
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MEDIA_EXT = {"image": "jpg", "audio": "wav", "video": "mp4"}
FIXED_MTIME = 1_700_000_000  # 2023-11-14, any constant keeps tars byte-identical
OBELICS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("texts", pa.list_(pa.string())),
        ("images", pa.list_(pa.binary())),
        ("url", pa.string()),
    ]
)


# --------------------------------------------------------------------------- corpus / jsonl


def read_docs(corpus_dir: Path) -> list[dict]:
    """Return the docs of `corpus_dir/docs.jsonl`, in file order."""
    with open(Path(corpus_dir) / "docs.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, docs: list[dict]) -> None:
    """Write `docs` to `path` as JSON Lines (utf-8, one compact object per line)."""
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- OBELICS parquet


def build_obelics_parquet(corpus_dir: Path, out_path: Path, n_docs: int | None = None) -> list[str]:
    """Write an OBELICS-layout Parquet file from the corpus' text+image docs; return their ids.

    Columns: `id`, `texts: list<string>`, `images: list<binary>` (aligned by position: at each
    position exactly one of texts[i] / images[i] is non-null), `url`. Only docs made of text and
    image segments with at least one image are used (first `n_docs` of them if given); images
    hold the JPEG file bytes. With >= 4 rows the file has 2 row groups.
    """
    corpus_dir = Path(corpus_dir)
    docs = [
        d
        for d in read_docs(corpus_dir)
        if {s["type"] for s in d["segments"]} <= {"text", "image"}
        and any(s["type"] == "image" for s in d["segments"])
    ]
    if n_docs is not None:
        docs = docs[:n_docs]
    rows: dict[str, list] = {"id": [], "texts": [], "images": [], "url": []}
    for doc in docs:
        texts: list[str | None] = []
        images: list[bytes | None] = []
        for seg in doc["segments"]:
            is_text = seg["type"] == "text"
            texts.append(seg["text"] if is_text else None)
            images.append(None if is_text else (corpus_dir / seg["path"]).read_bytes())
        rows["id"].append(doc["id"])
        rows["texts"].append(texts)
        rows["images"].append(images)
        rows["url"].append(f"https://example.org/corpus/{doc['id']}")
    table = pa.Table.from_pydict(rows, schema=OBELICS_SCHEMA)
    n = table.num_rows
    row_group_size = (n + 1) // 2 if n >= 4 else max(n, 1)
    pq.write_table(table, out_path, row_group_size=row_group_size)
    return rows["id"]


# --------------------------------------------------------------------------- tars


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)  # name is kept verbatim: no stripping of "/" or ".."
    info.size, info.mode, info.mtime = size, 0o644, FIXED_MTIME
    info.type, info.uid, info.gid, info.uname, info.gname = tarfile.REGTYPE, 0, 0, "", ""
    return info


def build_tar(out_path: Path, members: list[tuple[str, bytes]]) -> None:
    """Write an uncompressed tar holding `members` (name, data) in given order: regular files,
    or a directory entry for a name ending in "/" (as `tar cf x.tar dir/` writes first)."""
    with tarfile.open(out_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = _tarinfo(name.rstrip("/"), len(data))
            if name.endswith("/"):
                info.type, info.mode, info.size = tarfile.DIRTYPE, 0o755, 0
            tar.addfile(info, io.BytesIO(data))


def add_tar_member(tar_path: Path, name: str, data: bytes) -> None:
    """Append one regular-file member with an arbitrary, unsanitised `name` (e.g. "../evil.jpg",
    "/abs.txt") to the uncompressed tar at `tar_path`."""
    with tarfile.open(tar_path, "a", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))


def webdataset_samples(corpus_dir: Path) -> dict[str, dict[str, bytes]]:
    """img2dataset/video2dataset-style samples of the corpus' single-media captioned docs.

    Each doc with exactly one media segment (image/audio/video) and one text segment becomes a
    sample keyed "000000", "000001", ... (docs.jsonl order): {suffix: bytes} with `jpg|wav|mp4`
    (file bytes), `txt` (utf-8 text) and `json` ({"key", "id", "source", "license"}).
    """
    corpus_dir = Path(corpus_dir)
    samples: dict[str, dict[str, bytes]] = {}
    for doc in read_docs(corpus_dir):
        segs = doc["segments"]
        media = [s for s in segs if s["type"] in MEDIA_EXT]
        if len(segs) != 2 or len(media) != 1:
            continue
        (text,) = (s["text"] for s in segs if s["type"] == "text")
        key = f"{len(samples):06d}"
        meta = {"key": key, "id": doc["id"], "source": doc["source"], "license": doc["license"]}
        samples[key] = {
            MEDIA_EXT[media[0]["type"]]: (corpus_dir / media[0]["path"]).read_bytes(),
            "txt": text.encode("utf-8"),
            "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
        }
    return samples


def tar_members(samples: dict[str, dict[str, bytes]]) -> list[tuple[str, bytes]]:
    """Members `KEY.SUFFIX` of `samples`, sorted by name (WebDataset order)."""
    return sorted(
        (f"{key}.{suffix}", data) for key, m in samples.items() for suffix, data in m.items()
    )


def scattered(members: list[tuple[str, bytes]], seed: int = 0) -> list[tuple[str, bytes]]:
    """`members` in a deterministic shuffled order, as `tar cf x.tar dir/` over a directory
    nobody sorted gives them: the members of one sample are not adjacent."""
    shuffled = list(members)
    random.Random(seed).shuffle(shuffled)
    return shuffled


def blank_every_third_caption(samples: dict[str, dict[str, bytes]]) -> dict[str, str]:
    """Edit `samples` in place as img2dataset writes sources that had no caption: every third
    sample gets an empty, a whitespace-only or no `txt`. Returns key -> the media-only
    signature each of them must get (`image`, `audio`, `video`)."""
    media_only = {}
    for index, (key, members) in enumerate(samples.items()):
        if index % 3 == 0:
            variant = index % 9
            if variant == 0:
                del members["txt"]
            else:
                members["txt"] = b"" if variant == 3 else b" \n\t"
            (extension,) = set(members) - {"txt", "json"}
            media_only[key] = {ext: kind for kind, ext in MEDIA_EXT.items()}[extension]
    return media_only


def build_webdataset_tar(corpus_dir: Path, out_path: Path) -> list[str]:
    """Write the `webdataset_samples` of the corpus as a tar, members sorted by name; return
    the keys."""
    samples = webdataset_samples(corpus_dir)
    build_tar(out_path, tar_members(samples))
    return list(samples)


# --------------------------------------------------------------------------- bad media


def _chunks(data: bytes, start: int, fmt: str) -> list[tuple[bytes, int, int]]:
    """(tag, offset, total_length) of the RIFF ("<I", after a 12-byte header) or MP4 (">I")
    chunks of `data` from `start`; RIFF payload is 8 bytes after offset, MP4 size includes it."""
    out, i = [], start
    while i + 8 <= len(data):
        if fmt == "<I":
            tag, (size,) = data[i : i + 4], struct.unpack("<I", data[i + 4 : i + 8])
            size = 8 + size + (size & 1)
        else:
            (size,), tag = struct.unpack(">I", data[i : i + 4]), data[i + 4 : i + 8]
            size = size or len(data) - i  # size 0 means "to end of file"
        out.append((tag, i, size))
        i += max(size, 8)
    return out


def corrupt_jpeg(valid: bytes) -> bytes:
    """Cut a JPEG halfway through its entropy-coded scan data.

    `PIL.Image.open` succeeds (size/mode from the intact header); `.load()` raises
    `OSError: image file is truncated (N bytes not processed)`, unless
    `PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True`, which makes it load silently (grey fill).
    """
    i = 2  # skip SOI; walk marker segments up to Start Of Scan
    while i + 4 <= len(valid) and valid[i + 1] != 0xDA:
        i += 2 + struct.unpack(">H", valid[i + 2 : i + 4])[0]
    if i + 4 > len(valid):
        raise ValueError("no SOS marker: not a baseline/progressive JPEG")
    return valid[: i + (len(valid) - i) // 2]


def garbage_bytes(n: int = 2048) -> bytes:
    """`n` deterministic pseudo-random bytes (seed 0) that match no media magic number."""
    return random.Random(0).randbytes(n)


def png_bomb_header(width: int = 100_000, height: int = 100_000) -> bytes:
    """A ~100-byte PNG whose (CRC-valid) IHDR claims `width` x `height` 8-bit grey pixels.

    IDAT holds a valid zlib stream of only 64 zero bytes, then IEND. With Pillow defaults
    `Image.open` raises `PIL.Image.DecompressionBombError` (pixels > 2 * MAX_IMAGE_PIXELS,
    checked from the header, nothing decoded; between 1x and 2x it only warns). With
    `Image.MAX_IMAGE_PIXELS = None`, `Image.open` returns `.size == (width, height)` lazily.
    """

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(bytes(64)))
        + chunk(b"IEND", b"")
    )


def _wav(frames: bytes, sample_rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(frames)
    return buf.getvalue()


def silent_wav(seconds: float = 1.0, sample_rate: int = 16_000) -> bytes:
    """A valid 16-bit mono PCM WAV of `seconds` of digital silence."""
    return _wav(np.zeros(round(seconds * sample_rate), dtype="<i2").tobytes(), sample_rate)


def empty_wav(sample_rate: int = 16_000) -> bytes:
    """A valid 44-byte 16-bit mono PCM WAV with zero frames.

    soundfile reads it without error: `sf.read` -> (array of shape (0,), 16000)."""
    return _wav(b"", sample_rate)


def truncated_wav(valid: bytes) -> bytes:
    """Cut a WAV just before its "data" chunk: RIFF header and "fmt " chunk intact, RIFF size
    still promising the full file, no data chunk at all.

    `soundfile.read` raises `soundfile.LibsndfileError` ("Error opening <...>: Error in WAV file.
    No 'data' chunk marker."). Cutting inside the *sample data* instead is NOT an error for
    soundfile: libsndfile silently returns the frames present, so that variant is not used.
    """
    for tag, offset, _ in _chunks(valid, 12, "<I"):
        if tag == b"data":
            return valid[:offset]
    raise ValueError("no 'data' chunk: not a RIFF/WAVE file")


def truncated_mp4(valid: bytes, fraction: float = 0.1) -> bytes:
    """First `fraction` of the file as a non-"faststart" MP4 (moov atom after mdat) would look:
    top-level atoms minus "moov" (ftyp, free, mdat...), cut to `fraction` of the original size
    (never below the first atom). The moov atom is always missing.

    decord 0.6.0 `VideoReader` raises `RuntimeError("Error reading N bytes...")` and PyAV
    `av.open` raises `av.error.InvalidDataError` ("Invalid data found when processing input");
    neither crashes. Plain prefixes of the corpus MP4s were avoided: their moov is at the front,
    so a 10% prefix keeps it and failures depend on the cut point (PyAV may decode 0 or a few
    frames without error; decord raises DECORDError or RuntimeError). No segfault was seen.
    """
    all_atoms = _chunks(valid, 0, ">I")
    atoms = [a for a in all_atoms if a[0] != b"moov"]
    if not atoms or len(atoms) == len(all_atoms):
        raise ValueError("no moov atom: not an MP4")
    rest = b"".join(valid[o : o + s] for _, o, s in atoms)
    return rest[: max(atoms[0][2], int(len(valid) * fraction))]
