"""Token-sample codec: split, keys, deterministic tars, readers with and without project code."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset
from webdataset.gopen import gopen_schemes

from infra.services import MotoServer
from infra.storage import S3Config, Storage, StorageConfig
from tokenization.sequences import SequenceConfig, TokenizedSegment, build_sequences
from tokenization.token_samples import (
    TAR_MODE,
    encode_sample,
    read_tar,
    read_token_samples,
    sample_key,
    split_of,
    write_tar,
)
from tokenization.vocab import VocabLayout

LAYOUT = VocabLayout(text_size=100, image_size=64, audio_size=32)


def samples() -> list[dict[str, bytes]]:
    """Three samples from two documents, deliberately not in key order."""
    out = []
    documents = {
        "doc9": [TokenizedSegment("text", np.array([1, 2, 3]))],
        "doc1": [
            TokenizedSegment("image", np.array([111, 140])),
            TokenizedSegment("text", np.array([7, 8])),
        ],
    }
    for document_id, segments in documents.items():
        sequences, _ = build_sequences(segments, LAYOUT, SequenceConfig())
        for sequence in sequences:
            key = sample_key(document_id, sequence.bucket)
            out.append(encode_sample(key, sequence, {"document_id": document_id, "source": "t"}))
    return out


def write(path: Path, tar: bytes) -> str:
    path.write_bytes(tar)
    return str(path)


def test_split_is_deterministic_and_close_to_the_fraction() -> None:
    ids = [f"{i:020x}" for i in range(10_000)]
    first = [split_of(i, 0.1) for i in ids]
    assert first == [split_of(i, 0.1) for i in ids]
    assert abs(first.count("eval") / len(ids) - 0.1) < 0.015
    assert split_of("0c3f", 0.0) == "train"
    assert {split_of(i, 1.0) for i in ids[:100]} == {"eval"}
    with pytest.raises(ValueError):
        split_of("x", 1.5)


def test_sample_key_refuses_dots_and_slashes() -> None:
    assert sample_key("0123abcd", "image2text") == "0123abcd-image2text"
    for document_id, bucket in [("a.b", "text"), ("a/b", "text"), ("doc", "x.y")]:
        with pytest.raises(ValueError):
            sample_key(document_id, bucket)
    with pytest.raises(ValueError):
        encode_sample("a.b", *_one_sequence_and_meta())


def _one_sequence_and_meta():
    sequences, _ = build_sequences(
        [TokenizedSegment("text", np.array([1]))], LAYOUT, SequenceConfig()
    )
    return sequences[0], {}


def test_meta_cannot_override_codec_fields() -> None:
    sequence, _ = _one_sequence_and_meta()
    with pytest.raises(ValueError, match="bucket"):
        encode_sample("k", sequence, {"bucket": "image2text"})


def test_round_trip_through_project_reader(tmp_path: Path) -> None:
    encoded = samples()
    path = write(tmp_path / "shard-00000.tar", write_tar(encoded))
    read = list(read_token_samples(path))
    assert [s.key for s in read] == sorted(s["__key__"] for s in encoded)
    by_key = {s["__key__"]: s for s in encoded}
    for sample in read:
        tokens = np.load(io.BytesIO(by_key[sample.key]["tokens.npy"]), allow_pickle=False)
        assert sample.tokens.dtype == torch.int64 and sample.modality.dtype == torch.uint8
        assert sample.tokens.tolist() == tokens.tolist()
        assert sample.meta["length"] == len(tokens)
    image2text = next(s for s in read if s.key == "doc1-image2text")
    assert image2text.meta == {
        "document_id": "doc1",
        "source": "t",
        "bucket": "image2text",
        "instruction_length": 5,
        "length": 8,
        "spans": [
            ["special", 0, 1], ["special", 1, 2], ["image", 2, 4], ["special", 4, 5],
            ["text", 5, 7], ["special", 7, 8],
        ],
    }  # fmt: skip
    assert image2text.modality.tolist() == [1, 1, 2, 2, 1, 0, 0, 1]


def test_read_tar_is_the_inverse_of_write_tar() -> None:
    """What packing copies from a staged tar is what was staged: the same samples, and
    written again, the same bytes."""
    encoded = samples()
    data = write_tar(encoded)
    read = read_tar(data)
    assert read == sorted(encoded, key=lambda s: s["__key__"])
    assert write_tar(read) == data


def test_write_tar_unsorted_keeps_the_callers_order() -> None:
    """Pretokenize stages a bucket split by split and packing slices it by that order: a
    tar re-sorted by key would put the other split's samples into each slice."""
    encoded = sorted(samples(), key=lambda s: s["__key__"], reverse=True)
    assert [s["__key__"] for s in read_tar(write_tar(encoded, sort=False))] == [
        s["__key__"] for s in encoded
    ]


def test_several_shards_are_read_in_file_order(tmp_path: Path) -> None:
    encoded = samples()
    second = write(tmp_path / "b.tar", write_tar(encoded[:1]))
    first = write(tmp_path / "a.tar", write_tar(encoded[1:]))
    keys = [s.key for s in read_token_samples([second, first])]
    assert keys == [encoded[0]["__key__"]] + sorted(s["__key__"] for s in encoded[1:])
    braces = str(tmp_path / "{b,a}.tar")
    assert [s.key for s in read_token_samples(braces)] == keys


def test_same_samples_give_byte_identical_tars() -> None:
    tar = write_tar(samples())
    again = write_tar(list(reversed(samples())))
    assert hashlib.sha256(tar).hexdigest() == hashlib.sha256(again).hexdigest()
    with pytest.raises(ValueError, match="duplicate"):
        write_tar(samples() + samples()[:1])


def test_members_are_sorted_regular_files_with_fixed_attributes() -> None:
    with tarfile.open(fileobj=io.BytesIO(write_tar(samples()))) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    assert names[:3] == ["doc1-image2text.meta.json", "doc1-image2text.modality.npy",
                         "doc1-image2text.tokens.npy"]  # fmt: skip
    for member in members:
        assert member.isreg() and member.mode == TAR_MODE
        assert (member.mtime, member.uid, member.gid) == (0, 0, 0)


def test_long_keys_fit(tmp_path: Path) -> None:
    sequence, _ = _one_sequence_and_meta()
    key = sample_key("x" * 150, "text")
    path = write(tmp_path / "long.tar", write_tar([encode_sample(key, sequence, {})]))
    assert [s.key for s in read_token_samples(path)] == [key]


def test_plain_webdataset_reads_every_sample_without_project_code(tmp_path: Path) -> None:
    encoded = samples()
    path = write(tmp_path / "plain.tar", write_tar(encoded))
    dataset = webdataset.WebDataset([path], shardshuffle=False)
    raw = list(dataset)
    assert [r["__key__"] for r in raw] == sorted(s["__key__"] for s in encoded)
    for sample in raw:
        assert {"__key__", "tokens.npy", "modality.npy", "meta.json"} <= set(sample)
        tokens = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
        modality = np.load(io.BytesIO(sample["modality.npy"]), allow_pickle=False)
        assert tokens.dtype == np.int32 and modality.dtype == np.uint8
        assert tokens.shape == modality.shape
        assert json.loads(sample["meta.json"])["length"] == len(tokens)


def test_s3_scheme_is_registered_with_webdataset() -> None:
    assert "s3" in gopen_schemes


@pytest.mark.integration
def test_read_from_s3_through_moto(moto_server: MotoServer, s3_env: str) -> None:
    moto_server.create_bucket("token-samples")
    storage = Storage(StorageConfig(s3=S3Config(endpoint_url=s3_env)))
    encoded = samples()
    storage.write_bytes("s3://token-samples/tokens/shard-00000.tar", write_tar(encoded))
    options = {"client_kwargs": {"endpoint_url": s3_env}}
    read = list(read_token_samples(["s3://token-samples/tokens/shard-00000.tar"], options))
    assert [s.key for s in read] == sorted(s["__key__"] for s in encoded)
    assert read[0].meta["bucket"] == "image2text"
