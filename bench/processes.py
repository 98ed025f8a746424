"""The benchmark's cast as real processes: simulated switches, the proxy, load generators;
and what the kernel says each one spent (CPU time, resident memory)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio

T = TypeVar("T")
TICKS = os.sysconf("SC_CLK_TCK")
STARTUP_TIMEOUT = 30.0


async def until_signalled(main: Callable[[], Awaitable[T]]) -> T:
    """Run `main`; SIGTERM or SIGINT cancels it, so that every child process is stopped
    and the benchmark's schema dropped before the harness exits."""
    results: list[T] = []
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signal)
            results.append(await main())
            nursery.cancel_scope.cancel()
    if not results:
        raise SystemExit("stopped by a signal; children stopped, schema dropped")
    return results[0]


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _stat(entry: Path) -> list[str]:
    """The fields of /proc/PID/stat after the command name (which may hold spaces)."""
    return (entry / "stat").read_text().rpartition(")")[2].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU the process has used so far (its own threads included)."""
    fields = _stat(Path(f"/proc/{pid}"))
    return (int(fields[11]) + int(fields[12])) / TICKS


def parent_pid(entry: Path) -> int:
    """The parent of the process whose /proc folder is `entry`."""
    return int(_stat(entry)[1])


def pids_where(test: Callable[[Path], bool]) -> list[int]:
    """The processes whose /proc folder passes `test` (any that end meanwhile are left
    out)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if test(entry):
                    found.append(int(entry.name))
    return found


def rss_bytes(pid: int) -> int:
    """Resident memory of the process now."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def postgres_pids() -> list[int]:
    """Every PostgreSQL server process on this machine (the cluster's CPU is theirs)."""
    return pids_where(lambda entry: (entry / "comm").read_text().strip() == "postgres")


def postgres_cpu_seconds() -> float:
    """CPU used so far by the PostgreSQL processes alive now (backends come and go: take
    deltas over a case whose connections stay open, as the proxy's pool does)."""
    total = 0.0
    for pid in postgres_pids():
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


@dataclass
class Service:
    """A long-running child process (switch or proxy) and where it listens."""

    name: str
    process: trio.Process
    port: int

    @property
    def pid(self) -> int:
        return self.process.pid


async def wait_listening(
    port: int, process: trio.Process, name: str, log: Path | None = None
) -> None:
    """Wait until something accepts on `port` (or the process died: its log's end then
    comes with the error)."""
    with trio.fail_after(STARTUP_TIMEOUT):
        while True:
            if process.returncode is not None:
                tail = _tail(log) if log else ""
                raise RuntimeError(
                    f"{name} exited with {process.returncode} before listening\n{tail}"
                )
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)  # nothing to wait on but the port itself
                continue
            await stream.aclose()
            return


async def start_service(
    nursery: trio.Nursery,
    name: str,
    argv: Sequence[str],
    port: int,
    env: dict[str, str] | None = None,
    log: Path | None = None,
) -> Service:
    """Start `python -m ARGV...` and wait until it listens on `port`."""
    process = await nursery.start(
        supervise, [sys.executable, "-m", *argv], {**os.environ, **(env or {})}, log
    )
    await wait_listening(port, process, name, log)
    return Service(name, process, port)


async def supervise(
    argv: list[str],
    env: dict[str, str],
    log: Path | None,
    *,
    task_status: trio.TaskStatus[trio.Process],
) -> None:
    """Run a child (its output appended to `log`) until cancelled, then stop it: SIGTERM,
    then SIGKILL after 5 s."""
    with contextlib.ExitStack() as files:
        output: Any = files.enter_context(log.open("ab")) if log else subprocess.DEVNULL
        process = await trio.lowlevel.open_process(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=output
        )
        try:
            task_status.started(process)
            await process.wait()
        finally:
            await _stop(process)


async def _stop(process: trio.Process) -> None:
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.terminate()
            with trio.move_on_after(5):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


async def run_json(argv: Sequence[str]) -> dict[str, Any]:
    """Run `python -m ARGV...` to completion; the JSON object it printed last."""
    result = await trio.run_process(
        [sys.executable, "-m", *argv], capture_stdout=True, capture_stderr=True, check=False
    )
    if result.returncode != 0:
        tail = result.stderr.decode(errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(argv[:2])} failed ({result.returncode}): {tail}")
    summary: dict[str, Any] = json.loads(result.stdout.decode().strip().splitlines()[-1])
    return summary


@contextlib.contextmanager
def measured(pid: int, switches: Sequence[int] = ()) -> Iterator[dict[str, float]]:
    """CPU seconds of `pid`, of the `switches` and of PostgreSQL over the block, in the
    dict yielded."""
    found: dict[str, float] = {}
    proxy_before, pg_before = cpu_seconds(pid), postgres_cpu_seconds()
    switches_before = sum(cpu_seconds(switch) for switch in switches)
    yield found
    found["cpu_s"] = cpu_seconds(pid) - proxy_before
    found["postgres_cpu_s"] = max(0.0, postgres_cpu_seconds() - pg_before)
    found["switches_cpu_s"] = sum(cpu_seconds(switch) for switch in switches) - switches_before


def machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPU ({model}), {memory:.0f} GiB, Python {sys.version.split()[0]}"


def _tail(log: Path) -> str:
    """The end of a child's log (for the error that says it died)."""
    return log.read_text(errors="replace")[-2000:]
