"""One default TLS context for every httpx client a test process makes.

httpx builds a new ``ssl.SSLContext`` for each client, and each ``httpx.get``/``post``/
``stream`` is a client: loading certifi's CA bundle costs about 50 ms of CPU every time, even
for a plain ``http://`` URL. The tests make thousands of such calls, many of them while polling
a server that is starting (20 a second: a whole core spent polling the process it waits for).
:func:`share_default_tls_context` makes httpx reuse one context built exactly as its own default
(certifi's CAs, hostname checks, certificates required), so nothing a test proves about TLS
changes; any other ``verify`` (a CA file's context, ``False``) is passed through untouched.

Thread model: the context is built once under a lock; an ``SSLContext`` is safe to share
between threads for making connections.
"""

from __future__ import annotations

import os
import ssl
import threading
from typing import Any

_lock = threading.Lock()
_shared: dict[tuple[Any, ...], ssl.SSLContext] = {}


def share_default_tls_context() -> bool:
    """Install the shared default in httpx's transports; False when this httpx has no such
    hook (then every client keeps building its own, as before: slower, never wrong)."""
    try:
        from httpx._transports import default as transports
    except ImportError:
        return False
    original = getattr(transports, "create_ssl_context", None)
    if original is None or getattr(original, "shared_default", False):
        return original is not None

    def create_ssl_context(verify: Any = True, cert: Any = None, trust_env: bool = True) -> ssl.SSLContext:
        if verify is not True or cert is not None:
            return original(verify=verify, cert=cert, trust_env=trust_env)
        key = (trust_env, os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
        with _lock:
            context = _shared.get(key)
            if context is None:
                context = _shared[key] = original(verify=verify, cert=cert, trust_env=trust_env)
            return context

    create_ssl_context.shared_default = True  # type: ignore[attr-defined]
    transports.create_ssl_context = create_ssl_context
    return True
