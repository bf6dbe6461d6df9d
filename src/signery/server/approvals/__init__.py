"""Approvals: M-of-N approval of signing with a key, and the grants it creates.

``gate.py`` is what the signing plane calls (take a grant use, or record a
signing request); ``service.py`` is the approvers' side (decide, pre-approve,
list and revoke grants); ``expiry.py`` expires requests nobody decided in time;
``records.py`` reads and makes the rows they share and ``wire.py`` turns them into
the API's models.
"""
