"""Starts the real kvcompact-server binary on loopback for the tests."""
import os
import re
import subprocess
import tempfile
import time

import grpc
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_BINARY = os.path.normpath(os.path.join(HERE, "..", "..", "..", "build", "server", "kvcompact-server"))


def start_server(extra_args=(), env=None):
    """Starts the server; returns (process, address, log path). Readiness is read from its log."""
    binary = os.environ.get("KVCOMPACT_SERVER_BINARY", DEFAULT_BINARY)
    if not os.path.exists(binary):
        pytest.fail(f"server binary not found at {binary}; build the repository or set KVCOMPACT_SERVER_BINARY")
    log = tempfile.NamedTemporaryFile(prefix="kvcompact-py-", suffix=".log", delete=False)
    proc = subprocess.Popen([binary, "--listen=127.0.0.1:0", "--metrics_listen=", "--threads=2", *extra_args],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    address = None
    deadline = time.time() + 30
    while time.time() < deadline and proc.poll() is None:
        text = open(log.name).read()
        m = re.search(r"listening on \S+ \(port (\d+)\)", text)
        if m and "SERVING" in text:
            address = f"127.0.0.1:{m.group(1)}"
            break
        time.sleep(0.05)
    if address is None:
        proc.kill()
        pytest.fail("server did not start:\n" + open(log.name).read())
    return proc, address, log.name


def stop_server(proc, log_path):
    proc.terminate()
    proc.wait(timeout=20)
    os.unlink(log_path)


@pytest.fixture(scope="session")
def server_address():
    proc, address, log_path = start_server()
    grpc.channel_ready_future(grpc.insecure_channel(address)).result(timeout=10)
    yield address
    stop_server(proc, log_path)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """KVCOMPACT_DATA_DIR when set (the public evaluation data), else the project's own text."""
    from testdata import write_data_dir
    return os.environ.get("KVCOMPACT_DATA_DIR") or write_data_dir(str(tmp_path_factory.mktemp("data")))
