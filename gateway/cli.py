"""The ``misskey-gateway`` command line."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import jwt as pyjwt
import structlog
from aiohttp import web
from prometheus_client import multiprocess

from gateway import __version__
from gateway.apikeys import new_api_key
from gateway.app import POLICY_KEY, create_app
from gateway.config import ConfigError, Settings, load_settings
from gateway.credentials import JWT_ID_PATTERN, issue_jwt, validate_principal
from gateway.errors import StoredTokenInvalid, StoreUnavailable
from gateway.grants import CLIENT_ID_PATTERN, new_invite, new_oauth_client
from gateway.logs import configure_logging
from gateway.metrics import MULTIPROC_DIR_ENV
from gateway.onboarding import CALLBACK_PATH
from gateway.policy import API_PREFIX, load_policy_table
from gateway.policy_rules import render_table
from gateway.policy_sync import compare, fetch_openapi, rows_from_openapi
from gateway.server import run_app
from gateway.store import (
    TokenStore,
    describe_store,
    fingerprint,
    open_store,
    validate_token,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
# Seconds an invite from "invite create" stays valid, unless --ttl sets another.
DEFAULT_INVITE_TTL = 24 * 3600


class CommandFailed(Exception):
    """A command failed; the message states the cause and the next step."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="misskey-gateway",
        description="Authenticating reverse proxy in front of a Misskey server.",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = argparse.ArgumentParser(add_help=False)
    config.add_argument(
        "--config",
        metavar="PATH",
        help="TOML config file (default: $MISSKEY_GATEWAY_CONFIG, if set)",
    )
    config.add_argument(
        "--store",
        metavar="URL",
        help="token store: redis://…, rediss://…, unix://…, redis+sentinel://…, "
        "redis+cluster://… or sqlite:///PATH "
        "(default: SQLite in the XDG data directory)",
    )
    config.add_argument(
        "--redis-url",
        metavar="URL",
        help="Redis URL of the token store (same as --store)",
    )

    serve = commands.add_parser("serve", parents=[config], help="run the gateway")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="TCP port to listen on (default 8080)")
    serve.add_argument("--upstream", metavar="URL", help="origin of the Misskey server")
    serve.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes sharing the port (default 1)",
    )
    serve.set_defaults(handler=_serve)

    token = commands.add_parser("token", help="manage stored Misskey tokens")
    token_commands = token.add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    token_set = token_commands.add_parser(
        "set", parents=[config], help="store the token read from standard input"
    )
    token_set.add_argument("principal")
    token_set.set_defaults(handler=_token_set)
    token_get = token_commands.add_parser(
        "get", parents=[config], help="show the fingerprint of a stored token"
    )
    token_get.add_argument("principal")
    token_get.add_argument(
        "--reveal", action="store_true", help="print the token itself instead"
    )
    token_get.set_defaults(handler=_token_get)
    token_delete = token_commands.add_parser(
        "delete", parents=[config], help="delete a stored token"
    )
    token_delete.add_argument("principal")
    token_delete.set_defaults(handler=_token_delete)
    token_list = token_commands.add_parser(
        "list", parents=[config], help="list the principals that have a token"
    )
    token_list.set_defaults(handler=_token_list)

    jwt_command = commands.add_parser("jwt", help="gateway JWTs")
    jwt_commands = jwt_command.add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    issue = jwt_commands.add_parser(
        "issue", parents=[config], help="print a signed gateway JWT for a principal"
    )
    issue.add_argument("principal")
    _add_scope_argument(issue)
    issue.add_argument(
        "--ttl",
        type=int,
        metavar="SECONDS",
        help="lifetime in seconds (default: jwt.default_ttl)",
    )
    issue.set_defaults(handler=_jwt_issue)
    revoke = jwt_commands.add_parser(
        "revoke",
        parents=[config],
        help="reject a JWT from now on, by its jti or read from standard input",
    )
    revoke.add_argument("jwt_id", nargs="?", metavar="JTI", help="the JWT's jti claim")
    revoke.add_argument(
        "--for",
        dest="revoke_for",
        type=int,
        metavar="SECONDS",
        help="how long to keep the revocation; required with JTI "
        "(with a JWT on standard input, until the JWT expires)",
    )
    revoke.set_defaults(handler=_jwt_revoke)

    key_command = commands.add_parser("key", help="opaque API keys")
    key_commands = key_command.add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    key_create = key_commands.add_parser(
        "create", parents=[config], help="create an API key and print it once"
    )
    key_create.add_argument("principal")
    _add_scope_argument(key_create)
    key_create.set_defaults(handler=_key_create)
    key_revoke = key_commands.add_parser(
        "revoke", parents=[config], help="revoke the API keys of a principal"
    )
    key_revoke.add_argument("principal")
    key_revoke.add_argument(
        "--id", dest="key_id", metavar="ID", help="revoke only the key with this id"
    )
    key_revoke.set_defaults(handler=_key_revoke)
    key_list = key_commands.add_parser(
        "list", parents=[config], help="list a principal's API keys (ids, never keys)"
    )
    key_list.add_argument("principal")
    key_list.set_defaults(handler=_key_list)

    invite_command = commands.add_parser(
        "invite", help="one-time invites to link a Misskey account"
    )
    invite_commands = invite_command.add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    invite_create = invite_commands.add_parser(
        "create",
        parents=[config],
        help="create an invite that lets one person link a Misskey account "
        "to PRINCIPAL, and print it once",
    )
    invite_create.add_argument("principal")
    invite_create.add_argument(
        "--ttl",
        type=int,
        default=DEFAULT_INVITE_TTL,
        metavar="SECONDS",
        help="how long the invite stays valid, in seconds "
        f"(default {DEFAULT_INVITE_TTL})",
    )
    invite_create.set_defaults(handler=_invite_create)

    client_command = commands.add_parser(
        "client", help="OAuth clients (client credentials grant)"
    )
    client_commands = client_command.add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    client_create = client_commands.add_parser(
        "create",
        parents=[config],
        help="create an OAuth client for a principal; print its id and secret once",
    )
    client_create.add_argument("principal")
    _add_scope_argument(client_create)
    client_create.set_defaults(handler=_client_create)
    client_revoke = client_commands.add_parser(
        "revoke", parents=[config], help="delete an OAuth client"
    )
    client_revoke.add_argument("client_id", metavar="CLIENT_ID")
    client_revoke.set_defaults(handler=_client_revoke)

    policy = commands.add_parser("policy", help="endpoint policy")
    policy_commands = policy.add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    show = policy_commands.add_parser(
        "show", parents=[config], help="print the effective policy row of an endpoint"
    )
    show.add_argument("endpoint", help="endpoint name, e.g. notes/create")
    show.set_defaults(handler=_policy_show)
    sync = policy_commands.add_parser(
        "sync",
        parents=[config],
        help="build a policy table from the upstream's GET /api.json",
    )
    sync.add_argument("--upstream", metavar="URL", help="origin of the Misskey server")
    sync.add_argument(
        "--output",
        metavar="PATH",
        help="write the table here (default: standard output); "
        "point policy.file at it to use it",
    )
    sync.set_defaults(handler=_policy_sync)

    check = commands.add_parser(
        "check",
        parents=[config],
        help="validate the config and reach Redis and the upstream",
    )
    check.add_argument("--upstream", metavar="URL", help="origin of the Misskey server")
    check.set_defaults(handler=_check)
    return parser


def _add_scope_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scope",
        default="",
        help="space-separated Misskey permission kinds, "
        'e.g. "read:account write:notes"; "*" grants every kind (default: none)',
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except ConfigError as error:
        print(f"misskey-gateway: invalid configuration: {error}", file=sys.stderr)
        return EXIT_USAGE
    except CommandFailed as error:
        print(f"misskey-gateway: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        "store.url": args.store,
        "redis.url": args.redis_url,
        "server.host": getattr(args, "host", None),
        "server.port": getattr(args, "port", None),
        "server.workers": getattr(args, "workers", None),
        "upstream.url": getattr(args, "upstream", None),
    }
    return load_settings(args.config, overrides=overrides)


def _run_with_store(
    settings: Settings, work: Callable[[TokenStore], Awaitable[int]]
) -> int:
    async def run() -> int:
        store = open_store(settings)
        try:
            return await work(store)
        except StoreUnavailable as error:
            cause = error.__cause__ or error
            raise CommandFailed(
                f"cannot reach the token store ({store.description}): {cause}"
            ) from None
        finally:
            await store.close()

    return asyncio.run(run())


def _principal(args: argparse.Namespace) -> str:
    try:
        return validate_principal(args.principal)
    except ValueError as error:
        raise CommandFailed(f"invalid principal {args.principal!r}: {error}") from None


# serve


def _serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    settings.require_upstream()
    configure_logging(settings.log.level, settings.log.format)
    policy = load_policy_table(settings.policy.file or None, settings.policy.endpoints)

    workers = settings.server.workers
    if workers == 1:
        _run_worker(settings, reuse_port=False)
        return EXIT_OK
    if settings.server.port == 0:
        raise ConfigError(
            "server.port", "must be set explicitly when server.workers > 1"
        )
    structlog.get_logger("gateway").info(
        "gateway.workers", workers=workers, policy_rows=len(policy)
    )
    if os.environ.get(MULTIPROC_DIR_ENV):
        # The operator chose the directory, and empties it between runs.
        return _run_workers(settings, workers)
    # The workers inherit the variable, and prometheus-client reads it when
    # they import it.
    metrics_dir = tempfile.mkdtemp(prefix="misskey-gateway-metrics-")
    os.environ[MULTIPROC_DIR_ENV] = metrics_dir
    try:
        return _run_workers(settings, workers)
    finally:
        del os.environ[MULTIPROC_DIR_ENV]
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _run_worker(settings: Settings, reuse_port: bool) -> None:
    configure_logging(settings.log.level, settings.log.format)
    logger = structlog.get_logger("gateway")
    app = create_app(settings)
    policy = app[POLICY_KEY]
    logger.info(
        "gateway.starting",
        host=settings.server.host,
        port=settings.server.port,
        upstream=settings.upstream.url,
        store=describe_store(settings),
        policy_rows=len(policy),
        policy_misskey_version=policy.misskey_version,
    )
    loop = new_event_loop()
    _handle_stop_signals(loop)
    try:
        # The listening socket is closed first on a stop, so new connections
        # are refused while in-flight requests get server.shutdown_grace.
        run_app(app, settings, loop, reuse_port)
    except OSError as error:
        where = f"{settings.server.host}:{settings.server.port}"
        logger.error("gateway.listen_failed", address=where, error=str(error))
        raise CommandFailed(
            f"cannot listen on {where}: {error.strerror or error}"
        ) from None
    logger.info("gateway.stopped")


def _handle_stop_signals(loop: asyncio.AbstractEventLoop) -> None:
    """Start a graceful stop on the first SIGTERM or SIGINT, and ignore repeats.

    Ctrl-C in a terminal reaches each worker of ``serve --workers N`` twice:
    directly, and as the SIGTERM that the parent passes on. With aiohttp's own
    handlers the second signal would end the grace period at once.
    """
    logger = structlog.get_logger("gateway")
    received = False

    def stop(signum: int) -> None:
        nonlocal received
        if received:
            logger.info("gateway.signal_ignored", signal=signal.Signals(signum).name)
            return
        received = True
        raise web.GracefulExit()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop, signum)


def _worker_main(settings: Settings) -> None:
    """Run one worker process of ``serve --workers N``."""
    try:
        _run_worker(settings, reuse_port=True)
    except CommandFailed as error:
        print(f"misskey-gateway: {error}", file=sys.stderr)
        sys.exit(EXIT_FAILED)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """Return a uvloop event loop where uvloop is installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _run_workers(settings: Settings, workers: int) -> int:
    """Run ``workers`` processes that share the listening port via SO_REUSEPORT.

    The kernel spreads new connections across the processes. SIGTERM and
    SIGINT are passed on to every worker.
    """
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_worker_main, args=(settings,), name=f"worker-{index}")
        for index in range(workers)
    ]
    stopping = False

    def stop(signum: int = signal.SIGTERM, frame: Any = None) -> None:
        nonlocal stopping
        stopping = True
        for process in processes:
            if process.pid is not None and process.is_alive():
                process.terminate()

    # Handlers first, so a signal during start-up cannot orphan a worker.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for process in processes:
        process.start()

    running = list(processes)
    while running:
        for sentinel in multiprocessing.connection.wait([p.sentinel for p in running]):
            exited = next(p for p in running if p.sentinel == sentinel)
            exited.join()
            running.remove(exited)
            if exited.pid is not None:
                multiprocess.mark_process_dead(exited.pid)  # type: ignore[no-untyped-call]
            if not stopping and exited.exitcode != 0:
                # One worker failed: stop the others rather than run short.
                stop()

    failed = [p.name for p in processes if p.exitcode not in (0, -signal.SIGTERM)]
    if failed:
        print(f"misskey-gateway: workers failed: {', '.join(failed)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


# token


def _read_token_input() -> str:
    if sys.stdin.isatty():
        text = getpass.getpass("Misskey token: ")
    else:
        text = sys.stdin.read()
    token = text.strip()
    try:
        return validate_token(token)
    except ValueError as error:
        raise CommandFailed(f"invalid token on standard input: {error}") from None


def _token_set(args: argparse.Namespace) -> int:
    principal = _principal(args)
    token = _read_token_input()

    async def work(store: TokenStore) -> int:
        await store.set_token(principal, token)
        print(f"stored token for {principal} ({fingerprint(token)})")
        return EXIT_OK

    return _run_with_store(_settings(args), work)


def _token_get(args: argparse.Namespace) -> int:
    principal = _principal(args)

    async def work(store: TokenStore) -> int:
        try:
            token = await store.get_token(principal)
        except StoredTokenInvalid:
            raise CommandFailed(
                f"the stored value for {principal} is not a valid token; "
                f"store a new one with: misskey-gateway token set {principal}"
            ) from None
        if token is None:
            raise CommandFailed(f"no token stored for {principal}")
        print(token if args.reveal else f"{principal} {fingerprint(token)}")
        return EXIT_OK

    return _run_with_store(_settings(args), work)


def _token_delete(args: argparse.Namespace) -> int:
    principal = _principal(args)

    async def work(store: TokenStore) -> int:
        if not await store.delete_token(principal):
            raise CommandFailed(f"no token stored for {principal}")
        print(f"deleted token for {principal}")
        return EXIT_OK

    return _run_with_store(_settings(args), work)


def _token_list(args: argparse.Namespace) -> int:
    async def work(store: TokenStore) -> int:
        for principal in await store.principals():
            print(principal)
        return EXIT_OK

    return _run_with_store(_settings(args), work)


# jwt


def _jwt_issue(args: argparse.Namespace) -> int:
    settings = _settings(args)
    principal = _principal(args)
    ttl = settings.jwt.default_ttl if args.ttl is None else args.ttl
    if ttl < 1:
        raise CommandFailed(f"--ttl must be at least 1 second, not {ttl}")

    if settings.jwt.secret or settings.jwt.public_key_file:
        print(issue_jwt(settings.jwt, settings.jwt.secret, principal, args.scope, ttl))
        return EXIT_OK

    async def work(store: TokenStore) -> int:
        secret = await store.jwt_secret()
        print(issue_jwt(settings.jwt, secret, principal, args.scope, ttl))
        return EXIT_OK

    return _run_with_store(settings, work)


def _jwt_revoke(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.jwt_id is not None:
        if args.revoke_for is None or args.revoke_for < 1:
            raise CommandFailed("--for SECONDS (at least 1) is required with a JTI")
        jwt_id = args.jwt_id
        expires_at = time.time() + args.revoke_for
    else:
        jwt_id, expires_at = _jwt_id_from_stdin(settings)
    if not JWT_ID_PATTERN.fullmatch(jwt_id):
        raise CommandFailed(f"invalid jti {jwt_id!r}")

    async def work(store: TokenStore) -> int:
        await store.revoke_jwt_id(jwt_id, expires_at)
        until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires_at))
        print(f"revoked jti {jwt_id} until {until}")
        return EXIT_OK

    return _run_with_store(settings, work)


def _jwt_id_from_stdin(settings: Settings) -> tuple[str, float]:
    """Read a JWT from standard input; return its jti and expiry.

    The signature is not checked: revoking a forged token is harmless.
    """
    text = sys.stdin.read().strip()
    try:
        claims = pyjwt.decode(text, options={"verify_signature": False})
    except pyjwt.PyJWTError as error:
        raise CommandFailed(f"standard input is not a JWT: {error}") from None
    jwt_id = claims.get("jti")
    expires = claims.get("exp")
    if not isinstance(jwt_id, str):
        raise CommandFailed("the JWT has no jti claim, so it cannot be revoked alone")
    if not isinstance(expires, int | float):
        raise CommandFailed("the JWT has no exp claim")
    return jwt_id, float(expires) + settings.jwt.leeway


# key


def _key_create(args: argparse.Namespace) -> int:
    principal = _principal(args)
    key, record = new_api_key(principal, args.scope)

    async def work(store: TokenStore) -> int:
        await store.put_api_key(record)
        print(key)
        scope = record.scope or "no permission kinds"
        print(
            f"created API key {record.key_id} for {principal} ({scope}); "
            "it is shown only now",
            file=sys.stderr,
        )
        return EXIT_OK

    return _run_with_store(_settings(args), work)


def _key_revoke(args: argparse.Namespace) -> int:
    principal = _principal(args)

    async def work(store: TokenStore) -> int:
        revoked = await store.delete_api_keys(principal, args.key_id)
        if revoked == 0:
            which = f"with id {args.key_id} " if args.key_id else ""
            raise CommandFailed(f"no API key {which}found for {principal}")
        print(f"revoked {revoked} API key{'s' if revoked != 1 else ''} of {principal}")
        return EXIT_OK

    return _run_with_store(_settings(args), work)


def _key_list(args: argparse.Namespace) -> int:
    principal = _principal(args)

    async def work(store: TokenStore) -> int:
        for record in await store.list_api_keys(principal):
            created = time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created_at)
            )
            print(f"{record.key_id}  {created}  {record.scope or '-'}")
        return EXIT_OK

    return _run_with_store(_settings(args), work)


# invite


def _invite_create(args: argparse.Namespace) -> int:
    settings = _settings(args)
    principal = _principal(args)
    if args.ttl < 1:
        raise CommandFailed(f"--ttl must be at least 1 second, not {args.ttl}")
    invite, digest = new_invite()
    expires_at = time.time() + args.ttl

    async def work(store: TokenStore) -> int:
        await store.put_invite(principal, digest, expires_at)
        print(invite)
        until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires_at))
        print(
            f"created an invite for {principal}, valid once until {until}; "
            "it is shown only now",
            file=sys.stderr,
        )
        if not settings.onboarding.enabled:
            print(
                "note: onboarding.enabled is false, so the gateway rejects "
                "the invite until it is set to true",
                file=sys.stderr,
            )
        public_url = settings.onboarding.public_url.rstrip("/")
        form = CALLBACK_PATH.rsplit("/", 1)[0] + "/"
        if public_url:
            query = urlencode({"principal": principal, "invite": invite})
            print(f"send this link: {public_url}{form}?{query}", file=sys.stderr)
        else:
            print(f"the person enters it on the gateway's {form} page", file=sys.stderr)
        return EXIT_OK

    return _run_with_store(settings, work)


# client


def _client_create(args: argparse.Namespace) -> int:
    principal = _principal(args)
    secret, record = new_oauth_client(principal, args.scope)

    async def work(store: TokenStore) -> int:
        await store.put_oauth_client(record)
        print(f"client_id={record.client_id}")
        print(f"client_secret={secret}")
        scope = record.scope or "no permission kinds"
        print(
            f"created OAuth client {record.client_id} for {principal} ({scope}); "
            "the secret is shown only now",
            file=sys.stderr,
        )
        return EXIT_OK

    return _run_with_store(_settings(args), work)


def _client_revoke(args: argparse.Namespace) -> int:
    client_id = args.client_id
    if not CLIENT_ID_PATTERN.fullmatch(client_id):
        raise CommandFailed(
            f"invalid client id {client_id!r}; client ids look like mgc_ and 24 "
            "hex digits"
        )

    async def work(store: TokenStore) -> int:
        if not await store.delete_oauth_client(client_id):
            raise CommandFailed(f"no OAuth client {client_id}")
        print(f"revoked OAuth client {client_id}")
        return EXIT_OK

    return _run_with_store(_settings(args), work)


# policy


def _policy_sync(args: argparse.Namespace) -> int:
    settings = _settings(args)
    upstream = settings.require_upstream()
    try:
        document = asyncio.run(fetch_openapi(upstream))
        rows, version = rows_from_openapi(document)
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:
        raise CommandFailed(f"cannot read {upstream}/api.json: {error}") from None
    text = render_table(rows, version or "unknown", "misskey-gateway policy sync")

    current = load_policy_table(settings.policy.file or None, settings.policy.endpoints)
    difference = compare(current, rows)
    if args.output:
        path = Path(args.output)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(text, encoding="utf-8")
        partial.replace(path)
    else:
        sys.stdout.write(text)
    print(
        f"{len(rows)} endpoints from Misskey {version or 'unknown'}: "
        f"{len(difference.missing_from_table)} not in the current table, "
        f"{len(difference.missing_upstream)} only in the current table, "
        f"{len(difference.changed)} with another row",
        file=sys.stderr,
    )
    return EXIT_OK


def _policy_show(args: argparse.Namespace) -> int:
    settings = _settings(args)
    table = load_policy_table(settings.policy.file or None, settings.policy.endpoints)
    name = args.endpoint.strip()
    if name.startswith(API_PREFIX):
        name = name[len(API_PREFIX) :]
    name = name.lstrip("/")
    policy = table.lookup(name)
    print(f"endpoint:  {policy.endpoint}")
    print(f"mode:      {policy.mode.value}")
    print(f"kind:      {policy.kind or '-'}")
    print(f"allow_get: {'true' if policy.allow_get else 'false'}")
    print(f"source:    {policy.source}")
    return EXIT_OK


# check


def _check(args: argparse.Namespace) -> int:
    settings = _settings(args)
    upstream_url = settings.require_upstream()
    table = load_policy_table(settings.policy.file or None, settings.policy.endpoints)
    print(f"config: ok ({len(table)} policy rows)")

    async def work(store: TokenStore) -> int:
        await store.ping()
        print(f"store: ok ({store.description})")
        version = await _check_upstream(settings)
        print(f"upstream: ok ({upstream_url}, Misskey {version})")
        return EXIT_OK

    return _run_with_store(settings, work)


async def _check_upstream(settings: Settings) -> str:
    url = settings.upstream.url.rstrip("/") + "/api/meta"
    timeout = aiohttp.ClientTimeout(
        connect=settings.upstream.connect_timeout,
        sock_read=settings.upstream.read_timeout,
    )
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.post(url, json={"detail": False}) as response:
                text = await response.text()
                if response.status != 200:
                    raise CommandFailed(
                        f"upstream {url} returned HTTP {response.status}; "
                        "is upstream.url the Misskey server's origin?"
                    )
    except TimeoutError:
        raise CommandFailed(f"upstream {url} timed out") from None
    except aiohttp.ClientError as error:
        raise CommandFailed(f"cannot reach upstream {url}: {error}") from None
    try:
        meta = json.loads(text)
    except ValueError:
        raise CommandFailed(
            f"upstream {url} returned no JSON; is it a Misskey server?"
        ) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("version"), str):
        raise CommandFailed(f"upstream {url} returned no Misskey version")
    return str(meta["version"])
