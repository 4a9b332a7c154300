"""The ``fedseg`` command: a thin dispatcher over the project's command groups (see :mod:`fedseg.cli`)."""
