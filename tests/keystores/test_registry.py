"""The key-store plug-in point: kinds map to modules imported on demand, a missing
SDK ends with its install hint, the configured stores open into a registry, and
a new kind needs one module and one entry."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from signery.crypto import hash_bytes, verify_signature
from signery.errors import ConfigurationError, KeyStoreError, UnknownKeyStore
from signery.keystores import (
    BACKENDS,
    AwsKmsSettings,
    Backend,
    BuiltinKeyStore,
    BuiltinSettings,
    HealthChecked,
    KeyContext,
    Keyring,
    KeyStore,
    MasterKey,
    Pkcs11Settings,
    StoreHealth,
    health_of,
    open_key_stores,
)
from signery.protocol import Algorithm, DigestAlgorithm, SignatureScheme
from tests.keystores.memory_store import MemoryKeyStore, MemorySettings

KEYSTORES_SRC = Path(__file__).parents[2] / "src" / "signery" / "keystores"
MEMORY = Backend("memory", "tests.keystores.memory_store", section="memory")

# Run in a fresh interpreter in which the SDK's top-level package cannot be
# imported, the way it fails when the extra is not installed.
REFUSE_SDK = """
import importlib.abc, json, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == {sdk!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Refuse())
for loaded in [m for m in sys.modules if m.split(".")[0] == {sdk!r}]:
    del sys.modules[loaded]

import signery.keystores as ks
from signery.errors import ConfigurationError

settings = {settings}
try:
    ks.open_key_stores({{{kind!r}: settings}})
except ConfigurationError as e:
    print(json.dumps({{"message": e.detail, "cause": getattr(e.__cause__, "name", None)}}))
else:
    print(json.dumps({{"message": None}}))
"""

SDK_CASES = {
    "aws-kms": ("boto3", "ks.AwsKmsSettings(region='eu-central-1')", "signery[aws]"),
    "pkcs11": (
        "pkcs11",
        "ks.Pkcs11Settings(module='/nonexistent/libp11.so', token_label='t', pin='1234')",
        "signery[pkcs11]",
    ),
}


@pytest.mark.parametrize("kind", sorted(SDK_CASES))
def test_a_missing_sdk_ends_with_its_install_hint(kind: str) -> None:
    sdk, settings, extra = SDK_CASES[kind]
    script = REFUSE_SDK.format(sdk=sdk, kind=kind, settings=settings)

    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )

    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    section = BACKENDS[kind].section
    assert answer["message"] == f"[{section}] is configured: pip install '{extra}'"
    # The real import failure stays attached, naming what is missing.
    assert answer["cause"].split(".")[0] == sdk


def test_importing_the_package_imports_no_sdk_and_no_server() -> None:
    script = (
        "import json, sys; import signery.keystores; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'boto3', 'pkcs11'}) "
        "+ sorted(m for m in sys.modules if m.startswith('signery.server'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )

    assert json.loads(done.stdout) == []


def test_no_keystores_module_imports_the_server() -> None:
    """Not even under TYPE_CHECKING: the key stores sit below the server."""
    offenders = []
    for path in sorted(KEYSTORES_SRC.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("signery.server")]

    assert offenders == []


def test_every_kind_names_its_module_and_its_stores_kind() -> None:
    for kind, backend in BACKENDS.items():
        assert backend.kind == kind
        assert backend.module.startswith("signery.keystores._")
        assert (backend.extra is None) == (kind == "builtin")
        store_class = {
            "builtin": "BuiltinKeyStore",
            "aws-kms": "AwsKmsKeyStore",
            "pkcs11": "Pkcs11KeyStore",
        }[kind]
        assert getattr(backend.load(), store_class).kind == kind
    # Each kind's settings say which kind they open (the server keys them so).
    assert {BuiltinSettings.kind, AwsKmsSettings.kind, Pkcs11Settings.kind} == set(BACKENDS)


def test_a_new_kind_is_one_module_and_one_entry() -> None:
    registry = open_key_stores(
        {"memory": MemorySettings("scratch")}, backends={**BACKENDS, "memory": MEMORY}
    )

    store = registry.get("scratch")
    assert isinstance(store, MemoryKeyStore)
    generated = store.generate(Algorithm.EC_P256, KeyContext(str(uuid.uuid4()), 1, "1234567890"))
    hashed = hash_bytes(b"artifact", DigestAlgorithm.SHA256)
    signature = store.sign(generated.handle, hashed, SignatureScheme.ECDSA)
    assert verify_signature(generated.public_key, hashed, SignatureScheme.ECDSA, signature)


def test_a_store_without_the_optional_capabilities() -> None:
    """The server's answers for a store that cannot erase keys nor check its health."""
    registry = open_key_stores(
        {"memory": MemorySettings()}, backends={**BACKENDS, "memory": MEMORY}
    )
    store = registry.get("memory")

    assert not isinstance(store, HealthChecked)
    assert health_of(store) == StoreHealth(True, "no health check")
    assert registry.health() == {"memory": StoreHealth(True, "no health check")}
    with pytest.raises(KeyStoreError, match="cannot erase keys"):
        registry.destroyable("memory")


def test_the_builtin_kind_opens_on_the_given_database(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'k.db'}")
    try:
        registry = open_key_stores(
            {"builtin": BuiltinSettings(engine, Keyring(MasterKey.generate()))}
        )
        assert isinstance(registry.get("builtin"), BuiltinKeyStore)
        assert registry.destroyable("builtin") is registry.get("builtin")
    finally:
        engine.dispose()


def test_an_unknown_kind_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="no key store of kind 'vault'"):
        open_key_stores({"vault": object()})


def test_a_store_that_fails_to_open_closes_the_ones_before() -> None:
    opened: list[KeyStore] = []

    class Recording(Backend):
        def open_store(self, settings: object) -> KeyStore:
            opened.append(super().open_store(settings))
            return opened[-1]

    class Broken(Backend):
        def open_store(self, settings: object) -> KeyStore:
            raise ConfigurationError("[broken] cannot be opened")

    with pytest.raises(ConfigurationError, match="cannot be opened"):
        open_key_stores(
            {"memory": MemorySettings("first"), "broken": None},
            backends={
                "memory": Recording("memory", MEMORY.module, section="memory"),
                "broken": Broken("broken", "nowhere", section="broken"),
            },
        )

    assert [(s.name, getattr(s, "closed", False)) for s in opened] == [("first", True)]


def test_an_unknown_store_name_is_the_callers_error() -> None:
    registry = open_key_stores({})
    with pytest.raises(UnknownKeyStore):
        registry.get("builtin")
