"""CRC32C header and data digests (RFC 7143 §13.1, appendix B.4).

The 32-bit CRC is carried least significant byte first, as every iSCSI
implementation (and the RFC's worked examples in RFC 3720 appendix B.4) does.
"""

from __future__ import annotations

import struct

from crc32c import crc32c

_LE32 = struct.Struct("<I")
DIGEST_LEN = 4


def digest(*parts) -> bytes:
    crc = 0
    for p in parts:
        crc = crc32c(p, crc)
    return _LE32.pack(crc)


def digest_value(data) -> int:
    return crc32c(data)


def unpack_digest(buf, offset: int = 0) -> int:
    return _LE32.unpack_from(buf, offset)[0]
