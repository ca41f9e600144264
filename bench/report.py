"""Case results, the figures derived from them, and the output files."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.wrk import WrkRun

DIRECT = "direct"
REFERENCE_PROXY = "nginx-proxy"
HISTORY_MARKER = "<!-- history -->"
_MARKER_LINE = re.compile(rf"^{re.escape(HISTORY_MARKER)}[ \t]*$", re.MULTILINE)
DEFAULT_HISTORY = f"""{HISTORY_MARKER}
## History

`bench/run` keeps everything below the marker line above. Record here what
each change to the gateway gained, with the commit and the figures before and
after.
"""
# A load generator above this share of its CPU core may be what limits the rate.
LOAD_GENERATOR_SATURATED = 0.9
# CPU time outside the benchmark, or taken by the hypervisor, above this
# share of one core during a wrk run is reported as a disturbance. On the
# quiet 2-core machine of RESULTS.md the estimate stayed below 0.06 in the
# throughput runs, even at 200 000 requests/s.
DISTURBANCE_SHARE = 0.1
LATENCY_COLUMNS = ("p50", "p99", "p99.9")


@dataclass(frozen=True)
class ServerUsage:
    """CPU time and memory of the server processes of one case.

    The CPU times cover the throughput run only. Memory is the sum over the
    process tree, in KiB: resident memory after start-up, and the sum of each
    process's peak (VmHWM) after all runs.
    """

    processes: int
    cpu_seconds: float
    idle_rss_kib: int
    peak_rss_kib: int
    max_process_peak_rss_kib: int
    upstream_cpu_seconds: float | None = None
    redis_cpu_seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class MachineUsage:
    """CPU time of the whole machine during a wrk run, seconds over all cores.

    ``duration_s`` is the wall-clock time between the readings.
    ``other_process_cpu_seconds`` is the busy time of all cores (user,
    system and interrupts) minus the CPU time of wrk and the servers of the
    benchmark: load from outside the benchmark, which disturbs the figures.

    NOTE: this is an estimate that can be negative. /proc/stat samples each
    core once per clock tick, while a process's CPU time is measured
    precisely, so processes that run in short bursts, as in the
    one-connection run, get more time than /proc/stat counts as busy. A
    disturbance in a latency run can therefore go unreported.
    """

    duration_s: float
    other_process_cpu_seconds: float
    interrupt_cpu_seconds: float
    steal_cpu_seconds: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class CaseResult:
    """The measurements of one case, or the reason it was skipped or failed."""

    name: str
    description: str
    status: str  # "ok", "skipped" or "failed"
    reason: str = ""
    url: str = ""
    request_body_bytes: int = 0
    warmup: WrkRun | None = None
    throughput: WrkRun | None = None
    latency: WrkRun | None = None
    usage: ServerUsage | None = None
    # CPU time of the whole machine during the throughput and latency runs.
    throughput_machine: MachineUsage | None = None
    latency_machine: MachineUsage | None = None

    def to_json(self) -> dict[str, Any]:
        def run(value: WrkRun | None) -> dict[str, Any] | None:
            return value.to_json() if value is not None else None

        return {
            "name": self.name,
            "description": self.description,
            "status": self.status,
            "reason": self.reason,
            "url": self.url,
            "request_body_bytes": self.request_body_bytes,
            "warmup": run(self.warmup),
            "throughput": run(self.throughput),
            "latency": run(self.latency),
            "usage": _json_or_none(self.usage),
            "throughput_machine": _json_or_none(self.throughput_machine),
            "latency_machine": _json_or_none(self.latency_machine),
        }


def _json_or_none(value: MachineUsage | ServerUsage | None) -> dict[str, Any] | None:
    return value.to_json() if value is not None else None


@dataclass(frozen=True)
class Row:
    """The figures of one case as the table shows them.

    Latencies and added latencies are in microseconds, memory in MiB.
    ``added_*`` compare the one-connection run with that of the direct case,
    and ``ratio_to_proxy`` the throughput with that of the nginx proxy.
    """

    name: str
    status: str
    reason: str
    requests_per_second: float | None = None
    ratio_to_proxy: float | None = None
    latency_one: dict[str, float] | None = None
    latency_many: dict[str, float] | None = None
    connections: int | None = None
    added_p50_us: float | None = None
    added_p99_us: float | None = None
    cpu_seconds_per_1k: float | None = None
    idle_rss_mib: float | None = None
    peak_rss_mib: float | None = None
    errors: int = 0

    @property
    def flagged(self) -> bool:
        return self.errors > 0

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "flagged": self.flagged}


def _ok(cases: Sequence[CaseResult], name: str) -> CaseResult | None:
    for case in cases:
        if case.name == name and case.status == "ok":
            return case
    return None


def _error_count(case: CaseResult) -> int:
    runs = (case.throughput, case.latency)
    return sum(run.error_count for run in runs if run is not None)


def compute_rows(cases: Sequence[CaseResult]) -> list[Row]:
    """Derive the table rows: added latency, throughput ratio, CPU and memory."""
    direct = _ok(cases, DIRECT)
    proxy = _ok(cases, REFERENCE_PROXY)
    rows = []
    for case in cases:
        if case.status != "ok" or case.throughput is None or case.latency is None:
            rows.append(
                Row(case.name, case.status, case.reason, errors=_error_count(case))
            )
            continue
        rate = case.throughput.requests_per_second
        ratio = None
        if proxy is not None and proxy.throughput is not None:
            reference = proxy.throughput.requests_per_second
            ratio = rate / reference if reference > 0 else None
        added_p50 = added_p99 = None
        if direct is not None and direct.latency is not None:
            added_p50 = (
                case.latency.latency_us["p50"] - direct.latency.latency_us["p50"]
            )
            added_p99 = (
                case.latency.latency_us["p99"] - direct.latency.latency_us["p99"]
            )
        cpu_per_1k = idle = peak = None
        if case.usage is not None:
            if case.throughput.requests > 0:
                cpu_per_1k = case.usage.cpu_seconds / case.throughput.requests * 1000
            idle = case.usage.idle_rss_kib / 1024
            peak = case.usage.peak_rss_kib / 1024
        rows.append(
            Row(
                name=case.name,
                status=case.status,
                reason=case.reason,
                requests_per_second=rate,
                ratio_to_proxy=ratio,
                latency_one={
                    key: case.latency.latency_us[key] for key in LATENCY_COLUMNS
                },
                latency_many={
                    key: case.throughput.latency_us[key] for key in LATENCY_COLUMNS
                },
                connections=case.throughput.connections,
                added_p50_us=added_p50,
                added_p99_us=added_p99,
                cpu_seconds_per_1k=cpu_per_1k,
                idle_rss_mib=idle,
                peak_rss_mib=peak,
                errors=_error_count(case),
            )
        )
    return rows


def case_notes(cases: Sequence[CaseResult]) -> list[str]:
    """List failures, errors, disturbances and saturated load generators."""
    notes = []
    for case in cases:
        if case.status == "failed":
            notes.append(f"{case.name} failed: {case.reason}")
        for label, run in (("throughput", case.throughput), ("latency", case.latency)):
            if run is None:
                continue
            if run.error_count:
                notes.append(
                    f"! {case.name} {label} run: {run.error_responses} responses with "
                    f"status >= 400 and {run.socket_errors} socket errors or timeouts "
                    f"({_format_errors(run.errors)}) out of {run.requests} requests."
                )
            share = run.load_generator_cpu_share
            if share is not None and share >= LOAD_GENERATOR_SATURATED:
                notes.append(
                    f"{case.name} {label} run: wrk used {share:.0%} of its CPU core, "
                    "so the load generator may limit the rate."
                )
        for label, machine in (
            ("throughput", case.throughput_machine),
            ("latency", case.latency_machine),
        ):
            notes += _disturbance_notes(f"{case.name} {label} run", machine)
        if case.request_body_bytes >= 1024 * 1024 and case.throughput is not None:
            mib_per_second = (
                case.throughput.requests * case.request_body_bytes
                / case.throughput.duration_s / (1024 * 1024)
            )  # fmt: skip
            notes.append(
                f"{case.name}: {mib_per_second:.0f} MiB/s of request bodies "
                f"at {case.throughput.connections} connections."
            )
    return notes


def _disturbance_notes(run_name: str, machine: MachineUsage | None) -> list[str]:
    if machine is None or machine.duration_s <= 0:
        return []
    notes = []
    other = machine.other_process_cpu_seconds / machine.duration_s
    steal = machine.steal_cpu_seconds / machine.duration_s
    if other > DISTURBANCE_SHARE:
        notes.append(
            f"{run_name}: other processes and kernel threads used {other:.0%} "
            "of a core, which may have disturbed it."
        )
    if steal > DISTURBANCE_SHARE:
        notes.append(
            f"{run_name}: the hypervisor took {steal:.0%} of a core (steal time)."
        )
    return notes


def _format_errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{kind} {count}" for kind, count in errors.items())


# Table


def table_header(connections: int) -> list[str]:
    return [
        "case", "req/s", "vs nginx",
        "p50 c1", "p99 c1", "p99.9 c1",
        f"p50 c{connections}", f"p99 c{connections}", f"p99.9 c{connections}",
        "+p50 c1", "+p99 c1",
        "CPU s/1k", "RSS idle", "RSS peak", "errors",
    ]  # fmt: skip


def _number(value: float | None, digits: int = 0, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _measured(row: Row) -> bool:
    return row.status == "ok" and row.latency_one is not None


def table_cells(row: Row) -> list[str]:
    """Return a row's cells; a row without figures has two: its name and status."""
    name = f"! {row.name}" if row.flagged else row.name
    if not _measured(row):
        reason = row.reason.splitlines()[0] if row.reason else ""
        return [name, f"{row.status}: {reason}"]
    assert row.latency_one is not None and row.latency_many is not None  # noqa: S101
    return [
        name,
        _number(row.requests_per_second),
        _number(row.ratio_to_proxy, 3),
        *(_number(row.latency_one[key]) for key in LATENCY_COLUMNS),
        *(_number(row.latency_many[key]) for key in LATENCY_COLUMNS),
        _number(row.added_p50_us, sign=True),
        _number(row.added_p99_us, sign=True),
        _number(row.cpu_seconds_per_1k, 3),
        _number(row.idle_rss_mib, 1),
        _number(row.peak_rss_mib, 1),
        str(row.errors),
    ]


def format_text_table(rows: Sequence[Row], connections: int) -> str:
    """Render rows as an aligned plain-text table; a row without figures spans them."""
    header = table_header(connections)
    full = [header] + [table_cells(row) for row in rows if _measured(row)]
    widths = [max(len(cells[index]) for cells in full) for index in range(len(header))]
    widths[0] = max(len(table_cells(row)[0]) for row in rows) if rows else widths[0]
    widths[0] = max(widths[0], len(header[0]))
    lines = []
    for cells in [header] + [table_cells(row) for row in rows]:
        if len(cells) == 2:
            lines.append(f"{cells[0]:<{widths[0]}}  {cells[1]}")
            continue
        padded = [cells[0].ljust(widths[0])]
        padded += [
            cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(padded))
    return "\n".join(lines)


def format_markdown_table(rows: Sequence[Row], connections: int) -> str:
    header = table_header(connections)
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for row in rows:
        cells = table_cells(row)
        cells += ["-"] * (len(header) - len(cells))
        lines.append(
            "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"
        )
    return "\n".join(lines)


COLUMN_LEGEND = """\
- req/s: requests per second in the throughput run; vs nginx: that rate divided
  by the rate of `nginx-proxy`.
- p50/p99/p99.9: latency percentiles in µs as wrk measured them, at one
  connection (c1) and at the throughput run's connections.
- +p50 c1, +p99 c1: latency added over `direct` at one connection, µs.
- CPU s/1k: CPU seconds (user + system, summed over the server's processes)
  per 1000 requests in the throughput run. For `direct` the server is the
  upstream nginx, for `nginx-proxy` the proxy nginx, else the gateway.
- RSS idle: resident memory after start-up, before any load; RSS peak: the sum
  of each process's peak resident memory (VmHWM) after all runs; MiB.
- errors: responses with status >= 400 plus socket errors and timeouts in the
  two measured runs; a flagged case (`!`) had some.
"""


# Output files


def results_document(
    metadata: dict[str, Any], cases: Sequence[CaseResult], rows: Sequence[Row]
) -> dict[str, Any]:
    return {
        **metadata,
        "cases": [case.to_json() for case in cases],
        "table": [row.to_json() for row in rows],
        "notes": case_notes(cases),
    }


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")


def render_results_page(
    metadata: dict[str, Any], cases: Sequence[CaseResult], rows: Sequence[Row]
) -> str:
    """Render the generated part of RESULTS.md, which ends before the history marker."""
    settings = metadata["settings"]
    machine = metadata["machine"]
    software = metadata["software"]
    git = metadata["git"]
    commit = git["commit"] + (" (dirty)" if git["dirty"] else "")
    notes = case_notes(cases)
    load_average = ", ".join(
        f"{value:.2f}" for value in settings["load_average_at_start"]
    )
    lines = [
        "# Benchmark results",
        "",
        "Written by `bench/run` (see `bench/README.md`). Each full run replaces",
        "everything above the history marker line and keeps what is below it.",
        "",
        f"- Date: {metadata['date']}",
        f"- Commit: {commit}",
        f"- Command: `{metadata['command']}`",
        f"- Machine: {machine['cores']} cores ({machine['cpu_model']}), "
        f"{machine['memory_gib']:.1f} GiB memory, Linux {machine['kernel']}",
        f"- Software: Python {software['python']}, aiohttp {software['aiohttp']}, "
        f"misskey-gateway {software['misskey_gateway']}, {software['nginx']}, "
        f"{software['wrk']}, Redis {software['redis']}",
        f"- Pinning: {metadata['pinning']['description']}",
        f"- Load: throughput {settings['throughput_seconds']} s at "
        f"{settings['connections']} connections, latency "
        f"{settings['latency_seconds']} s at 1 connection, "
        f"{settings['warmup_seconds']} s warm-up, {settings['wrk_threads']} wrk thread",
        f"- Servers: `--workers {settings['workers']}` for the gateway and "
        f"`worker_processes {settings['workers']}` for both nginx servers; "
        f"gateway store {settings['store']}, log level "
        f"{settings['gateway_log_level']} to a file",
        f"- Load average at the start (1, 5, 15 min): {load_average}",
        "",
        format_markdown_table(rows, settings["connections"]),
        "",
        COLUMN_LEGEND,
    ]
    if notes:
        lines += ["Notes:", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(lines)


def write_results_page(path: Path, generated: str) -> None:
    """Write RESULTS.md: the generated part, then the history kept from the old file."""
    history = DEFAULT_HISTORY
    if path.exists():
        # The marker counts only as a line of its own, not quoted in a sentence.
        match = _MARKER_LINE.search(path.read_text())
        if match is not None:
            history = match.string[match.start() :]
    path.write_text(generated.rstrip("\n") + "\n\n" + history)
