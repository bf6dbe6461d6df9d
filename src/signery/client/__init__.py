"""The Signery client: digest locally, sign remotely.

from signery.client import AccountCredentials, Client
from signery.crypto import hash_file
from signery.protocol import DigestAlgorithm

creds = AccountCredentials.from_key_file(client_id, Path("ci.pem"))
with Client("https://signery.example", credentials=creds) as client:
    signer = client.signer("release")
    signature = signer.sign(hash_file(Path("app.tar.gz"), DigestAlgorithm.SHA256))

Many files in a real format, as ``signery sign`` writes them:

from signery.client import sign_files

with Client("https://signery.example", credentials=creds) as client:
    results = sign_files(client, "release", [Path("app.exe"), Path("lib.dll")], "authenticode")
failed = [r for r in results if isinstance(r, SigneryError)]
"""

from signery.client._batch import (
    DEFAULT_JOBS,
    FileResult,
    SignFilesObserver,
    sign_files,
)
from signery.client._client import (
    AccountCredentials,
    ApprovalDenied,
    ApprovalExpired,
    ApprovalPending,
    Client,
    ServerUnreachable,
    UnexpectedResponse,
    load_account_key,
)
from signery.client._signer import RemoteSigner
from signery.client._timestamp import (
    Timestamp,
    TimestampFailed,
    TimestampQuery,
    TimestampRefused,
    request_timestamp,
)

__all__ = [
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
]
