"""Independent, reproducible random streams derived from the run seed."""

import hashlib


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (run seed, step, micro-batch…): independent streams, reproducible."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
