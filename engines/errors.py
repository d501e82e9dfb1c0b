"""Errors shared by the export side and the service's runtimes."""


class RuntimeUnavailableError(RuntimeError):
    """A runtime (or engine build) cannot run here: package or device absent; says what is
    missing."""
