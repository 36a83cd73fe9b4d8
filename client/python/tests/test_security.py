"""The Python client against a secured server: TLS with a bearer token (call credentials) and a
token over plaintext (metadata). Certificates are made here with the openssl command line."""
import os
import subprocess

import grpc
import numpy as np
import pytest

from conftest import start_server, stop_server
from kvcompact import Client, CompactError, Layer

TOKEN = "python-test-token-0123456789"


def openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *ec, "-days", "1", "-subj", "/CN=test-ca", "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))
    openssl("req", *ec, "-subj", "/CN=localhost", "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"))
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
            "-CAcreateserial", "-days", "1", "-extfile", str(d / "san.ext"), "-out", str(d / "server.pem"))
    (d / "tokens").write_text(TOKEN + "\n")
    return d


def small_layer():
    rng = np.random.default_rng(0)
    k, v, q = (rng.normal(size=(2, n, 64)).astype(np.float32) for n in (256, 256, 128))
    return [Layer(0, k, v, q)]


def test_tls_with_token_and_refusals(pki):
    proc, address, log = start_server([f"--tls_cert_file={pki / 'server.pem'}", f"--tls_key_file={pki / 'server.key'}",
                                       f"--auth_token_file={pki / 'tokens'}", "--health_listen=127.0.0.1:0"])
    try:
        ca = (pki / "ca.pem").read_bytes()
        with Client(address, root_certificates=ca, token=TOKEN) as client:
            assert client.info().backend
            result = client.compact(small_layer(), ratio=8)
            assert result.layers[0].heads[0].keys.shape == (32, 64)
        with Client(address, root_certificates=ca, token="wrong-token-0123456789") as client:
            with pytest.raises(grpc.RpcError) as err:
                client.info()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(CompactError) as cerr:
                client.compact(small_layer(), ratio=8)
            assert cerr.value.code == grpc.StatusCode.UNAUTHENTICATED
        with Client(address) as plaintext:  # no TLS to a TLS port
            with pytest.raises(grpc.RpcError) as err:
                plaintext.info(timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert TOKEN not in open(log).read()
    finally:
        stop_server(proc, log)


def test_token_over_plaintext(pki):
    env = dict(os.environ, KVCOMPACT_AUTH_TOKEN=TOKEN)
    proc, address, log = start_server(env=env)
    try:
        with Client(address, token=TOKEN) as client:
            assert client.compact(small_layer(), ratio=8).layers
        with Client(address) as client:
            with pytest.raises(grpc.RpcError) as err:
                client.info()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        stop_server(proc, log)
