"""Development and test tooling shipped with Signery (test doubles for the demo,
the benchmark and the test suite). Nothing here is used by a production server.

- :mod:`signery.devtools.moto_kms`: moto's AWS KMS server, corrected to sign
  digests the way real AWS KMS does (``python -m signery.devtools.moto_kms``).
"""
