"""Subject policies: which certificate subjects the built-in CA issues in a TSG.

The built-in CA is the installation's trust anchor, shared by every tenant: a
relying party that trusts it tells signers apart by the subject of their
certificate. So the subjects a TSG may put in certificates are set from above:

- A policy belongs to one TSG and lists, per attribute of a subject (CN, O, OU,
  C, emailAddress: the only ones the built-in CA puts in a certificate), the
  patterns one of which the value must match (:class:`signery.protocol.SubjectPolicyRules`).
  An attribute without patterns may not appear.
- Policies are inherited downwards and only narrow: a subject must satisfy
  **every** policy on the path from the root TSG down to the key's TSG. A
  policy set on a child can restrict what its parent allows, never widen it.
- Without any policy on the path, the root TSG (the CA's own tenant) gets any
  subject, and every TSG below it gets **no** certificate from the built-in CA:
  ``subject_policy_missing`` until a root superuser sets one. That is the secure
  default and the step an operator takes on upgrade (docs/security.md).
- Only a superuser at the root TSG sets or clears policies
  (``signery.ca.subject_policy.manage`` checked at the root, like revocation);
  whoever may read a TSG may read the policies that apply to it.

Patterns are globs, never regular expressions (a pattern from an administrator
must not be able to make matching slow): ``*`` any run of characters, ``?`` one
character, ``\\`` makes the next character literal. Matching is case-sensitive:
X.509 compares names ignoring case (RFC 5280 §7.1), so exact matching can only
refuse more, never allow a subject the policy's author did not write. The
matcher runs in O(pattern x value) time whatever the pattern.

The rule is checked wherever the built-in CA issues: key creation, renewal,
reissue, rotation (scheduled ones too) and EST enrollment. Certificates from CA
connectors are issued by another CA under that CA's own rules.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from signery import protocol as p
from signery.errors import (
    Conflict,
    PermissionDenied,
    SubjectNotAllowed,
    SubjectPolicyInvalid,
    SubjectPolicyMissing,
    SubjectPolicyNotFound,
    TsgNotFound,
)
from signery.protocol import AuditOutcome, SubjectPolicyEffect
from signery.server.access.authz import Authorizer, Denied, Permission, Principal
from signery.server.access.context import RequestContext
from signery.server.audit.events import Actor, AuditRecord, EventKind
from signery.server.audit.recorder import AuditRecorder
from signery.server.ca.models import SubjectPolicyRow
from signery.server.persistence.db import Database, flush_unique
from signery.server.runtime.clock import Clock
from signery.server.tsg.tree import TsgDirectory

# The attributes of a subject, as p.KeySubject names them, in certificate order.
ATTRIBUTES: tuple[str, ...] = (
    "common_name",
    "organization",
    "organizational_unit",
    "country",
    "email",
)
# Longer than any value a subject may hold (KeySubject: 64, e-mail 128).
PATTERN_MAX_CHARS = 128
_ANY_RUN = 0
_ANY_ONE = 1
Token = str | int


@dataclass(frozen=True, slots=True)
class Glob:
    """A compiled pattern: literal characters, ``_ANY_ONE`` and ``_ANY_RUN``."""

    text: str
    tokens: tuple[Token, ...]

    def matches(self, value: str) -> bool:
        # Greedy matching that backtracks only to the last star: each character of
        # the value is revisited at most once per star, so O(len(tokens) * len(value)).
        tokens = self.tokens
        t = v = 0
        star, resume = -1, 0
        while v < len(value):
            if t < len(tokens) and (tokens[t] == _ANY_ONE or tokens[t] == value[v]):
                t += 1
                v += 1
            elif t < len(tokens) and tokens[t] == _ANY_RUN:
                star, resume = t, v
                t += 1
            elif star >= 0:
                resume += 1
                t, v = star + 1, resume
            else:
                return False
        while t < len(tokens) and tokens[t] == _ANY_RUN:
            t += 1
        return t == len(tokens)


def compile_pattern(text: str) -> Glob:
    """The pattern as a :class:`Glob`; ValueError (with the reason) if it is not one."""
    if len(text) > PATTERN_MAX_CHARS:
        raise ValueError(f"longer than {PATTERN_MAX_CHARS} characters")
    if any(unicodedata.category(c) == "Cc" for c in text):
        # No certificate value holds a control character, and a NUL cannot even be
        # stored in PostgreSQL text.
        raise ValueError("control characters are not allowed")
    tokens: list[Token] = []
    escaped = False
    for c in text:
        if escaped:
            tokens.append(c)
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == "*":
            if not tokens or tokens[-1] != _ANY_RUN:
                tokens.append(_ANY_RUN)
        elif c == "?":
            tokens.append(_ANY_ONE)
        else:
            tokens.append(c)
    if escaped:
        raise ValueError("ends with a lone backslash (write \\\\ for a literal one)")
    return Glob(text, tuple(tokens))


def validate_rules(rules: p.SubjectPolicyRules) -> p.SubjectPolicyRules:
    """Every pattern checked (SubjectPolicyInvalid names the first bad one), each
    list without duplicates, order kept."""
    if not rules.common_name:
        raise SubjectPolicyInvalid(
            "common_name: every certificate has a CN, so a policy lists the CNs it allows "
            "('*' allows any)"
        )
    clean: dict[str, list[str]] = {}
    for attribute in ATTRIBUTES:
        patterns: list[str] = getattr(rules, attribute)
        for i, text in enumerate(patterns):
            try:
                compile_pattern(text)
            except ValueError as e:
                raise SubjectPolicyInvalid(f"{attribute}[{i}]: {text[:40]!r} {e}") from None
        clean[attribute] = list(dict.fromkeys(patterns))
    return p.SubjectPolicyRules(**clean)


def subject_values(subject: p.KeySubject, default_cn: str) -> dict[str, str]:
    """What the certificate will hold, per attribute ('' when absent), as
    ``signery.server.ca.service.subject_name`` builds it."""
    values = {a: getattr(subject, a) or "" for a in ATTRIBUTES}
    values["common_name"] = subject.common_name or default_cn
    return values


def tsg_ids_of(path: str) -> list[str]:
    """The TSG ids of a materialized path, root first."""
    return [part for part in path.split("/") if part]


def policies_on_path(s: Session, path: str) -> list[SubjectPolicyRow]:
    """The policies set on the TSG at ``path`` and on every TSG above it, root first."""
    ids = tsg_ids_of(path)
    rows = {
        row.tsg_id: row
        for row in s.scalars(select(SubjectPolicyRow).where(SubjectPolicyRow.tsg_id.in_(ids)))
    }
    return [rows[i] for i in ids if i in rows]


def allows(patterns: Sequence[str], value: str) -> bool:
    """Whether an attribute's patterns allow its value ('' when absent): an
    attribute without patterns may only be absent."""
    if not patterns:
        return not value
    return any(compile_pattern(x).matches(value) for x in patterns)


def rules_of(row: SubjectPolicyRow) -> p.SubjectPolicyRules:
    return p.SubjectPolicyRules.model_validate_json(row.rules_json)


def _quoted(patterns: Sequence[str]) -> str:
    return ", ".join(repr(x) for x in patterns)


def _refusal(
    tsg_id: str, policy_tsg: str, attribute: str, value: str, patterns: Sequence[str]
) -> SubjectNotAllowed:
    where = (
        f"the subject policy of TSG {policy_tsg}"
        if policy_tsg == tsg_id
        else f"the subject policy of TSG {policy_tsg} (above TSG {tsg_id})"
    )
    if not patterns:
        detail = f"{where} allows no {attribute} in a subject; this one has {value!r}"
    elif not value:
        detail = f"the subject has no {attribute}; {where} requires one of {_quoted(patterns)}"
    else:
        detail = f"{attribute} {value!r} is not allowed: {where} allows {_quoted(patterns)}"
    return SubjectNotAllowed(detail, attribute=attribute, policy_tsg_id=policy_tsg)


def require_allowed_subject(
    s: Session, tsg_path: str, subject: p.KeySubject, default_cn: str
) -> None:
    """Refuse (SubjectNotAllowed, SubjectPolicyMissing) unless the built-in CA may
    certify ``subject`` for the TSG at ``tsg_path``; ``default_cn`` is the CN used
    when the subject has none (a key's name)."""
    ids = tsg_ids_of(tsg_path)
    tsg_id = ids[-1]
    policies = policies_on_path(s, tsg_path)
    if not policies:
        if len(ids) == 1:
            return  # the root TSG, without a policy of its own: any subject
        raise SubjectPolicyMissing(
            f"neither TSG {tsg_id} nor any TSG above it has a subject policy: below the root "
            "TSG the built-in CA certifies only the subjects a root superuser allows "
            "(signery tsg subject-policy set)",
            tsg_id=tsg_id,
        )
    values = subject_values(subject, default_cn)
    for row in policies:
        rules = rules_of(row)
        for attribute in ATTRIBUTES:
            patterns: list[str] = getattr(rules, attribute)
            if not allows(patterns, values[attribute]):
                raise _refusal(tsg_id, row.tsg_id, attribute, values[attribute], patterns)


def _level(row: SubjectPolicyRow) -> p.SubjectPolicyLevel:
    return p.SubjectPolicyLevel(
        tsg_id=row.tsg_id, rules=rules_of(row), updated_at=row.updated_at, updated_by=row.updated_by
    )


class SubjectPolicyService:
    """Reading, setting and clearing the subject policies of TSGs."""

    def __init__(
        self,
        *,
        db: Database,
        authz: Authorizer,
        recorder: AuditRecorder,
        clock: Clock,
        directory: TsgDirectory,
    ) -> None:
        self._db = db
        self._authz = authz
        self._recorder = recorder
        self._clock = clock
        self._directory = directory

    def get(self, principal: Principal, tsg_id: str) -> p.SubjectPolicy:
        """The policies that apply in the TSG: its own and those above it."""
        with self._db.read() as s:
            path = self._readable(s, principal, tsg_id)
            return self._view(s, path)

    def set(
        self,
        principal: Principal,
        tsg_id: str,
        rules: p.SubjectPolicyRules,
        ctx: RequestContext,
    ) -> p.SubjectPolicy:
        """Replace the TSG's own policy (the policies above it keep applying)."""
        with self._db.write() as s:
            path = self._readable(s, principal, tsg_id)
            self._require_manage(s, principal)
            # Checked once the caller may set policies: the others learn nothing.
            clean = validate_rules(rules)
            row = s.get(SubjectPolicyRow, tsg_id, with_for_update=True)
            previous = rules_of(row) if row is not None else None
            now = self._clock.now()
            if row is None:
                row = SubjectPolicyRow(tsg_id=tsg_id)
                s.add(row)
            row.rules_json = clean.model_dump_json()
            row.updated_at = now
            row.updated_by = principal.id
            flush_unique(
                s, Conflict("the TSG's subject policy was set meanwhile; read it and try again")
            )
            self._record(s, principal, tsg_id, path, clean, previous, ctx)
            return self._view(s, path)

    def clear(self, principal: Principal, tsg_id: str, ctx: RequestContext) -> None:
        """Remove the TSG's own policy; the policies above it keep applying."""
        with self._db.write() as s:
            path = self._readable(s, principal, tsg_id)
            self._require_manage(s, principal)
            row = s.get(SubjectPolicyRow, tsg_id, with_for_update=True)
            if row is None:
                raise SubjectPolicyNotFound(f"TSG {tsg_id} has no subject policy of its own")
            previous = rules_of(row)
            s.delete(row)
            s.flush()
            self._record(s, principal, tsg_id, path, None, previous, ctx)

    # ------------------------------------------------------------ helpers

    def _readable(self, s: Session, principal: Principal, tsg_id: str) -> str:
        path = self._directory.path(s, tsg_id)
        if path is None:
            raise TsgNotFound()
        self._authz.require(principal, Permission.TSG_READ, path, not_found=TsgNotFound)
        return path

    def _require_manage(self, s: Session, principal: Principal) -> None:
        # An act of the built-in CA, shared by every tenant: decided at the root TSG,
        # so a superuser of a subtree cannot widen what its own subtree may claim.
        _, root_path = self._directory.root(s)
        decision = self._authz.decide(principal, Permission.CA_SUBJECT_POLICY_MANAGE, root_path)
        if isinstance(decision, Denied):
            raise PermissionDenied(
                "subject policies are set by a superuser at the root TSG "
                f"({Permission.CA_SUBJECT_POLICY_MANAGE.value} at the root)"
            )

    def _view(self, s: Session, path: str) -> p.SubjectPolicy:
        ids = tsg_ids_of(path)
        levels = [_level(row) for row in policies_on_path(s, path)]
        own = levels[-1] if levels and levels[-1].tsg_id == ids[-1] else None
        if levels:
            effect = SubjectPolicyEffect.POLICIES
        elif len(ids) == 1:
            effect = SubjectPolicyEffect.ANY_SUBJECT
        else:
            effect = SubjectPolicyEffect.REFUSED
        return p.SubjectPolicy(tsg_id=ids[-1], own=own, path=levels, effect=effect)

    def _record(
        self,
        s: Session,
        principal: Principal,
        tsg_id: str,
        path: str,
        rules: p.SubjectPolicyRules | None,
        previous: p.SubjectPolicyRules | None,
        ctx: RequestContext,
    ) -> None:
        self._recorder.record(
            s,
            AuditRecord(
                EventKind.CA_SUBJECT_POLICY_UPDATED,
                AuditOutcome.SUCCEEDED,
                Actor.of(principal),
                tsg_id=tsg_id,
                tsg_path=path,
                context=ctx,
                details={
                    "policy": json.loads(rules.model_dump_json()) if rules else None,
                    "previous_policy": json.loads(previous.model_dump_json()) if previous else None,
                },
            ),
        )
