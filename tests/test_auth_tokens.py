"""Credentials: channel patterns, JWT verification, the Authorizer's decisions, [auth] config."""

import time
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from firehose_zmq.auth.tokens import (AuthError, Authorizer, ChannelPatterns, Rights,
                                      TokenVerifier)
from firehose_zmq.config import AuthConfig, ConfigError, parse_config

SECRET = "s" * 32
OTHER_SECRET = "o" * 32


def token(claims=None, key=SECRET, algorithm="HS256", **extra):
    body = {"firehose": {"publish": ["/chat/*"], "subscribe": ["/chat/room1"]}}
    if claims is not None:
        body = claims
    return jwt.encode({**body, **extra}, key, algorithm=algorithm)


def authorizer(**settings):
    auth = AuthConfig(**{"publish": "required", "subscribe": "required", "jwt_key": SECRET,
                         **settings})
    return Authorizer.from_config(auth)


def status_of(auth: Authorizer, op, channel, credential):
    try:
        auth.check(op, channel, credential)
    except AuthError as exc:
        return exc.status
    return 200


@pytest.mark.parametrize("patterns, channel, allowed", [
    (["/chat/room1"], "/chat/room1", True),
    (["/chat/room1"], "/chat/room10", False),
    (["/chat/*"], "/chat/a", True),
    (["/chat/*"], "/chat/a/b", True),
    (["/chat/*"], "/chat", False),
    (["/chat*"], "/chatter", True),
    (["*"], "/anything", True),
    ([], "/anything", False),
    (["/a", "/b/*"], "/b/c", True),
    (["/a", "/b/*"], "/c", False),
])
def test_channel_patterns(patterns, channel, allowed):
    """A pattern is an exact name or a prefix ending in '*'."""
    assert ChannelPatterns(patterns).allows(channel) is allowed


@pytest.mark.parametrize("pattern", ["", "chat/*", "/a*b", "/*/x", 5])
def test_bad_channel_patterns(pattern):
    """A '*' anywhere but at the end, or a pattern not starting with '/', is refused."""
    with pytest.raises(ValueError):
        ChannelPatterns([pattern])


@pytest.mark.parametrize("claim", [
    "publish", ["/a"], {"publish": "/a"}, {"admin": ["/a"]}, {"publish": ["a"]},
])
def test_bad_claims(claim):
    """A claim that is not {op: [patterns]} is refused as a whole."""
    with pytest.raises(ValueError):
        Rights.from_claim(claim)


NOW = int(time.time())

CASES = [
    # (what, op, channel, credential, status)
    ("no credential", "publish", "/chat/a", None, 401),
    ("empty credential", "subscribe", "/chat/room1", "", 401),
    ("not a JWT", "publish", "/chat/a", "garbage", 401),
    ("another key", "publish", "/chat/a", token(key=OTHER_SECRET), 401),
    # Times relative to when the test runs, not to when it was collected.
    ("expired", "publish", "/chat/a", lambda: token(exp=int(time.time()) - 120), 401),
    ("expired within the leeway", "publish", "/chat/a",
     lambda: token(exp=int(time.time()) - 5), 200),
    ("not valid yet", "publish", "/chat/a", lambda: token(nbf=int(time.time()) + 300), 401),
    ("nbf within the leeway", "publish", "/chat/a", lambda: token(nbf=int(time.time()) + 5),
     200),
    ("unaccepted algorithm", "publish", "/chat/a", token(key="k" * 64, algorithm="HS512"), 401),
    ("unsigned", "publish", "/chat/a", jwt.encode({"firehose": {"publish": ["*"]}}, None,
                                                  algorithm="none"), 401),
    ("no firehose claim", "publish", "/chat/a", token({"sub": "x"}), 401),
    ("malformed claim", "publish", "/chat/a", token({"firehose": {"publish": "/chat/a"}}), 401),
    ("valid publish", "publish", "/chat/a", token(exp=NOW + 600), 200),
    ("publish outside the prefix", "publish", "/news", token(), 403),
    ("publish with subscribe rights only", "publish", "/chat/room1",
     token({"firehose": {"subscribe": ["/chat/room1"]}}), 403),
    ("valid subscribe", "subscribe", "/chat/room1", token(), 200),
    ("subscribe to another room", "subscribe", "/chat/room2", token(), 403),
    ("wildcard", "subscribe", "/x", token({"firehose": {"subscribe": ["*"]}}), 200),
]


@pytest.mark.parametrize("what, op, channel, credential, status", CASES,
                         ids=[c[0] for c in CASES])
def test_required_operations(what, op, channel, credential, status):
    """Missing or bad credential: 401; valid but not granted: 403."""
    if callable(credential):
        credential = credential()
    assert status_of(authorizer(), op, channel, credential) == status


def test_open_operations_check_nothing():
    """An open operation lets anyone in, whatever credential they carry."""
    auth = authorizer(publish="open", subscribe="open")
    for op in ("publish", "subscribe"):
        assert not auth.required(op)
        assert status_of(auth, op, "/x", None) == 200
        assert status_of(auth, op, "/x", "garbage") == 200


def test_refusals_carry_a_challenge_and_a_reason():
    """401 has a Bearer challenge (with invalid_token when a credential was bad); 403 has none."""
    auth = authorizer(realm="chat")
    with pytest.raises(AuthError) as missing:
        auth.check("publish", "/chat/a", None)
    assert missing.value.headers() == {"WWW-Authenticate": 'Bearer realm="chat"'}
    assert "publishing needs a credential" in missing.value.reason
    with pytest.raises(AuthError) as expired:
        auth.check("publish", "/chat/a", token(exp=NOW - 3600))
    assert expired.value.reason == "the token has expired"
    assert 'error="invalid_token"' in expired.value.www_authenticate
    with pytest.raises(AuthError) as forbidden:
        auth.check("publish", "/news", token())
    assert forbidden.value.status == 403 and forbidden.value.headers() == {}
    assert forbidden.value.reason == "the token does not allow to publish to /news"


def test_audience_and_issuer():
    """With jwt_audience / jwt_issuer set, a token for another one is refused."""
    auth = authorizer(jwt_audience="firehose", jwt_issuer="https://issuer.test")
    good = token(aud="firehose", iss="https://issuer.test")
    assert status_of(auth, "publish", "/chat/a", good) == 200
    other_audience = token(aud="other", iss="https://issuer.test")
    other_issuer = token(aud="firehose", iss="https://evil.test")
    assert status_of(auth, "publish", "/chat/a", other_audience) == 401
    assert status_of(auth, "publish", "/chat/a", other_issuer) == 401


@pytest.mark.parametrize("headers, query, expected", [
    ({"Authorization": "Bearer abc"}, {}, "abc"),
    ({"Authorization": "bearer  abc "}, {}, "abc"),
    ({"Authorization": "Basic dXNlcjpw"}, {}, None),
    ({"Cookie": "a=1; firehose_token=cookie-token; b=2"}, {}, "cookie-token"),
    ({"Cookie": "firehose_token_x=1"}, {}, None),
    ({}, {"access_token": "query-token"}, "query-token"),
    ({}, {"access_token": ""}, None),
    ({"Authorization": "Bearer h", "Cookie": "firehose_token=c"}, {"access_token": "q"}, "h"),
    ({"Cookie": "firehose_token=c"}, {"access_token": "q"}, "c"),
    ({}, {}, None),
])
def test_credential_from(headers, query, expected):
    """Bearer header first, then the cookie, then the query parameter."""
    auth = authorizer()
    assert auth.credential_from(headers.get, query.get) == expected


def test_credential_names_are_configurable():
    """cookie_name and query_param choose where browsers put the token."""
    auth = authorizer(cookie_name="sess", query_param="jwt")
    assert auth.credential_from({"Cookie": "sess=x"}.get, {}.get) == "x"
    assert auth.credential_from({}.get, {"jwt": "y", "access_token": "z"}.get) == "y"


def _keypair(kind):
    private = (rsa.generate_private_key(public_exponent=65537, key_size=2048) if kind == "RS256"
               else ec.generate_private_key(ec.SECP256R1()))
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    private_pem = private.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    return private_pem, public_pem


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
def test_public_key_algorithms(tmp_path, algorithm):
    """RS256 / ES256 tokens verify against a public key file; another key's do not."""
    private_pem, public_pem = _keypair(algorithm)
    other_private, _ = _keypair(algorithm)
    key_file = tmp_path / "jwt.pub"
    key_file.write_bytes(public_pem)
    auth = authorizer(jwt_key="", jwt_key_file=str(key_file), jwt_algorithms=(algorithm,))
    assert status_of(auth, "publish", "/chat/a", token(key=private_pem, algorithm=algorithm)) == 200
    stranger = token(key=other_private, algorithm=algorithm)
    assert status_of(auth, "publish", "/chat/a", stranger) == 401
    # Only the configured algorithms are accepted: an HS256 token is refused.
    forged = jwt.encode({"firehose": {"publish": ["*"]}}, "x" * 32, algorithm="HS256")
    assert status_of(auth, "publish", "/chat/a", forged) == 401


@pytest.mark.parametrize("settings, message", [
    ({"jwt_key": "short"}, "at least 32 bytes"),
    ({"jwt_key": "", "jwt_key_file": "/nonexistent/key"}, "cannot read"),
])
def test_bad_keys_are_config_errors(settings, message):
    with pytest.raises(ConfigError, match=message):
        authorizer(**settings)


def test_private_key_file_is_refused(tmp_path):
    """The edge is given only the public half of an RS256/ES256 key."""
    private_pem, _ = _keypair("ES256")
    key_file = tmp_path / "jwt.key"
    key_file.write_bytes(private_pem)
    with pytest.raises(ConfigError, match="private key"):
        authorizer(jwt_key="", jwt_key_file=str(key_file), jwt_algorithms=("ES256",))


def test_hmac_key_file(tmp_path):
    """An HS256 secret may come from a file; a trailing newline is not part of it."""
    key_file = tmp_path / "jwt.secret"
    key_file.write_text(SECRET + "\n")
    auth = authorizer(jwt_key="", jwt_key_file=str(key_file))
    assert status_of(auth, "publish", "/chat/a", token()) == 200


def test_token_cache_is_bounded_and_rechecks_times():
    """At most token_cache_size tokens are remembered, and a cached token still expires."""
    clock = [time.time()]
    verifier = TokenVerifier(SECRET.encode(), ["HS256"], leeway_s=0, cache_size=50,
                             clock=lambda: clock[0])
    for i in range(200):
        verifier.rights(token(sub=str(i)))
    assert verifier.cached == 50
    short = token(exp=int(clock[0]) + 60)
    assert verifier.rights(short).allows("publish", "/chat/a")
    clock[0] += 61
    with pytest.raises(ValueError, match="expired"):
        verifier.rights(short)


WORKERS = ("[[workers]]\nid='w1'\nrouter_bind='tcp://{host}:1'\nrouter_connect='tcp://10.0.0.1:1'\n"
           "pub_bind='tcp://{host}:2'\npub_connect='tcp://10.0.0.1:2'\n")


def load(text, host="127.0.0.1"):
    import tomllib
    return parse_config(tomllib.loads(WORKERS.format(host=host) + text))


@pytest.mark.parametrize("text, host, message", [
    ("[edge]\nhost='0.0.0.0'\n", "127.0.0.1", "edge.host 0.0.0.0"),
    ("[edge]\nnative_router_bind='tcp://*:7476'\n", "127.0.0.1", "native_router_bind"),
    ("", "0.0.0.0", "worker w1 router_bind"),
    ("[edge]\nhost='0.0.0.0'\n[auth]\npublish='required'\njwt_key='" + SECRET + "'\n",
     "0.0.0.0", "worker w1 router_bind"),
    ("[auth]\npublish='maybe'\n", "127.0.0.1", "auth.publish must be one of"),
    ("[auth]\npublish='required'\n", "127.0.0.1", "nothing can grant it"),
    ("[auth]\nallow_open_publish='yes'\n", "127.0.0.1", "true or false"),
    ("[auth]\njwt_algorithms=['HS256','RS256']\n", "127.0.0.1", "cannot mix"),
    ("[auth]\njwt_algorithms=['none']\n", "127.0.0.1", "jwt_algorithms must name"),
    ("[auth]\njwt_algorithms=['RS256']\njwt_key='" + SECRET + "'\n", "127.0.0.1", "jwt_key_file"),
    ("[auth]\ncallout_url='ftp://x'\n", "127.0.0.1", "callout_url must be"),
    ("[auth]\ncallout_ops=['delete']\n", "127.0.0.1", "unknown operations"),
    ("[auth]\nbogus=1\n", "127.0.0.1", "unknown key"),
])
def test_bad_auth_configs_are_refused(text, host, message):
    """An unsafe or unusable [auth] is a one-line ConfigError."""
    with pytest.raises(ConfigError, match=message):
        load(text, host)


@pytest.mark.parametrize("text", [
    "",  # everything on loopback
    "[edge]\nhost='0.0.0.0'\n[auth]\nallow_open_publish=true\n",
    "[edge]\nhost='0.0.0.0'\n[auth]\npublish='required'\njwt_key='" + SECRET + "'\n",
    "[auth]\npublish='required'\ncallout_url='http://127.0.0.1:9/auth'\n",
])
def test_safe_auth_configs_load(text):
    config = load(text)
    assert config.auth.publish in ("open", "required")


def test_exposed_workers_need_curve():
    """Workers bound to a public address start only with CURVE on (or the explicit opt-out)."""
    config = load("[auth]\nallow_open_publish=true\n", host="0.0.0.0")
    assert config.auth.allow_open_publish
    curve = ("[curve]\nenabled=true\nworker_keys={w1='w1.key'}\nedge_key='e.key'\n"
             "edge_secret_key='e.key_secret'\nnative_secret_key='n.key_secret'\n")
    config = load("[auth]\npublish='required'\njwt_key='" + SECRET + "'\n" + curve,
                  host="0.0.0.0")
    assert config.curve.enabled and dict(config.curve.worker_keys) == {"w1": "w1.key"}


def test_required_is_per_operation():
    """subscribe = "open" with publish = "required": only publishing is checked."""
    auth = authorizer(subscribe="open")
    assert auth.required("publish") and not auth.required("subscribe")
    assert status_of(auth, "subscribe", "/news", None) == 200
    assert status_of(auth, "publish", "/news", None) == 401
