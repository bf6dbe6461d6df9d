"""One factory per key store, for the conformance suite and the end-to-end tests.

Each factory is a context manager that yields a ready key store backed by the
real thing (a SQLite database, moto_server over HTTP, SoftHSM2 through its
PKCS#11 library) and cleans up afterwards. A factory whose tool is missing
calls tests.support.missing(): a skip on a developer machine, a failure in CI.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from signery.keystores import BuiltinKeyStore, KeyStore, MasterKey
from signery.server.persistence import migrate
from signery.server.persistence.db import make_engine
from tests.keystores.moto import aws_kms_store
from tests.keystores.softhsm import pkcs11_store

StoreFactory = Callable[[Path], AbstractContextManager[KeyStore]]


@contextlib.contextmanager
def builtin_store(tmp: Path) -> Iterator[KeyStore]:
    engine = make_engine(f"sqlite:///{tmp / 'keys.db'}", pool_size=2)
    migrate.upgrade(engine)
    store = BuiltinKeyStore(engine, MasterKey.generate())
    try:
        yield store
    finally:
        store.close()
        engine.dispose()


FACTORIES: dict[str, StoreFactory] = {"builtin": builtin_store, "pkcs11": pkcs11_store}
FACTORIES["aws-kms"] = aws_kms_store
