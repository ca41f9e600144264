"""Read CPU time, memory and listening sockets of processes from /proc (Linux)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
TCP_LISTEN_STATE = "0A"


def _stat_fields(pid: int) -> list[str]:
    """Return the fields of /proc/PID/stat after the command name.

    The command name is in parentheses and may contain spaces, so the fields
    are split after its last ")". Index 0 is field 3 (state) of proc(5).
    """
    text = (PROC / str(pid) / "stat").read_text()
    return text.rpartition(")")[2].split()


def parent_pid(pid: int) -> int:
    return int(_stat_fields(pid)[1])


def cpu_seconds(pid: int) -> float:
    """Return user plus system CPU time of a process (all its threads), seconds."""
    fields = _stat_fields(pid)
    # utime and stime are fields 14 and 15 of proc(5), in clock ticks.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_SECOND


def status_kib(pid: int, key: str) -> int:
    """Return a memory line of /proc/PID/status, such as VmRSS or VmHWM, in KiB."""
    for line in (PROC / str(pid) / "status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0])
    raise KeyError(f"{key} not found in /proc/{pid}/status")


def child_pids(pid: int) -> list[int]:
    """Return the children of a process.

    /proc/PID/task/TID/children exists only on kernels built with
    CONFIG_PROC_CHILDREN, so without it every process's parent is read.
    """
    task_dir = PROC / str(pid) / "task"
    children: list[int] = []
    try:
        task_ids = [entry.name for entry in task_dir.iterdir()]
    except FileNotFoundError:
        return []
    try:
        for task_id in task_ids:
            text = (task_dir / task_id / "children").read_text()
            children.extend(int(child) for child in text.split())
        return children
    except FileNotFoundError:
        pass
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if parent_pid(int(entry.name)) == pid:
                children.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return children


def process_tree(pid: int) -> list[int]:
    """Return ``pid`` and all its live descendants, parents before children."""
    tree = [pid]
    index = 0
    while index < len(tree):
        tree.extend(child_pids(tree[index]))
        index += 1
    return tree


@dataclass(frozen=True)
class TreeUsage:
    """CPU time and memory of a process tree at one moment.

    ``cpu_seconds`` is the sum over the live processes, so CPU time of a
    process that exited before the reading is missing from it.
    """

    pids: tuple[int, ...]
    cpu_seconds: float
    rss_kib: int
    peak_rss_kib: int
    max_process_peak_rss_kib: int


def tree_usage(pid: int) -> TreeUsage:
    """Sum CPU time, resident memory (VmRSS) and peak memory (VmHWM) of a tree."""
    pids: list[int] = []
    cpu = 0.0
    rss = 0
    peak = 0
    max_peak = 0
    for member in process_tree(pid):
        try:
            member_cpu = cpu_seconds(member)
            member_rss = status_kib(member, "VmRSS")
            member_peak = status_kib(member, "VmHWM")
        except (FileNotFoundError, ProcessLookupError, KeyError):
            # Exited between listing and reading, or a zombie without memory.
            continue
        pids.append(member)
        cpu += member_cpu
        rss += member_rss
        peak += member_peak
        max_peak = max(max_peak, member_peak)
    return TreeUsage(tuple(pids), cpu, rss, peak, max_peak)


def cpu_affinity(pid: int) -> str:
    """Return the Cpus_allowed_list line of a process, such as "1" or "0-3"."""
    for line in (PROC / str(pid) / "status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == "Cpus_allowed_list":
            return value.strip()
    return ""


def listening_sockets(port: int) -> int:
    """Count TCP sockets in LISTEN state on a local port, IPv4 and IPv6.

    Processes that share a port with SO_REUSEPORT each have their own
    listening socket, so the count is the number of them that are ready.
    """
    count = 0
    for name in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / name).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rpartition(":")[2], 16)
            if local_port == port and fields[3] == TCP_LISTEN_STATE:
                count += 1
    return count


@dataclass(frozen=True)
class MachineCpu:
    """CPU time of the whole machine since boot, summed over all cores, seconds."""

    process_seconds: float  # user, nice and system time of every process
    interrupt_seconds: float  # hardware and software interrupts
    steal_seconds: float  # time the hypervisor ran something else


def machine_cpu() -> MachineCpu:
    """Read the "cpu" line of /proc/stat."""
    for line in (PROC / "stat").read_text().splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            ticks = [int(value) for value in fields[1:9]]
            user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
            return MachineCpu(
                (user + nice + system) / CLOCK_TICKS_PER_SECOND,
                (irq + softirq) / CLOCK_TICKS_PER_SECOND,
                steal / CLOCK_TICKS_PER_SECOND,
            )
    raise RuntimeError("no cpu line in /proc/stat")
