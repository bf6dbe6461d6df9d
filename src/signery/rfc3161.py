"""RFC 3161 wire pieces shared by the client (requester) and the server (TSA).

asn1crypto supplies the structures; this module only corrects what it gets wrong
for a TSA and its clients, and names the media types.
"""

from __future__ import annotations

from asn1crypto import cms, core, tsp  # type: ignore[import-untyped]

QUERY_MEDIA_TYPE = "application/timestamp-query"  # RFC 3161 §3.4
REPLY_MEDIA_TYPE = "application/timestamp-reply"  # RFC 3161 §3.4


class TimeStampResp(core.Sequence):  # type: ignore[misc]
    """RFC 3161 §2.4.2 TimeStampResp. asn1crypto 1.5 declares timeStampToken
    required; the RFC makes it OPTIONAL, and a rejection carries none."""

    _fields = [
        ("status", tsp.PKIStatusInfo),
        ("time_stamp_token", cms.ContentInfo, {"optional": True}),
    ]
