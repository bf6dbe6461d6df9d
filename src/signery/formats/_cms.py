"""``cms``: a detached CMS SignedData over the file (``FILE.p7s``, RFC 5652).

The SignerInfo signs the file's digest through its signed attributes (content
type, message digest, signing time, RFC 6211 algorithm protection) and carries the
key's whole certificate chain, so ``openssl cms -verify -binary -content FILE``
needs only the root. With ``--timestamp`` an RFC 3161 token over the signature
value is the unsigned attribute id-aa-timeStampToken (RFC 3161 Appendix A).

DER by default; ``--pem`` writes the RFC 7468 §9 ``CMS`` label, which
``openssl cms -inform PEM`` reads (``verify`` also accepts the older ``PKCS7``).
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import Any

from asn1crypto import cms, pem  # type: ignore[import-untyped]

from signery.crypto import PublicKey, hash_file
from signery.errors import ClientError
from signery.formats._base import Signer, SignOptions, SignResult, VerifyResult, write_atomically
from signery.formats._signeddata import (
    ID_AA_TIMESTAMP_TOKEN,
    SignedDataSpec,
    build_signed_data,
    check_signer,
    choose,
    parse_content_info,
    signing_certificate,
)
from signery.protocol import DigestAlgorithm

FORMAT_NAME = "cms"
# A detached SignedData over the file (RFC 5652 §5.2); `openssl cms -verify`
# accepts RSA-PSS even with a token from a non-PSS TSA.
SIGNED_DATA = SignedDataSpec(FORMAT_NAME, allow_pss_with_timestamp=True)
SUFFIX = ".p7s"  # RFC 5751 §3.2.1: the file extension of a detached signature
PEM_LABEL = "CMS"  # RFC 7468 §9: generators use "CMS"
PEM_LABELS = ("CMS", "PKCS7")  # RFC 7468 §9: parsers may accept "PKCS7" too
# A .p7s is the SignedData with its certificate chain and maybe a timestamp token
# (which has its own chain): a few KiB. Refuse to read anything much larger.
MAX_SIGNATURE_BYTES = 1024 * 1024
_DECODE_ERRORS = (ValueError, TypeError, KeyError, IndexError, OverflowError, AttributeError)


class NotACmsSignature(ClientError):
    """The signature file is not a CMS SignedData at all (DER or PEM)."""

    code = "not_cms_signature"
    title = "The signature file is not a CMS SignedData"


class OutputIsInput(ClientError):
    code = "output_is_input"
    title = "The signature would overwrite the file it signs"


class CmsFormat:
    """Detached CMS/PKCS#7 SignedData, DER or PEM."""

    name = FORMAT_NAME

    def default_output(self, file: Path, options: SignOptions) -> Path:
        return file.with_name(file.name + SUFFIX)

    def sign(self, signer: Signer, file: Path, output: Path, options: SignOptions) -> SignResult:
        # Refusals first: nothing is hashed or sent for a key that cannot sign cms.
        signing_certificate(signer, FORMAT_NAME)
        digest_algorithm, _ = choose(signer, options, SIGNED_DATA)
        if output.resolve() == file.resolve():
            raise OutputIsInput(f"{output} is the file being signed; choose another output")
        # RFC 5652 §5.4: for detached content the messageDigest attribute is the
        # digest of the content octets, i.e. of the whole file (streamed).
        hashed = hash_file(file, digest_algorithm, options.on_chunk)
        result = build_signed_data(signer, options, SIGNED_DATA, hashed)
        data = pem.armor(PEM_LABEL, result.der) if options.pem else result.der
        write_atomically(output, data, before_commit=options.check_interrupted)
        return SignResult(
            file=file,
            output=output,
            digest_algorithm=result.digest_algorithm,
            digest=hashed.hex,
            key_name=signer.key_name,
            key_version=result.key_version,
            scheme=result.scheme,
            timestamped=result.timestamped,
        )

    def verify(
        self, file: Path, signature: Path, public_keys: list[PublicKey], options: SignOptions
    ) -> VerifyResult:
        """Check the SignerInfo's signature with one of ``public_keys``, then the
        file's digest against its messageDigest. A timestamp token is reported and
        its imprint checked against the signature; its TSA signature and chain are
        for ``openssl ts -verify`` (the trust anchors are the verifier's choice)."""
        signed_data = _load(signature)

        def invalid(detail: str) -> VerifyResult:
            return VerifyResult(file, signature, False, detail)

        try:
            encap = signed_data["encap_content_info"]
            content_type = encap["content_type"].dotted
            embedded = encap["content"].native is not None
            signer_infos = signed_data["signer_infos"]
            signer_count = len(signer_infos)
        except _DECODE_ERRORS:
            return invalid("the SignedData is malformed")
        if embedded:
            return invalid("the SignedData embeds its content; a cms signature is detached")
        if signer_count != 1:
            return invalid(f"expected one SignerInfo, found {signer_count}")
        check = check_signer(signed_data, public_keys)
        if not check.valid or check.digest_algorithm is None or check.message_digest is None:
            return invalid(check.detail)
        problem = _signed_attribute_problem(signer_infos[0], content_type)
        if problem is not None:
            return invalid(problem)
        wanted = options.digest_algorithm
        if wanted is not None and wanted is not check.digest_algorithm:
            return invalid(f"signed with {check.digest_algorithm.value}, not {wanted.value}")
        hashed = hash_file(file, check.digest_algorithm, options.on_chunk)
        if not hmac.compare_digest(hashed.digest, check.message_digest):
            return invalid(f"the file's {hashed.algorithm.value} digest is not the signed one")
        detail = check.detail
        if check.timestamped:
            fits, stamp = _timestamp(signer_infos[0])
            if not fits:
                return invalid(stamp)
            detail += f", timestamped {stamp}"
        else:
            detail += ", not timestamped"
        return VerifyResult(file, signature, True, detail)


def _load(signature: Path) -> Any:
    """The SignedData of a DER or PEM ``.p7s``, or NotACmsSignature."""
    try:
        with signature.open("rb") as f:
            data = f.read(MAX_SIGNATURE_BYTES + 1)
    except OSError as e:
        raise ClientError(f"cannot read signature {signature}: {e.strerror}") from None
    if len(data) > MAX_SIGNATURE_BYTES:
        raise NotACmsSignature(f"{signature} is larger than any CMS signature Signery writes")
    if pem.detect(data):
        try:
            label, _, data = pem.unarmor(data)
        except ValueError:
            raise NotACmsSignature(f"{signature} is not valid PEM") from None
        if label not in PEM_LABELS:
            raise NotACmsSignature(f"{signature} is PEM {label!r}, not CMS or PKCS7")
    try:
        return parse_content_info(data)["content"]
    except ClientError:
        raise NotACmsSignature(f"{signature} is not a CMS SignedData (RFC 5652)") from None


def _signed_attribute_problem(signer_info: Any, content_type: str) -> str | None:
    """What is wrong with the signed attributes beyond the signature, or None."""
    try:
        attrs = {a["type"].dotted: a["values"] for a in signer_info["signed_attrs"]}
        # RFC 5652 §11.1: the content-type attribute must be present and equal the
        # eContentType; otherwise a signature made for other content could pass.
        signed_type = attrs["1.2.840.113549.1.9.3"][0].dotted
        protection = attrs.get("1.2.840.113549.1.9.52")
        if protection is not None:
            # RFC 6211 §3: the protected algorithms must be the ones in the SignerInfo.
            protected = protection[0].native
            if (
                protected["digest_algorithm"] != signer_info["digest_algorithm"].native
                or protected["signature_algorithm"] != signer_info["signature_algorithm"].native
            ):
                return "the algorithm protection attribute does not match the SignerInfo"
    except _DECODE_ERRORS:
        return "the signed attributes lack a content type or are malformed"
    if signed_type != content_type:
        return f"the signed content type {signed_type} is not the SignedData's {content_type}"
    if signed_type != cms.ContentType.unmap("data"):
        return f"the signed content type is {signed_type}, not id-data"
    return None


def _timestamp(signer_info: Any) -> tuple[bool, str]:
    """(True, the token's genTime) or (False, why the token does not fit the signature).

    RFC 3161 Appendix A: the token's messageImprint is the hash of the
    SignerInfo's signature value; a token for anything else proves nothing."""
    try:
        token = next(
            a["values"][0]
            for a in signer_info["unsigned_attrs"]
            if a["type"].dotted == ID_AA_TIMESTAMP_TOKEN
        )
        tst_info = token["content"]["encap_content_info"]["content"].parsed
        imprint = tst_info["message_imprint"]
        algorithm = DigestAlgorithm(imprint["hash_algorithm"]["algorithm"].native)
        expected = hashlib.new(algorithm.value, signer_info["signature"].native).digest()
        covered = hmac.compare_digest(expected, imprint["hashed_message"].native)
        gen_time = tst_info["gen_time"].native
    except (*_DECODE_ERRORS, StopIteration):
        return False, "the timestamp token is malformed"
    if not covered:
        return False, "the timestamp token does not cover this signature"
    return (
        True,
        f"{gen_time.isoformat()} (token imprint matches; check the TSA with openssl ts -verify)",
    )


__all__ = ["CmsFormat", "NotACmsSignature", "OutputIsInput"]
