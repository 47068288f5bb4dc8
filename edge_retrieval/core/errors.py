"""Typed exceptions of the appliance. Library code raises these with a human message; only
``edge_retrieval/cli.py`` turns them into exit codes."""


class ApplianceError(Exception):
    """Base class of every error the appliance reports to a user."""


class ConfigError(ApplianceError):
    """config.yaml is unreadable, has an unknown key or a bad value."""


class BundleError(ApplianceError):
    """A model bundle (manifest.json + its model file) is missing, corrupt or mismatched."""


class BundleUnavailable(BundleError):
    """The bundle cannot run on this install: its model package or its runtime (onnxruntime) is not installed.
    The device then falls back to ``encoder.fallback_bundle`` and says why."""


class CatalogIndexError(ApplianceError):
    """The catalog index is missing, corrupt, or was built with another bundle."""


class InputError(ApplianceError):
    """What a caller sent is wrong (an id, a label, an image): the web layer answers 4xx with the message.
    ``http_status`` is 400 unless a subclass or the raiser says otherwise (413: over a size limit)."""

    def __init__(self, message: str, *, http_status: int = 400):
        super().__init__(message)
        self.http_status = http_status


class ImageError(InputError):
    """An image (upload, file, frame) could not be decoded, is too large, too small or too narrow."""


class BusyError(ApplianceError):
    """Too many requests are being served (or enrolments waiting) at once; the web layer answers 503 with
    ``Retry-After: retry_after_s``."""

    def __init__(self, message: str, *, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DiskFullError(ApplianceError):
    """Not enough free space to keep a change durably; nothing was acknowledged (the web layer: 507)."""


class StoreError(ApplianceError):
    """The catalog store (catalog.store) cannot be opened or is corrupt, or another server holds it."""


class CameraError(ApplianceError):
    """A camera source could not be opened or stopped delivering frames."""
