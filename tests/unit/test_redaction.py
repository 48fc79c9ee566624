"""Secrets never reach logs or error lines: a database URL's password is hidden wherever
the URL is shown."""

from __future__ import annotations

import pytest

from dstore.master.metadata.postgres import PostgresMetadataStore, redacted


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql://app:s3cret@db.example:5432/dstore",
            "postgresql://app:***@db.example:5432/dstore",
        ),
        ("postgresql://app:p@ss@word@db/dstore", "postgresql://app:***@db/dstore"),
        ("postgresql://app@db/dstore", "postgresql://app@db/dstore"),
        ("postgresql://db/dstore", "postgresql://db/dstore"),
    ],
)
def test_a_database_urls_password_is_never_shown(url: str, shown: str) -> None:
    assert redacted(url) == shown
    assert "s3cret" not in repr(PostgresMetadataStore(url)) and "word" not in redacted(url)
