"""Each public package has one door: a sorted ``__all__`` that lists every public
class and function it offers, and nothing that is not there (after httpx's
tests/test_exported_members.py)."""

from __future__ import annotations

import inspect
import re
from types import ModuleType

import pytest

import signery.agent
import signery.client
import signery.formats
import signery.keystores

PACKAGES = [signery.client, signery.keystores, signery.formats, signery.agent]


def isort_style(name: str) -> tuple[int, list[str | int]]:
    """The order ruff's RUF022 keeps ``__all__`` in: SCREAMING_SNAKE_CASE constants,
    then CamelCase classes, then everything else; natural sort within each group."""
    if len(name) > 1 and name.isupper():
        group = 0
    elif name[:1].isupper():
        group = 1
    else:
        group = 2
    natural = [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
    return group, natural


@pytest.mark.parametrize("package", PACKAGES, ids=lambda m: m.__name__)
def test_all_is_sorted(package: ModuleType) -> None:
    exported = list(package.__all__)

    assert exported == sorted(exported, key=isort_style)
    assert len(set(exported)) == len(exported)


@pytest.mark.parametrize("package", PACKAGES, ids=lambda m: m.__name__)
def test_every_exported_name_exists(package: ModuleType) -> None:
    missing = [name for name in package.__all__ if not hasattr(package, name)]

    assert missing == []


@pytest.mark.parametrize("package", PACKAGES, ids=lambda m: m.__name__)
def test_every_public_class_and_function_is_exported(package: ModuleType) -> None:
    offered = {
        name
        for name, value in vars(package).items()
        if not name.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and value.__module__.startswith(package.__name__)
    }

    assert offered - set(package.__all__) == set()


@pytest.mark.parametrize("package", PACKAGES, ids=lambda m: m.__name__)
def test_exported_classes_and_functions_come_from_the_package(package: ModuleType) -> None:
    """The door re-exports the package's own names, not other packages' (which
    callers should import from where they live)."""
    foreign = [
        name
        for name in package.__all__
        if (inspect.isclass(obj := getattr(package, name)) or inspect.isfunction(obj))
        and not obj.__module__.startswith(package.__name__)
    ]

    assert foreign == []


def test_the_implementation_modules_are_private() -> None:
    for package in PACKAGES:
        submodules = {
            name for name, value in vars(package).items() if isinstance(value, ModuleType)
        }
        assert all(name.startswith("_") for name in submodules), (package.__name__, submodules)


def test_the_keystores_door_is_pinned() -> None:
    """What the server and the tests may use of the key stores (issue 13): the core
    interface, its optional capabilities, the registry of kinds, the built-in
    store's table, the master key and keyring, and the settings of each kind."""
    assert signery.keystores.__all__ == [
        "BACKENDS",
        "BUILTIN_METADATA",
        "AwsKmsSettings",
        "Backend",
        "BuiltinKeyStore",
        "BuiltinSettings",
        "CancellableKeyStore",
        "DestroyCancellable",
        "Destroyable",
        "DestroyableKeyStore",
        "GeneratedKey",
        "HealthChecked",
        "HealthCheckedKeyStore",
        "KeyContext",
        "KeyHandle",
        "KeyStore",
        "KeyStoreRegistry",
        "KeyWrapper",
        "Keyring",
        "KeyringEntry",
        "KeyringFile",
        "MasterKey",
        "Pkcs11Settings",
        "StoreHealth",
        "health_of",
        "open_key_stores",
        "open_kms_key_wrapper",
        "read_secret_file",
        "remote_private_key",
    ]


# The doors as a library user sees them. A change here is a change of the public
# API: say it in the changelog. Internals stay out: the CLI's profile storage
# (signery.cli), the RFC 3161 query and reply helpers behind request_timestamp,
# the OpenPGP packet parser, the atomic-write helpers formats use on large files.
DOORS = {
    signery.agent: [
        "ADDRESS_VARIABLE",
        "P11_KIT_CLIENT",
        "Agent",
        "AgentSettings",
        "default_socket",
        "prepare_socket_directory",
        "running_in_thread",
        "server_address",
    ],
    signery.client: [
        "DEFAULT_JOBS",
        "AccountCredentials",
        "ApprovalDenied",
        "ApprovalExpired",
        "ApprovalPending",
        "Client",
        "FileResult",
        "RemoteSigner",
        "ServerUnreachable",
        "SignFilesObserver",
        "Timestamp",
        "TimestampFailed",
        "TimestampQuery",
        "TimestampRefused",
        "UnexpectedResponse",
        "load_account_key",
        "request_timestamp",
        "sign_files",
    ],
    signery.formats: [
        "FORMATS",
        "AuthenticodeFormat",
        "AuthenticodeSignatureRequired",
        "CertificateRequired",
        "CmsFormat",
        "CorruptCertificateTable",
        "CorruptJar",
        "FormatSchemeUnsupported",
        "InvalidManifest",
        "JarFormat",
        "KeyChangedWhileSigning",
        "NotACmsSignature",
        "NotAJar",
        "NotPortableExecutable",
        "OpenPgpFormat",
        "OpenPgpInvalidUserId",
        "OpenPgpKey",
        "OpenPgpKeyChanged",
        "OpenPgpKeyTimeUnknown",
        "OpenPgpKeyUnsupported",
        "OpenPgpMalformed",
        "OpenPgpPublicKey",
        "OpenPgpTimestampUnsupported",
        "OutputIsInput",
        "RawFormat",
        "SignOptions",
        "SignResult",
        "SignatureFormat",
        "Signer",
        "Timestamper",
        "TruncatedPortableExecutable",
        "UnknownFormat",
        "VerifyResult",
        "export_public_key",
        "get_format",
        "write_atomically",
    ],
}


@pytest.mark.parametrize("package", list(DOORS), ids=lambda m: m.__name__)
def test_the_door_is_exactly_the_public_api(package: ModuleType) -> None:
    assert list(package.__all__) == DOORS[package]


def test_every_error_a_format_raises_is_offered_by_the_door() -> None:
    """A caller tells failures apart by class: each ClientError defined in a
    format module can be imported from signery.formats (regression: the
    Authenticode errors were missing)."""
    from signery.errors import SigneryError

    defined = {
        name
        for module_name, module in vars(signery.formats).items()
        if isinstance(module, ModuleType) and module_name.startswith("_")
        for name, value in vars(module).items()
        if inspect.isclass(value)
        and issubclass(value, SigneryError)
        and value.__module__ == module.__name__
    }

    assert defined - set(signery.formats.__all__) == set()
