"""Publisher and subscriber credentials: JWTs, channel rights, the one authorization check.

No sockets and no event loop here (the callout's HTTP request lives in ``callout``).

Operations: ``publish`` (publish and delete) and ``subscribe`` (long-poll, WebSocket,
event stream, native fetch and subscribe). Each is ``open`` or ``required``
(``[auth] publish`` / ``subscribe``). A required operation needs a credential,
taken in this order from ``Authorization: Bearer <token>``, the cookie
``cookie_name`` and the query parameter ``query_param`` (browsers' ``EventSource``
and WebSocket cannot set headers). When a JWT key is configured the credential
must be a JWT signed by it, within its ``nbf``/``exp`` (give or take
``jwt_leeway_s``), whose claim ``jwt_claim`` grants the channel::

    {"sub": "svc-1", "exp": 1767225600,
     "firehose": {"publish": ["/chat/*"], "subscribe": ["/chat/room1", "/news"]}}

A pattern is an exact channel name, or ends in ``*`` and matches every channel
whose name starts with what comes before the ``*`` (``/chat/*`` matches
``/chat/a`` and ``/chat/a/b``, not ``/chat``); ``*`` alone matches every channel.
A list left out grants nothing. A claim that breaks these rules makes the token
invalid. When a callout URL is configured it must also consent (``callout``).

Outcomes, as ``AuthError``: no credential or an invalid one is ``401`` with a
``WWW-Authenticate: Bearer`` challenge; a valid one that does not grant the
channel is ``403``; a callout that cannot be asked (and fails closed) is ``503``.

Theory of operation for the edge: ``Authorizer.check`` is synchronous and cheap
after the first sight of a token (verified tokens are cached, bounded by
``token_cache_size``, and their times checked again on every use). When
``callout_pending`` says so, the edge also awaits ``Authorizer.callout``.
"""

import time

import jwt

from ..config import AUTH_OPS, ConfigError

PUBLISH = "publish"
SUBSCRIBE = "subscribe"

# RFC 7518 §3.2: an HMAC key at least as long as the hash.
MIN_HMAC_KEY_BYTES = 32


class AuthError(Exception):
    """A refused operation: ``status`` (401, 403 or 503), a one-line ``reason`` and,
    for 401, the ``www_authenticate`` header value."""

    def __init__(self, status: int, reason: str, www_authenticate: str = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.www_authenticate = www_authenticate

    def headers(self) -> dict:
        """The response headers this refusal needs."""
        return {"WWW-Authenticate": self.www_authenticate} if self.www_authenticate else {}


class ChannelPatterns:
    """A set of exact channel names and prefixes (``/chat/*``); ``*`` is every channel."""

    __slots__ = ("exact", "prefixes", "everything")

    def __init__(self, patterns=()):
        exact, prefixes = set(), []
        for pattern in patterns:
            if not isinstance(pattern, str) or not pattern:
                raise ValueError("a channel pattern must be a non-empty string")
            if pattern == "*":
                prefixes.append("")
            elif not pattern.startswith("/"):
                raise ValueError(f"channel pattern {pattern!r} must start with '/' or be '*'")
            elif "*" in pattern[:-1]:
                raise ValueError(f"channel pattern {pattern!r}: '*' may only end a pattern")
            elif pattern.endswith("*"):
                prefixes.append(pattern[:-1])
            else:
                exact.add(pattern)
        self.everything = "" in prefixes
        self.exact = frozenset(exact)
        self.prefixes = tuple(sorted(set(prefixes)))

    def allows(self, channel: str) -> bool:
        return self.everything or channel in self.exact or channel.startswith(self.prefixes)

    def covers_prefix(self, prefix: str) -> bool:
        """True when every channel starting with ``prefix`` is allowed."""
        return self.everything or prefix.startswith(self.prefixes)

    def __bool__(self) -> bool:
        return bool(self.exact or self.prefixes)


class Rights:
    """What one credential may do: a ``ChannelPatterns`` per operation."""

    __slots__ = ("by_op",)

    def __init__(self, publish=(), subscribe=()):
        self.by_op = {PUBLISH: ChannelPatterns(publish), SUBSCRIBE: ChannelPatterns(subscribe)}

    @classmethod
    def from_claim(cls, claim) -> "Rights":
        """The rights of a token's claim value; raises ValueError with a reason."""
        if not isinstance(claim, dict):
            raise ValueError("its claim must be an object of operation: [channel patterns]")
        unknown = set(claim) - set(AUTH_OPS)
        if unknown:
            raise ValueError(f"its claim names unknown operations: {', '.join(sorted(unknown))}")
        lists = {}
        for op in AUTH_OPS:
            patterns = claim.get(op, [])
            if not isinstance(patterns, list):
                raise ValueError(f"its claim's {op} must be a list of channel patterns")
            lists[op] = patterns
        return cls(**lists)

    def allows(self, op: str, channel: str) -> bool:
        return self.by_op[op].allows(channel)


NO_RIGHTS = Rights()


def load_jwt_key(auth):
    """The verification key of an ``AuthConfig`` (None when it has none); raises ConfigError."""
    hmac = auth.jwt_algorithms[0].startswith("HS")
    if auth.jwt_key:
        key = auth.jwt_key.encode("utf-8")
        where = "auth.jwt_key"
    elif auth.jwt_key_file:
        where = f"auth.jwt_key_file {auth.jwt_key_file}"
        try:
            with open(auth.jwt_key_file, "rb") as f:
                key = f.read()
        except OSError as exc:
            raise ConfigError(f"cannot read {where}: {exc.strerror}") from None
        if hmac:
            key = key.rstrip(b"\r\n")
    else:
        return None
    if hmac:
        if len(key) < MIN_HMAC_KEY_BYTES:
            raise ConfigError(f"{where}: an HMAC key must be at least {MIN_HMAC_KEY_BYTES} bytes")
        return key
    algorithms = jwt.algorithms.get_default_algorithms()
    try:
        for name in auth.jwt_algorithms:
            prepared = algorithms[name].prepare_key(key)
    except (jwt.InvalidKeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"{where} is not a public key for {name}: {exc}") from None
    if hasattr(prepared, "private_bytes"):
        raise ConfigError(f"{where} holds a private key: the edge needs only the public key")
    return key


_TOKEN_ERRORS = (
    (jwt.ExpiredSignatureError, "the token has expired"),
    (jwt.ImmatureSignatureError, "the token is not valid yet (nbf)"),
    (jwt.InvalidAudienceError, "the token is for another audience"),
    (jwt.InvalidIssuerError, "the token is from another issuer"),
    (jwt.InvalidAlgorithmError, "the token's algorithm is not accepted"),
    (jwt.InvalidSignatureError, "the token's signature does not verify"),
    (jwt.DecodeError, "the credential is not a well-formed JWT"),
)


class TokenVerifier:
    """Turns a JWT into ``Rights``; remembers up to ``cache_size`` verified tokens."""

    def __init__(self, key, algorithms, claim: str = "firehose", audience: str = "",
                 issuer: str = "", leeway_s: float = 30, cache_size: int = 4096,
                 clock=time.time):
        self._key = key
        self._algorithms = list(algorithms)
        self._claim = claim
        self._audience = audience or None
        self._issuer = issuer or None
        self._leeway_s = leeway_s
        self._cache_size = cache_size
        self._clock = clock
        self._cache = {}  # token -> (rights, not_before, expires_at), oldest first

    def rights(self, token: str) -> Rights:
        """The rights ``token`` grants now; raises ``ValueError`` with a reason."""
        now = self._clock()
        hit = self._cache.get(token)
        if hit is not None:
            rights, not_before, expires_at = hit
            if now + self._leeway_s < not_before:
                raise ValueError("the token is not valid yet (nbf)")
            if now - self._leeway_s >= expires_at:
                del self._cache[token]
                raise ValueError("the token has expired")
            return rights
        try:
            claims = jwt.decode(token, self._key, algorithms=self._algorithms,
                                audience=self._audience, issuer=self._issuer,
                                leeway=self._leeway_s,
                                options={"verify_aud": self._audience is not None})
        except jwt.InvalidTokenError as exc:
            for kind, reason in _TOKEN_ERRORS:
                if isinstance(exc, kind):
                    raise ValueError(reason) from None
            raise ValueError(f"the token is invalid: {exc}") from None
        if self._claim not in claims:
            raise ValueError(f"the token has no {self._claim!r} claim")
        try:
            rights = Rights.from_claim(claims[self._claim])
        except ValueError as exc:
            raise ValueError(f"the token is invalid: {exc}") from None
        times = []
        for name, default in (("nbf", float("-inf")), ("exp", float("inf"))):
            value = claims.get(name, default)
            times.append(value if isinstance(value, (int, float)) else default)
        if len(self._cache) >= self._cache_size:
            del self._cache[next(iter(self._cache))]
        self._cache[token] = (rights, times[0], times[1])
        return rights

    @property
    def cached(self) -> int:
        return len(self._cache)


def _cookie(header: str, name: str):
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value.strip().strip('"')
    return None


class Authorizer:
    """The one authorization check of every edge path (HTTP, streams, native).

    ``check(op, channel, credential)`` raises ``AuthError`` or returns; when
    ``callout_pending(...)`` is true the edge then awaits ``callout(...)``."""

    def __init__(self, auth, verifier: TokenVerifier = None, callout=None):
        self.config = auth
        self._verifier = verifier
        self._callout = callout
        self._required = {op: getattr(auth, op) == "required" for op in AUTH_OPS}
        self._callout_ops = frozenset(op for op in AUTH_OPS
                                      if callout is not None and op in auth.callout_ops
                                      and self._required[op])
        self._challenge = f'Bearer realm="{auth.realm}"'
        where = ["the Authorization: Bearer header", f"the {auth.cookie_name} cookie",
                 f"the {auth.query_param} query parameter"]
        self._missing = {op: f"{'publishing' if op == PUBLISH else 'subscribing'} needs a "
                             f"credential ({', '.join(where)})" for op in AUTH_OPS}

    @classmethod
    def from_config(cls, auth) -> "Authorizer":
        """Load the key files of an ``AuthConfig``; raises ConfigError."""
        key = load_jwt_key(auth)
        verifier = None
        if key is not None:
            verifier = TokenVerifier(key, auth.jwt_algorithms, auth.jwt_claim, auth.jwt_audience,
                                     auth.jwt_issuer, auth.jwt_leeway_s, auth.token_cache_size)
        callout = None
        if auth.callout_url:
            from .callout import Callout  # imports Tornado's HTTP client
            callout = Callout.from_config(auth)
        return cls(auth, verifier, callout)

    def required(self, op: str) -> bool:
        """True when ``op`` needs a credential (False: open, nothing to check)."""
        return self._required[op]

    def credential_from(self, header, query):
        """The credential of a request: ``header(name)`` and ``query(name)`` return a
        string or None. Bearer header first, then the cookie, then the query parameter."""
        value = header("Authorization")
        if value:
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        cookies = header("Cookie")
        if cookies:
            token = _cookie(cookies, self.config.cookie_name)
            if token:
                return token
        return query(self.config.query_param) or None

    def check(self, op: str, channel: str, credential) -> None:
        """Raise ``AuthError`` unless ``credential`` may do ``op`` on ``channel``
        (the synchronous part: presence, signature, times, claim)."""
        if not self._required[op]:
            return
        if not credential:
            raise AuthError(401, self._missing[op], self._challenge)
        if self._verifier is None:
            return  # the callout decides
        try:
            rights = self._verifier.rights(credential)
        except ValueError as exc:
            reason = str(exc)
            raise AuthError(401, reason, f'{self._challenge}, error="invalid_token", '
                                         f'error_description="{reason}"') from None
        if not rights.allows(op, channel):
            verb = "publish to" if op == PUBLISH else "subscribe to"
            raise AuthError(403, f"the token does not allow to {verb} {channel}")

    def callout_pending(self, op: str, channel: str, credential) -> bool:
        """True when the callout must still be awaited; a cached refusal raises at once."""
        if op not in self._callout_ops:
            return False
        return not self._callout.answered(op, channel, credential)

    async def callout(self, op: str, channel: str, credential) -> None:
        """Ask the callout (after ``check``); raises ``AuthError``."""
        if op in self._callout_ops:
            await self._callout.ask(op, channel, credential)

    async def authorize(self, op: str, channel: str, credential) -> None:
        """``check`` and then, if needed, ``callout``: the whole decision."""
        self.check(op, channel, credential)
        if self.callout_pending(op, channel, credential):
            await self._callout.ask(op, channel, credential)

    def close(self) -> None:
        if self._callout is not None:
            self._callout.close()
