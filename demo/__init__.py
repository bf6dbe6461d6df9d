"""``make demo``: walk the whole Signery lifecycle against a real server process.

Run as ``python -m demo --out demo-out``. The demo drives the product the
way a user would: every action is a ``signery`` command run as a subprocess, and
every signature is checked with ``openssl`` rather than with Signery's own code.

It initializes an installation in a temporary data directory (SQLite, builtin
key store, built-in CA), starts ``signery serve`` on a free port of 127.0.0.1,
creates a child TSG with a subject policy (the certificate subjects its keys may
get; another is refused), a built-in account and two signing keys with certificates,
logs in as the account, signs sample artifacts, verifies them, rotates a key
(the account signs with the new version unchanged; both versions' signatures
verify), puts a key under an approval policy (the account's request waits until
a release manager with the approver role approves it; the single-use grant then
signs once), shows a refusal, shows the audit events and usage counters, and
stops the server. It prints each
step and exits 0 only if every step succeeded.

Hardware key stores, when this machine has what they need: with SoftHSM2 and
python-pkcs11 the demo initializes a SoftHSM2 token in its temporary directory
and gives the server the ``pkcs11`` store on it; with moto (and boto3) it starts
moto's AWS KMS double (``devtools.moto_kms``, on loopback, log in the
temporary directory) and gives the server the ``aws-kms`` store on it. For each,
it creates an EC P-256 key in that store with a built-in CA certificate, signs
``app.bin`` with it as the account and verifies the signature with openssl. A
store whose tools are missing is skipped, and the demo says why; ``--no-hardware``
skips both (the demo is then what it was without them).

Outputs left in the ``--out`` directory: the sample artifacts and their ``.sig``
files, ``pubkey.pem``, ``pubkey-rsa.pem`` and (after the rotation)
``pubkey-rsa-v2.pem`` with ``app.bin.rsa-v2.sig``, ``pubkey-gated.pem`` with the
approved ``app.bin.gated.sig``, ``chain.pem`` (leaf first, root
last) split into ``leaf.pem``, ``issuing-ca.pem`` and ``root-ca.pem``,
``audit-events.json``, ``usage.json`` and ``server.log``; with the pkcs11 store
``pubkey-hsm.pem``, ``leaf-hsm.pem`` and ``app.bin.hsm.sig``; with the aws-kms
store ``pubkey-kms.pem``, ``leaf-kms.pem``, ``app.bin.kms.sig`` (and ``moto.log``
if the double logged anything).
"""
