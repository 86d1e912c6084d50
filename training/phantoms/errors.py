"""The phantom package's exception tree.

    PhantomError             anything a caller can act on (bad option, missing tool)
    ├── PhantomOptionError   an option outside the range the phantom models
    └── EncodingError        a transfer syntax that cannot be written here

The CLI converts these into a message and exit status 2, in one place.
"""

from __future__ import annotations


class PhantomError(Exception):
    """Base class: a phantom that cannot be generated or written, with the reason."""


class PhantomOptionError(PhantomError, ValueError):
    """An option is outside what the phantom models; the message names the option."""


class EncodingError(PhantomError):
    """The requested encoding is unknown or its encoder is missing."""
