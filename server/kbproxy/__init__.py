"""kbproxy: the cluster-side Spark Connect gRPC proxy of kbase-spark-connect.

Each call is authenticated with the caller's KBase token (Auth2, cached) and relayed, as raw
bytes, to the caller's own Spark Connect server, chosen from the validated username. The
command line is `kbproxy serve` (and `kbproxy dev-auth` for development); this package's public
surface is what `__all__` lists.
"""

from __future__ import annotations

__version__ = "0.1.0"

from kbproxy.auth import Auth2Client, Authenticator, Identity, MfaPolicy, TokenCache
from kbproxy.errors import (
    AuthUnavailable,
    BackendUnavailable,
    ConfigError,
    ListenError,
    PermissionDenied,
    ProxyError,
    Unauthenticated,
    Unavailable,
)
from kbproxy.policy import Allow, Deny, credentials, decide
from kbproxy.pool import ChannelPool
from kbproxy.reasons import Reason
from kbproxy.relay import CallObserver, CallRecord, Relay
from kbproxy.routing import Router
from kbproxy.server import ProxyServer, Settings, serve
from kbproxy.slugs import backend_name
from kbproxy.stats import Stats

__all__ = [
    "Allow",
    "Auth2Client",
    "AuthUnavailable",
    "Authenticator",
    "BackendUnavailable",
    "CallObserver",
    "CallRecord",
    "ChannelPool",
    "ConfigError",
    "Deny",
    "Identity",
    "ListenError",
    "MfaPolicy",
    "PermissionDenied",
    "ProxyError",
    "ProxyServer",
    "Reason",
    "Relay",
    "Router",
    "Settings",
    "Stats",
    "TokenCache",
    "Unauthenticated",
    "Unavailable",
    "__version__",
    "backend_name",
    "credentials",
    "decide",
    "serve",
]
