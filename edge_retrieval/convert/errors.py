"""The converter's one error: a build that cannot go on, with a message for the user (``python -m edge_retrieval.convert``
prints it and exits 2)."""
from __future__ import annotations


class ConverterError(Exception):
    """A build that cannot go on, with a message for the user."""
