"""p0f v3 OS fingerprinting shared by the analyzer (F^p, the client's SYN) and the prober (F^a,
the SYN+ACK a source returns to our probe). One package, one database, one cache: never two copies.
"""

from osfp.database import DatabaseLoadError, default_database_path, stock_database_path
from osfp.fingerprinter import Fingerprinter
from osfp.result import Fingerprint, FingerprintError, NotFingerprinted

__all__ = [
    "DatabaseLoadError",
    "Fingerprint",
    "FingerprintError",
    "Fingerprinter",
    "NotFingerprinted",
    "default_database_path",
    "stock_database_path",
]
