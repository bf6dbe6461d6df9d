"""The built-in time-stamping authority (RFC 3161): ``POST /api/v1/tsa``.

The service admits a client (signery.server.tsa.ratelimit), parses its query
(signery.server.tsa.query), has the token built and signed through the key store
(signery.server.tsa.token), and answers. The authority is a ``ca_authorities`` row
with role ``tsa`` (signery.server.tsa.authority), made by ``signery init`` or, for
installations initialized before the TSA existed, on first use
(signery.server.tsa.provisioning; the unique ``role`` column settles a race
between workers).

Every answer is audited before it leaves (fail closed, like signing): a token only
after its ``tsa.timestamp.issued`` event and usage count are committed.
"""

from __future__ import annotations

import math
import threading
from datetime import datetime
from typing import Any

import anyio.to_thread
from cryptography import x509
from sqlalchemy import select

from signery.errors import (
    ConfigurationError,
    RateLimited,
    SigneryError,
    TimestampQueryRejected,
    TsaAlreadyProvisioned,
    TsaUnavailable,
    UnsupportedMediaType,
)
from signery.keystores import (
    Destroyable,
    KeyStoreRegistry,
)
from signery.protocol import AuditOutcome
from signery.rfc3161 import QUERY_MEDIA_TYPE
from signery.server.access.context import RequestContext
from signery.server.audit.events import (
    ANONYMOUS,
    Actor,
    AuditRecord,
    Counted,
    EventKind,
    UsageDelta,
    outcome_of,
)
from signery.server.audit.recorder import AuditRecorder
from signery.server.ca.models import CaAuthorityRow
from signery.server.ca.service import (
    ISSUING,
    ROOT,
    random_serial,
)
from signery.server.persistence import meta
from signery.server.persistence.db import Database, flush_unique
from signery.server.runtime.clock import Clock
from signery.server.tsa.authority import TSA, TimestampAuthority, TsaConfig, authority_of
from signery.server.tsa.provisioning import created_record, provision_tsa
from signery.server.tsa.query import TimestampQuery, parse_query
from signery.server.tsa.ratelimit import ClientRateLimiter
from signery.server.tsa.token import TokenBuilder, granted_reply, rejection_reply
from signery.server.tsg.models import TsgRow


class TsaService:
    """Issues RFC 3161 timestamps; every answer is audited before it leaves."""

    def __init__(
        self,
        *,
        db: Database,
        keystores: KeyStoreRegistry,
        recorder: AuditRecorder,
        clock: Clock,
        config: TsaConfig,
        limiter: ClientRateLimiter | None = None,
    ) -> None:
        self._db = db
        self._keystores = keystores
        self._recorder = recorder
        self._clock = clock
        self.config = config
        self.limiter = limiter or ClientRateLimiter(config.rate_limit_per_minute)
        self._loaded: tuple[TimestampAuthority, TokenBuilder] | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------ the authority

    def authority(self) -> TimestampAuthority:
        """The TSA, made now if this installation has none yet (blocking: DB, key store)."""
        return self._load()[0]

    async def authority_async(self) -> TimestampAuthority:
        return (await self._loaded_async())[0]

    async def _loaded_async(self) -> tuple[TimestampAuthority, TokenBuilder]:
        loaded = self._loaded
        if loaded is None:
            loaded = await anyio.to_thread.run_sync(self._load)
        return loaded

    def _load(self) -> tuple[TimestampAuthority, TokenBuilder]:
        with self._lock:
            if self._loaded is not None:
                return self._loaded
            tsa = self._read()
            if tsa is None:
                tsa = self._provision()
            self._loaded = (tsa, TokenBuilder(tsa))
            return self._loaded

    def _read(self) -> TimestampAuthority | None:
        with self._db.read() as s:
            rows = {
                r.role: r
                for r in s.scalars(
                    select(CaAuthorityRow).where(CaAuthorityRow.role.in_((ROOT, ISSUING, TSA)))
                )
            }
            if ROOT not in rows or ISSUING not in rows:
                raise ConfigurationError("the built-in CA is not initialized; run `signery init`")
            row = rows.get(TSA)
            if row is None:
                return None
            tsg_path = s.scalar(select(TsgRow.path).where(TsgRow.id == row.tsg_id))
        if tsg_path is None:
            raise ConfigurationError("the TSA's TSG does not exist")
        authority = authority_of(row)
        return TimestampAuthority(
            id=row.id,
            tsg_id=row.tsg_id,
            tsg_path=tsg_path,
            algorithm=authority.algorithm,
            handle=authority.handle,
            certificate=authority.certificate,
            issuing=x509.load_der_x509_certificate(rows[ISSUING].certificate_der),
            root=x509.load_der_x509_certificate(rows[ROOT].certificate_der),
        )

    def _provision(self) -> TimestampAuthority:
        """Make the TSA of an installation initialized without one (first use).

        Several workers or replicas may get here at once: each makes a key and a
        certificate, and the unique ``role`` lets exactly one row in. The others
        destroy their key and use the winner's."""
        with self._db.read() as s:
            issuing_row = s.scalars(
                select(CaAuthorityRow).where(CaAuthorityRow.role == ISSUING)
            ).one()
            values = meta.read_meta(s)
            root_tsg_id = values[meta.ROOT_TSG_ID]
            root_path = s.scalar(select(TsgRow.path).where(TsgRow.id == root_tsg_id))
        provisioned = provision_tsa(
            self._keystores,
            self._clock,
            self.config,
            issuing=authority_of(issuing_row),
            root_tsg_id=root_tsg_id,
            installation=values.get(meta.INSTALLATION_ID, "")[:8],
        )
        store = self._keystores.get(provisioned.handle.store)
        try:
            with self._db.write() as s:
                s.add(provisioned.row)
                flush_unique(s, TsaAlreadyProvisioned())
                self._recorder.record(
                    s, created_record(provisioned, root_path or "", when="first_use")
                )
        except TsaAlreadyProvisioned:
            if isinstance(store, Destroyable):
                store.destroy(provisioned.handle)  # the race was lost: no orphaned key
        except BaseException:
            if isinstance(store, Destroyable):
                store.destroy(provisioned.handle)
            raise
        tsa = self._read()
        if tsa is None:  # pragma: no cover - a row was committed, by us or a rival
            raise ConfigurationError("the TSA row vanished after it was written")
        return tsa

    async def chain_pem(self) -> str:
        return (await self.authority_async()).chain_pem

    # ------------------------------------------------------------ requests

    async def admit(self, ctx: RequestContext, actor: Actor = ANONYMOUS) -> None:
        """The per-client rate limit, checked before the body is even read.

        A refused client gets a 429 problem document, not a TimeStampResp: nothing
        of its query was parsed. The first refusal of a client in an audit interval
        is audited (with the count of those since not audited); none is counted as
        issued."""
        refusal = self.limiter.take(ctx.client_ip)
        if refusal is None:
            return
        error = RateLimited(
            f"at most {self.config.rate_limit_per_minute} timestamps per minute per client",
            retry_after=max(1, math.ceil(refusal.retry_after)),
        )
        if refusal.audit:
            await self._refused(
                await self.authority_async(),
                error,
                ctx,
                actor=actor,
                extra={"unaudited_refusals": refusal.unaudited},
            )
        else:
            error.audited = True  # accounted for in the client's next audited refusal
        raise error

    async def timestamp(
        self,
        content_type: str | None,
        body: bytes,
        ctx: RequestContext,
        actor: Actor = ANONYMOUS,
    ) -> bytes:
        """A DER TimeStampResp for ``body``: a granted token, or a rejection with the
        failInfo of RFC 3161 §2.4.2. Raises (a problem document) when the body is
        not a timestamp query at all, or nothing can be issued (5xx, fail closed)."""
        tsa, builder = await self._loaded_async()
        try:
            if (content_type or "").split(";")[0].strip().lower() != QUERY_MEDIA_TYPE:
                raise UnsupportedMediaType(
                    f"send the query as {QUERY_MEDIA_TYPE} (RFC 3161 section 3.4)"
                )
            query = parse_query(body, policy=self.config.policy)
        except TimestampQueryRejected as e:
            await self._refused(tsa, e, ctx, actor=actor)
            return rejection_reply(e)
        except SigneryError as e:
            await self._refused(tsa, e, ctx, actor=actor)
            raise
        # RFC 3161 §2.4.2: genTime in UTC with whole seconds; the accuracy covers the
        # truncation (and the server clock's error, which the operator bounds by NTP).
        gen_time = self._clock.now().replace(microsecond=0)
        serial = random_serial()
        try:
            if gen_time >= tsa.certificate.not_valid_after_utc:
                raise TsaUnavailable("the TSA certificate has expired")
            token = await self._build(tsa, builder, query, serial, gen_time)
        except SigneryError as e:
            await self._refused(tsa, e, ctx, query, actor=actor)
            raise
        # Fail closed: the token leaves only after its event and count are durably
        # committed; AuditUnavailable propagates and nothing is returned.
        await self._recorder.commit(
            AuditRecord(
                EventKind.TIMESTAMP_ISSUED,
                AuditOutcome.SUCCEEDED,
                actor,
                tsg_id=tsa.tsg_id,
                tsg_path=tsa.tsg_path,
                key_id=tsa.id,
                key_version=1,
                algorithm=tsa.algorithm.value,
                digest=query.imprint.hex,
                context=ctx,
                details={
                    "hash_algorithm": query.imprint.algorithm.value,
                    # Serials are random_serial()'s 16 random bytes (126 bits of
                    # entropy): unique across workers and replicas with no shared
                    # counter and no database round trip (RFC 3161 §2.4.2 asks for
                    # uniqueness per TSA, not order; a collision needs ~2^63 tokens).
                    "serial": f"{serial:x}",
                    "gen_time": gen_time.isoformat(),
                    "policy": self.config.policy,
                    "nonce": query.nonce is not None,
                    "cert_req": query.cert_req,
                },
            ),
            # The TSA is counted under its key id (scope "key"); the usage report
            # shows it as subject type "tsa".
            UsageDelta(Counted.SUCCEEDED, key_id=tsa.id),
        )
        return granted_reply(token)

    async def _build(
        self,
        tsa: TimestampAuthority,
        builder: TokenBuilder,
        query: TimestampQuery,
        serial: int,
        gen_time: datetime,
    ) -> bytes:
        store = self._keystores.get(tsa.handle.store)

        def build() -> bytes:
            return builder.build(
                query,
                serial=serial,
                gen_time=gen_time,
                policy=self.config.policy,
                accuracy_seconds=self.config.accuracy_seconds,
                sign=lambda hashed: store.sign(tsa.handle, hashed, builder.scheme),
            )

        if store.signs_inline(tsa.algorithm):
            return build()
        return await anyio.to_thread.run_sync(build)

    async def _refused(
        self,
        tsa: TimestampAuthority,
        error: SigneryError,
        ctx: RequestContext,
        query: TimestampQuery | None = None,
        *,
        actor: Actor = ANONYMOUS,
        extra: dict[str, Any] | None = None,
    ) -> None:
        details: dict[str, Any] = dict(extra or {})
        if isinstance(error, TimestampQueryRejected):
            details["fail_info"] = error.failure.value
        if query is not None:
            details["hash_algorithm"] = query.imprint.algorithm.value
        outcome = AuditOutcome.DENIED if isinstance(error, RateLimited) else outcome_of(error)
        await self._recorder.commit(
            AuditRecord(
                EventKind.TIMESTAMP_REFUSED,
                outcome,
                actor,
                reason=error.code,
                tsg_id=tsa.tsg_id,
                tsg_path=tsa.tsg_path,
                key_id=tsa.id,
                key_version=1,
                algorithm=tsa.algorithm.value,
                digest=query.imprint.hex if query is not None else None,
                context=ctx,
                details=details,
            ),
            UsageDelta(Counted.of(outcome), key_id=tsa.id),
        )
        error.audited = True
