"""The subscription filter of docs/protocol.md §8: the operator's own Python function that may
refuse a subscription.

``[auth] subscription_filter = "package.module:function"`` names it; the edge imports it
at start (a name that cannot be imported stops the edge with a one-line error) and
calls it for every subscription, on every transport::

    def function(channel: str, params: dict, credential: str | None) -> str | None:
        ...  # None accepts; a string is the reason the subscriber is refused

``params`` are the subscription's params (extra query parameters, a WebSocket frame's
``params``), ``credential`` the token the request carried when ``[auth]`` checks
them. The function runs on the edge's event loop: it must be quick and must not
block. If it raises, the subscription is refused with 503 (it fails closed).
"""

import importlib

from ..config import ConfigError


def load_subscription_filter(spec: str):
    """The callable ``spec`` ("module:function") names, or None for ""; raises ConfigError."""
    if not spec:
        return None
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"auth.subscription_filter must be \"module:function\", not {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"auth.subscription_filter: cannot import {module_name}: {exc}") \
            from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ConfigError(f"auth.subscription_filter: {module_name} has no function "
                          f"{attribute!r}")
    return function
