"""Seconds until ``omni --help`` and ``omni status`` answer, beside ``ray --help`` and
``mlflow --help``, in the same run.

A command line that takes seconds to print its help is one people stop asking. Each
command runs in a fresh process (nothing cached in memory but the OS's file cache), the
commands take turns round by round so that all of them see the same machine load, and
the median of ``--runs`` rounds is reported after one discarded warm-up round, with the
CPU seconds (user + system) of the same processes: on a shared machine the wall time
follows the load, the CPU time much less. ``omni``
is the console script installed beside this Python (``python -m pipelines.cli`` where
there is none); ``ray`` and ``mlflow`` are theirs. ``omni status`` reads the workspace of
``--config`` (``configs/demo.yaml``: ``./work/demo``, relative to the repository root);
run ``make demo`` first so that it reads a finished one, as the target assumes.

Targets (issue 27): ``omni --help`` <= 1.0 s and ``omni status`` <= 1.5 s on the 2-core
development machine. Writes ``benchmarks/results/cli_latency.json``.

    python benchmarks/cli_latency.py [--runs 7] [--config configs/demo.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TARGETS_S = {"omni --help": 1.0, "omni status": 1.5}


def _script(name: str) -> list[str] | None:
    """The console script ``name`` of this environment (or on PATH), as a command."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return [str(beside)]
    found = shutil.which(name)
    return [found] if found else None


def commands(config: str) -> dict[str, list[str]]:
    """What is timed: the name shown and the argv."""
    omni = _script("omni") or [sys.executable, "-m", "pipelines.cli"]
    timed = {
        "omni --help": [*omni, "--help"],
        "omni train --help": [*omni, "train", "--help"],
        "omni status": [*omni, "status", "--config", config],
    }
    for baseline in ("ray", "mlflow"):
        script = _script(baseline)
        if script is None:
            raise SystemExit(f"{baseline} is not installed here: it is the baseline")
        timed[f"{baseline} --help"] = [*script, "--help"]
    return timed


def environment() -> dict[str, str]:
    """This checkout first on the path; the offline, quiet defaults of the Makefile."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_once(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds of one fresh process; its failure stops the benchmark."""
    cpu, started = _children_cpu(), time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}: {done.stderr[-2000:]}")
    return seconds, _children_cpu() - cpu


def stage_states(argv: list[str], env: dict[str, str]) -> dict[str, str]:
    """What ``omni status`` reads: stage -> done / running / failed / pending."""
    done = subprocess.run(
        [*argv, "--json"], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    return {row["stage"]: row["state"] for row in json.loads(done.stdout)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="timed rounds (median reported)")
    parser.add_argument("--config", default="configs/demo.yaml", help="config of omni status")
    args = parser.parse_args()

    env, timed = environment(), commands(args.config)
    states = stage_states(timed["omni status"], env)
    if any(state != "done" for state in states.values()):
        print(f"note: the workspace is not finished ({states}); run `make demo` first for the "
              "figure the target is about", file=sys.stderr)  # fmt: skip
    runs: dict[str, list[float]] = {name: [] for name in timed}
    cpu_runs: dict[str, list[float]] = {name: [] for name in timed}
    for round_ in range(args.runs + 1):
        for name, argv in timed.items():  # in turns: every command sees the same load
            seconds, cpu = time_once(argv, env)
            if round_:  # round 0 warms the file cache and is not counted
                runs[name].append(seconds)
                cpu_runs[name].append(cpu)
    medians = {name: statistics.median(values) for name, values in runs.items()}
    cpu = {name: statistics.median(values) for name, values in cpu_runs.items()}

    ray, mlflow = medians["ray --help"], medians["mlflow --help"]
    entries = []
    for name in ("omni --help", "omni train --help", "omni status"):
        target = TARGETS_S.get(name, TARGETS_S["omni --help"])
        entries.append(
            {
                "name": name,
                "value": round(medians[name], 3),
                "baseline": round(ray, 3),
                "ratio": round(medians[name] / ray, 3),
                "ratio_to_mlflow": round(medians[name] / mlflow, 3),
                "target": target,
                "met": medians[name] <= target,
                "runs": [round(s, 3) for s in runs[name]],
                "cpu_seconds": round(cpu[name], 3),
                "cpu_ratio": round(cpu[name] / cpu["ray --help"], 3),
            }
        )
    headline = entries[0]
    result = {
        "name": "cli_latency",
        "unit": "seconds (median wall time of a fresh process)",
        "value": headline["value"],
        "baseline": headline["baseline"],
        "ratio": headline["ratio"],
        "target": headline["target"],
        "met": all(entry["met"] for entry in entries),
        "headline": "omni --help against ray --help; targets are absolute seconds",
        "commands": entries,
        "baselines": {
            name: {
                "value": round(medians[name], 3),
                "runs": [round(s, 3) for s in runs[name]],
                "cpu_seconds": round(cpu[name], 3),
            }
            for name in ("ray --help", "mlflow --help")
        },
        "status_workspace": {"config": args.config, "stages": states},
        "argv": {name: " ".join(argv) for name, argv in timed.items()},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average": [round(load, 2) for load in os.getloadavg()],
        "python": platform.python_version(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cli_latency.json").write_text(json.dumps(result, indent=2) + "\n")

    print(f"{'command':<20} {'median s':>9} {'x ray':>7} {'x mlflow':>9} {'cpu s':>7} "
          f"{'target s':>9}")  # fmt: skip
    for entry in entries:
        print(f"{entry['name']:<20} {entry['value']:>9.3f} {entry['ratio']:>7.2f} "
              f"{entry['ratio_to_mlflow']:>9.2f} {entry['cpu_seconds']:>7.2f} "
              f"{entry['target']:>9.1f}{'' if entry['met'] else '  MISSED'}")  # fmt: skip
    for name in ("ray --help", "mlflow --help"):
        print(f"{name:<20} {medians[name]:>9.3f} {'':>7} {'':>9} {cpu[name]:>7.2f}")
    print(f"load average {result['load_average']}; written {RESULTS / 'cli_latency.json'}")


if __name__ == "__main__":
    main()
