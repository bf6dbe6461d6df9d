"""Development and test tooling of the Signery repository (test doubles for the
demo, the benchmark and the test suite). It lives beside ``src/``, not in the
installed package: nothing here is used by a client or a server. Run from the
repository root (pytest's ``pythonpath``, ``python -m devtools.moto_kms``).

- :mod:`devtools.moto_kms`: moto's AWS KMS server, corrected to sign
  digests the way real AWS KMS does (``python -m devtools.moto_kms``).
- :mod:`devtools.softhsm`: SoftHSM2 tokens in a directory of their own.
- :mod:`devtools.pe`: minimal PE images for the Authenticode format.
"""
