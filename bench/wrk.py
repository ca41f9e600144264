"""Run wrk with bench/lua/post.lua and parse what it prints.

The Lua script's ``done()`` prints one JSON line with the totals and the
latency percentiles; that line is the source of every figure. wrk's own text
summary is parsed too, as a cross-check and for the error counts it prints.
"""

from __future__ import annotations

import dataclasses
import json
import re
import resource
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.servers import pinned

LUA_SCRIPT = Path(__file__).resolve().parent / "lua" / "post.lua"
PERCENTILES = ("p50", "p90", "p99", "p99.9")
ERROR_KINDS = ("connect", "read", "write", "status", "timeout")
# Seconds to wait for wrk beyond the run's duration and its request timeout.
EXIT_GRACE_SECONDS = 30


class WrkFailed(Exception):
    """wrk exited with an error or printed no summary line."""


@dataclass(frozen=True)
class WrkRequest:
    """The request that every wrk connection sends over and over."""

    url: str
    body_file: Path
    content_type: str
    authorization: str = ""


@dataclass(frozen=True)
class WrkRun:
    """Totals and latencies of one wrk run, in requests, bytes and microseconds.

    ``errors["status"]`` counts responses with a status of 400 or more, as
    wrk 4.1 does; the other kinds are socket errors and timeouts.
    """

    connections: int
    threads: int
    duration_s: float
    requests: int
    bytes: int
    errors: dict[str, int]
    latency_us: dict[str, float]
    # CPU time that wrk itself used, to tell when the load generator saturates.
    load_generator_cpu_seconds: float | None = None
    text_requests_per_second: float | None = None

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def error_responses(self) -> int:
        return self.errors.get("status", 0)

    @property
    def socket_errors(self) -> int:
        return sum(self.errors.get(kind, 0) for kind in ERROR_KINDS if kind != "status")

    @property
    def error_count(self) -> int:
        return self.error_responses + self.socket_errors

    @property
    def load_generator_cpu_share(self) -> float | None:
        if self.load_generator_cpu_seconds is None or self.duration_s <= 0:
            return None
        return self.load_generator_cpu_seconds / self.duration_s

    def to_json(self) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "threads": self.threads,
            "duration_s": self.duration_s,
            "requests": self.requests,
            "requests_per_second": self.requests_per_second,
            "bytes": self.bytes,
            "errors": dict(self.errors),
            "latency_us": dict(self.latency_us),
            "load_generator_cpu_seconds": self.load_generator_cpu_seconds,
            "text_requests_per_second": self.text_requests_per_second,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WrkRun:
        return cls(
            connections=int(data["connections"]),
            threads=int(data["threads"]),
            duration_s=float(data["duration_s"]),
            requests=int(data["requests"]),
            bytes=int(data["bytes"]),
            errors={kind: int(data["errors"].get(kind, 0)) for kind in ERROR_KINDS},
            latency_us={key: float(value) for key, value in data["latency_us"].items()},
            load_generator_cpu_seconds=data.get("load_generator_cpu_seconds"),
            text_requests_per_second=data.get("text_requests_per_second"),
        )


def parse_summary_line(stdout: str) -> dict[str, Any]:
    """Return the JSON object that post.lua's ``done()`` printed.

    Raises WrkFailed when no such line is found or a field is missing.
    """
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            summary = json.loads(line)
        except ValueError as error:
            raise WrkFailed(
                f"invalid summary line from post.lua: {error}: {line}"
            ) from None
        if not isinstance(summary, dict):
            continue
        missing = [
            key for key in ("requests", "duration_us", "bytes", "errors", "latency_us")
            if key not in summary
        ]  # fmt: skip
        missing += [
            f"errors.{kind}"
            for kind in ERROR_KINDS
            if kind not in summary.get("errors", {})
        ]
        missing += [
            f"latency_us.{name}"
            for name in PERCENTILES
            if name not in summary.get("latency_us", {})
        ]
        if missing:
            raise WrkFailed(
                f"summary line from post.lua lacks {', '.join(missing)}: {line}"
            )
        return summary
    raise WrkFailed("wrk printed no JSON summary line; did post.lua's done() run?")


@dataclass(frozen=True)
class WrkText:
    """The figures of wrk's own text summary."""

    requests: int | None = None
    duration_s: float | None = None
    requests_per_second: float | None = None
    error_responses: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)


_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_TOTALS = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h),")
_RATE = re.compile(r"^Requests/sec:\s+([\d.]+)")
_NON_2XX = re.compile(r"^\s*Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET_ERRORS = re.compile(
    r"^\s*Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
)


def parse_text(stdout: str) -> WrkText:
    """Parse the totals, rate and error lines of wrk 4.1's text summary."""
    requests = duration = rate = None
    error_responses = 0
    socket_errors: dict[str, int] = {}
    for line in stdout.splitlines():
        if match := _TOTALS.match(line):
            requests = int(match[1])
            duration = float(match[2]) * _TIME_UNITS[match[3]]
        elif match := _RATE.match(line):
            rate = float(match[1])
        elif match := _NON_2XX.match(line):
            error_responses = int(match[1])
        elif match := _SOCKET_ERRORS.match(line):
            socket_errors = dict(
                zip(
                    ("connect", "read", "write", "timeout"),
                    map(int, match.groups()),
                    strict=True,
                )
            )
    return WrkText(requests, duration, rate, error_responses, socket_errors)


def parse_output(stdout: str, connections: int, threads: int) -> WrkRun:
    """Build a WrkRun from wrk's standard output.

    Raises WrkFailed when the JSON line and the text summary disagree on the
    error counts, which would mean one of the two parsers is wrong.
    """
    summary = parse_summary_line(stdout)
    text = parse_text(stdout)
    errors = {kind: int(summary["errors"][kind]) for kind in ERROR_KINDS}
    if text.error_responses != errors["status"]:
        raise WrkFailed(
            f"wrk's text reports {text.error_responses} error responses, "
            f"post.lua reports {errors['status']}"
        )
    for kind, count in text.socket_errors.items():
        if count != errors[kind]:
            raise WrkFailed(
                f"wrk's text reports {count} {kind} errors, "
                f"post.lua reports {errors[kind]}"
            )
    return WrkRun(
        connections=connections,
        threads=threads,
        duration_s=int(summary["duration_us"]) / 1e6,
        requests=int(summary["requests"]),
        bytes=int(summary["bytes"]),
        errors=errors,
        latency_us={key: float(value) for key, value in summary["latency_us"].items()},
        text_requests_per_second=text.requests_per_second,
    )


def wrk_command(
    wrk: str,
    request: WrkRequest,
    connections: int,
    duration_s: int,
    timeout_s: int,
    threads: int = 1,
) -> list[str]:
    argv = [
        wrk,
        "--threads", str(threads),
        "--connections", str(connections),
        "--duration", f"{duration_s}s",
        "--timeout", f"{timeout_s}s",
        "--script", str(LUA_SCRIPT),
        request.url,
        "--",
        str(request.body_file),
        request.content_type,
    ]  # fmt: skip
    if request.authorization:
        argv.append(request.authorization)
    return argv


def run_wrk(
    wrk: str,
    request: WrkRequest,
    connections: int,
    duration_s: int,
    timeout_s: int,
    cpus: str | None,
    taskset: str | None,
    threads: int = 1,
) -> WrkRun:
    """Run wrk once and return its parsed results, with wrk's own CPU time."""
    argv = pinned(
        wrk_command(wrk, request, connections, duration_s, timeout_s, threads),
        cpus,
        taskset,
    )
    wait_s = duration_s + timeout_s + EXIT_GRACE_SECONDS

    # wrk is the only child reaped during the run, so the change in the
    # children's CPU time is wrk's.
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=wait_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise WrkFailed(f"wrk did not exit within {wait_s} s; killed it") from None
    except BaseException:
        process.kill()
        process.wait()
        raise
    after = resource.getrusage(resource.RUSAGE_CHILDREN)

    if process.returncode != 0:
        raise WrkFailed(
            f"wrk exited with status {process.returncode}: "
            f"{stderr.strip() or stdout.strip()}"
        )
    if stderr.strip():
        # wrk prints Lua errors to standard error and carries on.
        raise WrkFailed(f"wrk printed errors: {stderr.strip()}")
    run = parse_output(stdout, connections, threads)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return dataclasses.replace(run, load_generator_cpu_seconds=cpu)
