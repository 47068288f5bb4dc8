"""Typed exceptions of the appliance. Library code raises these with a human message; only
``device/__main__.py`` turns them into exit codes."""


class ApplianceError(Exception):
    """Base class of every error the appliance reports to a user."""


class ConfigError(ApplianceError):
    """config.yaml is unreadable, has an unknown key or a bad value."""


class BundleError(ApplianceError):
    """A model bundle (encoder.tflite + manifest.json) is missing, corrupt or mismatched."""


class CatalogIndexError(ApplianceError):
    """The catalog index is missing, corrupt, or was built with another bundle."""


class ImageError(ApplianceError):
    """An image (upload, file, frame) could not be decoded or is too large."""


class CameraError(ApplianceError):
    """A camera source could not be opened or stopped delivering frames."""
