"""Call four Misskey endpoints through Misskey.py and print the results as JSON.

Usage: python misskey_py_calls.py BASE_URL CREDENTIAL

BASE_URL must include the scheme (``http://127.0.0.1:43123``). Misskey.py
prepends ``https://`` to an address without one. CREDENTIAL goes where
Misskey.py takes the Misskey token, so the library sends it as ``i`` in every
JSON request body.

On success, prints one JSON object that maps each endpoint name to the value
Misskey.py returned and exits 0. On any exception, prints its type and message
to stderr and exits 1.
"""

import json
import sys

from misskey import Misskey
from misskey.exceptions import MisskeyAuthorizeFailedException


def call_endpoints(base_url: str, credential: str) -> dict:
    # The constructor already sends POST /api/meta with the credential as `i`.
    # NOTE: Misskey.py 4.1.0 sends that request without a timeout, so a caller
    # must run this script under its own timeout.
    client = Misskey(base_url, i=credential)
    return {
        "i": client.i(),
        "meta": client.meta(),
        "notes/create": client.notes_create(text="hello from Misskey.py"),
        "notes/local-timeline": client.notes_local_timeline(limit=5),
    }


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(f"usage: {argv[0]} BASE_URL CREDENTIAL", file=sys.stderr)
        return 2
    try:
        results = call_endpoints(argv[1], argv[2])
    except MisskeyAuthorizeFailedException:
        # Misskey.py raises this without a message. Of the calls above, only
        # the constructor's POST /api/meta raises it, on a 401 or 403 status.
        print(
            "MisskeyAuthorizeFailedException: POST /api/meta returned 401 or 403",
            file=sys.stderr,
        )
        return 1
    except Exception as exc:  # noqa: BLE001 - every failure must become exit 1
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
