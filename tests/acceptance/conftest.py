"""Worker processes for the acceptance tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


class Workers:
    """Starts `durable worker tests.acceptance.workflows:app` processes and cleans them up."""

    def __init__(self, database_url: str, tmp: Path) -> None:
        self.database_url = database_url
        self.counters = tmp / "counters"
        self.gates = tmp / "gates"
        self.logs = tmp / "logs"
        for folder in (self.counters, self.gates, self.logs):
            folder.mkdir()
        self.processes: list[subprocess.Popen[bytes]] = []

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "DURABLE_DATABASE_URL": self.database_url,
            "COUNTER_DIR": str(self.counters),
            "GATE_DIR": str(self.gates),
            "PYTHONPATH": str(ROOT),
            **extra,
        }

    def start(
        self,
        *,
        module: str = "durable",
        app: str = "tests.acceptance.workflows:app",
        concurrency: int = 4,
        args: tuple[str, ...] = (),
        **extra: str,
    ) -> subprocess.Popen[bytes]:
        """A worker process of ``app``; ``module`` is what runs the CLI
        (tests.acceptance.skewed for a wrong clock), ``args`` more arguments for it, ``extra``
        its environment."""
        log = self.logs / f"worker-{len(self.processes)}.log"
        with log.open("wb") as out:  # the child keeps its own copy of the descriptor
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    module,
                    "worker",
                    app,
                    "--concurrency",
                    str(concurrency),
                    *args,
                ],
                cwd=ROOT,
                env=self.env(**extra),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.processes.append(process)
        return process

    def log_of(self, process: subprocess.Popen[bytes]) -> str:
        return (self.logs / f"worker-{self.processes.index(process)}.log").read_text()

    def cli(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        """``durable ARGS`` in a process of its own, with ``extra`` in its environment."""
        return subprocess.run(
            [sys.executable, "-m", "durable", *args],
            cwd=ROOT,
            env=self.env(**extra),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def count(self, name: str) -> int:
        path = self.counters / name
        return len(path.read_text().splitlines()) if path.exists() else 0

    def lines(self, name: str) -> list[str]:
        path = self.counters / name
        return path.read_text().splitlines() if path.exists() else []

    def open_gate(self, name: str) -> None:
        (self.gates / name).touch()

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)
                process.kill()
            process.wait(timeout=30)


@pytest.fixture
def workers(database_url: str, tmp_path: Path) -> Iterator[Workers]:
    pool = Workers(database_url, tmp_path)
    yield pool
    pool.stop_all()
    # Shown by pytest only when the test failed: what each worker said up to then.
    for index, process in enumerate(pool.processes):
        print(f"--- worker {index} (exit {process.returncode}) ---\n{pool.log_of(process)}")


def counted(workers: Workers, name: str, at_least: int = 1) -> Callable[[], bool]:
    return lambda: workers.count(name) >= at_least
