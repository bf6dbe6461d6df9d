"""Minimal PE images for tests, the demo and the benchmarks (no compiler needed).

The Authenticode format signs PE32 and PE32+ files; this builds valid ones byte by
byte (PE/COFF specification: DOS header, PE signature, COFF header, optional
header with 16 data directories, one .text section), so that the format can be
exercised and verified with osslsigncode anywhere.
"""

from __future__ import annotations

import struct

__all__ = ["build_pe"]


def build_pe(*, pe32_plus: bool, text: bytes = b"\xc3", overlay: bytes = b"") -> bytes:
    """A minimal, valid PE image: DOS header, PE headers, one .text section
    (FileAlignment 0x200, SectionAlignment 0x1000) and optional trailing data
    (an "overlay", as installers carry), following the PE/COFF specification."""
    file_alignment, section_alignment = 0x200, 0x1000
    raw_size = -(-len(text) // file_alignment) * file_alignment
    dos = bytearray(0x80)
    dos[0:2] = b"MZ"
    struct.pack_into("<I", dos, 0x3C, len(dos))  # e_lfanew
    machine, optional_size = (0x8664, 240) if pe32_plus else (0x14C, 224)
    characteristics = 0x0022 if pe32_plus else 0x0102  # executable; large-address / 32-bit
    coff = struct.pack("<HHIIIHH", machine, 1, 0, 0, 0, optional_size, characteristics)
    size_of_image = section_alignment + -(-len(text) // section_alignment) * section_alignment
    if pe32_plus:
        optional = struct.pack(
            "<HBBIIIIIQIIHHHHHHIIIIHHQQQQII",
            0x20B, 14, 0, raw_size, 0, 0, 0x1000, 0x1000,  # magic .. BaseOfCode
            0x140000000, section_alignment, file_alignment,
            6, 0, 0, 0, 6, 0, 0,  # OS, image, subsystem versions; Win32VersionValue
            size_of_image, 0x200, 0, 3, 0x8160,  # SizeOfImage, SizeOfHeaders, CheckSum, CUI
            0x100000, 0x1000, 0x100000, 0x1000, 0, 16,
        )  # fmt: skip
    else:
        optional = struct.pack(
            "<HBBIIIIIIIIIHHHHHHIIIIHHIIIIII",
            0x10B, 14, 0, raw_size, 0, 0, 0x1000, 0x1000, 0x2000,  # .. BaseOfData
            0x400000, section_alignment, file_alignment,
            6, 0, 0, 0, 6, 0, 0,
            size_of_image, 0x200, 0, 3, 0x8140,
            0x100000, 0x1000, 0x100000, 0x1000, 0, 16,
        )  # fmt: skip
    optional += bytes(16 * 8)  # the data directories, all empty
    assert len(optional) == optional_size
    section = struct.pack(
        "<8sIIIIIIHHI", b".text", len(text), 0x1000, raw_size, 0x200, 0, 0, 0, 0, 0x60000020
    )
    headers = bytes(dos) + b"PE\0\0" + coff + optional + section
    return headers.ljust(0x200, b"\0") + text.ljust(raw_size, b"\0") + overlay
