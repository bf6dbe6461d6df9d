"""The audit hash chain: canonical encoding of an event, its hash, and the
verification of a whole trail (offline: a pure function over rows).

Each node (replica) keeps its own chain: its events carry ``node_seq`` (1, 2,
... per node), ``prev_hash`` (the hash of the node's previous event, 64 zeros
for the first) and ``hash``, the SHA-256 of the event's canonical encoding,
which covers every column but ``seq`` (the database's own row number) and
``hash`` itself. The writer (``recorder.py``) and the verifier use the same
:func:`canonical`, so a field changed after the fact no longer matches.

A hash chain alone has no secret: whoever can write the database can also
recompute a chain over a forged tail. Signed checkpoints (``checkpoints.py``)
pin the head of each chain at a moment with a key in a key store; exported
outside the database, they catch a trail rewritten or rolled back behind them.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

GENESIS_HASH = "0" * 64
# One audit key per installation; its fixed id lets exactly one row in when
# workers race to make it (the primary key settles it, like the TSA's role).
AUDIT_KEY_ID = "audit-checkpoint-key-1"

# Every column of audit_events but ``seq`` and ``hash``, in no particular order
# (the encoding sorts keys).
CHAINED_COLUMNS = (
    "id",
    "time",
    "kind",
    "outcome",
    "reason",
    "tsg_id",
    "tsg_path",
    "principal_type",
    "principal_id",
    "principal_name",
    "key_id",
    "key_version",
    "algorithm",
    "digest",
    "client_ip",
    "user_agent",
    "client_machine",
    "client_tool",
    "request_id",
    "node_id",
    "node_seq",
    "prev_hash",
    "details",
)


def encode_time(value: datetime | str) -> str:
    """ISO 8601 in UTC with microseconds: what SQLite and PostgreSQL both keep."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    elif value.utcoffset():
        value = value.astimezone(UTC)
    # "%Y-%m-%dT%H:%M:%S.%fZ", written without strftime (this runs once per event
    # on the signing path's writer thread, and strftime costs 3 us of it).
    return value.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def canonical(event: Mapping[str, Any]) -> bytes:
    """The bytes an event's hash covers.

    ``details`` is hashed as the JSON value it holds (the column stores it as
    text), so the stored text and the API's parsed object give the same bytes."""
    doc: dict[str, Any] = {c: event.get(c) for c in CHAINED_COLUMNS}
    doc["time"] = encode_time(event["time"])
    details = event.get("details")
    doc["details"] = json.loads(details) if isinstance(details, str) else (details or {})
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def event_hash(event: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(event)).hexdigest()


def link(events: Iterable[dict[str, Any]], head_seq: int, head_hash: str) -> tuple[int, str]:
    """Chain ``events`` (in order) after a head; set their chain columns; the new head."""
    for e in events:
        head_seq += 1
        e["node_seq"] = head_seq
        e["prev_hash"] = head_hash
        head_hash = e["hash"] = event_hash(e)
    return head_seq, head_hash


# ------------------------------------------------------------------ checkpoints


def checkpoint_payload(
    node_id: str, seq: int, head_hash: str, time: datetime, signing_key_id: str
) -> bytes:
    """The canonical statement a checkpoint signs."""
    doc = {
        "node_id": node_id,
        "seq": seq,
        "head_hash": head_hash,
        "time": encode_time(time),
        "signing_key_id": signing_key_id,
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed checkpoint as found (in the database or in an exported file)."""

    payload: bytes
    signature: bytes
    source: str  # "database" or the exported file's path

    @property
    def fields(self) -> dict[str, Any]:
        doc = json.loads(self.payload)
        if not isinstance(doc, dict):
            raise ValueError("checkpoint payload is not an object")
        return doc

    def to_file(self, public_key_pem: str) -> dict[str, str]:
        return {
            "payload": self.payload.decode(),
            "signature": base64.b64encode(self.signature).decode(),
            "public_key": public_key_pem,
        }

    @classmethod
    def from_file(cls, doc: Mapping[str, Any], source: str) -> Checkpoint:
        return cls(
            payload=str(doc["payload"]).encode(),
            signature=base64.b64decode(str(doc["signature"])),
            source=source,
        )


def signature_valid(public_key_der: bytes, payload: bytes, signature: bytes) -> bool:
    try:
        key = serialization.load_der_public_key(public_key_der)
        if not isinstance(key, ec.EllipticCurvePublicKey):
            return False
        key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


# ------------------------------------------------------------------ verification


class FindingKind(StrEnum):
    ALTERED = "altered"  # an event's hash does not match its content
    DELETED = "deleted"  # a gap in a node's chain
    INSERTED = "inserted"  # an event that does not belong to the chain
    REORDERED = "reordered"  # rows moved: chain order and row order disagree
    TRUNCATED = "truncated"  # the head (or a stored checkpoint) is past the last event
    ROLLED_BACK = "rolled_back"  # an exported checkpoint names a state the database lacks
    BAD_CHECKPOINT = "bad_checkpoint"  # a checkpoint whose signature does not verify


@dataclass(frozen=True, slots=True)
class Finding:
    kind: FindingKind
    node_id: str | None
    node_seq: int | None
    event_ids: tuple[str, ...]
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "node_id": self.node_id,
            "node_seq": self.node_seq,
            "event_ids": list(self.event_ids),
            "message": self.message,
        }


@dataclass(slots=True)
class Report:
    events: int = 0
    chained: int = 0
    unchained: int = 0  # written before the chain existed: counted, not an error
    nodes: dict[str, int] = field(default_factory=dict)  # node -> last node_seq
    checkpoints: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.findings

    def as_dict(self) -> dict[str, Any]:
        return {
            "clean": self.clean,
            "events": self.events,
            "chained": self.chained,
            "unchained": self.unchained,
            "nodes": self.nodes,
            "checkpoints": self.checkpoints,
            "findings": [f.as_dict() for f in self.findings],
        }


@dataclass(frozen=True, slots=True)
class _Link:
    seq: int
    node_seq: int
    id: str
    prev_hash: str | None
    hash: str | None
    intact: bool  # the stored hash matches the content


def verify(
    events: Iterable[Mapping[str, Any]],
    *,
    heads: Mapping[str, tuple[int, str]] | None = None,
    checkpoints: Iterable[Checkpoint] = (),
    exported: Iterable[Checkpoint] = (),
    public_keys: Mapping[str, bytes] | None = None,
) -> Report:
    """Check a trail: ``events`` as rows (column names as keys, any order),
    ``heads`` (node -> (seq, hash)) from ``audit_chain_heads`` when known,
    checkpoints stored in the database and ``exported`` ones kept outside it,
    verified with ``public_keys`` (signing key id -> DER SubjectPublicKeyInfo).

    Keeps only a small tuple per event, so a long trail fits in memory."""
    report = Report()
    by_node: dict[str, list[_Link]] = {}
    unchained: list[tuple[int, str]] = []
    first_chained: int | None = None
    for e in events:
        report.events += 1
        seq = int(e["seq"])
        if e.get("node_seq") is None:
            unchained.append((seq, str(e["id"])))
            continue
        report.chained += 1
        first_chained = seq if first_chained is None else min(first_chained, seq)
        by_node.setdefault(str(e["node_id"]), []).append(
            _Link(
                seq,
                int(e["node_seq"]),
                str(e["id"]),
                e.get("prev_hash"),
                e.get("hash"),
                e.get("hash") == event_hash(e),
            )
        )
    # Events without chain columns are legitimate only before the first chained one.
    for seq, event_id in unchained:
        if first_chained is not None and seq > first_chained:
            report.findings.append(
                Finding(
                    FindingKind.INSERTED,
                    None,
                    None,
                    (event_id,),
                    f"event (row {seq}) has no chain columns but was written after the chain began",
                )
            )
        else:
            report.unchained += 1
    for node, links in sorted(by_node.items()):
        report.findings.extend(_verify_node(node, links, (heads or {}).get(node), heads))
        report.nodes[node] = max(x.node_seq for x in links)
    last = {node: sorted(links, key=lambda x: x.node_seq) for node, links in by_node.items()}
    for cp in checkpoints:
        report.checkpoints += 1
        report.findings.extend(_verify_checkpoint(cp, last, public_keys or {}, exported=False))
    for cp in exported:
        report.checkpoints += 1
        report.findings.extend(_verify_checkpoint(cp, last, public_keys or {}, exported=True))
    return report


def _verify_node(
    node: str,
    links: list[_Link],
    head: tuple[int, str] | None,
    heads: Mapping[str, tuple[int, str]] | None,
) -> list[Finding]:
    found: list[Finding] = []
    links.sort(key=lambda x: (x.node_seq, x.seq))
    # Rows in chain order should be in row order too; a row out of place was moved.
    for x, expected in zip(links, sorted(x.seq for x in links), strict=True):
        if x.seq != expected:
            found.append(
                Finding(
                    FindingKind.REORDERED,
                    node,
                    x.node_seq,
                    (x.id,),
                    f"event #{x.node_seq} is at row {x.seq}, out of chain order",
                )
            )
    prev: _Link | None = None
    for x in links:
        if not x.intact:
            found.append(
                Finding(
                    FindingKind.ALTERED,
                    node,
                    x.node_seq,
                    (x.id,),
                    f"event #{x.node_seq}: content does not match its hash",
                )
            )
        expected_seq = 1 if prev is None else prev.node_seq + 1
        expected_prev = GENESIS_HASH if prev is None else prev.hash
        if prev is not None and x.node_seq == prev.node_seq:
            found.append(
                Finding(
                    FindingKind.INSERTED,
                    node,
                    x.node_seq,
                    (x.id,),
                    f"a second event #{x.node_seq}",
                )
            )
            continue
        if x.node_seq > expected_seq:
            missing = (
                f"#{expected_seq}"
                if x.node_seq == expected_seq + 1
                else f"#{expected_seq}..#{x.node_seq - 1}"
            )
            found.append(
                Finding(
                    FindingKind.DELETED,
                    node,
                    expected_seq,
                    ((prev.id,) if prev else ()) + (x.id,),
                    f"events {missing} are missing (before event #{x.node_seq})",
                )
            )
        elif x.prev_hash != expected_prev and x.intact:
            found.append(
                Finding(
                    FindingKind.INSERTED,
                    node,
                    x.node_seq,
                    ((prev.id,) if prev else ()) + (x.id,),
                    f"event #{x.node_seq} does not link to the event before it",
                )
            )
        prev = x
    if heads is not None:
        last = links[-1]
        if head is None:
            found.append(
                Finding(
                    FindingKind.INSERTED,
                    node,
                    None,
                    (links[0].id,),
                    f"node {node} has events but no chain head",
                )
            )
        elif head[0] > last.node_seq:
            found.append(
                Finding(
                    FindingKind.TRUNCATED,
                    node,
                    last.node_seq + 1,
                    (last.id,),
                    f"the chain head is at #{head[0]} but the last event is #{last.node_seq}",
                )
            )
        else:
            for x in links:
                if x.node_seq > head[0]:
                    found.append(
                        Finding(
                            FindingKind.INSERTED,
                            node,
                            x.node_seq,
                            (x.id,),
                            f"event #{x.node_seq} is past the chain head (#{head[0]})",
                        )
                    )
                elif x.node_seq == head[0] and x.hash != head[1]:
                    found.append(
                        Finding(
                            FindingKind.ALTERED,
                            node,
                            x.node_seq,
                            (x.id,),
                            f"event #{x.node_seq} differs from the chain head's hash",
                        )
                    )
    return found


def _verify_checkpoint(
    cp: Checkpoint,
    chains: Mapping[str, list[_Link]],
    public_keys: Mapping[str, bytes],
    *,
    exported: bool,
) -> list[Finding]:
    try:
        doc = cp.fields
        node, seq, head_hash = str(doc["node_id"]), int(doc["seq"]), str(doc["head_hash"])
        key_id = str(doc["signing_key_id"])
    except (ValueError, KeyError, TypeError):
        return [Finding(FindingKind.BAD_CHECKPOINT, None, None, (), f"{cp.source}: unreadable")]
    key = public_keys.get(key_id)
    if key is None or not signature_valid(key, cp.payload, cp.signature):
        return [
            Finding(
                FindingKind.BAD_CHECKPOINT,
                node,
                seq,
                (),
                f"{cp.source}: the signature does not verify with the audit key {key_id}",
            )
        ]
    links = chains.get(node, [])
    at = next((x for x in links if x.node_seq == seq), None)
    last = links[-1] if links else None
    kind = FindingKind.ROLLED_BACK if exported else FindingKind.TRUNCATED
    if at is None and (last is None or last.node_seq < seq):
        return [
            Finding(
                kind,
                node,
                seq,
                (last.id,) if last else (),
                f"{cp.source}: checkpoint at #{seq} but the last event is "
                f"#{last.node_seq if last else 0}",
            )
        ]
    if at is not None and at.hash != head_hash:
        return [
            Finding(
                FindingKind.ROLLED_BACK if exported else FindingKind.ALTERED,
                node,
                seq,
                (at.id,),
                f"{cp.source}: event #{seq} is not the one the checkpoint signed",
            )
        ]
    return []  # a missing event inside the chain is reported as deleted already


def read_exported(directory: Path) -> list[Checkpoint]:
    """The checkpoint files of an export directory (an unreadable one is kept, as
    an empty payload, so that verification reports it)."""
    found: list[Checkpoint] = []
    for path in sorted(directory.glob("*.json")):
        try:
            found.append(Checkpoint.from_file(json.loads(path.read_text()), str(path)))
        except (ValueError, KeyError, TypeError, OSError):
            found.append(Checkpoint(b"", b"", str(path)))
    return found
