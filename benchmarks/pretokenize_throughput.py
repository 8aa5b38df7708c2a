"""Samples/s of ``omni pretokenize`` with 1 and 2 actors against a bare loop, same run.

The corpus is the whole sample corpus (``examples/corpus/docs.jsonl``: 374 documents, 433
token samples) replicated under new ids until it holds at least ``--documents`` documents;
media files are shared. ``omni shard`` and a tiny tokenizer warm-up (2 image steps, 2 audio
steps, 512 text ids: encode speed does not depend on training) run once, untimed. Then
three variants tokenize the same shards, each on its own fresh copy of the workspace:

- ``bare``: the loop a user would write by hand: a fresh Python process (no Ray) that
  imports what it needs, sets ``torch.set_num_threads(1)``, loads the tokenizers once and runs
  ``process_shard`` on every input shard in order with the stage's own ``WorkerSettings``;
- ``1 actor`` / ``2 actors``: ``pretokenize.run`` with ``pretokenize.actors`` 1 or 2
  (``cpus_per_actor`` 1) on a Ray instance started before timing.

The main figure of each variant is samples / wall seconds of the whole call. Both sides pay
the same cold start: the stage's actor is a fresh worker process importing
``pipelines.pretokenize.stage`` (torch, transformers for Whisper, scipy) and loading the
tokenizers; the bare loop is a fresh process doing the same (timed from spawn to exit). Ray's
own start-up is left out of the stage's figure (the benchmark starts Ray first). A steady-state
figure leaves start-up out: samples / seconds from the moment the first actor is ready (the
end of its ``__init__`` in Ray's task timeline) to the moment the last token tar is written
(its mtime); for the bare loop, samples over its ``process_shard`` loop (its tokenizer load
and imports are its ``startup_seconds``). ``fixed_seconds`` (total minus steady) and the
steady rates give the corpus size at which each target would be met with start-up included
(``samples_for_target_*``). The variants run alternately (order rotated each repeat)
``--repeats`` times and the medians are compared.

The default corpus (``--documents 4400``: about 5,200 samples, a few seconds of work per
actor) keeps actor start-up (about 4-5 s of imports on these 2-CPU machines) a minority of
the run, as it is in real corpora of millions of samples; ``--documents 1100`` (1,299
samples) measures mostly start-up.

    python benchmarks/pretokenize_throughput.py [--documents 1100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

from infra.config import validate
from pipelines.config import PipelineConfig
from pipelines.pretokenize import stage as pretokenize
from pipelines.shard import stage as shard
from pipelines.tokenizers import stage as tokenizers_stage

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "corpus"
RESULTS = REPO / "benchmarks" / "results"
BARE_LOOP = REPO / "benchmarks" / "pretokenize_bare_loop.py"
TARGET_RATIO = 1.6  # 2 actors against 1 actor
TARGET_ONE_ACTOR_VS_BARE = 0.85
VARIANTS = ("bare", "actors1", "actors2")
QUICK_TOKENIZERS = {
    "text": {"vocab_size": 512},
    "warmup": {"image_steps": 2, "audio_steps": 2, "image_batch": 4, "audio_batch": 2},
}


def build_corpus(out: Path, documents: int) -> int:
    """Write renamed copies of the whole sample corpus; return the number of copies."""
    docs = [json.loads(line) for line in (SAMPLE / "docs.jsonl").read_text().splitlines() if line]
    copies = max(1, math.ceil(documents / len(docs)))
    with out.open("w", encoding="utf-8") as f:
        for copy in range(copies):
            for doc in docs:
                f.write(json.dumps({**doc, "id": f"{doc['id']}~{copy}"}, ensure_ascii=False))
                f.write("\n")
    return copies


def config_for(workspace: Path, corpus: Path, actors: int, target_tokens: int) -> PipelineConfig:
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
            "ray": {"num_cpus": 2},
            "shard": {"target_tokens": target_tokens, "jsonl_split_bytes": 2048},
            "tokenizers": QUICK_TOKENIZERS,
            "pretokenize": {"actors": actors, "cpus_per_actor": 1},
        },
    )


def fresh_workspace(prepared: Path, out: Path) -> Path:
    """A new workspace holding copies of the prepared shards and tokenizers, no tokens."""
    for stage in ("shards", "tokenizers"):
        shutil.copytree(prepared / stage, out / stage)
    return out


def bare_loop(config: PipelineConfig) -> dict[str, Any]:
    """The baseline, ``pretokenize_bare_loop.py`` in a fresh process, timed from spawn to exit."""
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, str(BARE_LOOP), config.model_dump_json()],
        check=True,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    inner = json.loads(completed.stdout.strip().splitlines()[-1])
    return {
        "seconds": seconds,
        "steady_seconds": inner["loop_seconds"],
        "startup_seconds": seconds - inner["loop_seconds"],
        "samples": inner["samples"],
    }


def actor_inits(since: float, until: float, actors: int) -> list[tuple[float, float]]:
    """(start, end) in epoch seconds of each actor's ``__init__``, from Ray's task timeline.

    Workers report profile events about once a second, so the timeline is read again until
    every actor of the run is in it. (The events of the last second of a run never arrive:
    the pool kills its actors. The end of the run is read from the files it wrote instead.)
    """
    for _ in range(10):
        inits = []
        for event in ray.timeline():  # waits 1 s for events in flight
            start = event["ts"] / 1e6
            end = start + event["dur"] / 1e6
            if event.get("cat") == "task::PretokenizeActor.__init__" and since <= start <= until:
                inits.append((start, end))
        if len(inits) >= actors:
            return sorted(inits)
    raise RuntimeError(f"Ray's timeline holds {len(inits)} of the {actors} actors' __init__")


def stage_run(config: PipelineConfig) -> dict[str, Any]:
    """``pretokenize.run`` timed whole, and its steady state: from the moment the first
    actor is ready (its ``__init__``, tokenizers loaded, has returned) to the moment the
    last token tar is published (its mtime)."""
    wall_started = time.time()
    started = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # the stage's tqdm bar
        report = pretokenize.run(config)
    seconds = time.perf_counter() - started
    assert not report.skipped and report.resumed_shards == 0, report
    tars = list((Path(config.workspace) / "tokens").glob("*/*.tar"))
    assert len(tars) == report.tars, (len(tars), report.tars)
    last_tar = max(tar.stat().st_mtime for tar in tars)
    inits = actor_inits(wall_started, wall_started + seconds, report.actors)
    ready = min(end for _, end in inits)
    return {
        "seconds": seconds,
        "steady_seconds": last_tar - ready,
        "startup_seconds": ready - wall_started,
        "actor_init_seconds": [round(end - start, 2) for start, end in inits],
        "actor_ready_seconds": [round(end - wall_started, 2) for _, end in inits],
        "samples": sum(b["samples"] for b in report.buckets.values()),
        "actors": report.actors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=4400, help="at least this many docs")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each variant")
    parser.add_argument("--target-tokens", type=int, default=6000, help="shard.target_tokens")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="pretokenize-bench-"))
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    try:
        corpus = workdir / "docs.jsonl"
        copies = build_corpus(corpus, args.documents)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        logging.getLogger("ray._private.state").setLevel(logging.ERROR)  # timeline notice
        ray.init(address="local", num_cpus=2, object_store_memory=512 * 2**20,
                 include_dashboard=False, logging_level="WARNING")  # fmt: skip
        prepared = workdir / "prepared"
        base = config_for(prepared, corpus, 1, args.target_tokens)
        setup_started = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):  # progress bars
            sharded = shard.run(base)
            tokenizers_stage.run(base)
        setup_seconds = time.perf_counter() - setup_started
        print(f"setup: {sharded.documents_out} documents in {sharded.shards} shards "
              f"({copies} copies), shard + tokenizers {setup_seconds:.1f}s")  # fmt: skip

        for attempt in range(args.repeats):
            order = VARIANTS[attempt % 3 :] + VARIANTS[: attempt % 3]
            for variant in order:
                workspace = fresh_workspace(prepared, workdir / f"{variant}-{attempt}")
                actors = 2 if variant == "actors2" else 1
                config = config_for(workspace, corpus, actors, args.target_tokens)
                result = bare_loop(config) if variant == "bare" else stage_run(config)
                runs[variant].append(result)
                print(f"  repeat {attempt} {variant:8s} {result['samples']} samples "
                      f"{result['seconds']:6.2f}s (steady {result['steady_seconds']:.2f}s, "
                      f"start-up {result['startup_seconds']:.2f}s)", flush=True)  # fmt: skip
        ray.shutdown()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    samples = runs["bare"][0]["samples"]
    assert all(r["samples"] == samples for rs in runs.values() for r in rs), runs
    med = {v: statistics.median(r["seconds"] for r in runs[v]) for v in VARIANTS}
    steady = {v: statistics.median(r["steady_seconds"] for r in runs[v]) for v in VARIANTS}
    startup = {v: statistics.median(r["startup_seconds"] for r in runs[v]) for v in VARIANTS}
    fixed = {  # what does not grow with the corpus: start-up, tail, manifest, actor kills
        v: statistics.median(r["seconds"] - r["steady_seconds"] for r in runs[v]) for v in VARIANTS
    }
    rate = {v: samples / med[v] for v in VARIANTS}
    steady_rate = {v: samples / steady[v] for v in VARIANTS}

    def samples_for(target: float, faster: str, slower: str) -> int | None:
        """Corpus size at which ``faster`` reaches ``target`` x ``slower``, start-up included,
        if seconds = fixed + samples / steady rate; None when the steady rates never get there."""
        per_sample = 1 / steady_rate[slower] - target / steady_rate[faster]
        needed = target * fixed[faster] - fixed[slower]
        if needed <= 0:
            return 0
        return math.ceil(needed / per_sample) if per_sample > 0 else None

    result = {
        "name": "pretokenize_throughput",
        "unit": "samples/s",
        "value": round(rate["actors2"], 1),
        "baseline": round(rate["actors1"], 1),
        "ratio": round(rate["actors2"] / rate["actors1"], 3),
        "target": TARGET_RATIO,
        "bare_loop": round(rate["bare"], 1),
        "one_actor_vs_bare": round(rate["actors1"] / rate["bare"], 3),
        "one_actor_vs_bare_target": TARGET_ONE_ACTOR_VS_BARE,
        "two_actors_vs_bare": round(rate["actors2"] / rate["bare"], 3),
        "steady_value": round(steady_rate["actors2"], 1),
        "steady_baseline": round(steady_rate["actors1"], 1),
        "steady_bare_loop": round(steady_rate["bare"], 1),
        "steady_ratio": round(steady_rate["actors2"] / steady_rate["actors1"], 3),
        "steady_one_actor_vs_bare": round(steady_rate["actors1"] / steady_rate["bare"], 3),
        "startup_seconds": {v: round(startup[v], 2) for v in VARIANTS},
        "fixed_seconds": {v: round(fixed[v], 2) for v in VARIANTS},
        "samples_for_target_ratio": samples_for(TARGET_RATIO, "actors2", "actors1"),
        "samples_for_target_one_actor_vs_bare": samples_for(
            TARGET_ONE_ACTOR_VS_BARE, "actors1", "bare"
        ),
        "samples": samples,
        "documents": sharded.documents_out,
        "shards": sharded.shards,
        "seconds": {v: [round(r["seconds"], 2) for r in runs[v]] for v in VARIANTS},
        "steady_seconds": {v: [round(r["steady_seconds"], 2) for r in runs[v]] for v in VARIANTS},
        "actor_init_seconds": {v: [r["actor_init_seconds"] for r in runs[v]] for v in VARIANTS[1:]},
        "actor_ready_seconds": {
            v: [r["actor_ready_seconds"] for r in runs[v]] for v in VARIANTS[1:]
        },
        "repeats": args.repeats,
        "cpus": 2,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "baseline_description": "pretokenize.actors=1 (cpus_per_actor 1), actor start-up included",
        "bare_loop_description": "a fresh process (no Ray), timed from spawn to exit: imports, "
        "1 torch thread, tokenizers loaded once, process_shard on every shard in order",
        "steady_description": "samples / (last tar written - first actor ready, from Ray's "
        "task timeline); bare: samples / the process_shard loop after loading the tokenizers",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pretokenize_throughput.json").write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{'variant':10s} {'samples/s':>10s} {'seconds':>8s} {'steady/s':>9s} "
          f"{'start-up s':>10s}")  # fmt: skip
    for v in VARIANTS:
        print(f"{v:10s} {rate[v]:10.1f} {med[v]:8.2f} {steady_rate[v]:9.1f} {startup[v]:10.2f}")
    print(
        f"fixed seconds (start-up etc.): {result['fixed_seconds']}; samples needed for the "
        f"targets with start-up included: ratio {result['samples_for_target_ratio']}, "
        f"1 actor vs bare {result['samples_for_target_one_actor_vs_bare']}"
    )
    print(
        f"2 vs 1 actor: {result['ratio']:.2f}x (target >= {TARGET_RATIO}x), steady "
        f"{result['steady_ratio']:.2f}x; 1 actor vs bare: {result['one_actor_vs_bare']:.2f}x "
        f"(target >= {TARGET_ONE_ACTOR_VS_BARE}x), steady {result['steady_one_actor_vs_bare']:.2f}x"
    )


if __name__ == "__main__":
    main()
