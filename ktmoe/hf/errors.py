"""Exceptions of the Hugging Face integration (spec 004 §6.1).

Each also derives from the built-in exception the interface documents for its
case (ValueError for an unsupported model or a bad configuration, RuntimeError
for the rest), so callers catching the built-in types keep working."""

from __future__ import annotations


class KTAMXError(Exception):
    """Base of the integration's exceptions."""


class KTAMXNotAvailableError(KTAMXError, RuntimeError):
    """The kernels (or a package the integration needs) cannot be used here."""


class KTAMXModelNotSupportedError(KTAMXError, ValueError):
    """The model's architecture is not supported; the message names its model type."""


class KTAMXConfigError(KTAMXError, ValueError):
    """A configuration value, adapter file or model state that cannot be used."""


class KTAMXForwardError(KTAMXError, RuntimeError):
    """The routed-experts forward failed."""


class KTAMXBackwardError(KTAMXError, RuntimeError):
    """The routed-experts backward failed."""


__all__ = [
    "KTAMXError", "KTAMXNotAvailableError", "KTAMXModelNotSupportedError", "KTAMXConfigError",
    "KTAMXForwardError", "KTAMXBackwardError",
]
