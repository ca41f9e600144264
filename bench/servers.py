"""Start and stop the servers under test: nginx, Redis and the gateway.

Every server runs as a child process in its own session, so a Ctrl-C in the
terminal reaches only the harness, which then stops them in order. Each one
writes its output to a log file in the run directory.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from bench import procfs

STARTUP_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0
# nginx 1.22 closes a keep-alive connection after 1000 requests by default,
# and aiohttp 3's server has no such limit, so nginx's limit is set out of reach.
KEEPALIVE_REQUESTS = 1_000_000
# Size of the keep-alive connection pool of the reference proxy.
PROXY_KEEPALIVE_CONNECTIONS = 64
FIXED_RESPONSE = '{"ok":true}'
# Larger than the 256 MiB upload with its multipart framing, so the upstream
# keeps an upload in memory instead of writing it to a temp file.
UPLOAD_BUFFER_SIZE = "300m"
UPLOAD_DONE_PATH = "/upload-done"


class StartupFailed(Exception):
    """A server did not start; the message includes the end of its log."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pinned(argv: Sequence[str], cpus: str | None, taskset: str | None) -> list[str]:
    """Prefix a command with ``taskset --cpu-list CPUS`` when ``cpus`` is set."""
    if cpus is None:
        return list(argv)
    if taskset is None:
        raise ValueError("CPU pinning needs taskset")
    return [taskset, "--cpu-list", cpus, *argv]


def http_request(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, bytes]:
    """Send one request on a new connection; return the status and the body."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(
        parts.hostname or "127.0.0.1", parts.port, timeout=timeout
    )
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request(method, target, body=body, headers=dict(headers or {}))
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


class ManagedProcess:
    """A server process that the harness started and must stop."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
    ):
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError(f"{self.name} was not started")
        return self.process.pid

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self) -> None:
        """Send SIGTERM, then SIGKILL after a timeout, to the process and its children.

        Children still alive after their parent exited, such as gateway
        workers whose supervisor died, are killed too.
        """
        if self.process is None:
            return
        descendants = (
            procfs.process_tree(self.process.pid)[1:] if self.running() else []
        )
        if self.running():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid in descendants:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    @contextlib.contextmanager
    def stopped_on_error(self) -> Iterator[None]:
        """Stop the process when the block raises, as when it never became ready."""
        try:
            yield
        except BaseException:
            self.stop()
            raise

    def log_tail(
        self, lines: int = 40, skip: Callable[[str], bool] | None = None
    ) -> str:
        """Return the last lines of the log, leaving out those ``skip`` selects."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        kept = [line for line in text.splitlines() if skip is None or not skip(line)]
        return "\n".join(kept[-lines:])

    def failure(self, message: str) -> StartupFailed:
        code = self.exit_code()
        state = "still running" if code is None else f"exit status {code}"
        tail = self.log_tail()
        return StartupFailed(
            f"{self.name}: {message} ({state}); end of {self.log_path}:\n{tail}"
        )


def wait_listening(process: ManagedProcess, port: int, sockets: int = 1) -> None:
    """Wait until ``sockets`` sockets listen on ``port``, or raise StartupFailed."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while procfs.listening_sockets(port) < sockets:
        if not process.running():
            raise process.failure(f"exited before listening on port {port}")
        if time.monotonic() > deadline:
            found = procfs.listening_sockets(port)
            raise process.failure(
                f"{found} of {sockets} listening sockets on port {port} "
                f"after {STARTUP_TIMEOUT_SECONDS:.0f} s"
            )
        time.sleep(0.05)


# nginx


def _nginx_main_block(run_dir: Path, name: str, workers: int) -> str:
    return f"""\
worker_processes {workers};
pid {run_dir}/{name}.pid;
error_log {run_dir}/{name}-error.log warn;

events {{
    worker_connections 4096;
}}
"""


def _nginx_http_common(run_dir: Path, name: str) -> str:
    temp = run_dir / f"{name}-temp"
    return f"""\
    client_body_temp_path {temp}/client-body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    # Accept bodies of any size, such as the 256 MiB upload.
    client_max_body_size 0;
    keepalive_requests {KEEPALIVE_REQUESTS};
"""


def upstream_config(run_dir: Path, port: int, workers: int) -> str:
    """Return the nginx config of the upstream: a fixed JSON response under /api/."""
    return f"""\
# Generated by bench/run: the fixed-response upstream for every case.
{_nginx_main_block(run_dir, "upstream", workers)}
http {{
    access_log off;
{_nginx_http_common(run_dir, "upstream")}
    server {{
        listen 127.0.0.1:{port};

        # Any method. nginx responds at once and discards the request body.
        location /api/ {{
            types {{ }}
            default_type application/json;
            return 200 '{FIXED_RESPONSE}';
        }}

        # An upload gets its response only after the whole body arrived, as
        # from Misskey. nginx reads the body into memory, then proxies a
        # request without the body to {UPLOAD_DONE_PATH} on this server. A
        # response sent before the body is read would stall wrk's connection.
        location = /api/drive/files/create {{
            client_body_buffer_size {UPLOAD_BUFFER_SIZE};
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header Content-Type "";
            proxy_pass http://127.0.0.1:{port}{UPLOAD_DONE_PATH};
        }}

        location = {UPLOAD_DONE_PATH} {{
            types {{ }}
            default_type application/json;
            return 200 '{FIXED_RESPONSE}';
        }}

        location / {{
            return 404;
        }}
    }}
}}
"""


def proxy_config(run_dir: Path, port: int, upstream_port: int, workers: int) -> str:
    """Return the nginx config of the reference proxy: a plain keep-alive proxy."""
    return f"""\
# Generated by bench/run: nginx as a plain reverse proxy, the reference.
{_nginx_main_block(run_dir, "proxy", workers)}
http {{
    # nginx's default: one access log line per request, as the gateway logs.
    access_log {run_dir}/proxy-access.log;
{_nginx_http_common(run_dir, "proxy")}
    upstream bench_upstream {{
        server 127.0.0.1:{upstream_port};
        keepalive {PROXY_KEEPALIVE_CONNECTIONS};
        keepalive_requests {KEEPALIVE_REQUESTS};
    }}

    server {{
        listen 127.0.0.1:{port};

        location / {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def start_nginx(
    nginx: str,
    name: str,
    config: str,
    run_dir: Path,
    port: int,
    cpus: str | None,
    taskset: str | None,
) -> ManagedProcess:
    """Check and start nginx in the foreground with a generated config."""
    config_path = run_dir / f"{name}.conf"
    config_path.write_text(config)
    (run_dir / f"{name}-temp").mkdir(exist_ok=True)
    startup_log = run_dir / f"{name}-startup.log"
    # -p: prefix for relative paths; -e: error log before the config is read.
    base = [nginx, "-p", f"{run_dir}/", "-e", str(startup_log), "-c", str(config_path)]
    check = subprocess.run(
        [*base, "-t", "-q"], capture_output=True, text=True, check=False
    )
    if check.returncode != 0:
        raise StartupFailed(
            f"nginx rejected the generated config {config_path}:\n"
            f"{check.stderr.strip()}"
        )
    process = ManagedProcess(
        f"nginx ({name})",
        pinned([*base, "-g", "daemon off;"], cpus, taskset),
        run_dir / f"{name}-error.log",
    )
    process.start()
    with process.stopped_on_error():
        wait_listening(process, port)
    return process


# Redis


def start_redis(
    redis_server: str, run_dir: Path, cpus: str | None, taskset: str | None
) -> tuple[ManagedProcess, int]:
    """Start a redis-server on a free loopback port that keeps nothing on disk."""
    port = free_port()
    data_dir = run_dir / "redis"
    data_dir.mkdir(exist_ok=True)
    argv = [
        redis_server,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(data_dir),
        "--loglevel", "warning",
    ]  # fmt: skip
    process = ManagedProcess(
        "redis-server", pinned(argv, cpus, taskset), run_dir / "redis.log"
    )
    process.start()
    with process.stopped_on_error():
        wait_listening(process, port)
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while not _redis_responds_to_ping(port):
            if not process.running() or time.monotonic() > deadline:
                raise process.failure(f"no PONG to PING on port {port}")
            time.sleep(0.05)
    return process, port


def _redis_responds_to_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


# Gateway


def start_gateway(
    argv: Sequence[str],
    env: Mapping[str, str],
    log_path: Path,
    port: int,
    workers: int,
) -> ManagedProcess:
    """Start ``misskey-gateway serve``; wait for every worker and GET healthz."""
    process = ManagedProcess("misskey-gateway", argv, log_path, env)
    process.start()
    with process.stopped_on_error():
        wait_listening(process, port, sockets=workers)
        url = f"http://127.0.0.1:{port}/_gateway/healthz"
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while True:
            try:
                status, _ = http_request("GET", url, timeout=2.0)
                if status == 200:
                    return process
            except OSError:
                status = 0
            if not process.running() or time.monotonic() > deadline:
                raise process.failure(f"GET {url} returned {status or 'no response'}")
            time.sleep(0.05)
