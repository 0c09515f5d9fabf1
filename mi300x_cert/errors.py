"""One exception tree for the whole package.

    CertError                      base; every error a user can cause or see
    ├── ProfileError               a profile / fleet file is malformed (names the file and field)
    ├── CardError                  an unknown or unusable card id
    ├── ModelSourceError           a missing weights directory / unknown synthetic arch
    ├── TelemetryError             a telemetry backend cannot start or read
    ├── NetworkIsolationError      enforced isolation requested but not available
    ├── WorkerError                a workload worker failed, hung or crashed
    ├── RunDirError                a run directory is missing, incomplete or inconsistent
    ├── HostBusyError              another run holds the host's measurement lock
    ├── ValidationError            a suite could not be evaluated (not: an expectation failed)
    ├── BundleError                a bundle cannot be built
    │   └── VerifyError            a signature or digest does not check out
    ├── StorageError               the object store refused or could not be reached
    ├── EvidenceError              a registered bundle's file cannot be shown: unknown (status 404)
    │                              or not matching the registered digests (status 409, never served)
    └── RegistryError              the fleet registry database cannot be reached, is behind its
        │                          schema, or refused a record (names the URL, password masked)
        └── RegistryConflict       a record contradicts one already registered (never overwritten)

CLI exit codes: 0 success/certified, 1 an expectation failed, 2 any CertError, 3 unexpected bug.
"""

from __future__ import annotations

__all__ = [
    "CertError",
    "ProfileError",
    "CardError",
    "ModelSourceError",
    "TelemetryError",
    "NetworkIsolationError",
    "WorkerError",
    "RunDirError",
    "HostBusyError",
    "ValidationError",
    "BundleError",
    "VerifyError",
    "StorageError",
    "RegistryError",
    "RegistryConflict",
    "EvidenceError",
    "EXIT_OK",
    "EXIT_FAILED_EXPECTATION",
    "EXIT_ERROR",
    "EXIT_BUG",
]

EXIT_OK = 0
EXIT_FAILED_EXPECTATION = 1
EXIT_ERROR = 2
EXIT_BUG = 3


class CertError(Exception):
    """Base of every error mi300x-cert raises on purpose."""


class ProfileError(CertError):
    pass


class CardError(CertError):
    pass


class ModelSourceError(CertError):
    pass


class TelemetryError(CertError):
    pass


class NetworkIsolationError(CertError):
    pass


class WorkerError(CertError):
    pass


class RunDirError(CertError):
    pass


class HostBusyError(CertError):
    pass


class ValidationError(CertError):
    pass


class BundleError(CertError):
    pass


class VerifyError(BundleError):
    pass


class StorageError(CertError):
    pass


class EvidenceError(CertError):
    """``status``: the HTTP status the console answers with (404 unknown/missing, 409 digest mismatch)."""

    def __init__(self, message: str, status: int = 404):
        super().__init__(message)
        self.status = status


class RegistryError(CertError):
    pass


class RegistryConflict(RegistryError):
    pass
