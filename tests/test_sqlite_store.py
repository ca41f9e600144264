"""The embedded SQLite store: location, permissions, WAL, other processes."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sqlite3
import stat
import sys
import threading
import time
from pathlib import Path

import pytest

from gateway.config import default_database_path, load_settings, sqlite_path
from gateway.errors import StoredTokenInvalid, StoreUnavailable
from gateway.logs import configure_logging
from gateway.sqlite_store import SqliteTokenStore, prepare_database_file
from gateway.store import describe_store, open_store

CLI = [sys.executable, "-m", "gateway"]


@pytest.fixture
async def store(tmp_path):
    opened = SqliteTokenStore(tmp_path / "data" / "tokens.db", poll_interval=0.0)
    yield opened
    await opened.close()


def test_default_path_uses_xdg_data_home(tmp_path):
    path = default_database_path({"XDG_DATA_HOME": str(tmp_path), "HOME": "/nowhere"})

    assert path == tmp_path / "misskey-gateway" / "store.db"


def test_default_path_falls_back_to_home():
    path = default_database_path({"HOME": "/home/alice"})

    assert path == Path("/home/alice/.local/share/misskey-gateway/store.db")


def test_default_path_ignores_relative_xdg():
    path = default_database_path({"XDG_DATA_HOME": "relative", "HOME": "/home/alice"})

    assert path == Path("/home/alice/.local/share/misskey-gateway/store.db")


def test_settings_default_to_sqlite(tmp_path):
    settings = load_settings(None, environ={"XDG_DATA_HOME": str(tmp_path)})

    assert settings.store.url == f"sqlite:///{tmp_path}/misskey-gateway/store.db"
    assert describe_store(settings) == f"sqlite {tmp_path}/misskey-gateway/store.db"


def test_settings_redis_url_selects_redis():
    settings = load_settings(
        None, environ={"MISSKEY_GATEWAY_REDIS_URL": "redis://h:1/0"}
    )

    assert settings.store.url == "redis://h:1/0"


def test_settings_conflicting_urls_rejected():
    from gateway.config import ConfigError

    with pytest.raises(ConfigError) as raised:
        load_settings(
            None,
            environ={
                "MISSKEY_GATEWAY_REDIS_URL": "redis://h:1/0",
                "MISSKEY_GATEWAY_STORE_URL": "sqlite:///x.db",
            },
        )
    assert raised.value.key == "store.url"


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///tokens.db", Path("tokens.db")),
        ("sqlite:///data/tokens.db", Path("data/tokens.db")),
        ("sqlite:////var/lib/tokens.db", Path("/var/lib/tokens.db")),
    ],
)
def test_sqlite_url_paths(url, path):
    assert sqlite_path(url) == path


@pytest.mark.parametrize("url", ["sqlite:///", "sqlite://x.db", "sqlite:/x.db"])
def test_sqlite_url_invalid(url):
    from gateway.config import ConfigError

    with pytest.raises(ConfigError):
        load_settings(None, environ={"MISSKEY_GATEWAY_STORE_URL": url})


async def test_file_and_folder_owner_only(store):
    await store.ping()

    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700


def test_database_file_created_by_racing_threads(tmp_path):
    """Every opener that loses the race to create the file or folder uses it."""
    attempts = 40
    openers = 8
    failures: list[BaseException] = []

    def open_all(barriers: list[threading.Barrier]) -> None:
        for number, barrier in enumerate(barriers):
            barrier.wait()
            try:
                prepare_database_file(tmp_path / f"run{number}" / "tokens.db")
            except BaseException as error:  # noqa: BLE001 - collected for the assert
                failures.append(error)

    barriers = [threading.Barrier(openers) for _ in range(attempts)]
    threads = [
        threading.Thread(target=open_all, args=(barriers,)) for _ in range(openers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert failures == []
    for number in range(attempts):
        path = tmp_path / f"run{number}" / "tokens.db"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_wal_mode_enabled(store):
    await store.set_token("alice", "token-a")
    with sqlite3.connect(store.path) as db:
        mode = db.execute("PRAGMA journal_mode").fetchone()[0]

    assert mode == "wal"


async def test_loose_permissions_logged(tmp_path):
    path = tmp_path / "tokens.db"
    path.touch(mode=0o644)
    path.chmod(0o644)
    buffer = io.StringIO()
    configure_logging("info", "json", stream=buffer, cache=False)
    opened = SqliteTokenStore(path)
    try:
        await opened.ping()
    finally:
        await opened.close()
        configure_logging("warning", "json", stream=io.StringIO(), cache=False)
    events = [json.loads(line) for line in buffer.getvalue().splitlines()]

    assert [e["event"] for e in events] == ["store.permissions"]
    assert events[0]["level"] == "warning"


async def test_token_round_trip(store):
    await store.set_token("alice", "token-a")
    await store.set_token("bob", "token-b")
    await store.set_token("alice", "token-a2")

    assert await store.get_token("alice") == "token-a2"
    assert await store.get_token("carol") is None
    assert await store.principals() == ["alice", "bob"]
    assert await store.delete_token("bob") is True
    assert await store.delete_token("bob") is False
    assert await store.principals() == ["alice"]


async def test_malformed_row_never_returned(store):
    await store.ping()
    with sqlite3.connect(store.path) as db:
        db.execute(
            "INSERT INTO tokens (principal, token, updated_at) VALUES ('eve', 'a b', 0)"
        )

    with pytest.raises(StoredTokenInvalid):
        await store.get_token("eve")


async def test_jwt_secret_shared_between_instances(tmp_path):
    first = SqliteTokenStore(tmp_path / "tokens.db")
    second = SqliteTokenStore(tmp_path / "tokens.db")
    try:
        secret = await first.jwt_secret()
        again = await second.jwt_secret()
    finally:
        await first.close()
        await second.close()

    assert len(secret) == 32
    assert again == secret


async def test_unusable_path_is_unavailable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    opened = SqliteTokenStore(blocker / "tokens.db")
    try:
        with pytest.raises(StoreUnavailable):
            await opened.get_token("alice")
        with pytest.raises(StoreUnavailable):
            await opened.ping()
    finally:
        await opened.close()


async def test_change_by_other_process_seen_within_poll(tmp_path):
    path = tmp_path / "tokens.db"
    reader = SqliteTokenStore(path, poll_interval=0.5)
    try:
        await reader.set_token("alice", "old-token")
        assert await reader.get_token("alice") == "old-token"

        env = {**os.environ, "MISSKEY_GATEWAY_STORE_URL": f"sqlite:///{path}"}
        process = await asyncio.create_subprocess_exec(
            *CLI, "token", "set", "alice",
            stdin=asyncio.subprocess.PIPE, env=env,
            stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        await asyncio.wait_for(process.communicate(b"new-token\n"), 30)
        assert process.returncode == 0
        written_at = time.monotonic()

        seen = None
        while time.monotonic() - written_at < 5:
            seen = await reader.get_token("alice")
            if seen == "new-token":
                break
            await asyncio.sleep(0.02)
        elapsed = time.monotonic() - written_at
    finally:
        await reader.close()

    assert seen == "new-token"
    # The poll interval plus room for a busy machine; without polling the new
    # token would never be seen at all.
    assert elapsed <= 0.5 + 0.5


async def test_several_processes_write_concurrently(tmp_path):
    path = tmp_path / "tokens.db"
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from gateway.sqlite_store import SqliteTokenStore\n"
        "async def main(worker):\n"
        "    store = SqliteTokenStore(Path(sys.argv[1]))\n"
        "    for n in range(25):\n"
        "        await store.set_token(f'w{worker}-{n}', f'token-{worker}-{n}')\n"
        "        await store.get_token(f'w{worker}-{n}')\n"
        "    await store.close()\n"
        "asyncio.run(main(sys.argv[2]))\n"
    )
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, str(path), str(w)
        )
        for w in range(4)
    ]
    codes = [await asyncio.wait_for(p.wait(), 60) for p in processes]
    check = open_store(
        load_settings(None, environ={"MISSKEY_GATEWAY_STORE_URL": f"sqlite:///{path}"})
    )
    try:
        principals = await check.principals()
        sample = await check.get_token("w3-24")
    finally:
        await check.close()

    assert codes == [0, 0, 0, 0]
    assert len(principals) == 100
    assert sample == "token-3-24"


async def test_invalidate_rereads_within_poll(tmp_path):
    path = tmp_path / "tokens.db"
    reader = SqliteTokenStore(path, poll_interval=3600)
    writer = SqliteTokenStore(path)
    try:
        await reader.set_token("alice", "old-token")
        assert await reader.get_token("alice") == "old-token"
        await writer.set_token("alice", "new-token")
        stale = await reader.get_token("alice")
        reader.invalidate("alice")
        fresh = await reader.get_token("alice")
    finally:
        await reader.close()
        await writer.close()

    assert stale == "old-token"
    assert fresh == "new-token"
