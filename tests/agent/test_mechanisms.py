"""What each mechanism turns into before anything is sent: the digest, its
algorithm and the scheme; and the refusals, each with its PKCS#11 return value."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import given
from hypothesis import strategies as st

from signery import protocol as p
from signery.agent._mechanisms import PssParams, start
from signery.agent._pkcs11 import CKG, CKM, CKR, Pkcs11Error

DATA = b"artifact"
PREFIX = {
    p.DigestAlgorithm.SHA256: "3031300d060960864801650304020105000420",
    p.DigestAlgorithm.SHA384: "3041300d060960864801650304020205000430",
    p.DigestAlgorithm.SHA512: "3051300d060960864801650304020305000440",
}


@pytest.mark.parametrize("algorithm", list(p.DigestAlgorithm))
def test_a_digest_info_becomes_its_digest(algorithm: p.DigestAlgorithm) -> None:
    digest = hashlib.new(algorithm.value, DATA).digest()
    op = start(CKM.RSA_PKCS, p.Algorithm.RSA_3072, None)
    op.update(bytes.fromhex(PREFIX[algorithm]) + digest)
    hashed, scheme = op.request()
    assert (hashed.algorithm, hashed.digest, scheme) == (
        algorithm,
        digest,
        p.SignatureScheme.RSA_PKCS1V15,
    )


@pytest.mark.parametrize(
    "data",
    [
        bytes.fromhex("3021300906052b0e03021a05000414") + bytes(20),  # SHA-1
        bytes.fromhex(PREFIX[p.DigestAlgorithm.SHA256]) + bytes(31),  # one byte short
        bytes(51),  # no DigestInfo at all
    ],
    ids=["sha1", "short", "raw"],
)
def test_other_digest_infos_are_data_invalid(data: bytes) -> None:
    op = start(CKM.RSA_PKCS, p.Algorithm.RSA_2048, None)
    op.update(data)
    with pytest.raises(Pkcs11Error) as refused:
        op.request()
    assert refused.value.rv is CKR.DATA_INVALID


def test_hash_and_sign_hashes_what_is_streamed() -> None:
    op = start(CKM.SHA384_RSA_PKCS, p.Algorithm.RSA_4096, None)
    for chunk in (DATA[:3], DATA[3:], b""):
        op.update(chunk)
    hashed, scheme = op.request()
    assert hashed.digest == hashlib.sha384(DATA).digest()
    assert scheme is p.SignatureScheme.RSA_PKCS1V15


def test_pss_takes_only_the_parameters_signery_signs_with() -> None:
    good = PssParams(CKM.SHA256, CKG.MGF1_SHA256, 32)
    op = start(CKM.RSA_PKCS_PSS, p.Algorithm.RSA_3072, good)
    op.update(hashlib.sha256(DATA).digest())
    assert op.request()[1] is p.SignatureScheme.RSA_PSS
    for bad in (
        None,
        PssParams(CKM.SHA256, CKG.MGF1_SHA384, 32),  # another MGF hash
        PssParams(CKM.SHA256, CKG.MGF1_SHA256, 20),  # another salt
        PssParams(0x220, 1, 20),  # SHA-1
    ):
        with pytest.raises(Pkcs11Error) as refused:
            start(CKM.RSA_PKCS_PSS, p.Algorithm.RSA_3072, bad)
        assert refused.value.rv is CKR.MECHANISM_PARAM_INVALID


@pytest.mark.parametrize("length", [0, 20, 28, 33, 100])
def test_ecdsa_refuses_a_digest_of_no_sha2_length(length: int) -> None:
    op = start(CKM.ECDSA, p.Algorithm.EC_P256, None)
    op.update(bytes(length))
    with pytest.raises(Pkcs11Error) as refused:
        op.request()
    assert refused.value.rv is CKR.DATA_LEN_RANGE


def test_mechanisms_must_fit_the_key() -> None:
    with pytest.raises(Pkcs11Error) as refused:
        start(CKM.ECDSA, p.Algorithm.RSA_2048, None)
    assert refused.value.rv is CKR.KEY_TYPE_INCONSISTENT
    with pytest.raises(Pkcs11Error) as unknown:
        start(0x4321, p.Algorithm.EC_P384, None)
    assert unknown.value.rv is CKR.MECHANISM_INVALID


def test_single_part_input_is_bounded() -> None:
    op = start(CKM.ECDSA, p.Algorithm.EC_P256, None)
    with pytest.raises(Pkcs11Error) as refused:
        op.update(bytes(2048))
    assert refused.value.rv is CKR.DATA_LEN_RANGE


@given(
    r=st.integers(min_value=1, max_value=2**521 - 1),
    s=st.integers(min_value=1, max_value=2**521 - 1),
)
def test_ecdsa_der_becomes_fixed_length_r_and_s(r: int, s: int) -> None:
    op = start(CKM.ECDSA, p.Algorithm.EC_P521, None)
    raw = op.result(encode_dss_signature(r, s))
    assert len(raw) == 132
    assert (int.from_bytes(raw[:66], "big"), int.from_bytes(raw[66:], "big")) == (r, s)
