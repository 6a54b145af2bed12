"""Every workload against durable, DBOS and pgqueuer, in one run on one database server.

    scripts/bench [--quick] [--repeat N] [--database-url URL] [--only durable,dbos,pgqueuer]

The peers are installed from PyPI, pinned, into their own virtual environments under .bench/
(created on first use). Each (system, workload) pair runs as a fresh process with a freshly
created database of its own on the same server; pairs run round-robin so machine noise hits
every system alike. With --repeat N each figure is the median of N runs. Prints a table with
each figure and durable's ratio to each peer, then (with --repeat above 1) each round's ratios,
so that a goal met by the median but not in every round shows; writes every figure, and every
round's, to benchmarks/results.json. Without --database-url: $DURABLE_DATABASE_URL, else the
embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import venv
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / ".bench"
RESULTS = ROOT / "benchmarks" / "results.json"


@dataclass(frozen=True)
class System:
    name: str
    script: str
    requirements: tuple[str, ...]  # empty: runs in our own environment
    workloads: tuple[str, ...]


WORKLOADS = ("W1", "W2", "W3", "W4", "W5", "W6", "W7")

SYSTEMS = (
    System("durable", "benchmarks/durable_bench.py", (), WORKLOADS),
    System("dbos", "benchmarks/peers/dbos_bench.py", ("dbos==3.4.0",), ("W1", "W2", "W3", "W4")),
    System(
        "pgqueuer",
        "benchmarks/peers/pgqueuer_bench.py",
        ("pgqueuer==1.6.0", "asyncpg==0.32.0"),
        ("W1", "W3"),
    ),
)

# (workload, figure key, label, higher is better)
ROWS = (
    ("W1", "drain_per_s", "W1 no-op runs drained (runs/s)", True),
    ("W1", "e2e_per_s", "W1 no-op runs, started singly while a worker runs (runs/s)", True),
    ("W1", "drain_cpu_us_per_run", "W1 drained: worker CPU per run (µs)", False),
    ("W1", "e2e_cpu_us_per_run", "W1 started singly: process CPU per run (µs)", False),
    ("W1", "start_single_per_s", "W1 start rate, one call per run (starts/s)", True),
    ("W1", "start_batch_per_s", "W1 start rate, batched (starts/s)", True),
    (
        "W1",
        "floor_single_per_s",
        "W1's floor: committing one-row inserts, one call each, back to back (inserts/s)",
        True,
    ),
    ("W2", "workflows_per_s", "W2 five-step workflows, started singly (wf/s)", True),
    ("W2", "steps_per_s", "W2 journaled steps, started singly (steps/s)", True),
    (
        "W2",
        "drain_workflows_per_s",
        "W2 five-step workflows, started first then drained (wf/s)",
        True,
    ),
    ("W2", "drain_steps_per_s", "W2 journaled steps, drained (steps/s)", True),
    ("W2", "cpu_us_per_step", "W2 started singly: process CPU per step (µs)", False),
    ("W2", "drain_cpu_us_per_step", "W2 drained: worker CPU per step (µs)", False),
    ("W3", "p50_ms", "W3 start to first step, p50 (ms)", False),
    ("W3", "p99_ms", "W3 start to first step, p99 (ms)", False),
    (
        "W3",
        "floor_p50_ms",
        "W3's floor: a committing one-row insert after the same idle spell, then a thread hop, "
        "p50 (ms)",
        False,
    ),
    ("W3", "floor_p99_ms", "W3's floor, p99 (ms)", False),
    ("W4", "late_p50_ms", "W4 1 s sleep, lateness p50 (ms)", False),
    ("W4", "late_p99_ms", "W4 1 s sleep, lateness p99 (ms)", False),
    ("W4", "late_max_ms", "W4 1 s sleep, lateness max (ms)", False),
    ("W5", "p50_ms", "W5 event sent to run resumed, p50 (ms)", False),
    ("W5", "p99_ms", "W5 event sent to run resumed, p99 (ms)", False),
    ("W6", "resume_ms", "W6 resume a 1,000-step journal (ms)", False),
    ("W6", "journal_loads", "W6 journal queries on resume", False),
    ("W7", "workflows_per_s", "W7 W2 with 1M journal rows, 10k suspended runs (wf/s)", True),
    ("W7", "rss_mb", "W7 worker peak RSS (MB; W2's: see results.json)", False),
)


def python_for(system: System) -> str:
    if not system.requirements:
        return sys.executable
    home = BENCH / "venvs" / system.name
    stamp = home / ".installed"
    wanted = " ".join(system.requirements)
    if not stamp.exists() or stamp.read_text() != wanted:
        print(f"installing {wanted} into {home} ...", file=sys.stderr)
        venv.create(home, with_pip=True, clear=True)
        subprocess.run(
            [str(home / "bin" / "python"), "-m", "pip", "install", "-q", *system.requirements],
            check=True,
        )
        stamp.write_text(wanted)
    return str(home / "bin" / "python")


def database_for(server: str, system: str) -> str:
    parts = urlsplit(server)
    return urlunsplit(parts._replace(path=f"/bench_{system}"))


def run_one(system: System, workload: str, server: str, quick: bool) -> dict[str, Any]:
    command = [
        python_for(system),
        str(ROOT / system.script),
        workload,
        "--url",
        database_for(server, system.name),
        *(["--quick"] if quick else []),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_")}
    env["PYTHONPATH"] = str(ROOT) if not system.requirements else ""
    done = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=900, check=False
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        print(f"  {system.name} {workload} failed: {' | '.join(tail)}", file=sys.stderr)
        return {}
    figures: dict[str, Any] = json.loads(lines[-1])
    if workload == "W6":
        figures["journal_loads"] = figures.get("queries_by_call", {}).get("load_journal", 0)
    return figures


def median_of(samples: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples if key in s]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        merged[key] = statistics.median(values) if numeric else values[-1]
    return merged


def server_version(server: str) -> str:
    import asyncio

    import asyncpg

    async def read() -> str:
        conn = await asyncpg.connect(server)
        try:
            return str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()

    return asyncio.run(read())


def commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return done.stdout.strip() or "unknown"


def table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    peers = [s.name for s in SYSTEMS if s.name != "durable" and s.name in results]
    head = ["figure", "durable", *peers, *(f"durable vs {p}" for p in peers)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for workload, key, label, higher in ROWS:
        ours = results.get("durable", {}).get(workload, {}).get(key)
        cells = [label, _fmt(ours)]
        theirs = [results.get(p, {}).get(workload, {}).get(key) for p in peers]
        cells += [_fmt(v) for v in theirs]
        for value in theirs:
            if ours is None or value is None or not ours or not value:
                cells.append("")
            else:
                ratio = ours / value if higher else value / ours
                cells.append(f"{ratio:.1f}x {'better' if ratio >= 1 else 'worse'}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios_by_round(samples: dict[str, dict[str, dict[int, dict[str, Any]]]], rounds: int) -> str:
    """Each figure's ratio to each peer in every round (rounds where either side failed: -)."""
    peers = [s.name for s in SYSTEMS if s.name != "durable" and s.name in samples]
    head = ["figure", *(f"durable vs {p}, round by round" for p in peers)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    ours_by_round = samples.get("durable", {})
    for workload, key, label, higher in ROWS:
        cells = [label]
        for peer in peers:
            each = []
            for round_ in range(rounds):
                ours = ours_by_round.get(workload, {}).get(round_, {}).get(key)
                theirs = samples[peer].get(workload, {}).get(round_, {}).get(key)
                if not ours or not theirs:
                    each.append("-")
                else:
                    each.append(f"{(ours / theirs if higher else theirs / ours):.1f}x")
            cells.append(", ".join(each) if any(c != "-" for c in each) else "")
        if any(cells[1:]):
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"
    return str(value)


def resolve_server(given: str | None) -> str:
    url = given or os.environ.get("DURABLE_DATABASE_URL")
    if url:
        return url
    sys.path.insert(0, str(ROOT))
    from durable import _embedded

    server = _embedded.acquire()
    return urlunsplit(urlsplit(server.dsn)._replace(path="/postgres"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", help="any database on the server to use")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--only", help="comma-separated systems (default: all)")
    parser.add_argument("--workloads", help="comma-separated workloads (default: all)")
    args = parser.parse_args()
    server = resolve_server(args.database_url)
    chosen = [s for s in SYSTEMS if not args.only or s.name in args.only.split(",")]
    wanted = args.workloads.split(",") if args.workloads else list(WORKLOADS)
    samples: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}  # system, workload, round
    failed: list[str] = []
    for round_ in range(args.repeat):
        for workload in wanted:
            for system in chosen:
                if workload not in system.workloads:
                    continue
                print(f"round {round_ + 1}: {system.name} {workload}", file=sys.stderr)
                figures = run_one(system, workload, server, args.quick)
                if figures:
                    samples.setdefault(system.name, {}).setdefault(workload, {})[round_] = figures
                else:
                    failed.append(f"{system.name} {workload} (round {round_ + 1})")
    results = {
        name: {w: median_of(list(runs.values())) for w, runs in by_workload.items()}
        for name, by_workload in samples.items()
    }
    context = {
        "commit": commit(),
        "server": server_version(server),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "repeat": args.repeat,
        "quick": args.quick,
        "worker_concurrency": 100,
        "sizes": "W1 5000, W2 1000 x 5 steps, W3 200, W4 200 x 1 s, W5 200, W6 1000 steps, "
        "W7 1000 x 5 steps over 1M journal rows and 10k suspended runs"
        if not args.quick
        else "quick sizes (see each result's size)",
    }
    print(
        f"\ncommit {context['commit']}, PostgreSQL {context['server']}, Python "
        f"{context['python']}, {context['cpus']} CPUs; one worker process per system with a "
        f"concurrency budget of 100; {context['sizes']}; median of {args.repeat} run(s).\n"
        f"Ratios: how many times durable is better (rates: ours/theirs; latencies: "
        f"theirs/ours).\n"
    )
    print(table(results))
    if args.repeat > 1:
        print(f"\nEach round's ratio (rounds 1 to {args.repeat}, in order):\n")
        print(ratios_by_round(samples, args.repeat))
    rounds = {
        name: {w: [runs.get(r) for r in range(args.repeat)] for w, runs in by_workload.items()}
        for name, by_workload in samples.items()
    }
    RESULTS.write_text(
        json.dumps({"context": context, "results": results, "rounds": rounds}, indent=2) + "\n"
    )
    print(f"\nwritten to {RESULTS.relative_to(ROOT)}", file=sys.stderr)
    if failed:  # the table has gaps: say so in the exit status, not only in the log above
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
