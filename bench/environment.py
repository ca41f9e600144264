"""Describe the machine, the software versions and the git commit of a run."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

# The harness's own output files do not make the measured tree dirty.
RESULT_PATHS = (":!bench/results", ":!bench/RESULTS.md")


def _run(argv: list[str], cwd: Path | None = None) -> str:
    """Return a command's standard output and error, or "" when it cannot run."""
    try:
        result = subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, check=False, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (result.stdout + result.stderr).strip()


def git_state(repository: Path) -> dict[str, Any]:
    """Return the short commit and whether files other than the results changed."""
    commit = _run(["git", "rev-parse", "--short", "HEAD"], repository) or "unknown"
    status = _run(
        ["git", "status", "--porcelain", "--", ".", *RESULT_PATHS], repository
    )
    return {"commit": commit, "dirty": bool(status)}


def machine() -> dict[str, Any]:
    cores = _run(["nproc"]) or str(os.cpu_count())
    cpu_model = "unknown"
    memory_kib = 0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.partition(":")[2].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
                break
    except OSError:
        pass
    return {
        "cores": int(cores) if cores.isdigit() else cores,
        "cpu_model": cpu_model,
        "memory_gib": memory_kib / 1024 / 1024,
        "kernel": platform.release(),
    }


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else "unknown"


def software(nginx: str, wrk: str, redis_server: str | None) -> dict[str, str]:
    """Return the versions of Python, aiohttp, the gateway and the tools."""
    # nginx -v prints "nginx version: nginx/1.22.1".
    nginx_version = _first_line(_run([nginx, "-v"])).removeprefix("nginx version: ")
    # wrk -v prints "wrk debian/4.1.0-3+b2 [epoll] Copyright ..." and exits with 1.
    wrk_version = re.sub(r"\s*Copyright.*", "", _first_line(_run([wrk, "-v"])))
    redis_version = "not used"
    if redis_server is not None:
        match = re.search(r"v=(\S+)", _run([redis_server, "--version"]))
        redis_version = match[1] if match else "unknown"
    return {
        "python": platform.python_version(),
        "aiohttp": _package_version("aiohttp"),
        "misskey_gateway": _package_version("misskey-gateway"),
        "nginx": nginx_version,
        "wrk": wrk_version,
        "redis": redis_version,
    }


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
