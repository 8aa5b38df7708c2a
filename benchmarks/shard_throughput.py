"""Documents/s of ``omni shard`` against a bare single-process pyarrow loop, same run.

The corpus is the sample corpus's media documents (image, audio, video, interleaved)
replicated under new ids until it holds at least ``--documents`` documents; media files
are shared, so the benchmark measures validation + sharding, not disk space.

Both sides do the same work per document (the project's ``accept``: resolve, decode-check,
embed bytes) and write zstd Parquet shards. Ray is started before timing (a cluster is up
in real use); the first run, which also pays Ray worker start-up and imports, is reported
as ``cold_value``. Then the two sides run alternately ``--repeats`` times on fresh output
folders and the medians are compared.

    python benchmarks/shard_throughput.py [--documents 2000] [--cpus 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from infra.config import validate
from infra.storage import Storage
from pipelines.config import PipelineConfig
from pipelines.shard import stage as shard
from pipelines.shard.media_checks import MediaLimits
from pipelines.shard.readers import READERS, SplitOptions
from pipelines.shard.validation import accept

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "corpus"
RESULTS = REPO / "benchmarks" / "results"
TARGET_RATIO = 1.5


def build_corpus(out: Path, documents: int) -> int:
    """Write a JSONL of renamed copies of the sample's media documents; return its size."""
    media_docs = [
        line for line in (SAMPLE / "docs.jsonl").read_text().splitlines() if '"path"' in line
    ]
    lines, copy = [], 0
    while len(lines) < documents:
        for line in media_docs:
            doc = json.loads(line)
            doc["id"] = f"{doc['id']}~{copy}"
            lines.append(json.dumps(doc))
        copy += 1
    out.write_text("\n".join(lines) + "\n")
    return len(lines)


def config_for(workspace: Path, corpus: Path, cpus: int) -> PipelineConfig:
    return validate(
        PipelineConfig,
        {
            "workspace": str(workspace),
            "corpus": {
                "inputs": [
                    {
                        "uri": str(corpus),
                        "format": "jsonl",
                        "name": "bench",
                        "media_root": str(SAMPLE),
                    }
                ]
            },  # fmt: skip
            "ray": {"num_cpus": cpus},
            "shard": {"target_tokens": 50_000, "jsonl_split_bytes": 4096},
        },
    )


def bare_loop(config: PipelineConfig, corpus: Path, out: Path) -> int:
    """The baseline: one process, read -> accept -> write shards of the same token size."""
    settings = config.shard
    limits = MediaLimits(
        settings.max_image_pixels, settings.max_media_bytes, settings.video_probe_frames
    )
    costs = shard._token_costs(settings)
    storage, reader = Storage(), READERS["jsonl"]
    split = reader.splits(storage, str(corpus), "bench/docs.jsonl", str(SAMPLE),
                          SplitOptions(1 << 40, 1))[0]  # fmt: skip
    out.mkdir(parents=True)
    rows, tokens, written, part = [], 0, 0, 0

    def flush() -> None:
        nonlocal rows, tokens, part
        table = pa.Table.from_pylist(rows, schema=shard.DOCUMENT_SCHEMA)
        pq.write_table(table, out / f"part-{part:05d}.parquet", compression="zstd",
                       row_group_size=settings.row_group_rows)  # fmt: skip
        rows, tokens, part = [], 0, part + 1

    for raw in reader.read(storage, split):
        row = accept(raw, storage, limits, costs)
        rows.append(row)
        tokens += row["est_tokens"]
        written += 1
        if tokens >= settings.target_tokens:
            flush()
    if rows:
        flush()
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=2000)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each side")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="shard-bench-"))
    try:
        corpus = workdir / "docs.jsonl"
        documents = build_corpus(corpus, args.documents)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", num_cpus=args.cpus, object_store_memory=512 * 2**20,
                 include_dashboard=False, logging_level="WARNING")  # fmt: skip
        started = time.perf_counter()
        cold = shard.run(config_for(workdir / "cold", corpus, args.cpus))
        cold_seconds = time.perf_counter() - started
        assert cold.documents_out == documents, cold

        bare_times, project_times = [], []
        for attempt in range(args.repeats):  # alternate, so both see the same machine state
            started = time.perf_counter()
            assert (
                bare_loop(config_for(workdir, corpus, 1), corpus, workdir / f"bare{attempt}")
                == documents
            )
            bare_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            report = shard.run(config_for(workdir / f"run{attempt}", corpus, args.cpus))
            project_times.append(time.perf_counter() - started)
            assert report.documents_out == documents and report.resumed_units == 0
        ray.shutdown()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    warm_seconds, bare_seconds = statistics.median(project_times), statistics.median(bare_times)

    value, baseline = documents / warm_seconds, documents / bare_seconds
    result = {
        "name": "shard_throughput",
        "unit": "documents/s",
        "value": round(value, 1),
        "baseline": round(baseline, 1),
        "ratio": round(value / baseline, 3),
        "target": TARGET_RATIO,
        "documents": documents,
        "seconds": round(warm_seconds, 2),
        "baseline_seconds": round(bare_seconds, 2),
        "runs_seconds": [round(t, 2) for t in project_times],
        "baseline_runs_seconds": [round(t, 2) for t in bare_times],
        "cold_value": round(documents / cold_seconds, 1),
        "cold_ratio": round((documents / cold_seconds) / baseline, 3),
        "cpus": args.cpus,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "baseline_description": "single process: same validation, pyarrow zstd shards",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "shard_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"omni shard: {value:.1f} docs/s (cold {result['cold_value']}), bare loop: "
        f"{baseline:.1f} docs/s, ratio {result['ratio']:.2f}x (target >= {TARGET_RATIO}x)"
    )


if __name__ == "__main__":
    main()
