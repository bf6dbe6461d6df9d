"""External CA connectors: configured on a TSG, usable by keys in its subtree.

A connector names an external CA (``csr``: an administrator carries the CSR to
the CA and the chain back; ``est``: RFC 7030 enrollment over HTTPS) and the
trust anchors every chain it delivers must reach. Its secrets (the EST
password, the TLS client key) are encrypted under the master key, bound to the
connector's id, and never returned by the API: responses say only whether one
is set.

What a connector does with a CSR is its kind's business (one module per kind,
signery.server.connectors.registry); this service stores, authorizes and audits
connectors whatever their kind. Which keys use a connector comes through the
narrow :class:`ConnectorUsers` interface (implemented by signery.server.keys).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select
from sqlalchemy.orm import Session

from signery import protocol as p
from signery.errors import (
    ConfigurationError,
    ConnectorInUse,
    ConnectorNotFound,
    ConnectorRequiresHardwareKey,
    InvalidRequest,
    NameTaken,
    TsgNotFound,
)
from signery.keystores import Keyring, KeyStoreRegistry
from signery.protocol import AuditOutcome, ConnectorKind
from signery.server.access.authz import Authorizer, Permission, Principal
from signery.server.access.context import RequestContext
from signery.server.audit.events import Actor, AuditRecord, EventKind
from signery.server.audit.recorder import AuditRecorder
from signery.server.ca.chains import fingerprint, parse_trust_anchors
from signery.server.ca.models import CaConnectorRow
from signery.server.connectors.base import (
    HARDWARE_STORE_KINDS,
    Connector,
    ConnectorRecord,
    StoredSettings,
)
from signery.server.connectors.registry import ConnectorKinds
from signery.server.persistence.db import Database, flush_unique, new_id
from signery.server.runtime.clock import Clock
from signery.server.tsg.models import TsgRow
from signery.server.tsg.tree import TsgDirectory, rows_by_ref, visible_rows_by_ref

_SECRETS_AAD = b"signery/ca-connector-secrets/v1/"


def _aad(connector_id: str) -> bytes:
    # Bound to the connector: secrets copied onto another row do not decrypt.
    return _SECRETS_AAD + connector_id.encode("ascii")


def wrap_secrets(keyring: Keyring, connector_id: str, secrets: dict[str, str]) -> str | None:
    if not secrets:
        return None
    primary = keyring.primary
    blob = primary.encrypt(json.dumps(secrets).encode(), _aad(connector_id))
    return json.dumps({"master_key_id": primary.key_id, "wrapped": base64.b64encode(blob).decode()})


def unwrap_secrets(keyring: Keyring, connector_id: str, value: str | None) -> dict[str, str]:
    if not value:
        return {}
    try:
        doc = json.loads(value)
        key_id, blob = doc["master_key_id"], base64.b64decode(doc["wrapped"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigurationError(f"the secrets of CA connector {connector_id} are damaged") from e
    master = keyring.get(key_id)
    if master is None and keyring.refresh():
        master = keyring.get(key_id)  # rotated by another process: re-read the file
    if master is None:
        raise ConfigurationError(
            f"the secrets of CA connector {connector_id} are wrapped by master key {key_id}, "
            "which is not in the master key file"
        )
    secrets = json.loads(master.decrypt(blob, _aad(connector_id)))
    assert isinstance(secrets, dict)
    return {str(k): str(v) for k, v in secrets.items()}


def rewrap_connector_secrets(db: Database, keyring: Keyring) -> int:
    """Re-wrap every connector's secrets under the primary master key (rotation)."""
    done = 0
    with db.read() as s:
        rows = s.execute(
            select(CaConnectorRow.id, CaConnectorRow.secrets_wrapped).where(
                CaConnectorRow.secrets_wrapped.is_not(None)
            )
        ).all()
    for connector_id, value in rows:
        if value is None or json.loads(value).get("master_key_id") == keyring.primary.key_id:
            continue
        with db.write() as s:
            row = s.get(CaConnectorRow, connector_id, with_for_update=True)
            if row is None or row.secrets_wrapped is None:
                continue
            secrets = unwrap_secrets(keyring, connector_id, row.secrets_wrapped)
            row.secrets_wrapped = wrap_secrets(keyring, connector_id, secrets)
        done += 1
    return done


def connectors_not_under(db: Database, primary_key_id: str) -> int:
    with db.read() as s:
        values = s.scalars(
            select(CaConnectorRow.secrets_wrapped).where(
                CaConnectorRow.secrets_wrapped.is_not(None)
            )
        ).all()
    return sum(1 for v in values if v and json.loads(v).get("master_key_id") != primary_key_id)


class ConnectorUsers(Protocol):
    """What the connectors need to know of the signing keys that use them."""

    def key_names(self, s: Session, connector_id: str, *, limit: int) -> Sequence[str]:
        """Names of (up to ``limit``) keys certified through the connector."""
        ...

    def key_stores(self, s: Session, connector_id: str) -> Sequence[str]:
        """The key stores (names) of the keys certified through the connector."""
        ...


class ConnectorService:
    def __init__(
        self,
        *,
        db: Database,
        authz: Authorizer,
        recorder: AuditRecorder,
        clock: Clock,
        directory: TsgDirectory,
        keyring: Keyring,
        keystores: KeyStoreRegistry,
        users: ConnectorUsers,
        kinds: ConnectorKinds | None = None,
    ) -> None:
        self._keystores = keystores
        self._users = users
        self.kinds = kinds or ConnectorKinds()
        self._db = db
        self._authz = authz
        self._recorder = recorder
        self._clock = clock
        self._directory = directory
        self._keyring = keyring

    # ------------------------------------------------------------ management

    def create(
        self, principal: Principal, req: p.CaConnectorCreate, ctx: RequestContext
    ) -> p.CaConnector:
        tsg_id = req.tsg_id or principal.tsg_id
        roots = parse_trust_anchors(req.roots_pem)
        settings = self.kinds.get(req.kind.value).configure(req.est, StoredSettings())
        connector_id = new_id()
        with self._db.write() as s:
            path = self._directory.path(s, tsg_id)
            if path is None:
                raise TsgNotFound()
            self._authz.require(
                principal, Permission.CA_CONNECTOR_MANAGE, path, not_found=TsgNotFound
            )
            row = CaConnectorRow(
                id=connector_id,
                name=req.name,
                tsg_id=tsg_id,
                kind=req.kind.value,
                public=req.public,
                roots_pem="".join(
                    c.public_bytes(serialization.Encoding.PEM).decode() for c in roots
                ),
                config_json=json.dumps(settings.config),
                secrets_wrapped=wrap_secrets(self._keyring, connector_id, settings.secrets),
                created_at=self._clock.now(),
            )
            s.add(row)
            taken = NameTaken(f"a CA connector named {req.name!r} already exists in TSG {tsg_id}")
            flush_unique(s, taken)
            self._record(
                s,
                EventKind.CA_CONNECTOR_CREATED,
                principal,
                row,
                path,
                ctx,
                {
                    "name": req.name,
                    "kind": req.kind.value,
                    "public": req.public,
                    "roots": [fingerprint(r) for r in roots],
                    "est_url": settings.config.get("url"),
                },
            )
            return self._wire(row)

    def list_connectors(
        self, principal: Principal, tsg_id: str | None = None
    ) -> list[p.CaConnector]:
        scopes = self._authz.scopes(principal, Permission.CA_CONNECTOR_READ)
        with self._db.read() as s:
            rows: list[CaConnectorRow] = []
            for scope in scopes:
                q = (
                    select(CaConnectorRow)
                    .join(TsgRow, TsgRow.id == CaConnectorRow.tsg_id)
                    .where(TsgRow.path.startswith(scope, autoescape=True))
                )
                if tsg_id:
                    q = q.where(CaConnectorRow.tsg_id == tsg_id)
                rows.extend(s.scalars(q))
        return [self._wire(r) for r in sorted(rows, key=lambda r: (r.tsg_id, r.name))]

    def get(self, principal: Principal, ref: str, tsg_id: str | None = None) -> p.CaConnector:
        with self._db.read() as s:
            row, _ = self._resolve(s, principal, ref, Permission.CA_CONNECTOR_READ, tsg_id)
            return self._wire(row)

    def update(
        self,
        principal: Principal,
        ref: str,
        req: p.CaConnectorUpdate,
        ctx: RequestContext,
        tsg_id: str | None = None,
    ) -> p.CaConnector:
        with self._db.write() as s:
            row, path = self._resolve(s, principal, ref, Permission.CA_CONNECTOR_MANAGE, tsg_id)
            changed: list[str] = []
            if req.roots_pem is not None:
                roots = parse_trust_anchors(req.roots_pem)
                row.roots_pem = "".join(
                    c.public_bytes(serialization.Encoding.PEM).decode() for c in roots
                )
                changed.append("roots_pem")
            if req.public is not None and req.public != row.public:
                if req.public:
                    self._refuse_software_keys(s, row)
                row.public = req.public
                changed.append("public")
            if req.est is not None:
                settings = self.kinds.get(row.kind).configure(req.est, self._settings(row))
                row.config_json = json.dumps(settings.config)
                row.secrets_wrapped = wrap_secrets(self._keyring, row.id, settings.secrets)
                changed.append("est")
            if not changed:
                raise InvalidRequest("nothing to change")
            s.flush()
            self._record(
                s,
                EventKind.CA_CONNECTOR_UPDATED,
                principal,
                row,
                path,
                ctx,
                {"name": row.name, "changed": changed, "public": row.public},
            )
            return self._wire(row)

    def delete(
        self, principal: Principal, ref: str, ctx: RequestContext, tsg_id: str | None = None
    ) -> None:
        with self._db.write() as s:
            row, path = self._resolve(s, principal, ref, Permission.CA_CONNECTOR_MANAGE, tsg_id)
            users = self._users.key_names(s, row.id, limit=5)
            if users:
                raise ConnectorInUse(
                    f"CA connector {row.name!r} is used by signing keys ({', '.join(users)})"
                )
            self._record(
                s,
                EventKind.CA_CONNECTOR_DELETED,
                principal,
                row,
                path,
                ctx,
                {"name": row.name, "kind": row.kind},
            )
            s.delete(row)

    # ------------------------------------------------------------ use by keys

    def for_key(self, s: Session, ref: str, key_tsg_path: str, store_kind: str) -> Connector:
        """The connector ``ref`` (name or id) configured on the key's TSG or an
        ancestor (the nearest when several ancestors have one of that name),
        checked against the key's store."""
        usable = [
            (row, path)
            for row, path in rows_by_ref(s, CaConnectorRow, ref)
            if key_tsg_path.startswith(path)
        ]
        if not usable:
            raise ConnectorNotFound(f"no CA connector {ref!r} on the key's TSG or its ancestors")
        row = max(usable, key=lambda found: len(found[1]))[0]
        connector = self.load(row)
        connector.check_store(store_kind)
        return connector

    def by_id(self, s: Session, connector_id: str) -> Connector:
        row = s.get(CaConnectorRow, connector_id)
        if row is None:
            raise ConnectorNotFound()
        return self.load(row)

    def load(self, row: CaConnectorRow) -> Connector:
        """The connector of ``row``, opened by its kind's class."""
        record = ConnectorRecord(
            id=row.id,
            name=row.name,
            tsg_id=row.tsg_id,
            public=row.public,
            roots=tuple(x509.load_pem_x509_certificates(row.roots_pem.encode())),
        )
        return self.kinds.get(row.kind)(record, self._settings(row))

    # ------------------------------------------------------------ helpers

    def _settings(self, row: CaConnectorRow) -> StoredSettings:
        config: dict[str, Any] = json.loads(row.config_json)
        return StoredSettings(config, unwrap_secrets(self._keyring, row.id, row.secrets_wrapped))

    def _refuse_software_keys(self, s: Session, row: CaConnectorRow) -> None:
        stores = self._users.key_stores(s, row.id)
        configured = set(self._keystores.names())
        for name in stores:
            # A store no longer configured here cannot be shown to be hardware.
            kind = self._keystores.get(name).kind if name in configured else "unknown"
            if kind not in HARDWARE_STORE_KINDS:
                raise ConnectorRequiresHardwareKey(
                    f"CA connector {row.name!r} has keys in the {name} store ({kind}): "
                    "it cannot become public"
                )

    def _resolve(
        self,
        s: Session,
        principal: Principal,
        ref: str,
        permission: Permission,
        tsg_id: str | None,
    ) -> tuple[CaConnectorRow, str]:
        found = visible_rows_by_ref(s, principal, CaConnectorRow, ref, tsg_id)
        if not found:
            raise ConnectorNotFound()
        if len(found) > 1:
            raise InvalidRequest(
                f"{len(found)} visible CA connectors are named {ref!r}; pass the id or the TSG"
            )
        row, path = found[0]
        self._authz.require(principal, permission, path, not_found=ConnectorNotFound)
        return row, path

    def _record(
        self,
        s: Session,
        kind: EventKind,
        principal: Principal,
        row: CaConnectorRow,
        path: str,
        ctx: RequestContext,
        details: dict[str, Any],
    ) -> None:
        self._recorder.record(
            s,
            AuditRecord(
                kind,
                AuditOutcome.SUCCEEDED,
                Actor.of(principal),
                tsg_id=row.tsg_id,
                tsg_path=path,
                context=ctx,
                details={"connector_id": row.id, **details},
            ),
        )

    def _wire(self, row: CaConnectorRow) -> p.CaConnector:
        roots = x509.load_pem_x509_certificates(row.roots_pem.encode())
        est = self.kinds.get(row.kind).describe(self._settings(row))
        return p.CaConnector(
            id=row.id,
            name=row.name,
            tsg_id=row.tsg_id,
            kind=ConnectorKind(row.kind),
            public=row.public,
            roots_pem=row.roots_pem,
            roots=[certificate_info(c) for c in roots],
            est=est,
            created_at=row.created_at,
        )


def certificate_info(cert: x509.Certificate) -> p.CertificateInfo:
    return p.CertificateInfo(
        serial=format(cert.serial_number, "x"),
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        fingerprint_sha256=fingerprint(cert),
    )
