#!/usr/bin/env python3
"""Server CPU per delivered message, by transport (not part of the tests).

One sender and N receivers against `chat.py server`, once per transport:
plaintext line protocol, TLS (the test certificate from test_chat.py), and
WebSocket receivers (JSON events, as the browser page gets them). The sender
sends M lines in windows of W and waits until every receiver has them; the
server's CPU time (user + system, from /proc) over the run is divided by the
deliveries, and compared with the plaintext line protocol's in the same run.
Linux only; the server is pinned to CPU 0 when taskset exists.

    python3 .ci/transport_bench.py --receivers 300 --messages 10000
"""
import argparse
import base64
import os
import selectors
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import test_chat  # noqa: E402  (the test certificate)


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(extra):
    argv = [sys.executable, os.path.join(ROOT, "chat.py"), "server", "--host", "127.0.0.1",
            "--port", "0", "-q", "--rate", "0", "--history", "0",
            "--max-clients", "20000"] + extra
    if shutil.which("taskset"):
        argv = ["taskset", "-c", "0"] + argv
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    port = int(proc.stderr.readline().rsplit(":", 1)[1])
    return proc, port


class Transport:
    """How the sender and the receivers of one run connect."""

    def __init__(self, label, server_args=(), tls=None, websocket=False):
        self.label, self.server_args = label, list(server_args)
        self.tls, self.websocket = tls, websocket

    def connect(self, port):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls:
            sock = self.tls.wrap_socket(sock, server_hostname="localhost")
        return sock

    def receiver(self, port, number):
        sock = self.connect(port)
        nick = b"/nick r%d" % number
        if not self.websocket:
            sock.sendall(nick + b"\n")
            return sock
        key = base64.b64encode(os.urandom(16))
        sock.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
                     + key + b"\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        sock.sendall(bytes((0x81, 0x80 | len(nick))) + b"\0\0\0\0" + nick)   # a zero mask
        return sock


class Receivers:
    """Non-blocking receivers counting the benchmark lines they get."""

    def __init__(self, socks):
        self.selector = selectors.DefaultSelector()
        self.counts = {}
        self.tails = {}
        for sock in socks:
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ)
            self.counts[sock] = 0
            self.tails[sock] = b""
        self.probed = dict.fromkeys(self.counts, 0)

    def wait_until(self, count, timeout=60):
        """Wait until every receiver has count BENCH lines."""
        deadline = time.monotonic() + timeout
        while min(self.counts.values()) < count:
            if time.monotonic() > deadline:
                raise SystemExit("receivers stalled before %d lines" % count)
            for key, _ in self.selector.select(0.2):
                self._read(key.fileobj)

    def ready(self, probe):
        """Call probe() until every receiver has heard one: all are in the room."""
        while min(self.probed.values()) < 1:
            probe()
            for key, _ in self.selector.select(0.2):
                self._read(key.fileobj)

    def _read(self, sock):
        while True:
            try:
                data = sock.recv(262144)
            except (BlockingIOError, ssl.SSLWantReadError):
                return
            if not data:
                raise SystemExit("server closed a receiver")
            data = self.tails[sock] + data
            self.counts[sock] += data.count(b"BENCH")
            self.probed[sock] += data.count(b"PROBE")
            self.tails[sock] = data[-4:]   # a marker cut by the read comes whole next time
            if b"BENCH" in self.tails[sock] or b"PROBE" in self.tails[sock]:
                self.tails[sock] = b""


def run(transport, args):
    """(deliveries a second, server CPU microseconds a delivery) of one transport."""
    proc, port = start_server(transport.server_args)
    try:
        sender = transport.connect(port)
        receivers = Receivers([transport.receiver(port, n) for n in range(args.receivers)])
        sender.sendall(b"/nick sender\n")
        receivers.ready(lambda: sender.sendall(b"PROBE\n"))
        payload = b"x" * (args.size - 20)
        cpu0, start = cpu_seconds(proc.pid), time.monotonic()
        for first in range(0, args.messages, args.window):
            batch = range(first, min(first + args.window, args.messages))
            sender.sendall(b"".join(b"BENCH %06d %s\n" % (i, payload) for i in batch))
            receivers.wait_until(batch[-1] + 1)
        cpu = cpu_seconds(proc.pid) - cpu0
        deliveries = args.messages * args.receivers
        return deliveries / (time.monotonic() - start), cpu * 1e6 / deliveries
    finally:
        proc.terminate()
        proc.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--receivers", type=int, default=300)
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--size", type=int, default=100)
    args = parser.parse_args()
    client_tls = ssl.create_default_context()
    client_tls.check_hostname = False
    client_tls.verify_mode = ssl.CERT_NONE
    with tempfile.NamedTemporaryFile("w", suffix=".pem") as pem:
        pem.write(test_chat.TEST_CERT_PEM + test_chat.TEST_KEY_PEM)
        pem.flush()
        transports = [Transport("line"), Transport("tls", ["--tls-cert", pem.name], client_tls),
                      Transport("websocket", websocket=True)]
        rows = [(transport.label,) + run(transport, args) for transport in transports]
    print("%-10s %12s %12s %8s" % ("transport", "deliv/s", "cpu_us/dlv", "x line"))
    for label, rate, cpu in rows:
        print("%-10s %12.0f %12.3f %8.2f" % (label, rate, cpu, cpu / rows[0][2]))


if __name__ == "__main__":
    main()
