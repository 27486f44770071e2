"""How every service and tool opens Redis: an ACL user and password, and TLS, from settings.

Each settings class that names a Redis URL mixes in `RedisClientSettings`, so its
credentials are read with its own prefix beside its URL (FEATURES_REDIS_URL,
FEATURES_REDIS_USERNAME, FEATURES_REDIS_PASSWORD, FEATURES_REDIS_TLS_CA_FILE, ...) and a
deployment can give each service an ACL user of its own. `redis_target()` checks them
together and returns a `RedisTarget`, which makes the clients (redis-py, asyncio or not, and
Celery's broker and result backend) and checks the credentials at start: a refused password
is one line naming the variables to fix, never a stack trace, while an unreachable Redis is
left to each service's own retries.

TLS is on for a `rediss://` URL: the server's certificate is verified against the CA file,
or the system's roots without one; a client certificate is presented when one is set.
The password is a SecretStr: it never appears in a repr, a log line or an error message.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit, urlunsplit

from pydantic import Field, SecretStr, model_validator

from services.runtime.settings import ServiceSettings, SettingsError

if TYPE_CHECKING:  # redis-py is imported where a client is made: the tools' start stays quick
    import redis
    import redis.asyncio as aioredis
_URL_SCHEMES = ("redis", "rediss", "unix")
# The start-up check's own timeout: longer than a service's per-request Redis timeout, so a
# slow TLS handshake is not mistaken for an unreachable Redis.
CHECK_TIMEOUT_SECONDS = 3.0


class RedisCredentialsError(SettingsError):
    """Redis refused the configured credentials (or requires some and none were set)."""


class RedisClientSettings(ServiceSettings):
    """The credentials and TLS of a Redis connection, read with the owner's prefix."""

    redis_username: str = Field(
        "", description="ACL user to authenticate to Redis as; empty: Redis's default user (or the URL's user)."
    )
    redis_password: SecretStr = Field(
        "",  # validated into a SecretStr (validate_default)
        validate_default=True,
        description=(
            "Password of that user (AUTH); empty: none, or the URL's. Never logged or shown. "
            "Under `infermesh up` it is generated and kept in <data dir>/redis-<port>.password."
        ),
    )
    redis_tls_ca_file: str = Field(
        "",
        description=(
            "CA certificate(s), PEM, that Redis's certificate must chain to over a rediss:// URL; "
            "empty: the system's roots."
        ),
    )
    redis_tls_cert_file: str = Field(
        "", description="Client certificate, PEM, presented to Redis over a rediss:// URL (with the key file)."
    )
    redis_tls_key_file: str = Field("", description="Private key, PEM, of that client certificate.")

    @model_validator(mode="after")
    def _cert_with_key(self) -> RedisClientSettings:
        self.check_paired("redis_tls_cert_file", "redis_tls_key_file")
        return self

    def redis_target(self, url: str, url_field: str = "redis_url") -> RedisTarget:
        """The connection to `url` (the value of `url_field`) with these credentials; raises
        SettingsError naming the variables when they cannot go together or a file is unreadable."""
        url_variable = self.variable(url_field)
        scheme = urlsplit(url).scheme
        if scheme not in _URL_SCHEMES:
            raise SettingsError(f"{url_variable}: expected a redis://, rediss:// or unix:// URL")
        tls_files = {
            self.variable(name): getattr(self, name)
            for name in ("redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file")
            if getattr(self, name)
        }
        if tls_files and scheme != "rediss":
            raise SettingsError(
                f"{', '.join(tls_files)} set, but {url_variable} is not a rediss:// URL: use rediss:// for TLS"
            )
        for variable, path in tls_files.items():
            if not os.access(path, os.R_OK):
                raise SettingsError(f"{variable}: cannot read {path}")
        return RedisTarget(
            url=url,
            username=self.redis_username,
            password=self.redis_password,
            tls_ca_file=self.redis_tls_ca_file,
            tls_cert_file=self.redis_tls_cert_file,
            tls_key_file=self.redis_tls_key_file,
            url_variable=url_variable,
            username_variable=self.variable("redis_username"),
            password_variable=self.variable("redis_password"),
        )


def redact_url(url: str) -> str:
    """The URL with any password replaced, safe to print."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


@dataclass(frozen=True)
class RedisTarget:
    """A Redis URL with the credentials and TLS files to open it with, and the names of the
    variables they came from (for error messages)."""

    url: str
    username: str = ""
    password: SecretStr = SecretStr("")
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    url_variable: str = "REDIS_URL"
    username_variable: str = "REDIS_USERNAME"
    password_variable: str = "REDIS_PASSWORD"

    @classmethod
    def of(cls, redis: str | RedisTarget) -> RedisTarget:
        """`redis` itself, or a URL with no credentials or TLS files of its own."""
        return redis if isinstance(redis, RedisTarget) else cls(redis)

    def settings_values(self) -> dict[str, Any]:
        """The RedisClientSettings fields (and redis_url) that name this target: for a
        settings class, or with their variables' prefix for a process's environment."""
        return {
            "redis_url": self.url,
            "redis_username": self.username,
            "redis_password": self.password,
            "redis_tls_ca_file": self.tls_ca_file,
            "redis_tls_cert_file": self.tls_cert_file,
            "redis_tls_key_file": self.tls_key_file,
        }

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "rediss"

    @property
    def shown(self) -> str:
        """The URL without its password, for messages."""
        return redact_url(self.url)

    def options(self) -> dict[str, Any]:
        """redis-py's keyword arguments for the credentials and TLS (a URL's own user and
        password win: redis-py lets the URL override them)."""
        options: dict[str, Any] = {}
        if self.username:
            options["username"] = self.username
        if self.password.get_secret_value():
            options["password"] = self.password.get_secret_value()
        if self.tls:
            options.update(ssl_cert_reqs="required", ssl_ca_certs=self.tls_ca_file or None)
            if self.tls_cert_file:
                options.update(ssl_certfile=self.tls_cert_file, ssl_keyfile=self.tls_key_file)
        return options

    def client(self, **options: Any) -> redis.Redis:
        import redis

        return redis.Redis.from_url(self.url, **self.options(), **options)

    def async_client(self, **options: Any) -> aioredis.Redis:
        import redis.asyncio as aioredis

        return aioredis.Redis.from_url(self.url, **self.options(), **options)

    # ---- Celery (kombu's broker, Celery's result backend): credentials in the URL, TLS apart
    def celery_url(self, url: str) -> str:
        """`url` (a broker or backend URL) with these credentials, unless it carries its own;
        a redis-py unix:// URL as Celery's redis+socket:// (Celery has no unix:// transport)."""
        url = _celery_socket_url(url)
        parts = urlsplit(url)
        secret = self.password.get_secret_value()
        if parts.password is not None or parts.username is not None or not (secret or self.username):
            return url
        userinfo = quote(self.username, safe="")
        if secret:
            userinfo += ":" + quote(secret, safe="")
        return urlunsplit(parts._replace(netloc=f"{userinfo}@{parts.netloc}"))

    def celery_ssl(self, url: str) -> dict[str, Any] | None:
        """broker_use_ssl / redis_backend_use_ssl for `url`: these TLS files for a rediss://
        URL (Celery refuses one without them), None for another."""
        if urlsplit(url).scheme != "rediss":
            return None
        options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
        if self.tls_ca_file:
            options["ssl_ca_certs"] = self.tls_ca_file
        if self.tls_cert_file:
            options.update(ssl_certfile=self.tls_cert_file, ssl_keyfile=self.tls_key_file)
        return options

    # ---- the start-up check -----------------------------------------------------------
    def check(self, timeout_seconds: float = CHECK_TIMEOUT_SECONDS) -> None:
        """PING once on a connection of its own: a refused password raises
        RedisCredentialsError; an unreachable Redis is not this check's business (the caller
        retries, degrades or reports it)."""
        import redis.exceptions

        client = self.client(socket_timeout=timeout_seconds, socket_connect_timeout=timeout_seconds)
        try:
            client.ping()
        except _refused() as error:
            raise self.refused(error) from None
        except redis.exceptions.NoPermissionError as error:
            raise self.forbidden(error) from None
        except redis.exceptions.RedisError:
            pass
        finally:
            client.close()

    def refused(self, error: Exception) -> RedisCredentialsError:
        """One line naming the variables to fix; the server's reason, never the password."""
        reason = _reason(error)
        if urlsplit(self.url).password is not None:
            source = f"the password in {self.url_variable}"
        elif self.password.get_secret_value():
            source = f"the credentials in {self.password_variable}"
            if self.username:
                source += f" (user {self.username!r} from {self.username_variable})"
        else:
            return RedisCredentialsError(
                f"Redis at {self.shown} requires a password and none is set: set {self.password_variable} "
                f"(and {self.username_variable} for an ACL user) ({reason})"
            )
        return RedisCredentialsError(f"Redis at {self.shown} refused {source} ({reason})")

    def forbidden(self, error: Exception) -> RedisCredentialsError:
        user = self.username or "default"
        return RedisCredentialsError(
            f"Redis at {self.shown} denies the user {user!r} ({self.username_variable}) a command it needs: "
            f"grant it in the user's ACL ({_reason(error)})"
        )


def _refused() -> tuple[type[Exception], ...]:
    """A refused password: the parser's AuthenticationError (WRONGPASS, NOAUTH, "invalid
    password"), a subclass of ConnectionError, so caught before an unreachable Redis is."""
    from redis.exceptions import AuthenticationError, AuthenticationWrongNumberOfArgsError

    return (AuthenticationError, AuthenticationWrongNumberOfArgsError)


def _reason(error: Exception) -> str:
    """The server's reason, one line, bounded (it never holds the password)."""
    text = " ".join(str(error).split())
    return text if len(text) <= 120 else text[:117] + "..."


def _celery_socket_url(url: str) -> str:
    """unix:///path?db=N (redis-py's) -> redis+socket:///path?virtual_host=N (kombu's and
    Celery's Redis backend's); any other URL as it is."""
    parts = urlsplit(url)
    if parts.scheme != "unix":
        return url
    db = parse_qs(parts.query).get("db", ["0"])[0]
    # By hand: urlunsplit drops the '//' of an empty host, and Celery then reads no scheme.
    return f"redis+socket://{parts.netloc}{parts.path}?{urlencode({'virtual_host': db})}"
