"""p0f v3 OS fingerprinting shared by the analyzer (F^p, the client's SYN) and the prober (F^a,
the SYN+ACK a source returns to our probe). One package, one database, one cache: never two copies.
"""

from osfp.result import Fingerprint, FingerprintError

__all__ = ["Fingerprint", "FingerprintError"]
