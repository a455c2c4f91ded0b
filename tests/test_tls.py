"""TLS on the edge's port: HTTPS long-polls and publishes, WSS and event streams, on both
serving paths, with a certificate made for the test."""

import datetime
import http.client
import ipaddress
import json
import socket
import ssl
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from .cluster import SERVING_PATHS, Cluster
from .streamclient import ws_recv


def make_certificate(directory) -> tuple:
    """A self-signed certificate for 127.0.0.1: (cert file, key file)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "firehose test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "edge.crt", directory / "edge.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


@pytest.fixture(scope="module", params=sorted(SERVING_PATHS))
def tls_cluster(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls")
    cert_file, key_file = make_certificate(directory)
    config = f'tls_cert = "{cert_file}"\ntls_key = "{key_file}"'
    with Cluster(directory, extra_config=config, edge_args=SERVING_PATHS[request.param]) as c:
        c.cert_file = cert_file
        yield c


def https(cluster, method, path, body=None, headers=None):
    context = ssl.create_default_context(cafile=str(cluster.cert_file))
    conn = http.client.HTTPSConnection("127.0.0.1", cluster.http_port, context=context,
                                       timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_https_publish_and_long_poll(tls_cluster):
    channel = f"/tls/{uuid.uuid4().hex}"
    assert https(tls_cluster, "PUT", channel, b"secret")[0] == 202
    status, body = https(tls_cluster, "GET", channel)
    assert status == 200 and json.loads(body) == {"message": "secret", "last_sequence": 1}


def test_plain_http_to_a_tls_port_is_not_answered_in_clear(tls_cluster):
    with socket.create_connection(("127.0.0.1", tls_cluster.http_port), timeout=5) as sock:
        sock.sendall(b"GET /tls/x HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            answer = sock.recv(4096)
        except (ConnectionResetError, socket.timeout):
            answer = b""
    assert not answer.startswith(b"HTTP/1.1 2")


def test_wss_subscribes_and_streams(tls_cluster, run):
    channel = f"/tls/{uuid.uuid4().hex}"
    assert https(tls_cluster, "PUT", channel, b"first")[0] == 202

    async def go():
        context = ssl.create_default_context(cafile=str(tls_cluster.cert_file))
        ws = await websocket_connect(HTTPRequest(
            f"wss://127.0.0.1:{tls_cluster.http_port}{channel}", ssl_options=context,
            connect_timeout=10, request_timeout=10))
        try:
            ws.write_message(json.dumps({"message_sequence": 0}))
            return await ws_recv(ws)
        finally:
            ws.close()
    assert run(go()) == {"message": "first", "last_sequence": 1}


def test_event_stream_over_tls(tls_cluster):
    channel = f"/tls/{uuid.uuid4().hex}"
    assert https(tls_cluster, "PUT", channel, b"evented")[0] == 202
    context = ssl.create_default_context(cafile=str(tls_cluster.cert_file))
    conn = http.client.HTTPSConnection("127.0.0.1", tls_cluster.http_port, context=context,
                                       timeout=10)
    try:
        conn.request("GET", channel, headers={"Accept": "text/event-stream"})
        response = conn.getresponse()
        assert response.status == 200
        data = b""
        while b"data: evented" not in data:
            more = response.read1(4096)
            assert more, data
            data += more
    finally:
        conn.close()
    assert b"id: 1\n" in data
