"""bench/run: measure the gateway against nginx on one machine, side by side.

Every case sends the same kind of load with wrk to a server that the harness
starts itself, all in front of one fixed-response nginx upstream. See
bench/README.md for the cases and the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

from bench import environment, procfs, report
from bench.cases import (
    CACHE_MISSING_REASON,
    CASES,
    FULL,
    GATEWAY,
    JSON_TYPE,
    MULTIPART_MISSING_REASON,
    PROXY,
    QUICK,
    REQUEST_TIMEOUT_SECONDS,
    UNCACHED_OVERRIDE,
    UPLOAD_BYTES,
    Case,
    Durations,
    LoadPlan,
    gateway_has_cache_setting,
    load_plan,
    select_cases,
    tiny_multipart_body,
    write_multipart_body,
)
from bench.report import CaseResult, MachineUsage, ServerUsage
from bench.servers import (
    FIXED_RESPONSE,
    ManagedProcess,
    StartupFailed,
    free_port,
    http_request,
    pinned,
    proxy_config,
    start_gateway,
    start_nginx,
    start_redis,
    upstream_config,
)
from bench.wrk import WrkFailed, WrkRequest, WrkRun, run_wrk

REPOSITORY = Path(__file__).resolve().parent.parent
RESULTS_JSON = REPOSITORY / "bench" / "results" / "latest.json"
QUICK_RESULTS_JSON = REPOSITORY / "bench" / "results" / "quick.json"
RESULTS_PAGE = REPOSITORY / "bench" / "RESULTS.md"

PRINCIPAL = "bench"
STORED_TOKEN = "bench-misskey-token"  # noqa: S105 - made up; the upstream ignores it
JWT_TTL_SECONDS = 24 * 3600
WRK_THREADS = 1
GATEWAY_LOG_LEVEL = "info"
# Variables not passed on to the gateway: its own settings, and interpreter
# settings such as PYTHONUNBUFFERED, which makes every log line a write(2).
STRIPPED_ENV_PREFIXES = ("MISSKEY_GATEWAY_", "PYTHON")


@dataclass(frozen=True)
class Pinning:
    """CPU lists for taskset: wrk on one core, every server on the others."""

    load_cpus: str | None
    server_cpus: str | None
    description: str


@dataclass(frozen=True)
class Tools:
    wrk: str
    nginx: str
    taskset: str | None
    redis_server: str | None
    gateway: str


class CaseFailed(Exception):
    """A case could not be measured; the message states the cause."""


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run",
        description="Measure the gateway against nginx on this machine with wrk.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"short runs ({QUICK.throughput} s throughput, {QUICK.latency} s "
        f"latency, {QUICK.warmup} s warm-up), written to bench/results/quick.json "
        "only",
    )

    parser.add_argument(
        "--cases",
        metavar="LIST",
        help="comma-separated case numbers or names to run (default: all): "
        + ", ".join(f"{case.number} {case.name}" for case in CASES),
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="gateway worker processes (serve --workers N), and nginx worker "
        "processes of the upstream and the proxy (default 1)",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=32,
        metavar="N",
        help="wrk connections of the throughput runs (default 32)",
    )

    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin wrk and the servers to separate CPU cores",
    )
    parser.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep the run directory with configs and server logs, and print its path",
    )

    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, not {args.workers}")
    if args.connections < 1:
        parser.error(f"--connections must be at least 1, not {args.connections}")
    try:
        args.selected = select_cases(args.cases)
    except ValueError as error:
        parser.error(str(error))
    return args


def find_tools(needs_redis: bool, needs_taskset: bool) -> Tools:
    """Locate the programs the run needs; exit with a message naming any missing."""
    found: dict[str, str | None] = {}
    for name in ("wrk", "nginx", "taskset", "redis-server"):
        found[name] = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    required = ["wrk", "nginx"]
    required += ["redis-server"] if needs_redis else []
    required += ["taskset"] if needs_taskset else []
    missing = [name for name in required if found[name] is None]
    gateway = Path(sys.executable).parent / "misskey-gateway"
    if not gateway.exists():
        missing.append(f"misskey-gateway (expected next to {sys.executable})")
    if missing:
        raise SystemExit(
            f"bench/run: not found: {', '.join(missing)}; run bench/setup first"
        )
    return Tools(
        wrk=str(found["wrk"]),
        nginx=str(found["nginx"]),
        taskset=found["taskset"],
        redis_server=found["redis-server"] if needs_redis else None,
        gateway=str(gateway),
    )


def choose_pinning(enabled: bool) -> Pinning:
    """Put wrk on the first allowed core and the servers on the rest (≥ 2 cores)."""
    allowed = sorted(os.sched_getaffinity(0))
    if not enabled:
        return Pinning(None, None, f"none (--no-pin; {len(allowed)} cores allowed)")
    if len(allowed) < 2:
        return Pinning(None, None, "none (only one core allowed)")
    load = str(allowed[0])
    servers = ",".join(str(cpu) for cpu in allowed[1:])
    return Pinning(
        load,
        servers,
        f"wrk on CPU {load}; upstream nginx, proxy nginx, gateway and Redis on "
        f"CPU {servers} (taskset --cpu-list)",
    )


@dataclass(frozen=True)
class CpuReading:
    """CPU seconds of the benchmark's servers and of the machine at one moment."""

    server: float
    upstream: float | None
    redis: float | None
    machine: procfs.MachineCpu
    monotonic: float  # time.monotonic() seconds


def _difference(after: float | None, before: float | None) -> float | None:
    if after is None or before is None:
        return None
    return after - before


def server_usage(
    before: CpuReading,
    after: CpuReading,
    idle: procfs.TreeUsage,
    peak: procfs.TreeUsage,
) -> ServerUsage:
    """Combine readings around the throughput run with the memory readings."""
    return ServerUsage(
        processes=len(peak.pids),
        cpu_seconds=after.server - before.server,
        idle_rss_kib=idle.rss_kib,
        peak_rss_kib=peak.peak_rss_kib,
        max_process_peak_rss_kib=peak.max_process_peak_rss_kib,
        upstream_cpu_seconds=_difference(after.upstream, before.upstream),
        redis_cpu_seconds=_difference(after.redis, before.redis),
    )


def machine_usage(before: CpuReading, after: CpuReading, run: WrkRun) -> MachineUsage:
    """Estimate the CPU time used outside the benchmark during a wrk run."""
    benchmark = after.server - before.server
    benchmark += _difference(after.upstream, before.upstream) or 0.0
    benchmark += _difference(after.redis, before.redis) or 0.0
    benchmark += run.load_generator_cpu_seconds or 0.0
    processes = after.machine.process_seconds - before.machine.process_seconds
    interrupts = after.machine.interrupt_seconds - before.machine.interrupt_seconds
    return MachineUsage(
        duration_s=after.monotonic - before.monotonic,
        # Without CONFIG_IRQ_TIME_ACCOUNTING a process's stime includes the
        # interrupts handled while it ran, which /proc/stat counts apart.
        other_process_cpu_seconds=processes + interrupts - benchmark,
        interrupt_cpu_seconds=interrupts,
        steal_cpu_seconds=after.machine.steal_seconds - before.machine.steal_seconds,
    )


class Bench:
    """One harness run: the shared servers, then each case in turn.

    Used as a context manager, so every server it started is stopped on
    return, on an exception and on Ctrl-C.
    """

    def __init__(
        self,
        tools: Tools,
        pinning: Pinning,
        run_dir: Path,
        durations: Durations,
        connections: int,
        workers: int,
    ):
        self.tools = tools
        self.pinning = pinning
        self.run_dir = run_dir
        self.durations = durations
        self.connections = connections
        self.workers = workers
        self.stack = contextlib.ExitStack()
        self.upstream: ManagedProcess | None = None
        self.upstream_port = 0
        self.redis: ManagedProcess | None = None
        self.redis_url = ""
        self.jwt_secret = secrets.token_hex(32)
        self.jwts: dict[str, str] = {}
        self.observed_affinity: dict[str, str] = {}

    def __enter__(self) -> Bench:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stack.close()

    def _record_affinity(self, process: ManagedProcess, label: str) -> None:
        self.observed_affinity[label] = procfs.cpu_affinity(process.pid)

    # Shared servers and credentials

    def start_upstream(self) -> None:
        self.upstream_port = free_port()
        config = upstream_config(self.run_dir, self.upstream_port, self.workers)
        self.upstream = start_nginx(
            self.tools.nginx,
            "upstream",
            config,
            self.run_dir,
            self.upstream_port,
            self.pinning.server_cpus,
            self.tools.taskset,
        )
        self.stack.callback(self.upstream.stop)
        self._record_affinity(self.upstream, "upstream nginx")
        status, body = http_request("POST", f"{self.upstream_url}/api/meta", b"{}")
        if status != 200 or body != FIXED_RESPONSE.encode():
            raise StartupFailed(f"upstream nginx returned {status} {body!r}")

    @property
    def upstream_url(self) -> str:
        return f"http://127.0.0.1:{self.upstream_port}"

    def issue_jwts(self, cases: Sequence[Case]) -> None:
        """Issue one JWT per scope that the cases send, signed with the run's secret."""
        for scope in {case.scope for case in cases if case.scope is not None}:
            self.jwts[scope] = self._gateway_command(
                ["jwt", "issue", PRINCIPAL, "--scope", scope]
                + ["--ttl", str(JWT_TTL_SECONDS)]
            ).strip()

    def start_store(self) -> None:
        """Start Redis and store the principal's Misskey token in it."""
        if self.tools.redis_server is None:
            raise StartupFailed("redis-server is needed by the gateway cases")
        redis, port = start_redis(
            self.tools.redis_server,
            self.run_dir,
            self.pinning.server_cpus,
            self.tools.taskset,
        )
        self.redis = redis
        self.stack.callback(redis.stop)
        self._record_affinity(redis, "redis-server")
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        self._gateway_command(
            ["token", "set", PRINCIPAL, "--store", self.redis_url], stdin=STORED_TOKEN
        )

    def gateway_env(self, overrides: dict[str, str] | None = None) -> dict[str, str]:
        """Return the environment of gateway commands, without inherited settings."""
        env = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(STRIPPED_ENV_PREFIXES)
        }
        env["MISSKEY_GATEWAY_JWT_SECRET"] = self.jwt_secret
        env["MISSKEY_GATEWAY_LOG_LEVEL"] = GATEWAY_LOG_LEVEL
        # Keeps an accidental default SQLite store out of the user's data folder.
        env["XDG_DATA_HOME"] = str(self.run_dir / "xdg-data")
        env.update(overrides or {})
        return env

    def _gateway_command(self, arguments: list[str], stdin: str = "") -> str:
        result = subprocess.run(
            [self.tools.gateway, *arguments],
            input=stdin,
            capture_output=True,
            text=True,
            env=self.gateway_env(),
            check=False,
        )
        if result.returncode != 0:
            raise StartupFailed(
                f"misskey-gateway {' '.join(arguments[:2])} exited with status "
                f"{result.returncode}: {result.stderr.strip()}"
            )
        return result.stdout

    # Cases

    def run_case(self, case: Case) -> CaseResult:
        """Start the case's server, measure it and stop it; return what it measured."""
        try:
            with contextlib.ExitStack() as case_stack:
                return self._run_case(case, case_stack)
        except (CaseFailed, StartupFailed, WrkFailed, RuntimeError, OSError) as error:
            return CaseResult(case.name, case.description, "failed", str(error))

    def _run_case(self, case: Case, case_stack: contextlib.ExitStack) -> CaseResult:
        if case.needs_token_cache and not gateway_has_cache_setting(sys.executable):
            return CaseResult(
                case.name, case.description, "skipped", CACHE_MISSING_REASON
            )
        server, port = self._start_server(case, case_stack)
        request = self._request(case, port)
        if case.upload:
            if not self._gateway_accepts_multipart(request):
                return CaseResult(
                    case.name, case.description, "skipped", MULTIPART_MISSING_REASON
                )
            content_type = write_multipart_body(request.body_file, UPLOAD_BYTES)
            request = replace(request, content_type=content_type)
        else:
            self._check_response(server, request)
        plan = load_plan(case, self.durations, self.connections)
        return self._measure(case, server, request, plan)

    def _start_server(
        self, case: Case, case_stack: contextlib.ExitStack
    ) -> tuple[ManagedProcess, int]:
        """Start the server a case measures, or return the shared upstream."""
        if case.server == PROXY:
            port = free_port()
            config = proxy_config(self.run_dir, port, self.upstream_port, self.workers)
            proxy = start_nginx(
                self.tools.nginx,
                "proxy",
                config,
                self.run_dir,
                port,
                self.pinning.server_cpus,
                self.tools.taskset,
            )
            case_stack.callback(proxy.stop)
            self._record_affinity(proxy, "proxy nginx")
            return proxy, port
        if case.server == GATEWAY:
            return self._start_gateway(case, case_stack)
        if self.upstream is None:
            raise StartupFailed("the upstream nginx was not started")
        return self.upstream, self.upstream_port

    def _start_gateway(
        self, case: Case, case_stack: contextlib.ExitStack
    ) -> tuple[ManagedProcess, int]:
        port = free_port()
        argv = [
            self.tools.gateway, "serve",
            "--host", "127.0.0.1",
            "--port", str(port),
            "--upstream", self.upstream_url,
            "--store", self.redis_url,
            "--workers", str(self.workers),
        ]  # fmt: skip
        process = start_gateway(
            pinned(argv, self.pinning.server_cpus, self.tools.taskset),
            self.gateway_env(dict(case.gateway_env)),
            self.run_dir / f"gateway-{case.name}.log",
            port,
            self.workers,
        )
        case_stack.callback(process.stop)
        self._record_affinity(process, "misskey-gateway")
        return process, port

    def _request(self, case: Case, port: int) -> WrkRequest:
        body_file = self.run_dir / f"{case.name}.body"
        body_file.write_bytes(case.body)
        authorization = ""
        if case.scope is not None:
            authorization = f"Bearer {self.jwts[case.scope]}"
        url = f"http://127.0.0.1:{port}{case.path}"
        return WrkRequest(url, body_file, JSON_TYPE, authorization)

    def _gateway_accepts_multipart(self, request: WrkRequest) -> bool:
        """POST a tiny multipart body; a gateway without multipart returns 415."""
        body, content_type = tiny_multipart_body()
        headers = {"Content-Type": content_type, "Authorization": request.authorization}
        status, response = http_request("POST", request.url, body, headers)
        return not (status == 415 and b"UNSUPPORTED_MEDIA_TYPE" in response)

    def _check_response(self, server: ManagedProcess, request: WrkRequest) -> None:
        """Send the case's request once and check for the upstream's fixed response."""
        headers = {"Content-Type": request.content_type}
        if request.authorization:
            headers["Authorization"] = request.authorization
        body = request.body_file.read_bytes()
        status, response = http_request("POST", request.url, body, headers)
        if status != 200 or response != FIXED_RESPONSE.encode():
            raise CaseFailed(
                f"POST {request.url} returned {status} {response[:300]!r}, expected "
                f"200 {FIXED_RESPONSE}; end of {server.log_path}:\n"
                f"{server.log_tail(10)}"
            )

    def _wrk(
        self, request: WrkRequest, connections: int, seconds: int, timeout: int
    ) -> WrkRun:
        return run_wrk(
            self.tools.wrk,
            request,
            connections,
            seconds,
            timeout,
            self.pinning.load_cpus,
            self.tools.taskset,
            WRK_THREADS,
        )

    def _measure(
        self, case: Case, server: ManagedProcess, request: WrkRequest, plan: LoadPlan
    ) -> CaseResult:
        """Run the warm-up, the throughput run and the latency run against a server.

        A server that exits during a run makes the case fail, with the runs
        measured until then.
        """
        result = CaseResult(
            case.name,
            case.description,
            "ok",
            url=request.url,
            request_body_bytes=request.body_file.stat().st_size,
        )
        idle = procfs.tree_usage(server.pid)
        progress(
            f"{case.name}: {len(idle.pids)} server process(es), "
            f"idle RSS {idle.rss_kib / 1024:.1f} MiB"
        )
        try:
            if plan.warmup_s > 0:
                warmup = self._wrk(
                    request, plan.connections, plan.warmup_s, plan.timeout_s
                )
                result = replace(result, warmup=warmup)
                self._require_running(server, "the warm-up")

            before = self._cpu_reading(server)
            throughput = self._wrk(
                request, plan.connections, plan.throughput_s, plan.timeout_s
            )
            after = self._cpu_reading(server)
            result = replace(result, throughput=throughput)
            progress(
                f"{case.name}: {throughput.requests_per_second:.0f} req/s at "
                f"{plan.connections} connections, {throughput.error_count} errors"
            )
            self._require_running(server, "the throughput run")
            result = replace(
                result, throughput_machine=machine_usage(before, after, throughput)
            )

            latency_before = self._cpu_reading(server)
            latency = self._wrk(request, 1, plan.latency_s, plan.timeout_s)
            latency_after = self._cpu_reading(server)
            result = replace(result, latency=latency)
            self._require_running(server, "the latency run")
            latency_machine = machine_usage(latency_before, latency_after, latency)
            result = replace(result, latency_machine=latency_machine)
        except CaseFailed as error:
            return replace(result, status="failed", reason=str(error))

        peak = procfs.tree_usage(server.pid)
        return replace(result, usage=server_usage(before, after, idle, peak))

    def _cpu_reading(self, server: ManagedProcess) -> CpuReading:
        upstream = redis = None
        if self.upstream is not None and self.upstream is not server:
            upstream = procfs.tree_usage(self.upstream.pid).cpu_seconds
        if self.redis is not None and server.name == "misskey-gateway":
            redis = procfs.tree_usage(self.redis.pid).cpu_seconds
        return CpuReading(
            server=procfs.tree_usage(server.pid).cpu_seconds,
            upstream=upstream,
            redis=redis,
            machine=procfs.machine_cpu(),
            monotonic=time.monotonic(),
        )

    @staticmethod
    def _require_running(server: ManagedProcess, stage: str) -> None:
        code = server.exit_code()
        if code is None:
            return
        how = f"was killed by signal {-code}" if code < 0 else f"exited with {code}"
        tail = server.log_tail(30, skip=is_request_event)
        raise CaseFailed(
            f"{server.name} {how} during {stage}; end of {server.log_path} "
            f"without request events:\n{tail}"
        )


def is_request_event(line: str) -> bool:
    """Return whether a gateway log line is a per-request event."""
    try:
        event = json.loads(line)
    except ValueError:
        return False
    return isinstance(event, dict) and event.get("event") == "request"


def progress(message: str) -> None:
    print(f"bench/run: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt, so the servers are stopped as on Ctrl-C."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_metadata(
    args: argparse.Namespace,
    argv: Sequence[str],
    tools: Tools,
    pinning: Pinning,
    durations: Durations,
    observed_affinity: dict[str, str],
    load_average: tuple[float, float, float],
) -> dict[str, Any]:
    return {
        "schema": 1,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["bench/run", *argv]),
        "git": environment.git_state(REPOSITORY),
        "machine": environment.machine(),
        "software": environment.software(tools.nginx, tools.wrk, tools.redis_server),
        "pinning": {
            "description": pinning.description,
            "wrk_cpus": pinning.load_cpus,
            "server_cpus": pinning.server_cpus,
            "observed_cpus_allowed": observed_affinity,
        },
        "settings": {
            "quick": args.quick,
            "cases": [case.name for case in args.selected],
            "connections": args.connections,
            "wrk_threads": WRK_THREADS,
            "warmup_seconds": durations.warmup,
            "throughput_seconds": durations.throughput,
            "latency_seconds": durations.latency,
            "request_timeout_seconds": REQUEST_TIMEOUT_SECONDS,
            "workers": args.workers,
            "store": "Redis (redis-server started by the run, on loopback)",
            "gateway_log_level": GATEWAY_LOG_LEVEL,
            "gateway_env_removed": [f"{prefix}*" for prefix in STRIPPED_ENV_PREFIXES],
            "uncached_override": UNCACHED_OVERRIDE,
            "load_average_at_start": list(load_average),
        },
    }


def run_cases(
    args: argparse.Namespace,
    tools: Tools,
    pinning: Pinning,
    durations: Durations,
    run_dir: Path,
) -> tuple[list[CaseResult], dict[str, str]]:
    """Start the shared servers, run every selected case, and stop everything."""
    results = []
    with Bench(
        tools, pinning, run_dir, durations, args.connections, args.workers
    ) as bench:
        progress(f"run directory {run_dir}; pinning: {pinning.description}")
        bench.start_upstream()
        bench.issue_jwts(args.selected)
        if any(case.server == GATEWAY for case in args.selected):
            bench.start_store()
        for index, case in enumerate(args.selected, start=1):
            progress(f"[{index}/{len(args.selected)}] {case.name}: {case.description}")
            result = bench.run_case(case)
            if result.status != "ok":
                progress(f"{case.name} {result.status}: {result.reason}")
            results.append(result)
        return results, dict(bench.observed_affinity)


def write_outputs(
    args: argparse.Namespace, info: dict[str, Any], results: list[CaseResult]
) -> None:
    """Print the table and notes; write the JSON file and, unless quick, RESULTS.md."""
    rows = report.compute_rows(results)
    print(report.format_text_table(rows, args.connections))
    for note in report.case_notes(results):
        print(note)
    document = report.results_document(info, results, rows)
    if args.quick:
        report.write_json(QUICK_RESULTS_JSON, document)
        progress(f"wrote {QUICK_RESULTS_JSON.relative_to(REPOSITORY)}")
        return
    report.write_json(RESULTS_JSON, document)
    page = report.render_results_page(info, results, rows)
    report.write_results_page(RESULTS_PAGE, page)
    written = [path.relative_to(REPOSITORY) for path in (RESULTS_JSON, RESULTS_PAGE)]
    progress(f"wrote {written[0]} and {written[1]}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected cases; exit 1 when a case failed, 130 when interrupted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    durations = QUICK if args.quick else FULL
    pinning = choose_pinning(not args.no_pin)
    tools = find_tools(
        needs_redis=any(case.server == GATEWAY for case in args.selected),
        needs_taskset=pinning.load_cpus is not None,
    )
    load_average = os.getloadavg()

    run_dir = Path(tempfile.mkdtemp(prefix="misskey-gateway-bench-"))
    if os.geteuid() == 0:
        # nginx workers started by root run as an unprivileged user and must
        # reach their temp directories inside the run directory.
        run_dir.chmod(0o711)
    try:
        with stop_on_sigterm():
            results, observed = run_cases(args, tools, pinning, durations, run_dir)
    except KeyboardInterrupt:
        progress("interrupted; every server started by this run was stopped")
        return 130
    except StartupFailed as error:
        progress(f"start-up failed: {error}")
        return 1
    finally:
        if args.keep_logs:
            progress(f"logs and configs kept in {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)

    info = run_metadata(args, argv, tools, pinning, durations, observed, load_average)
    write_outputs(args, info, results)
    return 1 if any(result.status == "failed" for result in results) else 0
