"""BucketStream: shard order, rank split without overlap, exact resume, corrupt input, S3."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from infra.services import MotoServer
from infra.storage import S3Config, Storage, StorageConfig
from tokenization.sequences import Span, TokenSequence
from tokenization.token_samples import encode_sample, write_tar
from training import token_stream
from training.token_stream import BucketStream, StreamState, rank_share, shard_order

BUCKET = "text"
EVAL_EVERY = 3  # in every shard, samples 2, 5, 8, ... are "eval"


# --------------------------------------------------------------------------- builders


def key_of(shard: int, index: int) -> str:
    return f"d{shard:02d}{index:03d}-{BUCKET}"


def split_of_index(index: int) -> str:
    return "eval" if index % EVAL_EVERY == EVAL_EVERY - 1 else "train"


def encoded(shard: int, index: int, split: str | None = None) -> dict[str, bytes]:
    """One sample whose tokens spell its origin: ``[shard, index, 7]``."""
    tokens = np.array([shard, index, 7], dtype=np.int32)
    sequence = TokenSequence(BUCKET, tokens, np.zeros(3, np.uint8), 1, [Span("text", 0, 3)])
    meta = {"document_id": key_of(shard, index), "split": split or split_of_index(index)}
    return encode_sample(key_of(shard, index), sequence, meta)


def shard_samples(shard: int, size: int, split: str | None = None) -> list[dict[str, bytes]]:
    return [encoded(shard, index, split) for index in range(size)]


def write_shards(folder: Path, sizes: list[int], split: str | None = None) -> list[str]:
    """One tar per size, ``<folder>/text/000NNN-000.tar``, as pretokenize names them;
    ``split``: every sample's (default: every third "eval")."""
    (folder / BUCKET).mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, size in enumerate(sizes):
        path = folder / BUCKET / f"{shard:06d}-000.tar"
        path.write_bytes(write_tar(shard_samples(shard, size, split)))
        paths.append(str(path))
    return paths


def keys_of_split(sizes: list[int], split: str = "train") -> set[str]:
    return {
        key_of(s, i) for s, n in enumerate(sizes) for i in range(n) if split_of_index(i) == split
    }


def take(stream: BucketStream, n: int) -> list[tuple[str, StreamState]]:
    """The next ``n`` keys, each with the state right after it."""
    return [(next(stream).key, stream.state) for _ in range(n)]


def epochs_of(stream: BucketStream, epochs: int = 1) -> list[list[str]]:
    """This rank's keys of its first ``epochs`` epochs (read up to the next epoch's first)."""
    keys: list[list[str]] = [[] for _ in range(epochs)]
    for sample in stream:
        if stream.state.epoch == epochs:
            return keys
        keys[stream.state.epoch].append(sample.key)
    raise AssertionError("unreachable: the stream is endless")


def first_epoch(stream: BucketStream) -> list[str]:
    return epochs_of(stream)[0]


def header_offsets(tar: bytes) -> dict[str, int]:
    """Member name -> where its 512-byte header starts."""
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        return {member.name: member.offset for member in archive.getmembers()}


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


# --------------------------------------------------------------------------- order and state


def test_shard_order_is_a_seeded_permutation_of_the_sorted_shards() -> None:
    shards = [f"s3://b/tokens/text/{i:06d}-000.tar" for i in range(12)]
    order = shard_order(shards, seed=1, epoch=0, bucket="text")
    assert sorted(order) == shards and order != shards
    assert shard_order(list(reversed(shards)), 1, 0, "text") == order
    assert len({tuple(shard_order(shards, 1, epoch, "text")) for epoch in range(5)}) == 5
    assert shard_order(shards, 2, 0, "text") != order
    assert shard_order(shards, 1, 0, "image2text") != order
    local = [f"/ws/tokens/text/{i:06d}-000.tar" for i in range(12)]
    assert [Path(p).name for p in shard_order(local, 1, 0, "text")] == [Path(p).name for p in order]


def test_shard_order_is_pinned_across_processes_and_machines() -> None:
    # A golden value: Python's salted hash() or an unseeded RNG would change it per process.
    assert shard_order(list("abcdef"), seed=0, epoch=0, bucket="text") == list("fcdbea")
    assert shard_order(list("abcdef"), seed=0, epoch=1, bucket="text") == list("ebdacf")


def test_stream_state_round_trips_through_json_and_refuses_bad_data() -> None:
    state = StreamState(epoch=3, position=1, offset=17)
    assert StreamState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    with pytest.raises(ValueError, match="offset"):
        StreamState.from_dict({"epoch": 0, "position": 0})
    with pytest.raises(ValueError, match="position"):
        StreamState(position=-1)
    with pytest.raises(ValueError):
        StreamState.from_dict({"epoch": 0, "position": 0, "offset": 0, "extra": 1})


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    shards = write_shards(tmp_path, [3, 3])
    with pytest.raises(ValueError, match="no shards"):
        BucketStream(BUCKET, [], seed=0, rank=0, world=1)
    with pytest.raises(ValueError, match="duplicate"):
        BucketStream(BUCKET, shards + shards[:1], seed=0, rank=0, world=1)
    with pytest.raises(ValueError, match="rank"):
        BucketStream(BUCKET, shards, seed=0, rank=2, world=2)
    with pytest.raises(ValueError, match="position 1"):  # rank 1 of 2 owns one shard
        BucketStream(BUCKET, shards, seed=0, rank=1, world=2, state=StreamState(0, 1, 0))
    with pytest.raises(ValueError, match="past this rank's range"):  # its 3 samples of it
        BucketStream(BUCKET, shards, seed=0, rank=0, world=2, state=StreamState(0, 0, 4))
    with pytest.raises(ValueError, match="no sample count"):
        BucketStream(BUCKET, shards, seed=0, rank=0, world=1, sizes={shards[0]: 3})


# --------------------------------------------------------------------------- rank split


# More shards than ranks and fewer, equal and unequal sizes.
SPLITS = [
    (1, [3, 1, 4]),
    (2, [3, 1, 4, 2, 5]),
    (3, [3, 1, 4, 2, 5]),
    (3, [3, 1, 4]),
    (2, [7]),
    (3, [4, 3]),
    (3, [0, 6]),
]


def keys_per_epoch(folder: Path, sizes: list[int], world: int, split: str) -> list[Counter[str]]:
    """All ranks' keys together, in each of the first three epochs."""
    shards = write_shards(folder, sizes)
    per_epoch: list[Counter[str]] = [Counter() for _ in range(3)]
    for rank in range(world):
        stream = BucketStream(BUCKET, shards, seed=5, rank=rank, world=world, split=split)
        for counter, keys in zip(per_epoch, epochs_of(stream, 3), strict=True):
            counter.update(keys)
    return per_epoch


@pytest.mark.parametrize(("world", "sizes"), SPLITS)
def test_every_epoch_of_all_ranks_covers_the_train_split_exactly_once(
    tmp_path: Path, world: int, sizes: list[int]
) -> None:
    expected = Counter(keys_of_split(sizes, "train"))
    assert keys_per_epoch(tmp_path, sizes, world, "train") == [expected] * 3


@pytest.mark.parametrize(("world", "sizes"), [(2, [3, 4, 5, 6, 3]), (2, [9]), (3, [9, 6])])
def test_every_epoch_of_all_ranks_covers_the_eval_split_exactly_once(
    tmp_path: Path, world: int, sizes: list[int]
) -> None:
    expected = Counter(keys_of_split(sizes, "eval"))
    assert keys_per_epoch(tmp_path, sizes, world, "eval") == [expected] * 3


def documented_rule(
    shards: list[str], sizes: list[int], world: int, rank: int, epoch: int
) -> list[str]:
    """Rank ``rank``'s train keys of ``epoch`` as the module docstring states the rule: its
    contiguous range of the epoch's samples end to end."""
    order = [shards.index(path) for path in shard_order(shards, 5, epoch, BUCKET)]
    samples = [(s, i) for s in order for i in range(sizes[s])]
    total = len(samples)
    mine = samples[rank * total // world : (rank + 1) * total // world]
    return [key_of(s, i) for s, i in mine if split_of_index(i) == "train"]


@pytest.mark.parametrize(("world", "sizes"), SPLITS)
def test_each_rank_reads_what_the_documented_rule_says(
    tmp_path: Path, world: int, sizes: list[int]
) -> None:
    shards = write_shards(tmp_path, sizes)
    for rank in range(world):
        stream = BucketStream(BUCKET, shards, seed=5, rank=rank, world=world)
        expected = [documented_rule(shards, sizes, world, rank, epoch) for epoch in range(3)]
        assert epochs_of(stream, 3) == expected
        from_epoch_2 = BucketStream(
            BUCKET, shards, seed=5, rank=rank, world=world, state=StreamState(2)
        )
        assert epochs_of(from_epoch_2, 3)[2] == expected[2]


def test_a_rank_opens_only_the_shards_of_its_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = [3, 1, 4, 2, 5]
    shards = write_shards(tmp_path, sizes)
    counts = dict(zip(shards, sizes, strict=True))
    opened: list[str] = []
    real_gopen = token_stream.gopen
    monkeypatch.setattr(
        token_stream, "gopen", lambda url, *a, **k: opened.append(url) or real_gopen(url, *a, **k)
    )
    stream = BucketStream(BUCKET, shards, seed=5, rank=1, world=2, sizes=counts)
    first_epoch(stream)
    shares = [rank_share(shard_order(shards, 5, e, BUCKET), counts, 1, 2) for e in (0, 1)]
    assert opened == [part.url for part in shares[0]] + [shares[1][0].url]
    assert len(shares[0]) < len(shards)


@pytest.mark.parametrize(("world", "sizes"), [(2, [1, 9, 2]), (3, [10, 1, 1, 5]), (4, [13, 2])])
def test_ranks_read_equal_shares_of_every_epoch_whatever_the_shard_sizes(
    tmp_path: Path, world: int, sizes: list[int]
) -> None:
    """Ranks consume at the same rate; with shares within one sample of each other, none
    comes round to its samples sooner: after each rank has read its share of an epoch,
    all together have read every sample of the bucket exactly once."""
    shards = write_shards(tmp_path, sizes, split="train")
    total = sum(sizes)
    everything = Counter(key_of(s, i) for s, n in enumerate(sizes) for i in range(n))
    streams = [BucketStream(BUCKET, shards, seed=5, rank=r, world=world) for r in range(world)]
    assert streams[0].sizes == dict(zip(shards, sizes, strict=True))  # counted from headers
    epochs = [epochs_of(stream, 3) for stream in streams]
    for epoch in range(3):
        shares = [len(keys[epoch]) for keys in epochs]
        assert set(shares) <= {total // world, -(-total // world)}, shares
        assert Counter(k for keys in epochs for k in keys[epoch]) == everything


def test_samples_come_in_file_order_with_their_payloads(tmp_path: Path) -> None:
    shards = write_shards(tmp_path, [5])
    stream = BucketStream(BUCKET, shards, seed=0, rank=0, world=1)
    samples = [next(stream) for _ in range(3)]
    assert [s.key for s in samples] == [key_of(0, 0), key_of(0, 1), key_of(0, 3)]
    assert [s.tokens.tolist() for s in samples] == [[0, 0, 7], [0, 1, 7], [0, 3, 7]]
    assert samples[0].meta["split"] == "train" and samples[0].modality.tolist() == [0, 0, 0]


def test_the_stream_is_endless_and_reorders_shards_every_epoch(tmp_path: Path) -> None:
    sizes = [2, 2, 2, 2]
    shards = write_shards(tmp_path, sizes)
    stream = BucketStream(BUCKET, shards, seed=3, rank=0, world=1)
    keys = [key for key, _ in take(stream, 8 * 3)]
    epochs = [keys[i : i + 8] for i in range(0, 24, 8)]
    assert all(set(epoch) == keys_of_split(sizes) for epoch in epochs)
    for epoch, keys_of_epoch in enumerate(epochs):
        shards_read = [int(key[1:3]) for key in keys_of_epoch[::2]]  # key_of: "d<shard><index>"
        assert shards_read == [shards.index(p) for p in shard_order(shards, 3, epoch, BUCKET)]
    assert stream.state.epoch == 2
    stream.state.epoch = 7  # a copy: the caller cannot move the stream by accident
    assert stream.state.epoch == 2


@pytest.mark.timeout(10)  # the failure this guards against is an endless loop
def test_a_rank_with_no_sample_of_its_split_raises_instead_of_looping(tmp_path: Path) -> None:
    shards = write_shards(tmp_path, [2])  # samples 0 and 1: both "train"
    assert len(take(BucketStream(BUCKET, shards, seed=0, rank=1, world=2), 5)) == 5
    with pytest.raises(ValueError, match=r"'text'.*'eval'.*rank 1 of 2"):
        next(BucketStream(BUCKET, shards, seed=0, rank=1, world=2, split="eval"))
    with pytest.raises(ValueError, match="rank 0 of 3"):  # 2 samples: its range is empty
        next(BucketStream(BUCKET, shards, seed=0, rank=0, world=3))


# --------------------------------------------------------------------------- resume


def damaged_shards(folder: Path, sizes: list[int]) -> list[str]:
    """write_shards, then a bad npy in shard 0's sample 1 and shard 1 cut inside sample 4."""
    paths = write_shards(folder, sizes)
    samples = shard_samples(0, sizes[0])
    samples[1]["tokens.npy"] = b"not an npy"
    Path(paths[0]).write_bytes(write_tar(samples))
    tar = Path(paths[1]).read_bytes()
    Path(paths[1]).write_bytes(tar[: header_offsets(tar)[f"{key_of(1, 4)}.modality.npy"] + 600])
    return paths


RESUMES = [  # (world, sizes, damaged): more and fewer shards than ranks, clean and damaged
    (1, [3, 1, 4], False),
    (2, [3, 1, 4, 2, 5], False),
    (3, [3, 1, 4, 2, 5], False),
    (2, [6], False),
    (3, [5, 4], False),
    (2, [5, 6, 4], True),
    (3, [9, 7], True),
]


@pytest.mark.parametrize(("world", "sizes", "damaged"), RESUMES)
def test_resume_from_any_state_continues_exactly(
    tmp_path: Path, world: int, sizes: list[int], damaged: bool
) -> None:
    shards = (damaged_shards if damaged else write_shards)(tmp_path, sizes)
    follow, skipped = 4, Counter()
    for rank in range(world):
        stream = BucketStream(BUCKET, shards, seed=9, rank=rank, world=world)
        reference = []
        while len(reference) < follow or reference[-follow][1].epoch < 2:
            reference += take(stream, 1)
        for n in range(len(reference) - follow):
            state = StreamState() if n == 0 else reference[n - 1][1]
            saved = StreamState.from_dict(json.loads(json.dumps(state.to_dict())))
            resumed = BucketStream(BUCKET, shards, seed=9, rank=rank, world=world, state=saved)
            assert resumed.state == saved
            assert take(resumed, follow) == reference[n : n + follow], (rank, n)
        skipped += stream.skipped
    assert bool(damaged) == ({"bad_npy", "truncated_tar"} <= set(skipped))


def test_resume_never_reads_the_payloads_of_consumed_samples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shards = write_shards(tmp_path, [12])
    stream = BucketStream(BUCKET, shards, seed=0, rank=0, world=1)
    consumed = [key for key, _ in take(stream, 6)]
    read: list[str] = []
    real_extractfile = tarfile.TarFile.extractfile

    def spy(self: tarfile.TarFile, member: tarfile.TarInfo) -> object:
        read.append(member.name)
        return real_extractfile(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", spy)
    resumed = BucketStream(BUCKET, shards, seed=0, rank=0, world=1, state=stream.state)
    assert consumed[-1] == key_of(0, 7)
    assert next(resumed).key == key_of(0, 9)
    assert read == [f"{key_of(0, 8)}.meta.json"] + [
        f"{key_of(0, 9)}.{member}" for member in ("meta.json", "modality.npy", "tokens.npy")
    ]


# --------------------------------------------------------------------------- corrupt input


def test_corrupt_samples_are_skipped_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = write_shards(tmp_path, [0, 3])[1]
    samples = shard_samples(0, 7)
    del samples[1]["tokens.npy"]
    samples[3]["meta.json"] = b"{not json"
    samples[4]["tokens.npy"] = b"\x93NUMPY garbage"
    samples[6]["modality.npy"] = npy_bytes(np.array([{"a": 1}], dtype=object), allow_pickle=True)
    bad = tmp_path / BUCKET / "000000-000.tar"
    bad.write_bytes(write_tar(samples))
    stream = BucketStream(BUCKET, [str(bad), good], seed=0, rank=0, world=1)
    with caplog.at_level(logging.WARNING, logger="training.token_stream"):
        keys = first_epoch(stream)
    assert sorted(keys) == [key_of(0, 0), key_of(1, 0), key_of(1, 1)]
    assert stream.skipped == {"missing_member": 1, "bad_meta": 1, "bad_npy": 2}
    for index in (1, 3, 4, 6):
        assert any(key_of(0, index) in r.message and str(bad) in r.message for r in caplog.records)


def test_a_sample_with_a_duplicated_member_is_skipped(tmp_path: Path) -> None:
    members = [
        (f"{sample['__key__']}.{name}", data)
        for sample in (encoded(0, 0), encoded(0, 1))
        for name, data in sorted(sample.items())
        if name != "__key__"
    ]
    members.insert(3, (f"{key_of(0, 0)}.tokens.npy", npy_bytes(np.array([1, 2, 3]))))
    path = tmp_path / "duplicate.tar"
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    stream = BucketStream(BUCKET, [str(path)], seed=0, rank=0, world=1)
    assert [key for key, _ in take(stream, 2)] == [key_of(0, 1)] * 2
    assert stream.skipped == {"duplicate_member": 2}


def cut_inside(tar: bytes, member: str, into: int) -> bytes:
    return tar[: header_offsets(tar)[member] + into]


@pytest.mark.parametrize(
    ("member", "into", "expected"),
    [
        ("tokens.npy", 512 + 30, {"truncated_member": 1, "truncated_tar": 1}),  # in its data
        ("modality.npy", 0, {"missing_member": 1, "truncated_tar": 1}),  # at a header
        ("meta.json", 0, {"truncated_tar": 1}),  # between samples
        ("meta.json", 200, {"truncated_tar": 1}),  # inside a header
    ],
)
def test_a_truncated_tar_yields_its_complete_samples_and_the_stream_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, member: str, into: int, expected: dict
) -> None:
    shards = write_shards(tmp_path, [8, 2])
    tar = Path(shards[0]).read_bytes()
    # Sample 4 (train) is cut; each member is a 512-byte header, then its data.
    Path(shards[0]).write_bytes(cut_inside(tar, f"{key_of(0, 4)}.{member}", into))
    stream = BucketStream(BUCKET, shards, seed=0, rank=0, world=1)
    with caplog.at_level(logging.WARNING, logger="training.token_stream"):
        keys = first_epoch(stream)
    assert sorted(keys) == sorted(keys_of_split([4]) | keys_of_split([0, 2]))
    assert stream.skipped == expected
    assert any("truncated_tar" in r.message and shards[0] in r.message for r in caplog.records)


def test_a_file_that_is_not_a_tar_is_skipped(tmp_path: Path) -> None:
    shards = write_shards(tmp_path, [3, 3])
    Path(shards[0]).write_bytes(b"this is not a tar" * 100)
    manifest = dict.fromkeys(shards, 3)  # the counts pretokenize wrote
    stream = BucketStream(BUCKET, shards, seed=0, rank=0, world=1, sizes=manifest)
    assert sorted(first_epoch(stream)) == [key_of(1, 0), key_of(1, 1)]
    read_again = shard_order(shards, 0, 1, BUCKET)[0] == shards[0]  # before epoch 1's first
    assert stream.skipped == {"corrupt_tar": 1 + read_again}


def test_a_missing_shard_is_a_storage_error_not_corruption(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        next(BucketStream(BUCKET, [str(tmp_path / "gone.tar")], seed=1, rank=0, world=1))


def test_pickled_npy_is_never_unpickled(tmp_path: Path) -> None:
    class Boom:
        def __reduce__(self) -> tuple:
            return (pytest.fail, ("unpickled",))

    sample = encoded(0, 0)
    sample["tokens.npy"] = npy_bytes(np.array([Boom()], dtype=object), allow_pickle=True)
    path = tmp_path / "pickle.tar"
    path.write_bytes(write_tar([sample, encoded(0, 1)]))
    stream = BucketStream(BUCKET, [str(path)], seed=0, rank=0, world=1)
    assert next(stream).key == key_of(0, 1)
    assert stream.skipped == {"bad_npy": 1}


# --------------------------------------------------------------------------- S3


@pytest.mark.integration
def test_streams_and_resumes_from_s3_through_moto(
    moto_server: MotoServer, s3_env: str, tmp_path: Path
) -> None:
    moto_server.create_bucket("token-stream")
    storage = Storage(StorageConfig(s3=S3Config(endpoint_url=s3_env)))
    sizes = [3, 1, 4, 2, 5]
    local = write_shards(tmp_path, sizes)
    remote = []
    for path in local:
        uri = f"s3://token-stream/ws/tokens/{BUCKET}/{Path(path).name}"
        storage.write_bytes(uri, Path(path).read_bytes())
        remote.append(uri)
    options = {"client_kwargs": {"endpoint_url": s3_env}}  # the endpoint comes from here only
    for rank in range(2):
        expected = take(BucketStream(BUCKET, local, seed=4, rank=rank, world=2), 8)
        stream = BucketStream(BUCKET, remote, seed=4, rank=rank, world=2, storage_options=options)
        assert take(stream, 8) == expected
        state = expected[2][1]
        resumed = BucketStream(
            BUCKET, remote, seed=4, rank=rank, world=2, state=state, storage_options=options
        )
        assert take(resumed, 5) == expected[3:]
