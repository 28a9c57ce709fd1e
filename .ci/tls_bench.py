#!/usr/bin/env python3
"""Server CPU per delivered message, plaintext versus TLS (not part of the tests).

One sender and N receivers against `chat.py server`, once in plaintext and once
with TLS (the test certificate from test_chat.py). The sender sends M lines in
windows of W and waits until every receiver has them; the server's CPU time
(user + system, from /proc) over the run is divided by the deliveries.
Linux only; the server is pinned to CPU 0 when taskset exists.

    python3 .ci/tls_bench.py --receivers 300 --messages 2000
"""
import argparse
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
            "--port", "0", "-q", "--rate", "0", "--max-clients", "20000"] + extra
    if shutil.which("taskset"):
        argv = ["taskset", "-c", "0"] + argv
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    port = int(proc.stderr.readline().rsplit(":", 1)[1])
    return proc, port


def connect(port, context):
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if context:
        sock = context.wrap_socket(sock, server_hostname="localhost")
    return sock


class Receivers:
    """Non-blocking receivers counting the benchmark lines they get."""

    def __init__(self, socks):
        self.selector = selectors.DefaultSelector()
        self.counts = {}
        self.buffers = {}
        for sock in socks:
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ)
            self.counts[sock] = 0
            self.buffers[sock] = b""

    def wait_until(self, count, timeout=60):
        deadline = time.monotonic() + timeout
        while min(self.counts.values()) < count:
            if time.monotonic() > deadline:
                raise SystemExit("receivers stalled at %d of %d" % (min(self.counts.values()), count))
            for key, _ in self.selector.select(1):
                self._read(key.fileobj)

    def _read(self, sock):
        while True:
            try:
                data = sock.recv(262144)
            except (BlockingIOError, ssl.SSLWantReadError):
                return
            if not data:
                raise SystemExit("server closed a receiver")
            data = self.buffers[sock] + data
            self.counts[sock] += data.count(b"BENCH")
            self.buffers[sock] = data[data.rfind(b"\n") + 1:]


def run(label, extra, context, args):
    proc, port = start_server(extra)
    try:
        sender = connect(port, context)
        receivers = Receivers([connect(port, context) for _ in range(args.receivers)])
        sender.sendall(b"/nick sender\nBENCH ready\n")
        receivers.wait_until(1)
        payload = b"x" * (args.size - 20)
        cpu0, start = cpu_seconds(proc.pid), time.monotonic()
        for first in range(0, args.messages, args.window):
            batch = range(first, min(first + args.window, args.messages))
            sender.sendall(b"".join(b"BENCH %06d %s\n" % (i, payload) for i in batch))
            receivers.wait_until(1 + batch[-1] + 1)
        cpu = cpu_seconds(proc.pid) - cpu0
        elapsed = time.monotonic() - start
        deliveries = args.messages * args.receivers
        return label, deliveries / elapsed, cpu * 1e6 / deliveries
    finally:
        proc.terminate()
        proc.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--receivers", type=int, default=300)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--size", type=int, default=100)
    args = parser.parse_args()
    with tempfile.NamedTemporaryFile("w", suffix=".pem") as pem:
        pem.write(test_chat.TEST_CERT_PEM + test_chat.TEST_KEY_PEM)
        pem.flush()
        client_context = ssl.create_default_context(cafile=None)
        client_context.check_hostname = False
        client_context.verify_mode = ssl.CERT_NONE
        rows = [run("plaintext", [], None, args),
                run("tls", ["--tls-cert", pem.name], client_context, args)]
    print("%-10s %12s %12s %8s" % ("mode", "deliv/s", "cpu_us/dlv", "x plain"))
    for label, rate, cpu in rows:
        print("%-10s %12.0f %12.3f %8.2f" % (label, rate, cpu, cpu / rows[0][2]))


if __name__ == "__main__":
    main()
