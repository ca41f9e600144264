"""The benchmark harness's parsers and derived figures, on captured wrk output.

No wrk, nginx or Redis runs here: the wrk outputs below were captured from
wrk 4.1.0 with bench/lua/post.lua, and the case results are made up.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench import procfs
from bench.cases import select_cases
from bench.report import (
    HISTORY_MARKER,
    CaseResult,
    MachineUsage,
    ServerUsage,
    case_notes,
    compute_rows,
    format_markdown_table,
    format_text_table,
    render_results_page,
    write_results_page,
)
from bench.servers import proxy_config, upstream_config
from bench.wrk import WrkFailed, WrkRun, parse_output, parse_summary_line, parse_text

# 32 connections against the fixed-response nginx.
CLEAN_OUTPUT = """\
Running 2s test @ http://127.0.0.1:59671/api/notes/create
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   123.21us   69.15us   1.84ms   96.54%
    Req/Sec   198.05k    16.22k  208.99k    85.71%
  413328 requests in 2.10s, 65.04MB read
Requests/sec: 196817.89
Transfer/sec:     30.97MB
{"requests":413328,"duration_us":2100053,"bytes":68199120,"errors":{"connect":0,\
"read":0,"write":0,"status":0,"timeout":0},"latency_us":{"min":33,"mean":123.2,\
"stdev":69.1,"max":1843,"p50":122,"p90":149,"p99":254,"p99.9":1297}}
"""

# Every response was a 404.
ERROR_STATUS_OUTPUT = """\
Running 1s test @ http://127.0.0.1:59671/nothere
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    65.14us   56.23us   1.45ms   98.17%
    Req/Sec    55.03k     7.06k   73.42k    81.82%
  60025 requests in 1.10s, 17.63MB read
  Non-2xx or 3xx responses: 60025
Requests/sec:  54588.33
Transfer/sec:     16.03MB
{"requests":60025,"duration_us":1099594,"bytes":18487700,"errors":{"connect":0,\
"read":0,"write":0,"status":60025,"timeout":0},"latency_us":{"min":10,"mean":65.1,\
"stdev":56.2,"max":1446,"p50":64,"p90":83,"p99":154,"p99.9":1070}}
"""

# A server that reset every connection after at most one response.
SOCKET_ERROR_OUTPUT = """\
Running 2s test @ http://127.0.0.1:47123/api/x
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    45.05us   46.92us   1.65ms   96.48%
    Req/Sec    15.09k   829.42    16.31k    66.67%
  31512 requests in 2.10s, 2.16MB read
  Socket errors: connect 0, read 25644, write 37382, timeout 0
Requests/sec:  15005.07
Transfer/sec:      1.03MB
{"requests":31512,"duration_us":2100090,"bytes":2268864,"errors":{"connect":0,\
"read":25644,"write":37382,"status":0,"timeout":0},"latency_us":{"min":12,\
"mean":45.0,"stdev":46.9,"max":1649,"p50":36,"p90":68,"p99":190,"p99.9":626}}
"""


def test_summary_line_fields() -> None:
    summary = parse_summary_line(CLEAN_OUTPUT)
    assert summary["requests"] == 413328
    assert summary["duration_us"] == 2100053
    assert summary["latency_us"]["p50"] == 122
    assert summary["latency_us"]["p99.9"] == 1297
    assert summary["errors"]["status"] == 0


def test_summary_line_missing() -> None:
    text_only = "\n".join(
        line for line in CLEAN_OUTPUT.splitlines() if not line.startswith("{")
    )
    with pytest.raises(WrkFailed, match="no JSON summary line"):
        parse_summary_line(text_only)


def test_summary_line_without_percentile() -> None:
    broken = CLEAN_OUTPUT.replace(',"p99.9":1297', "")
    with pytest.raises(WrkFailed, match=r"latency_us\.p99\.9"):
        parse_summary_line(broken)


def test_text_totals_and_rate() -> None:
    text = parse_text(CLEAN_OUTPUT)
    assert text.requests == 413328
    assert text.duration_s == pytest.approx(2.10)
    assert text.requests_per_second == pytest.approx(196817.89)
    assert text.error_responses == 0
    assert text.socket_errors == {}


def test_text_error_responses() -> None:
    assert parse_text(ERROR_STATUS_OUTPUT).error_responses == 60025


def test_text_socket_errors() -> None:
    text = parse_text(SOCKET_ERROR_OUTPUT)
    assert text.socket_errors == {
        "connect": 0,
        "read": 25644,
        "write": 37382,
        "timeout": 0,
    }


def test_output_clean_run() -> None:
    run = parse_output(CLEAN_OUTPUT, connections=32, threads=1)
    assert run.connections == 32
    assert run.requests == 413328
    assert run.duration_s == pytest.approx(2.100053)
    assert run.requests_per_second == pytest.approx(413328 / 2.100053)
    assert run.latency_us["p99"] == 254
    assert run.error_count == 0


def test_output_counts_errors() -> None:
    status = parse_output(ERROR_STATUS_OUTPUT, connections=4, threads=1)
    assert status.error_responses == 60025
    assert status.socket_errors == 0
    sockets = parse_output(SOCKET_ERROR_OUTPUT, connections=2, threads=1)
    assert sockets.error_responses == 0
    assert sockets.socket_errors == 25644 + 37382
    assert sockets.error_count == 25644 + 37382


def test_output_disagreement_rejected() -> None:
    tampered = ERROR_STATUS_OUTPUT.replace(
        "Non-2xx or 3xx responses: 60025", "Non-2xx or 3xx responses: 7"
    )
    with pytest.raises(WrkFailed, match="7 error responses"):
        parse_output(tampered, connections=4, threads=1)


def test_run_json_round_trip() -> None:
    run = parse_output(CLEAN_OUTPUT, connections=32, threads=1)
    assert WrkRun.from_json(run.to_json()) == run


# Derived figures


def make_run(
    requests: int,
    seconds: float,
    p50: float,
    p99: float,
    connections: int,
    status_errors: int = 0,
) -> WrkRun:
    return WrkRun(
        connections=connections,
        threads=1,
        duration_s=seconds,
        requests=requests,
        bytes=requests * 100,
        errors={
            "connect": 0,
            "read": 0,
            "write": 0,
            "status": status_errors,
            "timeout": 0,
        },
        latency_us={"p50": p50, "p90": p99, "p99": p99, "p99.9": p99 * 2},
    )


def make_case(
    name: str,
    rate: float,
    p50_one: float,
    p99_one: float,
    cpu_seconds: float,
    status_errors: int = 0,
) -> CaseResult:
    seconds = 10.0
    return CaseResult(
        name=name,
        description=name,
        status="ok",
        throughput=make_run(int(rate * seconds), seconds, 500, 2000, 32, status_errors),
        latency=make_run(1000, seconds, p50_one, p99_one, 1),
        usage=ServerUsage(
            processes=1,
            cpu_seconds=cpu_seconds,
            idle_rss_kib=50 * 1024,
            peak_rss_kib=60 * 1024,
            max_process_peak_rss_kib=60 * 1024,
        ),
    )


CASES = [
    make_case("direct", rate=100_000, p50_one=60, p99_one=150, cpu_seconds=5.0),
    make_case("nginx-proxy", rate=40_000, p50_one=80, p99_one=200, cpu_seconds=4.0),
    make_case(
        "gateway-required",
        rate=5_000,
        p50_one=300,
        p99_one=900,
        cpu_seconds=8.0,
        status_errors=3,
    ),
    CaseResult(
        "gateway-required-uncached",
        "uncached",
        "skipped",
        "token cache not implemented",
    ),
]


def test_rows_added_latency() -> None:
    rows = {row.name: row for row in compute_rows(CASES)}
    assert rows["direct"].added_p50_us == 0
    assert rows["nginx-proxy"].added_p50_us == 20
    assert rows["nginx-proxy"].added_p99_us == 50
    assert rows["gateway-required"].added_p50_us == 240
    assert rows["gateway-required"].added_p99_us == 750


def test_rows_ratio_to_proxy() -> None:
    rows = {row.name: row for row in compute_rows(CASES)}
    assert rows["nginx-proxy"].ratio_to_proxy == pytest.approx(1.0)
    assert rows["direct"].ratio_to_proxy == pytest.approx(2.5)
    assert rows["gateway-required"].ratio_to_proxy == pytest.approx(0.125)


def test_rows_cpu_per_thousand_requests() -> None:
    rows = {row.name: row for row in compute_rows(CASES)}
    # 8 CPU seconds over 50 000 requests.
    assert rows["gateway-required"].cpu_seconds_per_1k == pytest.approx(0.16)
    assert rows["direct"].cpu_seconds_per_1k == pytest.approx(0.005)


def test_rows_memory_in_mib() -> None:
    row = {row.name: row for row in compute_rows(CASES)}["gateway-required"]
    assert row.idle_rss_mib == pytest.approx(50.0)
    assert row.peak_rss_mib == pytest.approx(60.0)


def test_rows_flag_errors() -> None:
    rows = {row.name: row for row in compute_rows(CASES)}
    assert rows["gateway-required"].errors == 3
    assert rows["gateway-required"].flagged
    assert not rows["direct"].flagged


def test_rows_skipped_case() -> None:
    row = {row.name: row for row in compute_rows(CASES)}["gateway-required-uncached"]
    assert row.status == "skipped"
    assert row.reason == "token cache not implemented"
    assert row.requests_per_second is None


def test_rows_without_references() -> None:
    rows = compute_rows(CASES[2:3])
    assert rows[0].added_p50_us is None
    assert rows[0].ratio_to_proxy is None
    assert rows[0].cpu_seconds_per_1k == pytest.approx(0.16)


def test_text_table_lines() -> None:
    table = format_text_table(compute_rows(CASES), connections=32)
    lines = table.splitlines()
    assert len(lines) == 5
    assert "p99.9 c32" in lines[0]
    assert lines[3].startswith("! gateway-required")
    assert "+240" in lines[3]
    assert "0.125" in lines[3]
    assert lines[4].split() == [
        "gateway-required-uncached",
        "skipped:",
        "token",
        "cache",
        "not",
        "implemented",
    ]


def test_markdown_table_shape() -> None:
    table = format_markdown_table(compute_rows(CASES), connections=32)
    lines = table.splitlines()
    assert len(lines) == 2 + len(CASES)
    column_counts = {line.count("|") for line in lines}
    assert column_counts == {16}


def test_notes_name_errors() -> None:
    notes = case_notes(CASES)
    assert len(notes) == 1
    assert notes[0].startswith("! gateway-required throughput run: 3 responses")


def test_notes_name_disturbance() -> None:
    quiet = MachineUsage(10.0, 0.3, 1.0, 0.0)
    busy = MachineUsage(10.0, 4.0, 1.0, 2.0)
    case = CaseResult(
        "gateway-none",
        "none",
        "ok",
        throughput_machine=quiet,
        latency_machine=busy,
    )
    notes = case_notes([case])
    assert notes == [
        "gateway-none latency run: other processes and kernel threads used 40% "
        "of a core, which may have disturbed it.",
        "gateway-none latency run: the hypervisor took 20% of a core (steal time).",
    ]


# Output files


def test_results_page_render() -> None:
    metadata = {
        "date": "2026-01-01 00:00 UTC",
        "command": "bench/run",
        "git": {"commit": "abc1234", "dirty": True},
        "machine": {
            "cores": 2,
            "cpu_model": "Test CPU",
            "memory_gib": 4.0,
            "kernel": "6.1",
        },
        "software": {
            "python": "3.11.7",
            "aiohttp": "3.10.0",
            "misskey_gateway": "0.1.0",
            "nginx": "nginx/1.22.1",
            "wrk": "wrk 4.1.0",
            "redis": "7.0.15",
        },
        "pinning": {"description": "wrk on CPU 0; servers on CPU 1"},
        "settings": {
            "throughput_seconds": 15,
            "latency_seconds": 10,
            "warmup_seconds": 2,
            "connections": 32,
            "wrk_threads": 1,
            "workers": 1,
            "store": "Redis",
            "gateway_log_level": "info",
            "load_average_at_start": [0.1, 0.2, 0.3],
        },
    }
    page = render_results_page(metadata, CASES, compute_rows(CASES))
    assert "- Commit: abc1234 (dirty)" in page
    assert "- Command: `bench/run`" in page
    assert (
        "| gateway-required-uncached | skipped: token cache not implemented |" in page
    )
    assert "- ! gateway-required throughput run: 3 responses" in page
    assert HISTORY_MARKER not in page


def test_results_page_keeps_history(tmp_path: Path) -> None:
    page = tmp_path / "RESULTS.md"
    history = f"{HISTORY_MARKER}\n## History\n\n- token cache: +40% req/s\n"
    page.write_text(f"# old figures\n\n{history}")
    write_results_page(page, "# Benchmark results\n\nnew table\n")
    text = page.read_text()
    assert text.startswith("# Benchmark results\n\nnew table\n")
    assert "old figures" not in text
    assert text.endswith(history)


def test_results_page_marker_quoted(tmp_path: Path) -> None:
    page = tmp_path / "RESULTS.md"
    history = f"{HISTORY_MARKER}\n## History\n"
    page.write_text(f"# old\n\nText that quotes `{HISTORY_MARKER}`.\n\n{history}")
    write_results_page(page, "# new\n")
    assert page.read_text() == f"# new\n\n{history}"


def test_results_page_created(tmp_path: Path) -> None:
    page = tmp_path / "RESULTS.md"
    write_results_page(page, "# Benchmark results\n")
    assert HISTORY_MARKER in page.read_text()


# Cases, configs and /proc


def test_select_cases_by_number_and_name() -> None:
    names = [case.name for case in select_cases("4, direct,2")]
    assert names == ["direct", "nginx-proxy", "gateway-required"]
    assert len(select_cases(None)) == 7


def test_select_cases_unknown() -> None:
    with pytest.raises(ValueError, match="unknown case '8'"):
        select_cases("1,8")


def test_proxy_config_keepalive(tmp_path: Path) -> None:
    config = proxy_config(tmp_path, port=8001, upstream_port=8002, workers=1)
    assert "keepalive 64;" in config
    assert "proxy_http_version 1.1;" in config
    assert 'proxy_set_header Connection "";' in config
    assert "server 127.0.0.1:8002;" in config


def test_upstream_config_fixed_answer(tmp_path: Path) -> None:
    config = upstream_config(tmp_path, port=8002, workers=2)
    assert "return 200 '{\"ok\":true}';" in config
    assert "default_type application/json;" in config
    assert "worker_processes 2;" in config


def test_procfs_own_process() -> None:
    usage = procfs.tree_usage(os.getpid())
    assert usage.pids[0] == os.getpid()
    assert usage.cpu_seconds > 0
    assert usage.rss_kib > 0
    assert usage.peak_rss_kib >= usage.rss_kib
