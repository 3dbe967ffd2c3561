"""kbclient: Spark Connect sessions to your own KBase Spark cluster, with no configuration.

    from kbclient import create_spark_session
    spark = create_spark_session()

The token comes from the first of: the ``token`` argument, KBASE_AUTH_TOKEN, KB_AUTH_TOKEN, the
running kbdaemon, the token store ``kbdaemon login`` wrote (``kbclient.tokenstore``: the
``--insecure-storage`` file, then the OS keyring). The daemon's socket API is
``kbclient.daemon_api``, the profiles ``kbclient.profiles``. pyspark and httpx are imported on
first use, so ``import kbclient`` stays light.
"""

from __future__ import annotations

from kbclient._auth2 import TokenCache, TokenInfo, UserInfo
from kbclient._authclient import KBaseAuthClient, SyncKBaseAuthClient
from kbclient._connection import ConnectionInfo, S3Options
from kbclient._errors import (
    AuthError,
    AuthUnavailableError,
    InvalidTokenError,
    KBaseError,
    KeyringError,
    MFARequiredError,
    NoTokenError,
    SparkServerUnavailableError,
    TokenExpiredError,
    UnavailableError,
)
from kbclient._session import acreate_spark_session, create_spark_session, get_connection_info
from kbclient.profiles import PROD_AUTH_URL, ProfileError
from kbclient.tokenstore import KEYRING_SERVICE

__version__ = "0.1.0"

__all__ = [
    "KEYRING_SERVICE",
    "PROD_AUTH_URL",
    "AuthError",
    "AuthUnavailableError",
    "ConnectionInfo",
    "InvalidTokenError",
    "KBaseAuthClient",
    "KBaseError",
    "KeyringError",
    "MFARequiredError",
    "NoTokenError",
    "ProfileError",
    "S3Options",
    "SparkServerUnavailableError",
    "SyncKBaseAuthClient",
    "TokenCache",
    "TokenExpiredError",
    "TokenInfo",
    "UnavailableError",
    "UserInfo",
    "__version__",
    "acreate_spark_session",
    "create_spark_session",
    "get_connection_info",
]
