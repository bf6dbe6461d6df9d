"""The CLI tests drive a real `signery serve` through subprocesses. What they test
is the command line (arguments, output, exit codes, files written), which does not
depend on the database: they run against SQLite only. Every server behaviour they
reach is tested on SQLite and PostgreSQL by the in-process tests under
tests/server, and several replicas on one PostgreSQL by tests/e2e. (Running these
twice cost about two minutes of the CI budget.)"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import Installation, new_installation


@pytest.fixture(scope="module")
def installation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    with new_installation("sqlite", tmp_path_factory.mktemp("signery-cli-sqlite")) as inst:
        yield inst
