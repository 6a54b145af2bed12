"""DBOS Transact's side of the benchmark (runs in its own virtual environment, not ours).

    python benchmarks/peers/dbos_bench.py W2 --url postgresql://... [--quick]

Synchronous workflows and steps, as DBOS documents them. W1 and W2 go through a queue
(``DBOS.register_queue("bench", worker_concurrency=100)``); W3 and W4 start workflows directly with
``DBOS.start_workflow``, DBOS's fastest path (its queue polls once a second).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from dbos import DBOS, DBOSConfig, Queue

CONCURRENCY = 100
marks: dict[str, float] = {}
overshoot: dict[str, float] = {}


def fresh_database(url: str) -> None:
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    with psycopg.connect(urlunsplit(parts._replace(path="/postgres")), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')


@DBOS.step()
def small(i: int) -> dict[str, int]:
    return {"i": i}


@DBOS.step()
def mark(tag: str) -> None:
    marks[tag] = time.perf_counter()


@DBOS.workflow()
def noop(n: int) -> int:
    return n


@DBOS.workflow()
def five_steps(n: int) -> int:
    for i in range(5):
        small(i)
    return n


@DBOS.workflow()
def probe(tag: str) -> None:
    mark(tag)


@DBOS.workflow()
def napper(tag: str) -> None:
    before = time.perf_counter()
    DBOS.sleep(1.0)
    overshoot[tag] = (time.perf_counter() - before - 1.0) * 1000


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def w1(queue: Queue, n: int) -> dict[str, Any]:
    began, cpu = time.perf_counter(), time.process_time()
    handles = [queue.enqueue(noop, i) for i in range(n)]
    for handle in handles:
        handle.get_result()
    return {
        "e2e_per_s": n / (time.perf_counter() - began),
        "e2e_cpu_us_per_run": (time.process_time() - cpu) / n * 1e6,
    }


def w2(queue: Queue, n: int) -> dict[str, Any]:
    began, cpu = time.perf_counter(), time.process_time()
    handles = [queue.enqueue(five_steps, i) for i in range(n)]
    for handle in handles:
        handle.get_result()
    rate = n / (time.perf_counter() - began)
    per_step = (time.process_time() - cpu) / (5 * n)
    return {"workflows_per_s": rate, "steps_per_s": 5 * rate, "cpu_us_per_step": per_step * 1e6}


def w3(queue: Queue, n: int) -> dict[str, Any]:
    latencies = []
    for i in range(n):
        tag = f"p{i}"
        began = time.perf_counter()
        DBOS.start_workflow(probe, tag).get_result()
        latencies.append((marks[tag] - began) * 1000)
        time.sleep(random.uniform(0, 0.25))
    return {"p50_ms": statistics.median(latencies), "p99_ms": pct(latencies, 0.99)}


def w4(queue: Queue, n: int) -> dict[str, Any]:
    handles = [DBOS.start_workflow(napper, f"n{i}") for i in range(n)]
    for handle in handles:
        handle.get_result()
    late = list(overshoot.values())
    return {
        "late_p50_ms": statistics.median(late),
        "late_p99_ms": pct(late, 0.99),
        "late_max_ms": max(late),
    }


SIZES = {"W1": (5000, 500), "W2": (1000, 200), "W3": (200, 40), "W4": (200, 50)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workload", choices=sorted(SIZES))
    parser.add_argument("--url", required=True)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    size = SIZES[args.workload][1 if args.quick else 0]
    fresh_database(args.url)
    config: DBOSConfig = {"name": "bench", "system_database_url": args.url, "log_level": "WARNING"}
    DBOS(config=config)
    DBOS.launch()
    queue = DBOS.register_queue("bench", worker_concurrency=CONCURRENCY)
    try:
        runner = {"W1": w1, "W2": w2, "W3": w3, "W4": w4}[args.workload]
        figures = runner(queue, size)
    finally:
        DBOS.destroy()
    print(json.dumps({"system": "dbos", "workload": args.workload, "size": size, **figures}))


if __name__ == "__main__":
    main()
