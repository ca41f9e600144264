#!/usr/bin/env python3
"""Generate the default endpoint policy table from Misskey endpoint metadata.

Input is a tab-separated file with one row per Misskey API endpoint and the
columns ``endpoint requireCredential kind allowGet secure requireModerator
requireAdmin``, as read from each endpoint's ``meta`` declaration in Misskey's
``packages/backend/src/server/api/endpoints/``. Output is the TOML table that
the gateway loads at start-up (``config/policy.toml``).

Usage:
    python scripts/generate_policy.py ENDPOINTS.tsv MISSKEY_VERSION \
        > config/policy.toml
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from gateway.policy_rules import (
    EXTRA_ROWS,
    Row,
    classify,
    render_table,
    with_extra_rows,
)

TRUE = "true"


def build_rows(rows: list[dict[str, str]]) -> dict[str, Row]:
    """Turn metadata rows into gateway rows, plus the routes outside the table."""
    built: dict[str, Row] = {}
    for row in rows:
        built[row["endpoint"]] = classify(
            row["endpoint"],
            needs_credential=TRUE
            in (row["requireCredential"], row["requireModerator"], row["requireAdmin"]),
            secure=row["secure"] == TRUE,
            kind=row["kind"],
            allow_get=row["allowGet"] == TRUE,
        )
    for name in EXTRA_ROWS:
        if name in built:
            raise ValueError(f"{name} is already in the metadata file")
    return with_extra_rows(built)


def render(rows: list[dict[str, str]], version: str) -> str:
    return render_table(build_rows(rows), version, "scripts/generate_policy.py")


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    with Path(argv[1]).open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    sys.stdout.write(render(rows, argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
