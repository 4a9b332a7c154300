"""The error every part of the NIfTI pipeline raises for data that cannot be used as given."""

from __future__ import annotations


class DataError(ValueError):
    """A site's data cannot be used as given; the message names the file or folder and what was expected."""
