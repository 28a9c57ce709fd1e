"""Tests for chat.py: the real server on an ephemeral port, driven by real sockets,
and the real client in a subprocess. Run with: python -m unittest -v
"""

import base64
import codecs
import collections
import concurrent.futures
import gc
import hashlib
import json
import itertools
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import unittest
from unittest import mock

import chat

try:
    import ssl
except ImportError:
    ssl = None

HERE = os.path.dirname(os.path.abspath(__file__))
CHAT = os.path.join(HERE, "chat.py")
# chat.py as most tests start it: run as the module, so that its compiled code is kept
# (in the test run's own folder, see child_env) rather than compiled anew in each of
# some ninety processes. Two tests start it as "python chat.py", as people do.
RUN_CHAT = [sys.executable, "-m", "chat"]
TIMEOUT = 10.0             # a hang detector, never a delay
POSIX = os.name == "posix"
IRC_CAPS = ("away-notify batch cap-notify draft/chathistory echo-message extended-join "
            "invite-notify labeled-response message-tags multi-prefix server-time setname "
            "userhost-in-names")
CHROMIUM = shutil.which("chromium")
HISTORY_ENTRY = re.compile(r"^\*\*\* \[\d\d:\d\d\] ")   # a replayed line, at any hour

chat.log.addHandler(logging.NullHandler())   # in-process servers log quietly

# A test CA and a certificate for localhost, 127.0.0.1 and ::1 that it signed
# (EC P-256, valid 2000-01-01 to 2125-12-31, so clocks that differ do not matter).
# Made once with openssl; the tests need no openssl.
TEST_CA_PEM = """\
-----BEGIN CERTIFICATE-----
MIIBaTCCAQ6gAwIBAgICEAAwCgYIKoZIzj0EAwIwGjEYMBYGA1UEAwwPY2hhdC5w
eSB0ZXN0IENBMCAXDTAwMDEwMTAwMDAwMFoYDzIxMjUxMjMxMjM1OTU5WjAaMRgw
FgYDVQQDDA9jaGF0LnB5IHRlc3QgQ0EwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNC
AAT9jvgLhH0qAEE9pag5o3QbQEKkN59rdNnrxRkWsIN2h2ZqhrqMoDFz5XtePc0S
0L0iuDI2t2ZMJq9N5HMNdF/so0IwQDAPBgNVHRMBAf8EBTADAQH/MA4GA1UdDwEB
/wQEAwIBBjAdBgNVHQ4EFgQUm/qsS38MvAaiJFRZUC1R1PorrQQwCgYIKoZIzj0E
AwIDSQAwRgIhANdF9U33jgimFj3Gm28/lmKsDPi8dMjnFs01uicv+dvrAiEAvHqP
Bk3Flz1MvpN+oRz1wnPGyyU+cstf8CqADy+ZXdo=
-----END CERTIFICATE-----
"""
TEST_CERT_PEM = """\
-----BEGIN CERTIFICATE-----
MIIBxTCCAWugAwIBAgICEAEwCgYIKoZIzj0EAwIwGjEYMBYGA1UEAwwPY2hhdC5w
eSB0ZXN0IENBMCAXDTAwMDEwMTAwMDAwMFoYDzIxMjUxMjMxMjM1OTU5WjAUMRIw
EAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAT0u6FK
39fyHZq7VEA+dwGNLOZQEmYFeAnB8E5ko8l2Zq6sIaQl7uXyaO1rHYEP/RRZTWqr
EfRytzd7Vx2MdCSoo4GkMIGhMAwGA1UdEwEB/wQCMAAwDgYDVR0PAQH/BAQDAgeA
MBMGA1UdJQQMMAoGCCsGAQUFBwMBMCwGA1UdEQQlMCOCCWxvY2FsaG9zdIcEfwAA
AYcQAAAAAAAAAAAAAAAAAAAAATAdBgNVHQ4EFgQUoIP8f2m6hzb9K49BIrUziO4K
POYwHwYDVR0jBBgwFoAUm/qsS38MvAaiJFRZUC1R1PorrQQwCgYIKoZIzj0EAwID
SAAwRQIgSUWbv3e4OVdaniMqi3gFpT6SI9lynjBXGpMpuUZTyTUCIQCQ42hLqixE
9b/Yt1gtgatsDz1uLAj2cfAjHGc0OvHVyA==
-----END CERTIFICATE-----
"""
TEST_KEY_PEM = """\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgd8qlat1SBEk3uYSE
Xph+5tO+/CXLdWmsRKPlqtQOzj2hRANCAAT0u6FK39fyHZq7VEA+dwGNLOZQEmYF
eAnB8E5ko8l2Zq6sIaQl7uXyaO1rHYEP/RRZTWqrEfRytzd7Vx2MdCSo
-----END PRIVATE KEY-----
"""
TEST_CERT_FINGERPRINT = (
    "SHA256:44:1f:ae:aa:d4:af:4e:28:79:f4:0c:aa:72:20:a0:37:34:50:e8:0d:70:ce:4b:f7:b3:14:c7:ef:f1:dc:14:5e")


PKI = {}   # name -> path of the test PEM files, written by setUpModule
BYTECODE = tempfile.mkdtemp(prefix="chat-test-bytecode-")   # for the processes' compiled chat.py


def setUpModule():
    folder = tempfile.mkdtemp(prefix="chat-test-")
    contents = {"ca": TEST_CA_PEM, "cert": TEST_CERT_PEM, "key": TEST_KEY_PEM,
                "both": TEST_CERT_PEM + TEST_KEY_PEM}
    for name, text in contents.items():
        PKI[name] = os.path.join(folder, name + ".pem")
        with open(PKI[name], "w") as file:
            file.write(text)


def tearDownModule():
    Chromium.stop()   # the one browser of the tests that need one
    for path in PKI.values():
        os.unlink(path)
    os.rmdir(os.path.dirname(PKI["ca"]))
    shutil.rmtree(BYTECODE, ignore_errors=True)


def raise_fd_limit(test, needed):
    """Raise this process's open-file soft limit to needed, or skip the test."""
    try:
        import resource
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        test.skipTest("needs %d open files, the hard limit is %d" % (needed, hard))
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def ipv6_available():
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


def child_env(**changes):
    """The environment for a chat.py process: ours, without what would change its behaviour
    (a password, NO_COLOR, a locale or terminal of the caller), plus changes."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("CHAT_", "LC_"))
           and name not in ("NO_COLOR", "LANG", "TERM", "PYTHONDONTWRITEBYTECODE")}
    env.update(LANG="C.UTF-8", PYTHONIOENCODING="utf-8", PYTHONPATH=HERE,
               PYTHONPYCACHEPREFIX=BYTECODE)
    env.update(changes)
    return env


def history_of(peer):
    """The lines of the history block a peer receives next, without their times."""
    block = peer.lines_until(r"\*\*\* --- end of history ---")
    return [HISTORY_ENTRY.sub("", line) for line in block if HISTORY_ENTRY.match(line)]


def wait_for(condition, timeout=TIMEOUT, message="condition"):
    """Poll an in-process condition until it holds; fail after timeout."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + message)
        time.sleep(0.01)


def server_side_tcp_timer(server_port, client_port):
    """(kind, seconds left) of the timer on the server's end of a loopback connection,
    from /proc/net/tcp: kind 2 is keepalive."""
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        fields = line.split()
        local, remote, timer = fields[1], fields[2], fields[5]
        if (int(local.split(":")[1], 16) == server_port
                and int(remote.split(":")[1], 16) == client_port):
            kind, left = timer.split(":")
            return int(kind, 16), int(left, 16) / os.sysconf("SC_CLK_TCK")
    raise AssertionError("no server-side socket for port %d" % client_port)


class Peer:
    """A chat user on a raw socket, as nc would be, with a transcript for failures."""

    def __init__(self, sock):
        self.sock = sock
        self.sock.settimeout(TIMEOUT)
        self.buffer = b""
        self.pending = collections.deque()    # received lines not read yet
        self.transcript = []

    def recent(self):
        """The last lines received, shortened, for failure messages."""
        return [line[:80] for line in self.transcript[-8:]]

    def send(self, data):
        self.sock.sendall(data)

    def say(self, *lines):
        self.send("".join(line + "\n" for line in lines).encode())

    def read_line(self):
        """The next line as text, or None at end of stream."""
        while not self.pending:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            except socket.timeout:
                raise AssertionError("no line within %.0f s; got so far: %r"
                                     % (TIMEOUT, self.recent()))
            if not data:
                return None
            lines = (self.buffer + data).split(b"\n")
            self.buffer = lines.pop()
            self.pending.extend(lines)
        line = self.pending.popleft().decode("utf-8")
        if line.endswith("\r"):   # IRC's CR LF
            line = line[:-1]
        self.transcript.append(line)
        return line

    def lines_until(self, pattern):
        """Every line before the first one matching pattern (a regex), which is consumed."""
        before = []
        while True:
            line = self.read_line()
            if line is None:
                raise AssertionError("connection closed waiting for %r after %r"
                                     % (pattern, self.recent()))
            if re.fullmatch(pattern, line):
                return before
            before.append(line)

    def expect(self, pattern):
        """Skip lines up to one that matches pattern; return it."""
        self.lines_until(pattern)
        return self.transcript[-1]

    def next_line(self):
        line = self.read_line()
        if line is None:
            raise AssertionError("connection closed; got %r" % self.recent())
        return line

    def sync(self):
        """Lines that arrived before the answer to a /who sent now: a barrier."""
        self.say("/who")
        return self.lines_until(r"\*\*\* \d+ online: .*")

    def expect_closed(self):
        """Read to the end of the stream; return what came before it."""
        rest = []
        while True:
            line = self.read_line()
            if line is None:
                return rest
            rest.append(line)


class Cable:
    """A TCP relay to the server that a test can cut, as a network failure would."""

    def __init__(self, test, target):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.pairs = []
        self.refusing = False       # cut with refuse: connections are closed at once
        self._lock = threading.Lock()
        test.addCleanup(self.close)
        threading.Thread(target=self._accept, name="cable", daemon=True).start()

    def _accept(self):
        while True:
            try:
                near, _ = self.listener.accept()
                if self.refusing:
                    near.close()
                    continue
                far = socket.create_connection(self.target, timeout=TIMEOUT)
            except OSError:
                return
            far.settimeout(None)
            with self._lock:
                self.pairs.append((near, far))
            for source, sink in ((near, far), (far, near)):
                threading.Thread(target=self._pump, args=(source, sink), name="cable-pump",
                                 daemon=True).start()

    @staticmethod
    def _pump(source, sink):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def cut(self, refuse=False):
        """End every connection through the cable, both ways at once (and, refuse, every
        new one until reopen())."""
        self.refusing = refuse
        with self._lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for sock in pair:
                try:
                    sock.shutdown(socket.SHUT_RDWR)   # wakes the pumps blocked on it
                except OSError:
                    pass
                sock.close()

    def reopen(self):
        self.refusing = False

    def close(self):
        self.listener.close()
        self.cut()


class ServerTestCase(unittest.TestCase):
    """Starts a real ChatServer on 127.0.0.1, port 0, in a named daemon thread."""

    # A newcomer is announced when it sets its nick; the fallback timer is far off, so
    # no test depends on how fast the machine is. Tests of the timer shorten it.
    DEFAULTS = dict(host="127.0.0.1", name="testroom", rate=0,
                    greet_delay=0.05, close_linger=0.5, shutdown_timeout=1.0)
    options = {}

    def setUp(self):
        settings = dict(self.DEFAULTS, port=0)
        settings.update(self.options)
        self.server = chat.ChatServer(chat.ServerOptions(**settings))
        self.addCleanup(self.server.server_close)
        self.thread = threading.Thread(target=self.server.serve_forever, name="chat-server",
                                       daemon=True)
        self.thread.start()
        self.addCleanup(self.stop_server)
        self.address = self.server.addresses[0]

    def stop_server(self):
        self.server.shutdown()
        self.thread.join(TIMEOUT)
        self.assertFalse(self.thread.is_alive(), "server thread did not end")

    def restart_server(self, before_start=None, **options):
        """Stop the server; start a new one on the same port (after before_start())."""
        port = self.address[1]
        self.stop_server()
        self.server.server_close()
        if before_start:
            before_start()
        settings = dict(self.DEFAULTS, **self.options)
        settings.update(options, port=port)
        self.server = chat.ChatServer(chat.ServerOptions(**settings))
        self.addCleanup(self.server.server_close)
        self.thread = threading.Thread(target=self.server.serve_forever, name="chat-server-2",
                                       daemon=True)
        self.thread.start()
        self.addCleanup(self.stop_server)   # before server_close: cleanups run last first

    def hold_loop(self):
        """Stop the server's loop until the returned Event is set: what clients send
        meanwhile waits in the kernel, to be read in one turn."""
        holding, release = threading.Event(), threading.Event()

        def hold():
            holding.set()
            release.wait(TIMEOUT)
        threading.Thread(target=self.server.run_in_loop, args=(hold,), name="hold",
                         daemon=True).start()
        holding.wait(TIMEOUT)
        self.addCleanup(release.set)
        return release

    def member(self, nick):
        """The server's ConnectionInfo of the member called nick, or None."""
        return next((info for info in self.server.members() if info.nick == nick), None)

    def open_peer(self, address=None):
        sock = self.wrap(socket.create_connection(address or self.address, timeout=TIMEOUT))
        self.addCleanup(sock.close)
        return Peer(sock)

    def peer_from(self, source):
        """A peer connecting from another loopback address (Linux has all of 127.0.0.0/8);
        the test is skipped where there is no such address."""
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.settimeout(TIMEOUT)
        try:
            sock.bind((source, 0))
        except OSError:
            self.skipTest("cannot connect from %s here" % source)
        sock.connect(self.address)
        return Peer(sock)

    def wrap(self, sock):
        """Hook for subclasses that speak TLS."""
        return sock

    def reader_that_never_reads(self, nick):
        """A connection under nick, with a small receive buffer, that reads nothing."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(TIMEOUT)
        sock.connect(self.address)
        self.addCleanup(sock.close)
        sock.sendall(b"/nick %s\n" % nick.encode())

    def connect(self, nick=None):
        """A peer past its greeting; with a nick, it asks for it first, as the client does
        (which announces it), else it waits to be greeted as a guest."""
        peer = self.open_peer()
        if nick:
            peer.say("/nick " + nick)
            peer.expect(r"\*\*\* welcome to .*, you are " + re.escape(nick))
        peer.expect(r"\*\*\* type /help for commands")
        return peer


class ProtocolTextTest(unittest.TestCase):
    """The pure helpers every line goes through."""

    def test_client_tags_are_checked_escaped_once_and_bounded(self):
        tags = chat.client_tags
        self.assertEqual(tags("+a=b;c=d;+e;label=x;+=1;+a_b=2;+vendor.org/x=3"),
                         "+a=b;+e;+vendor.org/x=3")   # only well-formed client tags
        self.assertEqual(tags("+k=a\\:b\\sc\\\\d\\x;+k2=trailing\\;+k=last"),
                         "+k=last;+k2=trailing")   # the last of a key wins
        self.assertEqual(tags("+k=a\\:b\\sc\\\\d\\x"), "+k=a\\:b\\sc\\\\dx")
        self.assertEqual(tags("+a=\x1b[31m;+b=\u202e;+c=\\n;+d=\t;+ok=\U0001f44d"),
                         "+ok=\U0001f44d")   # nothing a terminal would obey
        self.assertEqual(tags("+r=e" + "\u0301" * 10), "+r=e" + "\u0301" * 4)
        self.assertEqual([tags(value) for value in (5, None, ["+a"])], ["", "", ""])
        many = tags(";".join("+k%d=%s" % (n, "v w" * 50) for n in range(100)))
        self.assertTrue(0 < len(many.encode()) <= 4094, len(many))   # escaped, and still fits

    def test_sanitize_keeps_plain_and_unicode_text(self):
        for text in ("hello world", "héllo wörld", "日本語テキスト", "emoji 🎉 ok", "a\u00a0b"):
            self.assertEqual(chat.sanitize(text), text)

    def test_sanitize_strips_whole_escape_sequences(self):
        cases = {
            "\x1b[31mred\x1b[0m": "red",
            "\x1b[2J\x1b[Hwiped": "wiped",
            "a\x1b[?1049hb": "ab",
            "\x1b]0;evil title\x07text": "text",
            "\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\": "link",
            "\x1b]52;c;Zm9v": "",                       # OSC to the end of the line
            "\x1bP+q544e\x1b\\after": "after",          # DCS up to ST
            "\x1b_apc\x07after": "after",               # APC up to BEL
            "\x9b31mC1 csi": "C1 csi",
            "\x1b(Bcharset": "charset",
            "\x1b7save\x1b8": "save",
            "bell\x07 bs\x08 nul\x00 del\x7f": "bell bs nul del",
            "tab\there": "tab here",
            "cr\rlf\n": "crlf",
            "bidi \u202eevil\u202c \u2066x\u2069 \u200fy": "bidi evil x y",
            "line\u2028para\u2029end": "lineparaend",
            "c1 \x85\x90\x9c controls": "c1  controls",
        }
        for text, expected in cases.items():
            with self.subTest(text=text):
                self.assertEqual(chat.sanitize(text), expected)

    def test_decode_line(self):
        self.assertEqual(chat.decode_line(b"hello\r"), "hello")
        self.assertEqual(chat.decode_line(b"bad \xfe utf8 \xc3("), "bad \ufffd utf8 \ufffd(")
        self.assertEqual(chat.decode_line(b"caf\xe9"), "caf\ufffd")
        self.assertEqual(chat.decode_line(b"\xff\xfb\x01\xff\xfd\x03hi"), "hi")
        self.assertEqual(chat.decode_line(b"\xff\xfa\x18\x00xterm\xff\xf0hi"), "hi")
        self.assertEqual(chat.decode_line("grüße".encode()), "grüße")

    def test_valid_nicks_in_many_scripts(self):
        for nick in ("alice", "Bob_2", "x-y", "देवनागरी", "สมชาย", "张伟", "さくら", "Ωμέγα", "Дима"):
            with self.subTest(nick=nick):
                self.assertEqual(chat.normalize_nick(nick), nick)

    def test_nicks_are_nfkc_normalised(self):
        self.assertEqual(chat.normalize_nick("ａｌｉｃｅ"), "alice")   # full-width letters
        self.assertEqual(chat.normalize_nick("e\u0301"), "\u00e9")    # combining accent composed

    def test_invalid_nicks(self):
        for nick in ("", "a b", "x" * 21, "<alice>", "a\x1b[31m", "\u0301x", "bob!", "a.b",
                     "p\u0430ypal", "Ωmegaa"):   # Latin with a Cyrillic a; Greek with Latin
            with self.subTest(nick=nick):
                with self.assertRaises(ValueError):
                    chat.normalize_nick(nick)

    def test_invisible_characters_are_refused(self):
        for nick in ("bob\u034f", "alice\ufe0f", "alice\U000e0100", "bob\u17b4", "\u3164",
                     "a\u200bb", "\uffa0bob"):
            with self.subTest(nick=ascii(nick)):
                with self.assertRaisesRegex(ValueError, "invisible"):
                    chat.normalize_nick(nick)

    def test_look_alikes_share_a_skeleton(self):
        cases = {"alice": ("аӏісе", "alıce", "ɑlice", "aIice", "ALICE"),
                 "bob": ("bօb", "ᏴᎾᏴ", "ꓐꓳꓐ", "b0b", "BOB"),
                 "mom": ("\u039c\u039f\u039c", "rnorn", "rn0rn")}
        for real, fakes in cases.items():
            for fake in fakes:
                with self.subTest(fake=fake):
                    self.assertTrue(chat.lookalike_keys(real)
                                    & chat.lookalike_keys(chat.normalize_nick(fake)))
        for nick in ("देव", "さくら", "张伟", "Иван", "bobby", "alicia", "Alice_2"):
            with self.subTest(nick=nick):
                keys = chat.lookalike_keys(chat.normalize_nick(nick))
                self.assertFalse(keys & (chat.lookalike_keys("alice") | chat.lookalike_keys("bob")))

    def test_room_names(self):
        self.assertEqual(chat.normalize_room("dev"), "#dev")
        self.assertEqual(chat.normalize_room("#Dev_2"), "#Dev_2")
        for name in ("#", "#a b", "#" + "x" * 31, "##dev", "#d\u200bev"):
            with self.subTest(name=name):
                with self.assertRaises(ValueError):
                    chat.normalize_room(name)

    def test_nick_key_ignores_case(self):
        self.assertEqual(chat.name_key("Alice"), chat.name_key("aLICE"))
        self.assertEqual(chat.name_key("STRASSE"), chat.name_key("straße"))

    def test_make_valid_nick_from_login_names(self):
        self.assertEqual(chat.make_valid_nick("john.doe"), "john_doe")
        self.assertEqual(chat.make_valid_nick("DOMAIN\\user"), "DOMAIN_user")
        self.assertEqual(chat.make_valid_nick("a" * 30), "a" * 20)
        self.assertIsNone(chat.make_valid_nick("..."))
        self.assertIsNone(chat.make_valid_nick(""))
        self.assertEqual(chat.nick_variant("a" * 20, 12), "a" * 18 + "12")

    def test_peer_ip_unmaps_ipv4(self):
        self.assertEqual(chat.peer_ip(("::ffff:10.0.0.1", 5, 0, 0)), "10.0.0.1")
        self.assertEqual(chat.peer_ip(("::1", 5, 0, 0)), "::1")
        self.assertEqual(chat.format_address("::1", 80), "[::1]:80")


class RecordingSink:
    """Where a hub's news goes in the core tests: recorded, nothing sent."""

    def __init__(self):
        self.published = []             # (room name, event, nick left out)
        self.sent = collections.defaultdict(list)   # member -> events
        self.closed = []
        self.timers = []

    def publish(self, room, event, excluded):
        self.published.append((room.name, event, excluded[0].nick if excluded else None))

    def send(self, member, event):
        self.sent[member].append(event)

    def moved(self, member, room, entered):
        pass

    def close(self, member, reason, farewell):
        self.closed.append((member.nick, reason, farewell))

    def call_later(self, delay, function, *args):
        self.timers.append((delay, function, args))

    def answer_later(self, member, callback):
        return callback


class HubTest(unittest.TestCase):
    """The core alone: rooms, moves, topics, history and limits, without a socket."""

    def setUp(self):
        self.sink = RecordingSink()
        self.hub = chat.Hub(chat.ServerOptions(history=2, announce_limit=3, max_rooms=4),
                            self.sink, "hub")

    def admit(self, nick):
        return self.hub.admit("endpoint of " + nick, nick)

    def replies(self, member, kind=None):
        events = self.sink.sent.pop(member, [])
        return [event for event in events if kind is None or isinstance(event, kind)]

    def test_a_newcomer_is_greeted_into_the_default_room(self):
        alice = self.admit("alice")
        greeting = self.replies(alice)
        self.assertEqual(greeting[0], chat.Welcome("hub", "alice"))
        self.assertEqual(greeting[1].room, self.hub.default_room)
        self.assertEqual(alice.room.name, "#lobby")
        self.assertEqual(self.sink.published, [("#lobby", chat.Joined("#lobby", "alice"), "alice")])

    def test_join_moves_a_member_and_both_rooms_are_told(self):
        self.admit("alice")
        bob = self.admit("bob")
        self.sink.published.clear()
        self.replies(bob)
        self.hub.do_join(bob, "dev")
        self.assertEqual(self.sink.published, [
            ("#lobby", chat.Parted("#lobby", "bob", to="#dev"), None),
            ("#dev", chat.Joined("#dev", "bob"), "bob")])
        self.assertEqual([room.name for room in bob.rooms], ["#dev"])
        self.assertEqual([state.room.name for state in self.replies(bob, chat.RoomState)], ["#dev"])
        self.hub.do_join(bob, "#DEV")
        self.assertEqual(self.replies(bob), [chat.notice("already_in_room", room="#dev")])

    def test_an_empty_room_disappears_but_the_default_room_stays(self):
        alice = self.admit("alice")
        self.hub.do_join(alice, "#dev")
        self.assertIn("#dev", [room.name for room in self.hub.rooms.values()])
        self.hub.do_part(alice)
        self.assertEqual([room.name for room in self.hub.rooms.values()], ["#lobby"])
        self.hub.do_part(alice)
        self.assertEqual(self.replies(alice)[-1],
                         chat.notice("in_default_room", room="#lobby"))
        self.hub.leave(alice, "quit")
        self.assertEqual([room.name for room in self.hub.rooms.values()], ["#lobby"])

    def test_history_and_topic_belong_to_a_room(self):
        alice, bob = self.admit("alice"), self.admit("bob")
        for text in ("one", "two", "three"):
            self.hub.do_say(alice, text)
        self.hub.do_join(bob, "#dev")
        self.assertEqual(self.replies(bob, chat.History), [])   # #dev has none
        self.hub.do_topic(bob, None, "ship it")
        self.assertIn(("#dev", chat.TopicSet("#dev", "bob", "ship it"), None), self.sink.published)
        self.hub.do_join(alice, "#dev")
        self.assertEqual([state.room.topic for state in self.replies(alice, chat.RoomState)],
                         [None, "ship it"])   # the greeting's #lobby, then #dev
        self.hub.do_join(alice, "#lobby")
        history = self.replies(alice, chat.History)[0].room.recent()
        self.assertEqual([said.text for said in history], ["two", "three"])   # --history 2

    def test_room_limits(self):
        alice, bob = self.admit("alice"), self.admit("bob")
        self.hub.do_join(alice, "a b")
        self.assertEqual(self.replies(alice)[-1].key, "invalid_room")
        self.hub.do_join(alice, "#dev")
        self.hub.do_join(bob, "#ԁеѵ")   # all Cyrillic
        self.assertEqual(self.replies(bob)[-1],
                         chat.notice("room_lookalike", room="#ԁеѵ", other="#dev"))
        self.hub.do_join(bob, "#ops")
        carol = self.admit("carol")
        self.hub.do_join(carol, "#qa")   # #lobby, #dev, #ops and #qa: the most there may be
        self.hub.do_join(carol, "#more")
        self.assertEqual(self.replies(carol)[-1], chat.notice("too_many_rooms", count=4))

    def test_creating_rooms_is_rate_limited(self):
        alice = self.admit("alice")
        self.hub.options.max_rooms = 100
        for number in range(chat.ROOM_CREATE_BURST):
            self.hub.do_join(alice, "#room%d" % number)   # each is left, and vanishes
        self.replies(alice)
        self.hub.do_join(alice, "#one-too-many")
        self.assertEqual(self.replies(alice)[-1].key, "rooms_too_fast")
        self.hub.do_join(alice, "#lobby")   # joining an existing room is always fine
        self.assertEqual(alice.room.name, "#lobby")

    def test_notices_stay_quiet_in_big_rooms(self):
        members = [self.admit("m%d" % number) for number in range(5)]   # limit 3
        joins = [event for _, event, _ in self.sink.published if isinstance(event, chat.Joined)]
        self.assertEqual([event.nick for event in joins], ["m0", "m1", "m2"])
        self.sink.published.clear()
        self.hub.do_nick(members[0], "renamed")
        self.assertEqual(self.sink.published, [])   # 5 members: too many for notices


class FlushPacerTest(unittest.TestCase):
    """When a turn's output goes: at once in a quiet chat and for one sender's lines;
    under load, lines of others wait to share a send, never longer than FLUSH_GAP."""

    def test_only_another_speakers_lines_wait_and_not_for_long(self):
        pacer, alice, bob = chat.FlushPacer(), object(), object()
        pacer.source = alice
        self.assertTrue(pacer.due(100, 50.0))   # nothing flushed yet: at once
        pacer.flushed(50.0, 50.001)   # a flush that took a millisecond
        self.assertTrue(pacer.due(100, 50.0015))   # alice's next line: no wait
        pacer.source = bob
        self.assertFalse(pacer.due(100, 50.0015))   # bob's waits for more...
        self.assertTrue(pacer.due(100, 50.002))   # ...as long as the flush took
        self.assertTrue(pacer.due(chat.SEND_CHUNK, 50.0015))   # a full send never waits
        pacer.flushed(60.0, 61.0)   # a slow flush: the wait is capped
        pacer.source = alice
        self.assertFalse(pacer.due(100, 61.0 + chat.FLUSH_GAP / 2))
        self.assertTrue(pacer.due(100, 61.0 + chat.FLUSH_GAP))


class TurnBatcherTest(unittest.TestCase):
    """What each connection gets of a turn: in order, once, only while it was there."""

    class Dialect:
        @classmethod
        def render_shared(cls, event):
            return event.encode() + b";"

    class Event(str):
        uid = 0

    def setUp(self):
        self.batcher = chat.TurnBatcher()
        self.rooms = {name: chat.Room(name, 0) for name in ("#a", "#b")}

    def conn(self, *rooms):
        conn = mock.Mock(stage=chat.CHAT, dialect=self.Dialect(), owed=0)
        conn.member = chat.Member(conn, multi_room=len(rooms) > 1)
        for name in rooms:
            self.enter(conn, name, during_turn=False)
        return conn

    def enter(self, conn, name, during_turn=True):
        room = self.rooms[name]
        room.add(conn.member)
        conn.member.rooms[room] = None
        if during_turn:
            self.batcher.moved(conn, room, True)

    def leave(self, conn, name):
        room = self.rooms[name]
        room.remove(conn.member)
        del conn.member.rooms[room]
        self.batcher.moved(conn, room, False)

    def say(self, name, text, exclude=None, uid=0):
        event = self.Event(text)
        event.uid = uid
        self.batcher.publish(self.rooms[name], event, (exclude,) if exclude else ())

    def flush(self):
        got = collections.defaultdict(bytes)

        def deliver(conn, pieces):
            got[conn] += b"".join(bytes(piece) for piece in pieces)
        self.batcher.flush(deliver, lambda conn, data: deliver(conn, [data]))
        return got

    def test_shared_bytes_own_lines_left_out_replies_in_order(self):
        reader, speaker = self.conn("#a"), self.conn("#a")
        self.say("#a", "one", exclude=speaker)
        self.batcher.send(speaker, b"reply;")
        self.say("#a", "two")
        self.say("#a", "three", exclude=speaker)
        got = self.flush()
        self.assertEqual(got[reader], b"one;two;three;")
        self.assertEqual(got[speaker], b"reply;two;")

    def test_entering_and_leaving_during_the_turn(self):
        stays, comes, goes = self.conn("#a"), self.conn(), self.conn("#a")
        self.say("#a", "before")
        self.enter(comes, "#a")
        self.say("#a", "between")
        self.leave(goes, "#a")
        self.say("#a", "after")
        got = self.flush()
        self.assertEqual(got[stays], b"before;between;after;")
        self.assertEqual(got[comes], b"between;after;")
        self.assertEqual(got[goes], b"before;between;")

    def test_moving_between_rooms_and_several_rooms_at_once(self):
        mover, both = self.conn("#a"), self.conn("#a", "#b")
        self.say("#a", "a1")
        self.say("#b", "b1")
        self.leave(mover, "#a")
        self.enter(mover, "#b")
        self.say("#a", "a2")
        self.say("#a", "quit", uid=7)   # one event told in both rooms
        self.say("#b", "quit", uid=7)
        self.say("#b", "b2")
        got = self.flush()
        self.assertEqual(got[mover], b"a1;quit;b2;")
        self.assertEqual(got[both], b"a1;a2;quit;b1;b2;")   # by room, and the quit once


class ChatTest(ServerTestCase):
    """The conversation rules, as an nc user sees them."""

    def test_greeting_names_server_nick_and_who_is_online(self):
        alice = self.connect("alice")
        peer = self.open_peer()
        self.assertEqual(peer.next_line(), "*** welcome to testroom, you are guest1")
        self.assertEqual(peer.next_line(), "*** you are in #lobby: 2 online: alice, guest1")
        self.assertEqual(peer.next_line(), "*** type /help for commands")
        self.assertEqual(alice.sync(), [])

    def test_chat_line_reaches_others_not_sender(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        alice.say("hello bob")
        self.assertEqual(bob.expect(r"<alice> .*"), "<alice> hello bob")
        self.assertEqual(alice.sync(), ["*** bob joined"])   # no echo of its own line

    def test_action_and_private_message(self):
        alice, bob, carol = self.connect("alice"), self.connect("bob"), self.connect("carol")
        alice.say("/me waves", "/msg BOB psst, secret")
        self.assertEqual(bob.lines_until(r"\*alice\* psst, secret")[-1], "* alice waves")
        self.assertEqual(alice.lines_until(r"-> \*bob\* psst, secret")[-2:],
                         ["*** bob joined", "*** carol joined"])
        self.assertEqual(carol.sync(), ["* alice waves"])   # the private line stays private

    def test_command_errors(self):
        alice = self.connect("alice")
        alice.say("/dance", "/msg nobody hi", "/msg", "/me", "/nick")
        self.assertEqual(alice.next_line(), "*** error: unknown command /dance (try /help)")
        self.assertEqual(alice.next_line(), "*** error: no such nick nobody")
        self.assertEqual(alice.next_line(), "*** error: usage: /msg NICK TEXT")
        self.assertEqual(alice.next_line(), "*** error: usage: /me ACTION")
        self.assertEqual(alice.next_line(), "*** error: usage: /nick NAME (you are alice)")

    def test_who_follows_joins_renames_and_leaves(self):
        bob, alice = self.connect("bob"), self.connect("alice")
        self.assertEqual(alice.sync(), [])
        carol = self.connect("carol")
        alice.say("/who")
        self.assertEqual(alice.expect(r"\*\*\* \d+ online.*"), "*** 3 online: alice, bob, carol")
        carol.say("/nick Caroline")
        carol.expect(r"\*\*\* you are now known as Caroline")
        bob.say("/quit")
        bob.expect_closed()
        alice.say("/who")
        self.assertEqual(alice.expect(r"\*\*\* \d+ online.*"), "*** 2 online: alice, Caroline")

    def test_who_and_help(self):
        self.connect("bob")
        alice = self.connect("alice")
        alice.say("/WHO", "/help")
        self.assertEqual(alice.next_line(), "*** 2 online: alice, bob")
        help_lines = alice.lines_until(r"\*\*\*   //text .*")
        for command in ("/nick", "/me", "/msg", "/who", "/quit"):
            self.assertTrue(any(command in line for line in help_lines), command)

    def test_double_slash_sends_literal_slash_line_and_blank_lines_are_ignored(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        alice.say("", "   ", "//etc/hosts is a file", "\x1b[2J")
        self.assertEqual(alice.sync(), ["*** bob joined"])   # alice's lines are handled
        self.assertEqual(bob.sync(), ["<alice> /etc/hosts is a file"])

    def test_nick_rules(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        bob.say("/nick ALICE", "/nick a b", "/nick p\u0430ypal", "/nick  bobby ")
        self.assertEqual(bob.next_line(), "*** error: nick ALICE is taken")
        self.assertRegex(bob.next_line(), r"\*\*\* error: invalid nick a b: .*")
        self.assertRegex(bob.next_line(), r"\*\*\* error: invalid nick p\u0430ypal: .*mix.*")
        self.assertEqual(bob.next_line(), "*** you are now known as bobby")
        self.assertEqual(alice.expect(r"\*\*\* bob is .*"), "*** bob is now known as bobby")
        alice.say("/who")
        self.assertEqual(alice.expect(r"\*\*\* 2 online.*"), "*** 2 online: alice, bobby")

    def test_look_alikes_of_a_nick_online_are_refused(self):
        alice = self.connect("alice")
        self.connect("bob")
        guest = self.connect()
        guest.say("/nick аӏісе", "/nick ᏴᎾᏴ", "/nick bob\u034f", "/nick Иван")
        self.assertEqual(guest.next_line(), "*** error: nick аӏісе looks like alice, who is online")
        self.assertEqual(guest.next_line(), "*** error: nick ᏴᎾᏴ looks like bob, who is online")
        self.assertRegex(guest.next_line(), r"\*\*\* error: invalid nick bob.*: .*invisible")
        self.assertEqual(guest.next_line(), "*** you are now known as Иван")
        alice.say("/quit")
        alice.expect_closed()
        guest.say("/nick аӏісе")   # alice is gone: the name is free to look like hers
        self.assertEqual(guest.expect(r"\*\*\* you are now .*"), "*** you are now known as аӏісе")

    def test_unicode_nick_and_text(self):
        alice, bob = self.connect("alice"), self.connect("देव")
        bob.say("नमस्ते 🎉")
        self.assertEqual(alice.expect(r"<.*"), "<देव> नमस्ते 🎉")

    def test_hostile_bytes_are_neutralised(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        bob.send(b"\xff\xfd\x03hi \x1b]0;pwned\x07\x1b[31mred\tx\xc3( \xe2\x80\xae end\r\n")
        bob.say("/me \x1b[2Jdances", "/msg alice \x1b[Hpsst", "/quit \x1b[31mgone\x07")
        self.assertEqual(alice.expect(r"<bob> .*"), "<bob> hi red x\ufffd( end")
        self.assertEqual(alice.next_line(), "* bob dances")
        self.assertEqual(alice.next_line(), "*bob* psst")
        self.assertEqual(alice.next_line(), "*** bob left (quit: gone)")

    def test_quit_says_bye_and_closes(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        bob.say("/quit see you")
        self.assertEqual(bob.expect_closed(), ["*** bye"])
        self.assertEqual(alice.expect(r"\*\*\* bob left.*"), "*** bob left (quit: see you)")

    def test_abrupt_disconnects(self):
        alice, bob, carol = self.connect("alice"), self.connect("bob"), self.connect("carol")
        bob.sync()   # nothing unread, so the close is a clean FIN
        bob.sock.close()
        self.assertEqual(alice.expect(r"\*\*\* bob left.*"), "*** bob left (connection closed)")
        carol.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        carol.sock.close()   # linger 0: the close is a reset
        self.assertRegex(alice.expect(r"\*\*\* carol left.*"),
                         r"\*\*\* carol left \((connection reset|connection closed)\)")
        self.assertEqual(alice.sync(), [])

    def test_lines_before_half_close_are_delivered(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        alice.expect(r"\*\*\* bob joined")
        bob.send(b"first\nsecond\nno newline at the end")
        bob.sock.shutdown(socket.SHUT_WR)
        self.assertEqual(alice.lines_until(r"\*\*\* bob left.*"),
                         ["<bob> first", "<bob> second", "<bob> no newline at the end"])
        self.assertEqual(bob.expect_closed(), [])

    def test_a_line_cannot_forge_the_next_row_of_a_screen(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        alice.expect(r"\*\*\* bob joined")
        bob.say("hi" + " " * 78 + "*** bob is now an operator",
                "x\u3000\u2800\u3164" * 20 + "y", "e" + "\u0301" * 40,
                "hi" + " \u200b \u2060 \u200d" * 30 + " ***", "Z" + ("\u0489" * 4 + "\u200d") * 30,
                "family \U0001f468\u200d\U0001f469\u200d\U0001f467 \u2764\ufe0f")
        self.assertEqual(alice.next_line(), "<bob> hi *** bob is now an operator")
        self.assertEqual(alice.next_line(), "<bob> " + "x " * 20 + "y")
        self.assertEqual(alice.next_line(), "<bob> e" + "\u0301" * chat.MAX_MARKS)
        self.assertEqual(alice.next_line(), "<bob> hi ***")
        self.assertEqual(alice.next_line(), "<bob> Z" + "\u0489" * chat.MAX_MARKS)
        self.assertEqual(alice.next_line(), "<bob> family \U0001f468\u200d\U0001f469\u200d"
                                            "\U0001f467 \u2764\ufe0f")   # emoji keep joiners
        bob.say("/nick Z" + "\u0489" * 19)
        self.assertRegex(bob.expect(r"\*\*\* error: .*"), r".*at most 4 marks on a letter")

    def test_many_lines_arrive_in_order(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        lines = ["line %d %s" % (i, "x" * (i % 50 + 1)) for i in range(2000)]
        bob.send("".join(line + "\n" for line in lines).encode())
        self.assertEqual(alice.lines_until(r"<bob> line 1999 .*")[-1999:],
                         ["<bob> " + line for line in lines[:1999]])

    def test_unexpected_error_drops_only_that_client(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        with mock.patch.object(chat.Hub, "do_help", side_effect=RuntimeError("boom")):
            with self.assertLogs(chat.log, logging.ERROR) as logs:
                bob.say("/help")
                self.assertEqual(bob.expect_closed(), [])
        self.assertIn("boom", "\n".join(logs.output))
        self.assertEqual(alice.expect(r"\*\*\* bob left.*"), "*** bob left (internal error)")
        alice.say("/who")
        self.assertEqual(alice.expect(r"\*\*\* 1 online.*"), "*** 1 online: alice")


class RoomsTest(ServerTestCase):
    """Rooms as an nc user meets them."""

    options = {"history": 5}

    def peers(self, *nicks):
        """Connected peers, each past the notices of those who came after it."""
        peers = [self.connect(nick) for nick in nicks]
        for peer in peers:
            peer.sync()
        return peers

    def test_join_moves_you_and_both_rooms_are_told(self):
        alice, bob, carol = self.peers("alice", "bob", "carol")
        bob.say("/join dev")
        self.assertEqual(bob.next_line(), "*** you are in #dev: 1 online: @bob")
        self.assertEqual(alice.expect(r"\*\*\* bob .*"), "*** bob left for #dev")
        bob.say("only in dev")
        carol.say("/join #dev")
        self.assertEqual(carol.lines_until(r"\*\*\* you are in #dev: 2 online: @bob, carol"),
                         ["*** bob left for #dev"])
        self.assertEqual(carol.next_line(), "*** --- last 1 message in #dev ---")
        self.assertRegex(carol.next_line(), r"\*\*\* \[\d\d:\d\d\] <bob> only in dev")
        self.assertEqual(bob.expect(r"\*\*\* carol .*"), "*** carol joined")
        self.assertEqual(alice.sync(), ["*** carol left for #dev"])   # nothing said in #dev
        alice.say("lobby only")
        self.assertEqual(bob.sync(), [])
        alice.say("/msg bob across rooms")
        self.assertEqual(bob.expect(r"\*alice\* .*"), "*alice* across rooms")

    def test_part_returns_to_the_room_everyone_starts_in(self):
        alice, bob = self.peers("alice", "bob")
        bob.say("/join #dev", "/part", "/part")
        self.assertEqual(bob.next_line(), "*** you are in #dev: 1 online: @bob")
        self.assertEqual(bob.next_line(), "*** you are in #lobby: 2 online: alice, bob")
        self.assertEqual(bob.next_line(), "*** error: you are in #lobby, where everyone starts; "
                                          "/quit leaves the chat")
        self.assertEqual(alice.sync(), ["*** bob left for #dev", "*** bob joined"])
        self.assertEqual([room.name for room in self.server.rooms()], ["#lobby"])   # #dev is gone

    def test_rooms_who_and_topic(self):
        alice, bob, carol = self.peers("alice", "bob", "carol")
        for peer in (bob, carol):
            peer.say("/join #dev")
            peer.expect(r"\*\*\* you are in .*")
        self.assertEqual(alice.sync(), ["*** bob left for #dev", "*** carol left for #dev"])
        alice.say("/rooms", "/who #dev", "/who #nowhere", "/who", "/topic")
        self.assertEqual(alice.next_line(), "*** 2 rooms: #dev (2), #lobby (1)")
        self.assertEqual(alice.next_line(), "*** #dev: 2 online: @bob, carol")
        self.assertEqual(alice.next_line(), "*** error: no such room #nowhere")
        self.assertEqual(alice.next_line(), "*** 1 online: alice")
        self.assertEqual(alice.next_line(), "*** no topic is set in #lobby")
        bob.say("/topic release on friday")
        self.assertEqual(carol.expect(r"\*\*\* bob set .*"),
                         "*** bob set the topic of #dev: release on friday")
        alice.say("/join #dev")
        alice.expect(r"\*\*\* you are in #dev: .*")
        self.assertEqual(alice.next_line(), "*** topic of #dev: release on friday")

    def test_rooms_lists_the_busiest_first_and_counts_the_rest(self):
        peers = [self.connect("user%d" % number) for number in range(chat.ROOMS_LISTED + 2)]
        for number, peer in enumerate(peers[1:]):
            peer.say("/join #room%02d" % number)
            peer.expect(r"\*\*\* you are in .*")
        peers[2].say("/join #room00")
        peers[2].expect(r"\*\*\* you are in .*")
        peers[0].say("/rooms")
        listed = peers[0].expect(r"\*\*\* \d+ rooms: .*")
        self.assertTrue(listed.startswith("*** 21 rooms: #room00 (2), #lobby (1), #room02 (1), "),
                        listed)
        self.assertTrue(listed.endswith(", and 1 more"), listed)


class DefaultRoomTest(ServerTestCase):

    options = {"room": "#main", "max_rooms": 2}

    def test_the_default_room_and_the_room_limit(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        self.assertEqual(alice.transcript[1], "*** you are in #main: 1 online: alice")
        alice.say("/join #one", "/part")
        alice.expect(r"\*\*\* you are in #one: .*")
        self.assertEqual(alice.next_line(), "*** you are in #main: 2 online: bob, alice")
        bob.say("/join #two")
        bob.expect(r"\*\*\* you are in #two: .*")
        alice.say("/join #three")
        self.assertEqual(alice.expect(r"\*\*\* error: .*"), "*** error: 2 rooms exist, the most "
                         "this server allows; join one of them (/rooms)")


class JoinNoticeTest(ServerTestCase):
    """Join notices wait for the nick, so people appear once, under their name."""

    def test_nick_set_at_once_is_announced_once(self):
        alice = self.connect("alice")
        bob = self.open_peer()
        bob.say("/nick bob")
        bob.expect(r"\*\*\* welcome to testroom, you are bob")
        self.assertEqual(alice.sync(), ["*** bob joined"])

    def test_taken_nick_does_not_announce_the_guest(self):
        alice = self.connect("alice")
        guest = self.open_peer()
        guest.say("/nick alice", "/nick alice2")
        guest.expect(r"\*\*\* you are now known as alice2")
        self.assertEqual(alice.sync(), ["*** alice2 joined"])


    def test_first_line_announces_before_it_is_relayed(self):
        alice = self.connect("alice")
        guest = self.open_peer()
        guest.say("hi all")
        self.assertEqual(alice.lines_until(r"<guest1> hi all"), ["*** guest1 joined"])

    def test_newcomer_receives_broadcasts_from_its_greeting_on(self):
        alice = self.connect("alice")
        guest = self.open_peer()
        guest.expect(r"\*\*\* type /help for commands")
        alice.say("welcome, whoever you are")
        self.assertEqual(guest.next_line(), "<alice> welcome, whoever you are")

    def test_quitting_before_the_notice_leaves_no_trace(self):
        alice = self.connect("alice")
        guest = self.open_peer()
        guest.say("/quit")
        guest.expect_closed()
        self.assertEqual(alice.sync(), [])


class SilentGuestTest(ServerTestCase):
    """A connection greeted as a guest that never says anything (a browser's spare socket,
    a port scan) hears the room but leaves no trace: no join or leave told, no WHOWAS."""

    options = {"op_password": "op secret"}

    def guest(self):
        peer = self.open_peer()
        nick = re.match(r"\*\*\* welcome to .*, you are (\S+)$",
                        peer.expect(r"\*\*\* welcome to .*")).group(1)
        peer.expect(r"\*\*\* type /help for commands")
        return peer, nick

    def test_only_a_guest_that_spoke_is_remembered_by_whowas(self):
        alice = IrcPeer(self.wrap(socket.create_connection(self.address, timeout=TIMEOUT)))
        self.addCleanup(alice.sock.close)
        alice.register("alice")
        (silent, silent_nick), (talker, talker_nick) = self.guest(), self.guest()
        talker.say("hello")
        alice.expect(r":%s!\S+ PRIVMSG #lobby :hello" % talker_nick)
        for peer in (silent, talker):
            peer.sock.close()
        alice.expect(r":%s!\S+ QUIT .*" % talker_nick)
        wait_for(lambda: self.member(silent_nick) is None, message="the silent guest gone")
        alice.irc("WHOWAS " + silent_nick, "WHOWAS " + talker_nick)
        self.assertEqual(alice.lines_until(r":testroom 369 alice %s .*" % silent_nick), [
            ":testroom 406 alice %s :There was no such nickname" % silent_nick])
        self.assertRegex(alice.next_line(), r":testroom 314 alice %s %s " % (
            talker_nick, talker_nick))

    def test_replies_to_a_client_that_does_not_read_arrive_whole_and_in_order(self):
        """Own replies go in one send() when nothing is queued, and are queued behind what
        is when the socket is full: either way each arrives once, in order."""
        peer, _ = self.guest()
        count = 400
        peer.sock.sendall(b"".join(b"/topic #r%d\n" % number for number in range(count)))
        for number in range(count):
            self.assertEqual(peer.next_line(), "*** error: no such room #r%d" % number)

    def test_connections_that_came_and_went_are_not_kept_until_their_deadlines(self):
        """Each connection has a registration deadline, 30 s off: a churn of connections
        must not pin every one of them in memory until then."""
        peers = [self.open_peer() for _ in range(60)]
        ports = {peer.sock.getsockname()[1] for peer in peers}
        for peer in peers[::2]:
            peer.sock.close()   # before its greeting
        for peer in peers[1::2]:
            peer.expect(r"\*\*\* type /help for commands")   # greeted as a guest
            peer.sock.close()
        wait_for(lambda: not self.server.connections(), message="all gone")

        def connections_in_memory():
            gc.collect()
            return sum(isinstance(thing, chat.Connection) and thing.peer[1] in ports
                       for thing in gc.get_objects())
        self.assertEqual(self.server.run_in_loop(connections_in_memory), 0)

    def test_a_silent_guest_kicked_can_be_banned_by_nick_one_that_left_cannot(self):
        """Departed guests that never showed themselves are not remembered (a storm of them
        would push out the people who were), unless an operator kicked them."""
        alice = self.connect("alice")
        alice.say("/op op secret")
        alice.expect(r"\*\*\* you are an operator now")
        kicked, left = self.peer_from("127.0.0.2"), self.peer_from("127.0.0.3")
        nicks = []
        for peer in (kicked, left):
            nicks.append(re.match(r"\*\*\* welcome to .*, you are (\S+)$",
                                  peer.expect(r"\*\*\* welcome to .*")).group(1))
            peer.expect(r"\*\*\* type /help for commands")
        left.sock.close()
        wait_for(lambda: self.member(nicks[1]) is None, message="the guest gone")
        alice.say("/kick %s enough" % nicks[0], "/ban " + nicks[0], "/ban " + nicks[1])
        kicked.expect_closed()
        self.assertEqual(alice.expect(r"\*\*\* banned .*"),
                         "*** banned %s (127.0.0.2/32) for good: no reason given" % nicks[0])
        self.assertRegex(alice.next_line(), r"\*\*\* error: .*%s.*" % nicks[1])

    def test_a_silent_guest_hears_the_room_but_shows_only_once_it_speaks(self):
        alice = self.connect("alice")
        guest = self.connect()
        self.assertEqual(alice.sync(), [])   # no "joined" for a socket that says nothing
        alice.say("/who", "hello")
        self.assertEqual(alice.expect(r"\*\*\* \d+ online.*"), "*** 1 online: alice")
        self.assertEqual(guest.expect(r"<alice> .*"), "<alice> hello")
        guest.say("hi")
        self.assertEqual(alice.next_line(), "*** guest1 joined")
        self.assertEqual(alice.next_line(), "<guest1> hi")
        guest.say("/quit")
        self.assertEqual(alice.expect(r"\*\*\* guest1 .*"), "*** guest1 left (quit)")

    def test_a_failing_timer_drops_only_its_connection(self):
        alice = self.connect("alice")
        with mock.patch.object(chat.LineDialect, "start", side_effect=RuntimeError("x")):
            with self.assertLogs(chat.log, logging.ERROR):
                guest = self.open_peer()   # its greeting after silence fails
                self.assertEqual(guest.expect_closed(), [])
        alice.say("/who")
        self.assertEqual(alice.expect(r"\*\*\* \d+ online.*"), "*** 1 online: alice")


class BigRoomTest(ServerTestCase):
    """Notices stop above --announce-limit; the greeting lists at most 20 names."""

    options = {"announce_limit": 3}

    def test_notices_only_in_small_rooms(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        self.connect("carol")
        dave = self.connect("dave")           # the fourth member: not announced
        self.assertEqual(alice.sync(), ["*** bob joined", "*** carol joined"])
        dave.say("/nick david", "/quit")
        dave.expect_closed()
        bob.say("/nick bobby")                # announced member, room of 3 again: notice
        bob.expect(r"\*\*\* you are now known as bobby")
        self.assertEqual(alice.sync(), ["*** bob is now known as bobby"])

    def test_greeting_lists_twenty_names_then_a_count(self):
        for i in range(22):
            self.connect("user%d" % i)
        peer = self.open_peer()
        peer.next_line()
        names = peer.next_line()
        self.assertTrue(names.startswith("*** you are in #lobby: 23 online: user0, user1, "),
                        names)
        self.assertTrue(names.endswith(", user19, and 3 more"), names)


class LimitsTest(ServerTestCase):
    """Over-long lines, slow readers and a full server."""

    options = {"max_line": 100, "queue_limit": 64 * 1024, "max_clients": 4}

    def test_long_line_is_refused_and_connection_stays_usable(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        bob.say("x" * 101, "y" * 100)
        self.assertEqual(bob.next_line(), "*** error: line too long (over 100 bytes), not sent")
        self.assertEqual(alice.expect(r"<bob> .*"), "<bob> " + "y" * 100)

    def test_long_partial_line_is_discarded_without_buffering_it(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        for _ in range(50):
            bob.send(b"z" * 100)
        self.assertEqual(bob.next_line(), "*** error: line too long (over 100 bytes), not sent")
        self.assertLessEqual(self.member("bob").buffered_input, 101)
        bob.send(b"z" * 50000 + b"\nshort line\n")
        self.assertEqual(alice.expect(r"<bob> .*"), "<bob> short line")
        self.assertEqual(bob.sync(), [])

    def test_irc_lines_are_bounded_by_the_limit_their_tags_aside(self):
        alice = self.connect("alice")
        peer = IrcPeer(socket.create_connection(self.address, timeout=TIMEOUT))
        self.addCleanup(peer.sock.close)
        peer.irc("CAP REQ :message-tags", "NICK tagger", "USER t 0 * :T", "CAP END",
                 "JOIN #lobby", "PRIVMSG #lobby :" + "y" * 100,
                 "@+t=%s PRIVMSG #lobby :short" % ("a" * 3000))
        self.assertEqual(peer.expect(r".* 417 .*"), ":testroom 417 tagger :Input line was too long")
        self.assertEqual(alice.expect(r"<tagger> .*"), "<tagger> short")

    def test_full_server_refuses_with_a_message(self):
        peers = [self.connect() for _ in range(4)]
        extra = self.open_peer()
        self.assertEqual(extra.expect_closed(), ["*** error: server full"])
        peers[0].sock.close()
        wait_for(lambda: self.server.stats()["connections"] == 3, message="a slot to free up")
        self.connect("late")


class SlowReaderTest(ServerTestCase):

    options = {"queue_grace": 0.2}

    def test_slow_reader_is_dropped_others_get_everything_in_order(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        self.reader_that_never_reads("slow")
        self.assertEqual(alice.expect(r"\*\*\* slow joined"), "*** slow joined")
        # bob talks until the server gives up on slow, however much the kernel buffers
        # hold; each batch waits for alice to have the one before, so that alice, who
        # reads, is never behind by more than the queue limit, however slow the machine.
        dropped, sent, received = "*** slow left (send queue exceeded)", [], []
        with self.assertLogs(chat.log, logging.WARNING) as logs:
            for number in range(200):
                batch = ["%03d %04d %s" % (number, i, "p" * 1000) for i in range(500)]
                bob.send("".join(line + "\n" for line in batch).encode())
                sent.extend(batch)
                received += alice.lines_until(re.escape("<bob> " + batch[-1]))
                received.append("<bob> " + batch[-1])
                if dropped in received:
                    break
            bob.say("the end")
            received += alice.lines_until(r"<bob> the end")
        received.remove(dropped)
        self.assertEqual(received, ["<bob> " + line for line in sent])
        self.assertIn("send queue exceeded", "\n".join(logs.output))


class StuckReader:
    """For server tests: a reader that never reads, flooded."""

    def flood_stuck_reader(self, done):
        """alice, bob, and a reader called stuck that never reads; bob says long lines
        until done(stuck's ConnectionInfo, or None once it is gone). Returns alice and
        the most the server held for everyone meanwhile."""
        alice, bob = self.connect("alice"), self.connect("bob")
        self.reader_that_never_reads("stuck")
        alice.expect(r"\*\*\* stuck joined")
        batch = "".join("%04d %s\n" % (i, "q" * 1000) for i in range(100)).encode()
        peak = 0
        while not done(self.member("stuck")):   # the kernel buffers fill, then the server's
            bob.send(batch)
            bob.sync()
            peak = max(peak, self.server.stats()["backlog"])
        return alice, peak


class StuckReaderTest(StuckReader, ServerTestCase):

    options = {"queue_grace": 0.2, "queue_limit": 64 * 1024}

    def test_a_reader_that_stops_is_dropped_even_when_all_is_quiet(self):
        alice, _ = self.flood_stuck_reader(lambda info: info is None or info.backlog > 64 * 1024)
        alice.expect(r"\*\*\* stuck left \(send queue exceeded\)")   # with nothing more said


class HardQueueCapTest(StuckReader, ServerTestCase):

    options = {"queue_grace": 3600, "queue_limit": 64 * 1024}

    def test_a_reader_far_behind_goes_at_once_whatever_its_grace(self):
        alice, peak = self.flood_stuck_reader(lambda info: info is None)
        alice.expect(r"\*\*\* stuck left \(send queue exceeded\)")
        self.assertLessEqual(peak, 4 * 64 * 1024 + 100 * 1006)


class BigTurnTest(ServerTestCase):
    """Many long lines in one turn: memory in proportion to what was said, and no reader
    that keeps up is dropped, though each gets far more than the queue limit at once."""

    options = {"queue_limit": 64 * 1024, "queue_grace": 60.0}

    @staticmethod
    def read_lines(peer, count):
        """The senders of count lines, read without keeping the lines."""
        senders, data = [], peer.buffer
        while len(senders) < count:
            chunk = peer.sock.recv(1 << 16)
            if not chunk:
                break
            data += chunk
            lines = data.split(b"\n")
            data = lines.pop()
            senders += [line[1:line.index(b">")].decode() for line in lines]
        return senders

    def test_a_turn_of_many_long_lines(self):
        raise_fd_limit(self, 2 * 100 + 100)
        nicks = ["p%02d" % i for i in range(100)]
        peers = [self.connect(nick) for nick in nicks]
        for peer in peers:
            peer.sync()
        release = self.hold_loop()
        for nick, peer in zip(nicks, peers):   # 400 KB said in one turn, 40 MB delivered
            peer.say("x" * 4000)
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        release.set()
        for nick, peer in zip(nicks, peers):
            self.assertEqual(sorted(self.read_lines(peer, 99)), [n for n in nicks if n != nick])
        peak = tracemalloc.get_traced_memory()[1]
        self.assertLess(peak, 10 << 20)   # a copy of the turn per speaker would be 40 MB
        self.assertEqual(len(self.server.members()), 100)


class ShutdownTest(ServerTestCase):

    def test_shutdown_tells_everyone_and_closes(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        self.server.shutdown()
        self.assertEqual(alice.expect_closed()[-1], "*** server shutting down")
        self.assertEqual(bob.expect_closed(), ["*** server shutting down"])


class ManyClientsTest(ServerTestCase):

    def test_a_thousand_clients_get_every_line_in_order(self):
        raise_fd_limit(self, 2 * 1000 + 100)   # both ends of every connection live here
        peers = [self.open_peer() for _ in range(1000)]
        for peer in peers:
            peer.expect(r"\*\*\* type /help for commands")
        speaker = peers[0]
        speaker.say("/nick speaker")
        speaker.expect(r"\*\*\* you are now known as speaker")
        lines = ["line %02d from the speaker" % i for i in range(50)]
        speaker.say(*lines)
        expected = ["<speaker> " + line for line in lines]
        for peer in peers[1:]:
            self.assertEqual(peer.lines_until(r"<speaker> line 49 .*")[-49:], expected[:49])


@unittest.skipUnless(ipv6_available(), "no IPv6 on this machine")
class IPv6Test(ServerTestCase):

    options = {"host": "::1"}

    def test_ipv6_clients_chat(self):
        self.assertEqual(self.address[0], "::1")
        alice, bob = self.connect("alice"), self.connect("bob")
        alice.say("over v6")
        self.assertEqual(bob.expect(r"<alice> .*"), "<alice> over v6")


class TLSServerMixin:
    """Serve TLS with the test certificate; peers trust the test CA."""

    def setUp(self):
        context, self.fingerprint = chat.server_tls_context(PKI["cert"], PKI["key"])
        self.options = dict(self.options, tls_context=context)
        super().setUp()

    def wrap(self, sock):
        context = ssl.create_default_context(cafile=PKI["ca"])
        return context.wrap_socket(sock, server_hostname="localhost")


@unittest.skipIf(ssl is None, "no ssl module")
class TLSTest(TLSServerMixin, ServerTestCase):
    """TLS in the selector loop: handshakes never hold anyone up."""

    def test_fingerprint_of_the_certificate(self):
        self.assertEqual(self.fingerprint, TEST_CERT_FINGERPRINT)
        self.assertEqual(chat.server_tls_context(PKI["both"])[1], TEST_CERT_FINGERPRINT)

    def test_tls_chat_end_to_end(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        lines = ["line %d %s" % (i, "t" * 500) for i in range(500)]   # many TLS records
        bob.send("".join(line + "\n" for line in lines).encode())
        self.assertEqual([line for line in alice.lines_until(r"<bob> line 499 .*") if line[0] == "<"],
                         ["<bob> " + line for line in lines[:499]])

    def test_reader_that_falls_behind_catches_up_intact(self):
        self.server.options.queue_limit = 1 << 30
        alice, bob = self.connect("alice"), self.connect("bob")
        bob.sync()
        lines = iter("%06d %s" % (i, "s" * 1000) for i in itertools.count())
        sent = []
        while not any(member.backlog for member in self.server.members()):
            chunk = list(itertools.islice(lines, 1000))   # until the kernel buffers are full
            alice.send("".join(line + "\n" for line in chunk).encode())
            sent += chunk
            alice.sync()   # the server has handled all of it
            self.assertLess(len(sent), 200000, "bob's queue never grew")
        self.assertEqual(bob.lines_until(r"<alice> %s" % sent[-1]),
                         ["<alice> " + line for line in sent[:-1]])

    def test_plaintext_client_is_told_and_dropped_while_others_chat(self):
        alice = self.connect("alice")
        with self.assertLogs(chat.log, logging.INFO) as logs:
            plain = Peer(socket.create_connection(self.address, timeout=TIMEOUT))
            self.addCleanup(plain.sock.close)
            plain.say("hello?")
            self.assertEqual(plain.expect_closed(), [
                "*** error: this server speaks TLS: connect with 'chat.py client --tls' "
                "or 'openssl s_client'"])
        self.assertIn("plaintext client on the TLS port", "\n".join(logs.output))
        bob = self.connect("bob")
        bob.say("still here")
        self.assertEqual(alice.expect(r"<bob> .*"), "<bob> still here")

    def test_plaintext_irc_and_http_on_the_tls_port_are_told_in_their_words(self):
        got = raw_exchange(self.address, b"NICK bob\r\nUSER bob 0 * :Bob\r\n")
        self.assertEqual(got, b"ERROR :Closing link: this server speaks TLS: connect with "
                              b"'chat.py client --tls' or 'openssl s_client'\r\n")
        status, _, body = http(self.address, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        self.assertEqual(status, 400)
        self.assertIn(b"https://", body)

    def test_stalled_handshakes_do_not_delay_others(self):
        stalled = socket.create_connection(self.address, timeout=TIMEOUT)
        self.addCleanup(stalled.close)
        stalled.sendall(b"\x16\x03\x01\x02\x00\x01\x00")   # the start of a ClientHello
        silent = socket.create_connection(self.address, timeout=TIMEOUT)
        self.addCleanup(silent.close)
        wait_for(lambda: self.server.stats()["handshaking"] == 2, message="both handshakes")
        alice, bob = self.connect("alice"), self.connect("bob")
        bob.say("not waiting for anyone")
        self.assertEqual(alice.expect(r"<bob> .*"), "<bob> not waiting for anyone")
        self.assertEqual(self.server.stats()["handshaking"], 2)   # both still waiting

    def test_shutdown_with_a_handshake_in_progress(self):
        stalled = socket.create_connection(self.address, timeout=TIMEOUT)
        self.addCleanup(stalled.close)
        stalled.sendall(b"\x16\x03\x01\x02\x00\x01\x00")
        alice = self.connect("alice")
        wait_for(lambda: self.server.stats()["handshaking"] == 1, message="the stalled handshake")
        self.server.shutdown()
        self.assertEqual(alice.expect_closed()[-1:], ["*** server shutting down"])
        self.assertEqual(stalled.recv(100), b"")   # closed, no plaintext in a TLS stream

    @unittest.skipUnless(os.path.exists("/proc/net/tcp"), "needs Linux's /proc/net/tcp")
    def test_accepted_sockets_use_keepalive(self):
        """The kernel's own table shows the server's end of each connection with its
        keepalive timer set to the idle time (the options come from the listening
        socket where the system copies them, else are set on each connection)."""
        for name in ("alice", "bob"):
            ports = self.address[1], self.connect(name).sock.getsockname()[1]
            # Until its greeting is acknowledged, the retransmission timer (1) shows.
            wait_for(lambda: server_side_tcp_timer(*ports)[0] != 1, message="the ACK")
            kind, left = server_side_tcp_timer(*ports)
            self.assertEqual(kind, 2, "keepalive timer")
            self.assertGreater(left, chat.KEEPALIVE_IDLE - 15)


@unittest.skipIf(ssl is None, "no ssl module")
class TLSReadTest(TLSServerMixin, ServerTestCase):

    options = {"rate": 1000, "burst": 1000, "max_line": 20000}   # reads of 16 KB

    def test_a_record_cut_by_a_read_is_not_left_waiting(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        alice.sync()
        release = self.hold_loop()
        bob.send(b"first\n")   # a short record, then a full one: a 16 KB read ends inside it
        bob.send(b"z" * (chat.PACED_RECV_SIZE - 6) + b"\nlast\n")
        release.set()
        alice.expect(r"<bob> first")
        self.assertEqual(alice.lines_until(r"<bob> last"), ["<bob> " + "z" * 16378])

    def test_connections_end_with_close_notify(self):
        context = ssl.create_default_context(cafile=PKI["ca"])
        tls = context.wrap_socket(socket.create_connection(self.address, timeout=TIMEOUT),
                                  server_hostname="localhost",
                                  suppress_ragged_eofs=False)   # else no difference
        self.addCleanup(tls.close)
        peer = Peer(tls)
        peer.say("/nick quitter")
        peer.expect(r"\*\*\* type /help for commands")
        peer.say("/quit")
        self.assertEqual(peer.expect_closed(), ["*** bye"])   # an EOF alone raises SSLEOFError


@unittest.skipIf(ssl is None, "no ssl module")
class TLSRegistrationTimeoutTest(TLSServerMixin, ServerTestCase):

    options = {"register_timeout": 0.5}

    def test_stalled_handshake_is_dropped_at_the_timeout(self):
        started = time.monotonic()
        stalled = socket.create_connection(self.address, timeout=TIMEOUT)
        self.addCleanup(stalled.close)
        stalled.sendall(b"\x16\x03\x01\x02\x00\x01\x00")
        silent = socket.create_connection(self.address, timeout=TIMEOUT)
        self.addCleanup(silent.close)
        for sock in (stalled, silent):
            self.assertEqual(sock.recv(100), b"")
        self.assertGreaterEqual(time.monotonic() - started, 0.5)
        self.assertEqual(self.server.stats()["connections"], 0)


class PasswordTest(ServerTestCase):
    """A password keeps strangers out of the room entirely."""

    options = {"password": "open sesame", "wrong_password_delay": 0.3}

    def enter(self, nick):
        peer = self.open_peer()
        self.assertEqual(peer.next_line(), "*** password required: /pass PASSWORD")
        peer.say("/pass open sesame", "/nick " + nick)
        self.assertEqual(peer.next_line()[:24], "*** welcome to testroom,")
        peer.expect(r"\*\*\* you are now known as " + nick)
        return peer

    def test_right_password_enters_the_room(self):
        alice = self.enter("alice")
        self.enter("bob")
        self.assertEqual(alice.sync(), ["*** bob joined"])

    def test_stranger_sees_nothing_and_is_not_in_the_room(self):
        alice = self.enter("alice")
        stranger = self.open_peer()
        stranger.say("hello?", "/who", "/nick mallory", "/msg alice hi")
        alice.say("our secret plans")
        self.assertEqual(alice.sync(), [])            # no join notice, not listed
        self.assertEqual([member.nick for member in self.server.members()], ["alice"])
        stranger.say("/pass open  sesame")            # one space too many
        self.assertEqual(stranger.lines_until(r"\*\*\* error: wrong password"),
                         ["*** password required: /pass PASSWORD"]
                         + ["*** error: password required"] * 3)   # /nick waits for the way in
        self.assertEqual(stranger.expect_closed(), [])
        self.assertEqual(alice.sync(), [])

    def test_wrong_password_is_closed_after_a_pause(self):
        peer = self.open_peer()
        peer.next_line()
        started = time.monotonic()
        peer.say("/pass guess")
        self.assertEqual(peer.next_line(), "*** error: wrong password")
        self.assertEqual(peer.expect_closed(), [])
        self.assertGreaterEqual(time.monotonic() - started, 0.25)

    def test_quit_before_the_password(self):
        peer = self.open_peer()
        peer.say("/quit")
        self.assertEqual(peer.expect_closed(), ["*** password required: /pass PASSWORD",
                                                "*** bye"])

    def test_pass_in_the_room_is_not_relayed(self):
        alice, bob = self.enter("alice"), self.enter("bob")
        bob.say("/pass open sesame")
        self.assertEqual(bob.next_line(), "*** error: you are already in")
        self.assertEqual(alice.sync(), ["*** bob joined"])


class PasswordGuessingTest(ServerTestCase):

    options = {"password": "open sesame", "wrong_password_delay": 0.2}

    def guess(self, password, source="127.0.0.1"):
        peer = self.peer_from(source)
        peer.say("/pass " + password)
        return peer

    def test_guessing_is_slow_and_soon_refused_while_others_get_in(self):
        with self.assertLogs(chat.log, logging.WARNING) as logs:
            for number in range(chat.GUESS_LIMIT):
                started = time.monotonic()
                peer = self.guess("guess %d" % number)
                self.assertEqual(peer.expect_closed(), ["*** password required: /pass PASSWORD",
                                                        "*** error: wrong password"])
                self.assertGreaterEqual(time.monotonic() - started, 0.2)   # answered late
        self.assertIn("127.0.0.1: 5 wrong passwords within 60 s", "\n".join(logs.output))
        refused = self.guess("open sesame")   # right, but from the guessing address
        self.assertRegex(refused.expect_closed()[-1], r"\*\*\* error: too many wrong passwords "
                         r"from your address; try again in \d+ s")
        other = self.guess("open sesame", source="127.0.0.2")
        self.assertRegex(other.expect(r"\*\*\* welcome .*"), r"\*\*\* welcome to testroom, .*")


class PasswordTimeoutTest(ServerTestCase):

    options = {"password": "open sesame", "register_timeout": 0.5}

    def test_registration_times_out(self):
        peer = self.open_peer()
        self.assertEqual(peer.expect_closed(), ["*** password required: /pass PASSWORD",
                                                "*** error: registration timed out"])


class FloodTest(ServerTestCase):
    """A flooder is paced, loses nothing, and slows nobody else."""

    options = {"rate": 20, "burst": 5}

    def test_flood_is_paced_in_order_and_does_not_delay_others(self):
        alice, bob, flooder = self.connect("alice"), self.connect("bob"), self.connect("flood")
        alice.sync()
        lines = ["flood %03d" % i for i in range(100)]   # five seconds' worth at --rate
        started = time.monotonic()
        flooder.say(*lines)
        alice.expect(r"<flood> flood 000")
        bob.say("quick question")
        received = alice.lines_until(r"<flood> flood 030")
        # Line 30 needs 26 tokens beyond the burst of 5: the server cannot relay it sooner.
        self.assertGreaterEqual(time.monotonic() - started, 26 / 20 * 0.95)
        self.assertIn("<bob> quick question", received)   # bob did not wait for the flood
        received.remove("<bob> quick question")
        self.assertEqual(received, ["<flood> " + line for line in lines[1:30]])
        self.assertIn("flood", [member.nick for member in self.server.members()])

    def test_lines_before_the_end_of_input_are_all_relayed_paced(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        alice.sync()
        lines = ["paced %02d" % i for i in range(12)]   # the burst of 5, then 7 at --rate
        bob.send(("\n".join(lines)).encode())          # the last line has no newline
        bob.sock.shutdown(socket.SHUT_WR)
        self.assertEqual(alice.lines_until(r"\*\*\* bob left .*"),
                         ["<bob> " + line for line in lines])
        self.assertEqual(alice.transcript[-1], "*** bob left (connection closed)")


class PasteTest(ServerTestCase):

    options = {"rate": chat.DEFAULT_RATE, "burst": chat.DEFAULT_BURST}

    def test_a_pasted_block_of_thirty_lines_goes_through_at_once(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        alice.sync()
        lines = ["pasted %02d" % i for i in range(30)]
        bob.say(*lines)
        self.assertEqual(alice.lines_until(r"<bob> pasted 29"),
                         ["<bob> " + line for line in lines[:-1]])
        self.assertEqual(bob.sync(), [])   # still connected


class ExcessFloodTest(ServerTestCase):
    """A connection far ahead of flood control is cut off; a paste and a piped client are not."""

    options = {"rate": 50, "burst": 5, "flood_lag": 0.2}   # up to 10 lines may wait

    def test_a_flood_far_ahead_of_the_rate_is_cut_off(self):
        alice, flooder = self.connect("alice"), self.connect("flood")
        alice.sync()
        with self.assertLogs(chat.log, logging.WARNING) as logs:
            flooder.say(*("flood %05d" % i for i in range(20000)))   # then, say, kill -9
            self.assertEqual(flooder.expect(r"\*\*\* error: .*"),
                             "*** error: excess flood (over 1 s of lines ahead of the rate limit)")
        self.assertIn("excess flood", "\n".join(logs.output))
        said = alice.lines_until(r"\*\*\* flood left \(excess flood\)")
        self.assertEqual(said, ["<flood> flood %05d" % i for i in range(len(said))])
        self.assertLessEqual(len(said), 5 + 10)   # the burst, and at most what may wait

    def test_bare_newlines_cost_the_flooders_their_connections_not_the_others_time(self):
        raise_fd_limit(self, 2 * 60 + 100)
        alice = self.connect("alice")
        flooders = [self.open_peer() for _ in range(50)]
        for flooder in flooders:
            flooder.send(b"\n" * 65536)
        for flooder in flooders:
            self.assertIn("*** error: excess flood (over 1 s of lines ahead of the rate limit)",
                          flooder.expect_closed())
        self.assertEqual(alice.sync(), [])
        self.assertEqual([member.nick for member in self.server.members()], ["alice"])

    def test_lines_up_to_the_bound_wait_their_turn(self):
        alice, bob = self.connect("alice"), self.connect("bob")   # /nick took a token
        alice.sync()
        lines = ["pasted %02d" % i for i in range(14)]   # 4 at once, and 10 that wait
        bob.say(*lines)
        self.assertEqual(alice.lines_until(r"<bob> pasted 13"),
                         ["<bob> " + line for line in lines[:-1]])
        self.assertEqual(bob.sync(), [])   # still connected

    def test_the_client_paces_a_pipe_to_the_server_rate(self):
        alice = self.connect("alice")
        lines = ["piped %02d" % i for i in range(60)]   # 1.1 s of lines, 0.2 s may wait
        client = ClientProcess(self, self.address[1], "--nick", "bot",
                               stdin_data="".join(line + "\n" for line in lines).encode())
        code, out, err = client.finish()
        self.assertEqual((code, err), (0, ""))
        self.assertIn("*** flood control: 5 lines at once, then 50 a second", out.splitlines())
        self.assertEqual(alice.lines_until(r"\*\*\* bot left \(quit\)"),
                         ["*** bot joined"] + ["<bot> " + line for line in lines])


@unittest.skipUnless(socket.has_dualstack_ipv6() and ipv6_available(), "no dual-stack IPv6")
class PerAddressLimitTest(ServerTestCase):

    options = {"host": None, "max_per_ip": 2}

    def test_connections_per_address_are_limited(self):
        self.address = ("127.0.0.1", self.address[1])   # IPv4 peers of a dual-stack socket
        first, _ = self.connect(), self.connect()
        third = self.open_peer()
        self.assertEqual(third.expect_closed(),
                         ["*** error: too many connections from your address"])
        first.sock.close()
        wait_for(lambda: self.server.stats()["connections"] == 1, message="a slot to free up")
        self.connect("again")


# --- Operators, and everyone's /away, /ignore, /whois ---

class ModerationTest(ServerTestCase):
    """An operator removes a troublemaker in one command, and keeps them out."""

    options = {"op_password": "op secret", "greet_delay": 5.0}

    def connect_from(self, source, nick):
        peer = self.peer_from(source)
        peer.say("/nick " + nick)
        peer.expect(r"\*\*\* type /help for commands")
        return peer

    def operator(self, nick="alice"):
        peer = self.connect(nick)
        peer.say("/op op secret")
        self.assertEqual(peer.expect(r"\*\*\* (you are|error).*"), "*** you are an operator now")
        return peer

    def test_op_kick_and_the_marks_in_lists(self):
        bob, carol = self.connect("bob"), self.connect("carol")
        bob.say("/kick carol", "/op wrong", "/op op secret!")
        self.assertEqual(bob.expect(r"\*\*\* error.*"), "*** error: only operators may /kick")
        self.assertEqual(bob.next_line(), "*** error: wrong operator password")
        alice = self.operator()
        alice.say("/who", "/kick carol spamming", "/kick nobody")
        self.assertEqual(alice.expect(r"\*\*\* \d online.*"), "*** 3 online: @alice, bob, carol")
        self.assertEqual(carol.expect_closed()[-1], "*** you were kicked by alice (spamming)")
        self.assertEqual(bob.expect(r"\*\*\* carol .*"), "*** carol was kicked by alice (spamming)")
        self.assertEqual(alice.expect(r"\*\*\* error.*"), "*** error: no such nick nobody")

    def test_a_ban_keeps_an_address_out_until_it_ends(self):
        alice = self.operator()
        bob = self.connect_from("127.0.0.2", "bob")
        alice.say("/ban bob 2s flooding", "/bans")
        self.assertEqual(bob.expect_closed()[-1], "*** you were kicked by alice (banned: flooding)")
        self.assertEqual(alice.expect(r"\*\*\* banned .*"),
                         "*** banned bob (127.0.0.2/32) for 2s: flooding")
        self.assertRegex(alice.expect(r"\*\*\* ban .*"),
                         r"\*\*\* ban bob \(127\.0\.0\.2/32\) by alice, for [12]s: flooding")
        refused = self.peer_from("127.0.0.2")
        refused.say("/nick bob")
        self.assertEqual(refused.expect_closed(), ["*** error: banned"])
        self.connect("carol")   # other addresses are welcome

        def back_in():
            try:
                self.connect_from("127.0.0.2", "bob")
                return True
            except AssertionError:
                return False
        wait_for(back_in, message="the ban to end")

    def test_a_banned_address_is_refused_at_once(self):
        alice = self.operator()
        alice.say("/ban 127.0.0.1 testing")   # the operator stays; newcomers from it do not
        alice.expect(r"\*\*\* note: the ban covers your own address.*")
        for first in (b"NICK bob\r\nUSER bob 0 * :Bob\r\n", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                      b""):   # IRC, a browser, nc: one plain line, before any dialect
            self.assertEqual(raw_exchange(self.address, first), b"*** error: banned\n")
        self.assertEqual(self.server.stats()["connections"], 1)   # they hold no slot
        code, _, err = ClientProcess(self, self.address[1], "--nick", "dave").finish()
        self.assertEqual(code, 1)
        self.assertRegex(err, r"^chat.py: 127\.0\.0\.1:\d+ has banned this address\n$")
        self.assertEqual(alice.sync(), [])   # none of them got in

    def test_the_client_does_not_come_back_after_a_kick(self):
        alice = self.operator()
        client = ClientProcess(self, self.address[1], "--nick", "ci", "--listen-only")
        alice.expect(r"\*\*\* ci joined")
        alice.say("/kick ci enough")
        code, out, err = client.finish()
        self.assertEqual(code, 1)
        self.assertEqual(out.splitlines()[-1], "*** you were kicked by alice (enough)")
        self.assertRegex(err, r"^chat.py: 127\.0\.0\.1:\d+: you were kicked by alice \(enough\)\n$")

    def test_unban_and_networks(self):
        alice = self.operator()
        alice.say("/ban 127.0.0.0/30 testing", "/unban 127.0.0.0/30", "/unban 10.0.0.1",
                  "/ban ::ffff:127.0.0.3", "/bans", "/ban", "/ban nowhere")
        self.assertEqual(alice.expect(r"\*\*\* banned .*"),
                         "*** banned 127.0.0.0/30 (127.0.0.0/30) for good: testing")
        self.assertRegex(alice.next_line(), r"\*\*\* note: the ban covers your own address.*")
        self.assertEqual(alice.next_line(), "*** unbanned 127.0.0.0/30")
        self.assertEqual(alice.next_line(), "*** error: no ban on 10.0.0.1")
        self.assertEqual(alice.next_line(), "*** banned ::ffff:127.0.0.3 (127.0.0.3/32) for good: "
                                            "no reason given")   # IPv4-mapped counts as IPv4
        self.assertRegex(alice.next_line(), r"\*\*\* ban ::ffff:127\.0\.0\.3 .*")
        self.assertRegex(alice.next_line(), r"\*\*\* error: usage: /ban .*")
        self.assertRegex(alice.next_line(), r"\*\*\* error: nowhere is neither .*")

    def test_unban_by_any_name_and_ban_after_a_kick(self):
        alice = self.operator()
        bob = self.connect_from("127.0.0.2", "Bob")
        alice.say("/kick bob enough", "/ban bob", "/unban 127.0.0.2", "/ban BOB 1h",
                  "/unban bob", "/ban ::ffff:127.0.0.0/104", "/unban 127.0.0.0/8")
        bob.expect_closed()
        self.assertEqual(alice.expect(r"\*\*\* banned .*"),
                         "*** banned bob (127.0.0.2/32) for good: no reason given")
        self.assertEqual(alice.next_line(), "*** unbanned 127.0.0.2")
        self.assertEqual(alice.next_line(), "*** banned BOB (127.0.0.2/32) for 1h: no reason given")
        self.assertEqual(alice.next_line(), "*** unbanned bob")
        self.assertEqual(alice.next_line(), "*** banned ::ffff:127.0.0.0/104 (127.0.0.0/8) for "
                                            "good: no reason given")
        alice.expect(r"\*\*\* note: the ban covers your own address.*")
        self.assertEqual(alice.next_line(), "*** unbanned 127.0.0.0/8")

    def test_service_and_server_names_cannot_be_taken(self):
        peer = self.connect("bob")
        peer.say("/nick NickServ", "/nick chanserv", "/nick ＮｉｃｋＳｅｒｖ", "/nick testroom")
        self.assertEqual(peer.next_line(), "*** error: nick NickServ is kept for the server and "
                                           "its services")
        for _ in range(3):
            self.assertRegex(peer.next_line(), r"\*\*\* error: nick \S+ is kept for .*")

    def test_the_ignored_are_left_out_of_replayed_history(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        bob.say("/join #dev", "spam", "more spam")
        alice.say("/join #dev", "hello", "/ignore bob", "/part", "/join #dev")
        history_of(alice)
        alice.expect(r"\*\*\* ignoring bob .*")
        self.assertEqual(history_of(alice), ["<alice> hello"])

    def test_mute(self):
        alice, carol = self.operator(), self.connect("carol")
        bob = self.connect_from("127.0.0.2", "bob")
        spare = self.connect_from("127.0.0.2", "spare")   # a second voice at the same address
        alice.say("/mute bob 10m")
        self.assertEqual(alice.expect(r"\*\*\* bob is muted .*"), "*** bob is muted for 10m")
        self.assertEqual(bob.expect(r"\*\*\* alice muted .*"),
                         "*** alice muted you for 10m; you may still /msg an operator")
        muted = "*** error: you are muted; you may still /msg an operator"
        spare.expect(r"\*\*\* alice muted you .*")
        bob.say("let me talk", "/msg carol psst", "/msg alice sorry", "/nick bobby",
                "/topic free speech", "/away listen to me", "/join #buy-cheap-stuff")
        self.assertEqual(bob.next_line(), muted)
        self.assertEqual(bob.next_line(), muted)
        self.assertEqual(bob.next_line(), "-> *alice* sorry")
        self.assertEqual([bob.next_line() for _ in range(4)], [muted] * 4)   # no way around
        self.assertEqual(alice.expect(r"\*bob\* .*"), "*bob* sorry")
        alice.say("/mutes")
        self.assertRegex(alice.expect(r"\*\*\* mute .*"), r"\*\*\* mute bob \(127\.0\.0\.2/32\) "
                         r"by alice, for (10m|9m \d+s): no reason given")
        bob.say("/quit my last words")
        self.assertEqual(carol.expect(r"\*\*\* bob left .*"), "*** bob left (quit)")
        again = self.connect_from("127.0.0.2", "I-am-back")   # still muted, a guest, and told
        self.assertRegex(again.transcript[0], r"\*\*\* welcome to testroom, you are guest\d+")
        self.assertRegex(again.next_line(), r"\*\*\* alice muted you for (10m|9m \d+s); .*")
        again.say("back as I was")
        self.assertEqual(again.next_line(), muted)
        innocent = self.connect_from("127.0.0.3", "bobby")
        innocent.say("hello")
        self.assertEqual(carol.expect(r"<bobby> .*"), "<bobby> hello")
        alice.say("/unmute bob")
        for peer in (again, spare):
            self.assertEqual(peer.expect(r"\*\*\* you may .*"), "*** you may talk again")
        again.say("/nick bob", "thanks")
        self.assertEqual(carol.expect(r"<bob> .*"), "<bob> thanks")

    def test_away_ignore_and_whois(self):
        alice = self.operator()
        bob, carol = self.connect_from("127.0.0.2", "bob"), self.connect("carol")
        carol.say("/away at lunch", "/ignore bob")
        self.assertEqual(carol.next_line(), "*** you are away: at lunch")
        self.assertEqual(carol.next_line(), "*** ignoring bob (/unignore bob to hear them again)")
        bob.say("can anyone hear me", "/msg carol psst")
        self.assertEqual(bob.expect(r"\*\*\* carol is away.*"), "*** carol is away: at lunch")
        self.assertEqual(alice.expect(r"<bob> .*"), "<bob> can anyone hear me")
        carol.say("/unignore bob", "/away")
        bob.say("now?")
        self.assertEqual(carol.lines_until(r"<bob> now\?"),
                         ["*** no longer ignoring bob", "*** you are back"])   # nothing before
        bob.say("/whois carol", "/whois alice")
        self.assertRegex(bob.next_line(), r"\*\*\* carol: in #lobby; idle \d+s$")
        self.assertRegex(bob.next_line(), r"\*\*\* alice: in #lobby; idle \d+s; operator$")
        alice.say("/whois bob")
        self.assertRegex(alice.expect(r"\*\*\* bob: .*"),
                         r"\*\*\* bob: in #lobby; idle \d+s; from 127\.0\.0\.2$")

    def test_wrong_operator_passwords_are_throttled(self):
        peer = self.connect("guesser")
        peer.say(*["/op guess %d" % number for number in range(chat.GUESS_LIMIT + 1)])
        for _ in range(chat.GUESS_LIMIT):
            self.assertEqual(peer.next_line(), "*** error: wrong operator password")
        self.assertRegex(peer.next_line(), r"\*\*\* error: too many wrong operator passwords "
                                           r"from your address; try again in \d+ s")


class IrcModerationTest(ServerTestCase):

    options = {"op_password": "op secret", "greet_delay": 5.0}

    def test_oper_kick_bans_away_and_whois(self):
        alice = IrcPeer(socket.create_connection(self.address, timeout=TIMEOUT))
        self.addCleanup(alice.sock.close)
        alice.register("alice")
        bob = self.connect("bob")
        alice.irc("OPER alice wrong", "OPER alice :op secret", "NAMES #lobby", "AWAY :brb")
        self.assertEqual(alice.numeric("464"), ":testroom 464 alice :Password incorrect")
        self.assertEqual(alice.numeric("381"), ":testroom 381 alice :You are now an IRC operator")
        self.assertEqual(alice.next_line(), ":alice!alice@chat MODE alice +o")   # the user mode
        self.assertEqual(alice.numeric("353"), ":testroom 353 alice = #lobby :@alice bob")
        self.assertEqual(alice.numeric("306"), ":testroom 306 alice :You have been marked as "
                                               "being away")
        bob.say("/msg alice are you there", "/whois alice")
        self.assertEqual(bob.expect(r"\*\*\* alice is away.*"), "*** alice is away: brb")
        self.assertRegex(bob.next_line(), r"\*\*\* alice: in #lobby; idle \d+s; away: brb; "
                                          r"operator$")
        alice.irc("WHOIS bob", "MODE #lobby +b nobody!*@*", "MODE #lobby b", "KICK #lobby bob :go")
        self.assertRegex(alice.numeric("338"), r":testroom 338 alice bob 127\.0\.0\.1 :.*")
        self.assertRegex(alice.numeric("317"), r":testroom 317 alice bob \d+ \d{10} :seconds idle, "
                                               r"signon time")
        self.assertEqual(alice.expect(r".* MODE .*"), ":alice!alice@chat MODE #lobby +b nobody!*@*")
        self.assertRegex(alice.next_line(), r":testroom 367 alice #lobby nobody!\*@\* alice \d+$")
        self.assertEqual(alice.numeric("368"), ":testroom 368 alice #lobby :End of channel ban list")
        self.assertEqual(alice.expect(r".* KICK .*"), ":alice!alice@chat KICK #lobby bob :go")
        self.assertEqual(bob.expect_closed()[-1], "*** you were kicked by alice (go)")

    def test_ban_lists_and_changes_as_clients_record_them(self):
        alice = IrcPeer(socket.create_connection(self.address, timeout=TIMEOUT))
        self.addCleanup(alice.sock.close)
        alice.register("alice")
        carol = self.connect("carol")
        alice.irc("MODE #lobby -b", "OPER alice :op secret")
        self.assertEqual(alice.numeric("461"), ":testroom 461 alice MODE :Not enough parameters")
        self.assertEqual(carol.expect(r"\*\*\* alice is .*"), "*** alice is now an operator")
        alice.irc("MODE #lobby +b *!*@10.1.2.3", "MODE #lobby +b", "MODE #lobby -b *!*@10.1.2.3")
        self.assertEqual(alice.expect(r".* MODE #lobby .*"),
                         ":alice!alice@chat MODE #lobby +b *!*@10.1.2.3/32")   # as it is kept
        since = int(alice.numeric("367").split()[-1])
        self.assertLess(abs(since - time.time()), 60)   # the time it was set, not 0
        self.assertEqual(alice.expect(r".* MODE .*"),
                         ":alice!alice@chat MODE #lobby -b *!*@10.1.2.3/32")
        self.assertEqual(carol.expect(r"\*\*\* alice .*"),
                         "*** alice banned *!*@10.1.2.3/32 from #lobby")
        self.assertEqual(carol.next_line(), "*** alice lifted the ban on *!*@10.1.2.3/32 in #lobby")

    def test_secret_rooms_are_none_to_outsiders(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        alice.say("/join #secret", "/mode +s", "/topic #secret hush", "/mode +b troll")
        alice.expect(r"\*\*\* alice banned troll!\*@\* from #secret")
        bob.say("/who #secret", "/topic #secret", "/mode #secret", "/mode #secret +b",
                "/topic #lobby open to all", "/topic #lobby")
        self.assertEqual(bob.expect(r"\*\*\* error: .*"), "*** error: no such room #secret")
        for _ in range(3):
            self.assertEqual(bob.next_line(), "*** error: no such room #secret")
        self.assertEqual(bob.expect(r"\*\*\* topic of .*"), "*** topic of #lobby: open to all")

    def test_room_bans_cover_look_alikes_and_address_blocks(self):
        member = chat.Member(None, address="2001:db8::5")
        member.nick, member.lookalikes = "bob", chat.lookalike_keys("bob")
        for typed, covers in (("b\u043eb", True), ("BOB", True), ("b?b", True), ("bo", False),
                              ("2001:db8::9", True), ("2001:db8:1::5", False),
                              ("*!*@2001:DB8::/32", True), ("::ffff:10.0.0.1", False),
                              ("*!bob@chat", True), ("*!eve@*", False)):
            self.assertEqual(chat.ban_covers(chat.ban_mask(typed), member), covers, typed)
        member.address = "10.0.0.1"
        self.assertTrue(chat.ban_covers(chat.ban_mask("::ffff:10.0.0.0/120"), member))
        self.assertEqual(chat.ban_mask("::ffff:10.0.0.1"), "*!*@10.0.0.1/32")
        self.assertEqual(chat.ban_mask("127.0.0.0/8"), "*!*@127.0.0.0/8")   # as it is kept
        for not_a_network in ("*!*@foo/bar", "*!*@1.2.3.4/33", "a!b@c/d"):
            self.assertIsNone(chat.ban_mask(not_a_network))
        member.nick, member.lookalikes = "bobby", chat.lookalike_keys("bobby")
        self.assertTrue(chat.ban_covers("b0bby!*@*", member))   # a ban covers look-alikes...
        self.assertFalse(chat.ban_covers("b0bby!*@*", member, lookalikes=False))   # ...not so
        self.assertTrue(chat.ban_covers("BOBBY!*@*", member, lookalikes=False))   # exceptions
        self.assertIsNone(chat.ban_mask("\U0001d54f" * 30))   # over 100 bytes

    def test_kill_and_wallops_are_for_operators(self):
        alice, bob = IrcPeer(socket.create_connection(self.address, timeout=TIMEOUT)), \
            IrcPeer(socket.create_connection(self.address, timeout=TIMEOUT))
        for peer, nick in ((alice, "alice"), (bob, "bob")):
            self.addCleanup(peer.sock.close)
            peer.register(nick)
        carol, dave = self.connect("carol"), self.connect("dave")
        carol.say("/op op secret")
        carol.expect(r"\*\*\* you are an operator now")
        bob.irc("KILL alice :go away", "WALLOPS :hello ops")
        for _ in range(2):
            self.assertEqual(bob.numeric("481"), ":testroom 481 bob :Permission Denied- You're "
                                                 "not an IRC operator")
        alice.irc("OPER alice :op secret", "WALLOPS :hello ops", "KILL nobody", "KILL bob :enough")
        self.assertEqual(alice.expect(r".* WALLOPS .*"), ":alice!alice@chat WALLOPS :hello ops")
        self.assertEqual(carol.expect(r"\*\*\* to operators.*"),
                         "*** to operators, from alice: hello ops")
        self.assertEqual(alice.numeric("401"), ":testroom 401 alice nobody :No such nick/channel")
        self.assertIn("ERROR :Closing link: you were kicked by alice (enough)", bob.expect_closed())
        dave.say("/wallops me too")
        before = dave.lines_until(r"\*\*\* error: only operators may /wallops")
        self.assertFalse([line for line in before if "hello ops" in line], before)

    def test_room_bans_by_mask_nick_and_network(self):
        alice = IrcPeer(socket.create_connection(self.address, timeout=TIMEOUT))
        self.addCleanup(alice.sock.close)
        alice.register("alice")
        bob, carol = self.connect("bob"), self.connect("carol")
        alice.irc("JOIN #dev")   # its first member: it runs #dev
        bob.say("/join #dev")
        alice.expect(r":bob!bob@chat JOIN #dev")
        alice.irc("MODE #dev +b *!*@127.0.0.0/8")
        alice.expect(r":alice!alice@chat MODE #dev \+b .*")
        self.assertEqual(bob.expect(r"\*\*\* alice .*"), "*** alice banned *!*@127.0.0.0/8 from #dev")
        bob.say("still here?", "/part", "/join #dev")
        self.assertEqual(bob.next_line(), "*** error: you are banned from #dev: you may not talk "
                                          "there")
        self.assertEqual(bob.expect(r"\*\*\* error: .*"), "*** error: you are banned from #dev")
        alice.irc("MODE #dev -b+b *!*@127.0.0.0/8 BOB", "MODE #dev +v alice")   # by nick now
        self.assertEqual(alice.expect(r".* MODE #dev .*"),
                         ":alice!alice@chat MODE #dev -b+b *!*@127.0.0.0/8 BOB!*@*")
        bob.say("/join #dev")
        self.assertEqual(bob.expect(r"\*\*\* error: .*"), "*** error: you are banned from #dev")
        carol.say("/join #dev", "/mode +b", "/mode +b bad!mask!", "/mode -b nobody")
        self.assertEqual(carol.expect(r"\*\*\* #dev bans .*"), "*** #dev bans BOB!*@* (set by alice)")
        self.assertEqual(carol.next_line(), "*** end of the bans of #dev")
        self.assertEqual(carol.next_line(), "*** error: only operators of #dev may do that")
        alice.irc("MODE #dev +b bad!mask!", "MODE #dev -b nobody!*@*", "MODE #dev b")
        self.assertRegex(alice.expect(r".* NOTICE .*"), r".*usage: /mode \+b .*")
        self.assertRegex(alice.numeric("367"), r":testroom 367 alice #dev BOB!\*@\* alice \d+")
        self.assertEqual(alice.numeric("368"), ":testroom 368 alice #dev :End of channel ban list")

    def test_exceptions_to_bans_and_to_invitations(self):
        alice = IrcPeer(socket.create_connection(self.address, timeout=TIMEOUT))
        self.addCleanup(alice.sock.close)
        alice.register("alice")
        alice.irc("JOIN #dev", "MODE #dev +ib *!*@127.0.0.0/8", "MODE #dev +e Bob",
                  "MODE #dev +I *!carol@*", "MODE #dev e", "MODE #dev I")
        self.assertEqual(alice.expect(r".* MODE #dev \+e.*"), ":alice!alice@chat MODE #dev +e Bob!*@*")
        self.assertEqual(alice.expect(r".* MODE #dev \+I.*"), ":alice!alice@chat MODE #dev +I *!carol@*")
        self.assertRegex(alice.numeric("348"), r":testroom 348 alice #dev Bob!\*@\* alice \d+$")
        self.assertEqual(alice.numeric("349"), ":testroom 349 alice #dev :End of channel exception list")
        self.assertRegex(alice.numeric("346"), r":testroom 346 alice #dev \*!carol@\* alice \d+$")
        self.assertEqual(alice.numeric("347"), ":testroom 347 alice #dev :End of channel invite list")
        alice.irc("MODE #dev +e *!*@not/anetwork")   # a "/" is only a network's
        self.assertRegex(alice.expect(r".* NOTICE .*"), r".*usage: /mode \+e .*")
        bob, carol, dave = self.connect("bob"), self.connect("carol"), self.connect("dave")
        bob.say("/join #dev")   # excepted from the ban, but not invited
        self.assertEqual(bob.expect(r"\*\*\* error: .*"),
                         "*** error: #dev is invite-only: ask one of its operators")
        alice.irc("MODE #dev +I bob")
        self.assertEqual(alice.expect(r".* MODE #dev .*"), ":alice!alice@chat MODE #dev +I bob!*@*")
        bob.say("/join #dev", "hi dev")
        self.assertEqual(alice.expect(r".* PRIVMSG #dev .*"), ":bob!bob@chat PRIVMSG #dev :hi dev")
        carol.say("/join #dev")   # no invitation needed, but banned
        self.assertEqual(carol.expect(r"\*\*\* error: .*"), "*** error: you are banned from #dev")
        bob.say("/mode -e bob")   # not an operator of #dev
        self.assertEqual(bob.expect(r"\*\*\* error: .*"), "*** error: only operators of #dev may do that")
        alice.irc("MODE #dev +ee dave dave", "MODE #dev -e+I Bob eve", "MODE #dev -I",
                  "MODE #dev -e bob!*@*", "MODE #dev +ob-I bob evil eve", "MODE #dev eI")
        self.assertEqual(alice.expect(r".* MODE #dev .*"), ":alice!alice@chat MODE #dev +e dave!*@*")
        self.assertEqual(alice.expect(r".* MODE #dev .*"),
                         ":alice!alice@chat MODE #dev -e+I Bob!*@* eve!*@*")
        self.assertEqual(alice.numeric("461"), ":testroom 461 alice MODE :Not enough parameters")
        self.assertRegex(alice.numeric("348"), r":testroom 348 alice #dev dave!\*@\* alice \d+$")
        self.assertEqual(alice.numeric("349"), ":testroom 349 alice #dev :End of channel exception list")
        self.assertEqual(alice.numeric("347"), ":testroom 347 alice #dev :End of channel invite list")
        before = bob.lines_until(r"\*\*\* alice gave bob operator status in #dev")
        self.assertEqual(before, [])   # exceptions are the operators' business: not told
        self.assertEqual(bob.next_line(), "*** alice banned evil!*@* from #dev")
        bob.say("/mode -o bob", "/mode e", "still talking?")   # now the ban covers bob
        self.assertEqual(bob.expect(r"\*\*\* error: .*"), "*** error: only operators of #dev may do that")
        self.assertEqual(bob.next_line(), "*** error: you are banned from #dev: you may not talk there")
        dave.say("/join #dev")
        self.assertEqual(dave.expect(r"\*\*\* error: .*"),
                         "*** error: #dev is invite-only: ask one of its operators")

    def test_chat_commands_irc_has_no_word_for(self):
        early = IrcPeer(socket.create_connection(self.address, timeout=TIMEOUT))
        self.addCleanup(early.sock.close)
        early.irc("NICK early", "MUTE bob")
        self.assertEqual(early.numeric("451"), ":testroom 451 * :You have not registered")
        alice = IrcPeer(socket.create_connection(self.address, timeout=TIMEOUT))
        self.addCleanup(alice.sock.close)
        alice.register("alice")
        bob = self.connect("bob")
        alice.irc("OPER alice :op secret", "MUTE bob :10m", "BANS", "IGNORE bob", "UNMUTE")
        self.assertEqual(alice.expect(r".* NOTICE .*"), ":testroom NOTICE alice :bob is muted for 10m")
        self.assertEqual(alice.next_line(), ":testroom NOTICE alice :no bans")
        self.assertEqual(alice.next_line(), ":testroom NOTICE alice :ignoring bob (/unignore bob "
                                            "to hear them again)")
        self.assertRegex(alice.next_line(), r":testroom NOTICE alice :error: usage: /unmute .*")
        self.assertRegex(bob.expect(r"\*\*\* alice muted .*"), r"\*\*\* alice muted you for 10m.*")


class PersistenceTest(ServerTestCase):
    """With a data directory, a restart loses nothing that was relayed."""

    options = {"op_password": "op secret", "history": 5}

    def setUp(self):
        self.data = tempfile.mkdtemp(prefix="chat-data-")
        self.addCleanup(shutil.rmtree, self.data, True)
        self.options = dict(self.options, data_dir=os.path.join(self.data, "chat"))
        super().setUp()

    def log_file(self, room):
        return os.path.join(self.options["data_dir"], "room-%s.log" % room.replace("#", "%23"))

    def test_a_labeled_history_read_from_disk_is_one_labeled_answer(self):
        """CHATHISTORY beyond the lines in memory is read from the data dir in a thread and
        answered turns later: still as the labeled command's answer, never as an ACK."""
        alice = self.connect("alice")
        alice.say(*("line %d" % number for number in range(1, 8)))
        alice.sync()
        tagger = IrcPeer(socket.create_connection(self.address, timeout=TIMEOUT))
        self.addCleanup(tagger.sock.close)
        tagger.irc("CAP REQ :message-tags", "NICK alice2", "USER a 0 * :A", "CAP END",
                   "JOIN #lobby", "@+draft/reply=1-x;+e=\\:) PRIVMSG #lobby :line 8")   # tags kept
        self.assertEqual(alice.expect(r"<alice2> .*"), "<alice2> line 8")
        self.restart_server()
        peer = IrcPeer(socket.create_connection(self.address, timeout=TIMEOUT))
        self.addCleanup(peer.sock.close)
        peer.irc("CAP LS 302", "NICK eve", "USER eve 0 * :Eve",
                 "CAP REQ :labeled-response batch server-time message-tags", "CAP END",
                 "JOIN #lobby")
        peer.barrier()   # past the join and its replay
        peer.irc("@label=h1 CHATHISTORY LATEST #lobby * 8")
        first = irc_tagged(peer.expect(r".*(BATCH|ACK).*"))
        self.assertEqual(first[0]["label"], "h1")
        self.assertRegex(first[1], r"^:testroom BATCH \+\S+ labeled-response$")
        outer = first[1].split()[2][1:]
        lines = peer.lines_until(r":testroom BATCH -%s" % outer)
        said = [irc_tagged(line)[1] for line in lines if " PRIVMSG " in line]
        self.assertEqual(said, [":alice!alice@chat PRIVMSG #lobby :line %d" % number
                                for number in range(1, 8)]
                         + [":alice2!alice2@chat PRIVMSG #lobby :line 8"])
        tags = [irc_tagged(line)[0] for line in lines if line.endswith(":line 8")][0]
        self.assertEqual((tags["+draft/reply"], tags["+e"]), ("1-x", ";)"))

    def test_history_topics_and_bans_survive_a_restart(self):
        alice = self.connect("alice")
        alice.say("/op op secret", "in the lobby", "/join #dev", "/topic release friday",
                  "in dev", "/me ships it", "/ban 10.1.2.3 7d a spammer", "/mode +b troll",
                  "/mode +eI friend 10.9.0.0/16")
        alice.expect(r"\*\*\* banned .*")
        alice.expect(r"\*\*\* alice banned troll!\*@\* from #dev")
        alice.expect(r"\*\*\* alice lets \*!\*@10\.9\.0\.0/16 into #dev without .*")
        self.restart_server()
        bob = self.connect("bob")
        self.assertRegex(bob.expect(r"\*\*\* \[.*"), r"\*\*\* \[\d\d:\d\d\] <alice> in the lobby")
        bob.say("/join #dev")
        self.assertEqual(bob.expect(r"\*\*\* topic .*"), "*** topic of #dev: release friday")
        self.assertEqual([HISTORY_ENTRY.sub("", line) for line in
                          bob.lines_until(r"\*\*\* --- end of history ---")[1:]],
                         ["<alice> in dev", "* alice ships it"])
        bob.say("/mode #dev +b", "/mode #dev eI")   # the first in again: bob runs #dev
        self.assertEqual(bob.next_line(), "*** #dev bans troll!*@* (set by alice)")
        self.assertEqual(bob.expect(r"\*\*\* #dev lets .*"),
                         "*** #dev lets friend!*@* in despite its bans (set by alice)")
        self.assertEqual(bob.expect(r"\*\*\* #dev lets .*"),
                         "*** #dev lets *!*@10.9.0.0/16 in without an invitation (set by alice)")
        bob.say("/op op secret", "/bans")
        self.assertRegex(bob.expect(r"\*\*\* ban .*"), r"\*\*\* ban 10\.1\.2\.3 \(10\.1\.2\.3/32\) "
                         r"by alice, for 6d 23h: a spammer")

    def test_rooms_full_of_masks_never_cost_the_servers_bans(self):
        alice = self.connect("alice")
        alice.say("/op op secret", "/ban 10.1.2.3 a spammer")
        alice.expect(r"\*\*\* banned .*")
        with mock.patch.object(chat, "STATE_LIMIT", 2500), mock.patch.object(chat, "MASKS_KEPT", 13):
            for number in range(3):   # each room's masks take about 1 KB of state.json
                alice.say("/join #full%d" % number, "/mode +bbbb %s" % " ".join(
                    "%s%d!*@*" % ("\\" * 90, mask) for mask in range(4)))
                alice.expect(r"\*\*\* alice banned .*")
            alice.say("/mode +ee one one", "/mode +e two", "/mode +e")   # 13 masks: no more
            self.assertEqual(alice.expect(r"\*\*\* alice lets .*"),
                             "*** alice lets one!*@* into #full2 despite its bans")
            self.assertEqual(alice.next_line(), "*** error: this server's rooms have 13 bans and "
                                                "exceptions already: lift some first")
            self.assertEqual(alice.next_line(), "*** #full2 lets one!*@* in despite its bans "
                                                "(set by alice)")
            with self.assertLogs(chat.log, logging.WARNING) as logs:
                self.restart_server()   # the state is saved at the stop, trimmed to fit
        self.assertIn("left out the modes or topics", "\n".join(logs.output))
        bob = self.connect("bob")
        bob.say("/op op secret", "/bans")
        self.assertRegex(bob.expect(r"\*\*\* ban .*"), r"\*\*\* ban 10\.1\.2\.3 .*a spammer")

    def test_scrolling_back_reads_the_logs_after_a_restart(self):
        alice = self.connect("alice")
        alice.say(*("line %02d" % number for number in range(1, 41)))
        alice.sync()
        self.restart_server()   # memory holds the last 5 again; the rest is on disk
        web = WsPeer(self.address)
        self.addCleanup(web.close)
        web.say("/nick webby")
        self.assertEqual(web.expect(type="room")["seq"], 40)
        self.assertEqual(len(web.expect(type="history")["lines"]), 5)

        def history(asked):
            """/history, asked again while the store is being read (reads are spaced)."""
            deadline = time.monotonic() + TIMEOUT
            while True:
                web.say("/history #lobby " + asked)
                event = web.event()
                while event["type"] not in ("history", "error"):
                    event = web.event()
                if event["type"] == "history" or time.monotonic() > deadline:
                    return event
                self.assertEqual(event["code"], "history_busy")
                time.sleep(0.05)   # polling, with a deadline
        for asked, expected in (("before 36 20", (list(range(16, 36)), True)),
                                ("after 30", (list(range(31, 41)), False)),
                                ("before 2", ([1], False))):
            found = history(asked)
            self.assertEqual(([line["seq"] for line in found["lines"]], found["more"]), expected)
        self.assertEqual(found["lines"][0]["text"], "line 01")
        with mock.patch.object(chat, "STORE_READ_GAP", 3600):   # reads of one member: spaced
            web.say("/history #lobby before 30", "/history #lobby after 37")
            self.assertEqual(web.expect(type="error")["code"], "history_busy")
            self.assertEqual(web.expect(type="history")["after"], 37)   # from memory: at once

    @unittest.skipUnless(POSIX, "modes are POSIX")
    def test_private_files_and_rotation(self):
        self.restart_server(log_max_bytes=200, history=5)   # 200 bytes: under 5 records
        alice = self.connect("alice")
        for number in range(20):   # a turn each: a log is rotated after a turn's write
            if number == 3:        # a restart goes on counting the records of the log
                self.restart_server(log_max_bytes=200, history=5)
                alice = self.connect("alice")
            alice.say("line %02d" % number)
            alice.sync()
        log_file = self.log_file("#lobby")
        self.assertFalse(os.path.exists(log_file))   # the 20th record made the 4th rotation
        with open(log_file + ".1", "rb") as older:
            self.assertEqual(older.read().count(b"\n"), 5)   # rotated, keeping the replay
        logs = {name for name in os.listdir(self.options["data_dir"]) if name.startswith("room-")}
        self.assertLessEqual(logs, {"room-%23lobby.log", "room-%23lobby.log.1"})   # two at most
        self.assertEqual(os.stat(self.options["data_dir"]).st_mode & 0o777, 0o700)
        for name in (log_file, log_file + ".1", os.path.join(self.options["data_dir"], "lock")):
            if os.path.exists(name):
                self.assertEqual(os.stat(name).st_mode & 0o777, 0o600, name)
        self.restart_server(log_max_bytes=200, history=5)
        bob = self.connect("bob")
        self.assertEqual(history_of(bob), ["<alice> line %02d" % number for number in range(15, 20)])

    def test_a_torn_last_record_is_skipped(self):
        self.stop_server()
        self.server.server_close()
        with open(self.log_file("#lobby"), "wb") as log_file:
            for text in ("first", "second"):
                log_file.write(json.dumps({"time": 1, "nick": "alice", "kind": "said",
                                           "text": text}).encode() + b"\n")
            log_file.write(b'{"time": 2, "nick": "alice", "ki')   # the server died here
        with self.assertLogs(chat.log, logging.WARNING) as logs:
            self.restart_server()
            bob = self.connect("bob")
        self.assertIn("skipped 1 record that cannot be read", "\n".join(logs.output))
        self.assertEqual(history_of(bob), ["<alice> first", "<alice> second"])
        with self.assertLogs(chat.log, logging.WARNING) as logs:
            bob.say("third")
            bob.sync()
            self.restart_server()
        self.assertIn("ended a torn record at the end", "\n".join(logs.output))
        carol = self.connect("carol")   # the line after the torn one was not lost with it
        self.assertEqual(history_of(carol), ["<alice> first", "<alice> second", "<bob> third"])

    def test_kept_state_edited_by_hand_is_read_as_far_as_it_can_be(self):
        self.stop_server()
        self.server.server_close()
        good = {"target": "10.0.0.1", "network": "10.0.0.1/32", "until": None,
                "reason": "spam", "by": "alice"}
        with open(os.path.join(self.options["data_dir"], "state.json"), "w") as state:
            json.dump({"topics": {"#lobby": "kept", "#dev": 7},
                       "bans": [dict(good, until="soon"), dict(good, network="nowhere"), [1], good]},
                      state)
        with self.assertLogs(chat.log, logging.WARNING) as logs:
            self.restart_server()
            bob = self.connect("bob")
        self.assertEqual(len([line for line in logs.output if "skipped a kept ban" in line]), 3)
        bob.say("/topic", "/op op secret", "/bans")
        self.assertEqual(bob.expect(r"\*\*\* topic .*"), "*** topic of #lobby: kept")
        self.assertEqual(bob.expect(r"\*\*\* (ban|no bans).*"),
                         "*** ban 10.0.0.1 (10.0.0.1/32) by alice, for good: spam")
        self.assertEqual(bob.sync(), [])   # one ban, and only one

    def stopped(self):
        self.stop_server()
        self.server.server_close()
        return self.options["data_dir"]

    def write_records(self, room, records):
        with open(self.log_file(room), "ab") as log_file:
            for record in records:
                log_file.write((record if isinstance(record, str) else json.dumps(record))
                               .encode("utf-8", "surrogatepass") + b"\n")

    def test_hostile_records_are_skipped_or_made_safe(self):
        self.stopped()
        good = {"time": 1, "nick": "alice", "kind": "said", "text": "fine"}
        self.write_records("#lobby", [
            dict(good, time="noon"), dict(good, time=1e20), '{"time": NaN, "nick": "a", '
            '"kind": "said", "text": "x"}', dict(good, nick="not a nick!"), [1, 2],
            dict(good, text="\x1b[2J\x07wiped\x1b]0;title\x07"), '{"time": 1, "nick": "alice",'
            ' "kind": "said", "text": "lone \\ud800 surrogate"}', dict(good, time=True),
            "[" * 100000, dict(good, text="x" * 70000), dict(good, text="tagged", tags=5),
            dict(good, text="big tags", tags="+a=" + " " * 5000), good])
        with open(os.path.join(self.options["data_dir"], "state.json"), "w") as state:
            state.write('{"topics": {"#lobby": "\\u001b[31mred"}, "bans": [{"target": "x", '
                        '"network": "10.0.0.0/8", "until": Infinity, "reason": "r", "by": "b"}]}')
        with self.assertLogs(chat.log, logging.WARNING):
            self.restart_server()
            bob = self.connect("bob")
        self.assertEqual(history_of(bob), ["<alice> wiped", "<alice> lone ? surrogate",
                                           "<alice> tagged", "<alice> big tags", "<alice> fine"])
        bob.say("/topic")
        self.assertEqual(bob.expect(r"\*\*\* topic .*"), "*** topic of #lobby: red")
        self.connect("carol").say("still here")   # a newcomer is not dropped by that room
        self.assertEqual(bob.expect(r"<carol> .*"), "<carol> still here")

    @unittest.skipUnless(hasattr(os, "mkfifo"), "needs FIFOs")
    def test_a_fifo_planted_in_the_data_directory_stalls_nothing(self):
        folder = self.stopped()
        os.mkfifo(os.path.join(folder, "state.json"))
        os.mkfifo(self.log_file("#dev"))
        with self.assertLogs(chat.log, logging.WARNING):
            self.restart_server()
            bob = self.connect("bob")
            bob.say("/join #dev", "said in dev")
            self.assertEqual(bob.sync(), ["*** you are in #dev: 1 online: @bob"])

    def test_a_state_nested_too_deep_is_skipped(self):
        folder = self.stopped()
        with open(os.path.join(folder, "state.json"), "w") as state:
            state.write('{"bans": ' + "[" * 200000)
        with self.assertLogs(chat.log, logging.WARNING):
            self.restart_server()
        self.connect("bob")

    @unittest.skipUnless(hasattr(os, "symlink") and POSIX, "needs symbolic links")
    def test_links_planted_in_the_data_directory_are_not_followed(self):
        folder = self.stopped()
        victim = os.path.join(self.data, "victim")
        with open(victim, "w") as file:
            file.write("precious")
        os.symlink(victim, os.path.join(folder, "state.json.new"))
        os.symlink(victim, self.log_file("#lobby"))
        with self.assertLogs(chat.log, logging.WARNING):
            self.restart_server()
            bob = self.connect("bob")
            bob.say("/topic a new topic", "a line for the log")
            bob.sync()
            self.restart_server()
        with open(victim) as file:
            self.assertEqual(file.read(), "precious")
        os.unlink(os.path.join(folder, "lock"))
        os.symlink(victim, os.path.join(folder, "lock"))
        self.stopped()
        with self.assertRaises(chat.StoreError):
            chat.FileStore(folder)
        with open(victim) as file:
            self.assertEqual(file.read(), "precious")

    @unittest.skipUnless(POSIX and hasattr(os, "geteuid") and os.geteuid() == 0,
                         "needs root to give the directory away")
    def test_a_data_directory_of_another_user_is_refused(self):
        folder = self.stopped()
        os.chown(folder, 65534, 65534)
        with self.assertRaisesRegex(chat.StoreError, "belongs to another user"):
            chat.FileStore(folder)

    def test_long_room_names_keep_their_history(self):
        bob = self.connect("bob")
        names = ["#" + "漢" * 30, "#" + "\U0001d400" * 30]   # CJK, and mathematical bold A
        for name in names:
            bob.say("/join " + name, "said in a long room")
            bob.sync()
        self.restart_server()
        carol = self.connect("carol")
        for name in names:
            carol.say("/join " + name)
            self.assertEqual(history_of(carol), ["<bob> said in a long room"])
        self.assertTrue(all(len(name) <= 255 for name in os.listdir(self.options["data_dir"])))

    def test_a_huge_log_is_read_from_its_tail(self):
        self.stopped()
        with open(self.log_file("#dev"), "wb") as log_file:
            log_file.truncate(1 << 30)   # a sparse gigabyte without a single newline
        with open(self.log_file("#lobby"), "wb") as log_file:
            log_file.truncate(1 << 30)   # a sparse gigabyte of old lines, then the last ones
            log_file.seek(0, os.SEEK_END)
            log_file.write(b"\n")
        self.write_records("#lobby", [{"time": 1, "nick": "alice", "kind": "said",
                                      "text": "line %d" % i} for i in range(10)])
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        started = time.process_time()
        self.restart_server()
        bob = self.connect("bob")
        self.assertEqual(history_of(bob), ["<alice> line %d" % i for i in range(5, 10)])
        bob.say("/join #dev", "said in dev")
        bob.expect(r"\*\*\* you are in #dev: .*")
        bob.sync()
        self.assertGreater(os.path.getsize(self.log_file("#dev")), 1 << 30)   # nothing cut
        self.assertLess(tracemalloc.get_traced_memory()[1], 32 << 20)
        self.assertLess(time.process_time() - started, 5)   # a whole read takes far more

    @unittest.skipUnless(os.path.isdir("/proc/self/fd"), "counts descriptors in /proc")
    def test_descriptors_and_topics_of_gone_rooms_are_bounded(self):
        self.server.options.max_rooms = 500
        before = len(os.listdir("/proc/self/fd"))
        with mock.patch.object(chat, "ROOM_CREATE_BURST", 1000):
            bob = self.connect("bob")
            for i in range(400):
                bob.say("/join #r%d" % i, "/topic topic %d" % i, "line")
            bob.sync()
        self.assertLess(len(os.listdir("/proc/self/fd")) - before, 2 * chat.OPEN_LOGS + 16)
        self.restart_server()   # the state is written when the server closes
        with open(os.path.join(self.options["data_dir"], "state.json")) as state:
            topics = json.load(state)["topics"]
        self.assertLessEqual(len(topics), chat.TOPICS_KEPT + 1)
        self.assertIn("#r399", topics)

    def test_a_data_directory_in_use_is_refused(self):
        with self.assertRaisesRegex(chat.StoreError, "in use by another server"):
            chat.ChatServer(chat.ServerOptions(host="127.0.0.1", port=0,
                                               data_dir=self.options["data_dir"]))

    def test_a_failing_disk_is_logged_and_the_chat_goes_on(self):
        os.mkdir(self.log_file("#lobby"))   # the log cannot be opened: EISDIR
        alice, bob = self.connect("alice"), self.connect("bob")
        with self.assertLogs(chat.log, logging.ERROR) as logs:
            alice.say("still here", "and here")
            self.assertEqual(bob.expect(r"<alice> .*"), "<alice> still here")
            self.assertEqual(bob.next_line(), "<alice> and here")
        self.assertEqual(len(logs.output), 1)   # once, not for every line
        self.assertIn("cannot write the log of #lobby", logs.output[0])


@unittest.skipUnless(POSIX, "kill -9 and resource limits are POSIX")
class CrashTest(unittest.TestCase):

    def setUp(self):
        self.data = tempfile.mkdtemp(prefix="chat-data-")
        self.addCleanup(shutil.rmtree, self.data, True)

    def peer(self, port, nick):
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.addCleanup(sock.close)
        peer = Peer(sock)
        peer.say("/nick " + nick)
        peer.expect(r"\*\*\* type /help for commands")
        return peer

    def test_kill_9_loses_nothing_that_was_relayed(self):
        server = ServerProcess(self, "--host", "127.0.0.1", "--rate", "0", "--data-dir", self.data)
        alice, bob = self.peer(server.port, "alice"), self.peer(server.port, "bob")
        lines = ["said before the crash %d" % number for number in range(10)]
        alice.say(*lines)
        bob.lines_until(r"<alice> said before the crash 9")
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(TIMEOUT)
        server = ServerProcess(self, "--host", "127.0.0.1", "--data-dir", self.data)
        carol = self.peer(server.port, "carol")
        self.assertEqual(history_of(carol), ["<alice> " + line for line in lines])

    def test_a_full_disk_is_logged_and_the_chat_goes_on(self):
        import resource

        def small_files():
            resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))
        server = ServerProcess(self, "--host", "127.0.0.1", "--rate", "0", "--data-dir",
                               self.data, preexec_fn=small_files)
        alice, bob = self.peer(server.port, "alice"), self.peer(server.port, "bob")
        alice.say(*("line %d %s" % (number, "x" * 50) for number in range(20)))
        self.assertEqual(bob.lines_until(r"<alice> line 19 .*")[-1][:15], "<alice> line 18")
        server.wait_for(r"cannot write the log of #lobby .*: File too large; the chat goes on")

    def test_a_second_server_on_the_same_data_directory_is_refused(self):
        ServerProcess(self, "--host", "127.0.0.1", "--data-dir", self.data)
        result = run_cli("server", "--host", "127.0.0.1", "--port", "0", "--data-dir", self.data)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr, "chat.py: the data directory %s is in use by another "
                                        "server\n" % self.data)


# --- IRC ---

class IrcPeer(Peer):
    """An IRC client on a raw socket."""

    def irc(self, *lines):
        self.send("".join(line + "\r\n" for line in lines).encode())

    def barrier(self):
        """The lines that arrived before the answer to a PING sent now."""
        self.irc("PING :barrier")
        return self.lines_until(r":\S+ PONG \S+ :barrier")

    def numeric(self, number):
        """Skip to the next numeric reply of that number; return its line."""
        return self.expect(r":\S+ %s .*" % number)

    def register(self, nick):
        """Register as modern clients do, and join #lobby as one set to do so does;
        return every line up to the end of the join."""
        self.irc("CAP LS 302", "NICK " + nick, "USER %s 0 * :%s the tester" % (nick, nick))
        self.expect(r":\S+ CAP \* LS :.*")
        self.irc("CAP END", "JOIN #lobby")
        return self.lines_until(r":\S+ 366 %s #lobby :.*" % re.escape(nick))


def irc_tagged(line):
    """({tag: value}, the rest) of a line from an IRC server, its tags parsed and
    unescaped as IRCv3 clients do."""
    if not line.startswith("@"):
        return {}, line
    tags, _, rest = line[1:].partition(" ")
    escapes = {"\\:": ";", "\\s": " ", "\\\\": "\\", "\\r": "\r", "\\n": "\n"}
    parsed = {}
    for tag in tags.split(";"):
        name, _, value = tag.partition("=")
        parsed[name] = re.sub(r"\\.?", lambda m: escapes.get(m.group(), m.group()[1:]), value)
    return parsed, rest


class IrcTest(ServerTestCase):
    """IRC clients on the same port, among everyone else."""

    options = {"greet_delay": 5.0, "history": 3}   # IRC clients speak first: never late

    def irc_peer(self, nick=None):
        peer = IrcPeer(self.wrap(socket.create_connection(self.address, timeout=TIMEOUT)))
        self.addCleanup(peer.sock.close)
        if nick:
            peer.register(nick)
        return peer

    def test_kick_in_pairs_and_whois_of_nobody(self):
        alice, bob, carol = self.irc_peer("alice"), self.irc_peer("bob"), self.irc_peer("carol")
        for peer in (alice, bob, carol):
            peer.irc("JOIN #k")
        alice.expect(r":carol!carol@chat JOIN #k")
        alice.irc("KICK #k,#k bob,carol :bye", "KICK #k,#k bob :no", "WHOIS nobody")
        self.assertEqual(alice.expect(r".* KICK .*"), ":alice!alice@chat KICK #k bob :bye")
        self.assertEqual(alice.next_line(), ":alice!alice@chat KICK #k carol :bye")
        self.assertEqual(alice.numeric("461"), ":testroom 461 alice KICK :Not as many channels "
                                               "as nicks")
        self.assertEqual(alice.numeric("401"), ":testroom 401 alice nobody :No such nick/channel")
        self.assertEqual(alice.next_line(), ":testroom 318 alice nobody :End of /WHOIS list")

    def test_invisible_users(self):
        evan, shiv = self.irc_peer("evan"), self.irc_peer("shiv")
        evan.irc("PART #lobby", "JOIN #xyz", "MODE evan +i", "MODE evan", "MODE evan +x")
        self.assertEqual(evan.expect(r".* MODE evan .*"), ":evan!evan@chat MODE evan +i")
        self.assertEqual(evan.numeric("221"), ":testroom 221 evan +i")
        self.assertEqual(evan.numeric("501"), ":testroom 501 evan :Unknown MODE flag")
        shiv.irc("WHO eva*", "WHO evan", "WHOIS evan")
        lines = shiv.lines_until(r":testroom 318 .*")
        self.assertEqual([line.split()[1] for line in lines if line.startswith(":testroom")],
                         ["315", "352", "315", "311", "312", "317"])   # by mask: no; by nick: yes
        shiv.irc("JOIN #xyz", "WHO eva*", "WHOIS evan")
        lines = shiv.lines_until(r":testroom 318 .*")
        self.assertIn(":testroom 319 shiv evan :@#xyz", lines)
        self.assertEqual(len([line for line in lines if " 352 " in line]), 1)

    def test_lines_that_are_not_utf8(self):
        bob = self.irc_peer("bob")
        peer = self.irc_peer()
        peer.send(b"NICK ann\r\nUSER ann 0 * :Ir\xe8ne\r\nPRIVMSG bob :caf\xe9\r\n"
                  b"PRIVMSG bob :caf\xc3\xa9\r\n")
        self.assertEqual(peer.expect(r".* FAIL .*"), ":testroom FAIL PRIVMSG INVALID_UTF8 :Not "
                         "sent: the line is not UTF-8 (the server announces UTF8ONLY)")
        self.assertEqual(bob.expect(r".* PRIVMSG .*"), ":ann!ann@chat PRIVMSG bob :caf\u00e9")
        peer.irc("WHOIS ann")
        self.assertEqual(peer.numeric("311"), ":testroom 311 ann ann ann chat * :Ir\ufffdne")

    def test_numbers_in_other_scripts_are_not_numbers(self):
        # "\u00b2" (a superscript two) passes str.isdigit() but not int(): it once cost
        # the connection, with a traceback in the log.
        peer = self.irc_peer("alice")
        peer.irc("LIST >\u00b2", "WHOWAS bob \u00b2", "JOIN #mine", "MODE #mine +l \u00b2")
        self.assertIn(":testroom 406 alice bob :There was no such nickname", peer.barrier())
        nc = self.connect("carol")
        nc.say("/join #own", "/mode +l \u00b2", "/mode +l 99999999999999999999", "/who")
        self.assertEqual(nc.expect(r"\*\*\* \d online: .*"), "*** 1 online: @carol")

    def test_registration_as_clients_expect_it(self):
        peer = self.irc_peer()
        peer.irc("CAP LS 302", "NICK alice", "USER alice 0 * :Alice Tester")
        self.assertEqual(peer.next_line(), ":testroom CAP * LS :" + IRC_CAPS)
        peer.irc("CAP REQ :multi-prefix sasl", "PING :held")
        self.assertEqual(peer.next_line(), ":testroom CAP * NAK :multi-prefix sasl")   # no sasl
        self.assertEqual(peer.next_line(), ":testroom PONG testroom :held")   # no 001 yet
        peer.irc("CAP END")
        lines = peer.lines_until(r":testroom 376 alice :End of /MOTD command")
        self.assertIn(":testroom 372 alice :- Everyone meets in #lobby: /join #lobby", lines)
        peer.irc("JOIN #lobby")   # nothing joined unasked, as on any IRC server
        lines += peer.lines_until(r":testroom 366 alice #lobby :End of /NAMES list")
        self.assertEqual(lines[0], ":testroom 001 alice :Welcome to testroom, alice!alice@chat")
        numbers = [line.split(" ")[1] for line in lines if line.startswith(":testroom ")]
        for number in ("002", "003", "004", "005", "251", "375", "353"):
            self.assertIn(number, numbers)
        isupport = " ".join(line for line in lines if " 005 " in line)
        for token in ("CASEMAPPING=", "CHANTYPES=#", "NICKLEN=20", "CHANNELLEN=31", "PREFIX=",
                      "NETWORK=testroom", "UTF8ONLY", "CHATHISTORY=200", "MAXLIST=b:50,e:50,I:50",
                      "CHANMODES=beI,k,l,imnst", "EXCEPTS", "INVEX", "TAGMSG:4", "WHOX",
                      "ELIST=MNU", "BOT=B",
                      "MSGREFTYPES=msgid,timestamp"):
            self.assertIn(token, isupport)
        self.assertNotIn("CLIENTTAGDENY", isupport)   # client tags are relayed
        self.assertIn(":alice!alice@chat JOIN #lobby", lines)
        self.assertIn(":testroom 353 alice = #lobby :alice", lines)
        self.assertFalse([line for line in lines if line.startswith("***")])

    def test_any_cap_subcommand_first_is_irc(self):
        peer = self.irc_peer()
        peer.irc("CAP LIST", "CAP NOTACOMMAND")
        self.assertEqual(peer.next_line(), ":testroom CAP * LIST :")
        self.assertEqual(peer.next_line(), ":testroom 410 * NOTACOMMAND :Invalid CAP command")

    def test_labeled_responses(self):
        """IRCv3 labeled-response: the answer to a labeled command carries its label (one
        line), is a labeled-response batch (several, a replay's batch nested in it), or is
        an ACK (none); nobody else ever sees the label."""
        bob = self.connect("bob")
        bob.say("said before")
        bob.sync()
        bar = self.irc_peer("bar")
        foo = self.irc_peer()
        foo.irc("CAP LS 302", "NICK foo", "USER foo 0 * :Foo",
                "CAP REQ :labeled-response batch echo-message server-time", "CAP END")
        foo.numeric("376")

        def answer(line):   # its lines, their tags but the time
            foo.irc(line)
            tagged = [irc_tagged(got) for got in foo.barrier()]
            return [({name: value for name, value in tags.items() if name != "time"}, rest)
                    for tags, rest in tagged]
        self.assertEqual(answer("@label=p1 PING :x"),
                         [({"label": "p1"}, ":testroom PONG testroom :x")])
        self.assertEqual(answer("@label=p2 PONG :x"), [({"label": "p2"}, ":testroom ACK")])
        self.assertEqual(answer("@label=p3 NOSUCH"),
                         [({"label": "p3"}, ":testroom 421 foo NOSUCH :Unknown command")])
        joined = answer("@a=b;label=p4 JOIN #lobby")
        self.assertEqual(joined[0][0], {"label": "p4"})
        start = joined[0][1].split()
        self.assertEqual(start[1:3] + start[3:], ["BATCH", start[2], "labeled-response"])
        self.assertRegex(start[2], r"^\+[A-Za-z0-9-]+$")
        outer = start[2][1:]
        self.assertEqual(joined[-1], ({}, ":testroom BATCH -" + outer))
        inside = joined[1:-1]
        self.assertEqual(inside[0], ({"batch": outer}, ":foo!foo@chat JOIN #lobby"))
        replay = [(tags, line) for tags, line in inside if tags.get("batch") != outer]
        self.assertEqual([line for _, line in replay], [":bob!bob@chat PRIVMSG #lobby :said before"])
        inner = replay[0][0]["batch"]
        self.assertIn(({"batch": outer}, ":testroom BATCH +%s chathistory #lobby" % inner), inside)
        self.assertIn(({"batch": outer}, ":testroom BATCH -" + inner), inside)
        self.assertTrue(all(tags for tags, _ in inside), inside)

        self.assertEqual(answer("@label=p5 PRIVMSG bar :hi"),
                         [({"label": "p5"}, ":foo!foo@chat PRIVMSG bar :hi")])
        self.assertEqual(bar.expect(r".*PRIVMSG bar .*"), ":foo!foo@chat PRIVMSG bar :hi")
        self.assertEqual(answer("@label=n1 NOTICE bar :note"),   # a NOTICE stays one
                         [({"label": "n1"}, ":foo!foo@chat NOTICE bar :note")])
        self.assertEqual(bar.expect(r".* bar :note"), ":foo!foo@chat NOTICE bar :note")
        to_self = answer("@label=p6 PRIVMSG foo :me")   # delivered, and echoed: one answers
        self.assertEqual(to_self, [({"label": "p6"}, ":foo!foo@chat PRIVMSG foo :me"),
                                   ({}, ":foo!foo@chat PRIVMSG foo :me")])
        self.assertEqual(answer("@label=p7 PRIVMSG #lobby :all"),
                         [({"label": "p7"}, ":foo!foo@chat PRIVMSG #lobby :all")])
        self.assertEqual(bar.expect(r".*PRIVMSG #lobby :all"), ":foo!foo@chat PRIVMSG #lobby :all")
        self.assertEqual(bob.expect(r"<foo> .*"), "<foo> all")
        for sent, label in (("@label=has;ok=no", "has"), ("@label=a\\sb", "a b")):
            self.assertEqual(answer(sent + " PING :o"),
                             [({"label": label}, ":testroom PONG testroom :o")])
        self.assertEqual(answer("@label=" + "x" * 65 + " PING :o"),
                         [({}, ":testroom PONG testroom :o")])
        plain = self.irc_peer()   # labels need batches too
        plain.irc("CAP LS 302", "NICK plain", "USER p 0 * :P", "CAP REQ :labeled-response",
                  "CAP END", "@label=p8 PING :y")
        self.assertEqual(plain.expect(r".* PONG .*"), ":testroom PONG testroom :y")
        foo.irc("CAP REQ :message-tags")
        foo.expect(r".* ACK :message-tags")
        to_self = answer("@label=t1;+r=x TAGMSG foo")   # client tags alone, the same way
        self.assertEqual([(tags.get("label"), tags["+r"], line) for tags, line in to_self],
                         [("t1", "x", ":foo!foo@chat TAGMSG foo"),
                          (None, "x", ":foo!foo@chat TAGMSG foo")])

    def test_server_time_msgids_batches_and_chathistory(self):
        bob = self.connect("bob")
        bob.say(*("line %d" % number for number in range(1, 7)))
        bob.sync()
        plain = self.irc_peer("plain")
        peer = self.irc_peer()
        peer.irc("CAP LS 302", "NICK eve", "USER eve 0 * :Eve", "CAP REQ :server-time "
                 "message-tags batch draft/chathistory echo-message", "CAP END", "JOIN #lobby")
        lines = [irc_tagged(line) for line in peer.lines_until(r":testroom 366 eve .*")]
        while not lines[-1][1].startswith(":testroom BATCH -"):
            lines.append(irc_tagged(peer.next_line()))
        batch = [(tags, line) for tags, line in lines if "batch" in tags]
        opened = [line for _, line in lines if " BATCH " in line]
        self.assertEqual(opened[0].split()[2:], ["+" + batch[0][0]["batch"], "chathistory",
                                                 "#lobby"])   # the replay: as said, in a batch
        self.assertEqual(opened[1], ":testroom BATCH -" + batch[0][0]["batch"])
        self.assertEqual([line for _, line in batch],
                         [":bob!bob@chat PRIVMSG #lobby :line %d" % n for n in (4, 5, 6)])
        for tags, _ in batch:
            self.assertRegex(tags["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        ids = {int(tags["msgid"].split("-")[0]): tags["msgid"] for tags, _ in batch}
        self.assertEqual(sorted(ids), [4, 5, 6])

        def history(*asked):
            peer.irc("CHATHISTORY " + " ".join(asked))
            found = []
            while True:
                tags, line = irc_tagged(peer.next_line())
                if line.startswith(":testroom BATCH -"):
                    return found
                if " FAIL " in line:
                    return line
                if "batch" in tags:
                    found.append(int(line.rpartition(" ")[2]))
        self.assertEqual(history("BEFORE #lobby msgid=" + ids[4], "10"), [1, 2, 3])
        self.assertEqual(history("AFTER #lobby msgid=" + ids[5], "10"), [6])
        self.assertEqual(history("LATEST #lobby * 2"), [5, 6])
        self.assertEqual(history("LATEST #lobby msgid=" + ids[4], "10"), [5, 6])
        self.assertEqual(history("AROUND #lobby msgid=" + ids[4], "3"), [3, 4, 5])
        self.assertEqual(history("BETWEEN #lobby msgid=" + ids[4], "msgid=" + ids[6], "9"), [5])
        self.assertEqual(history("BETWEEN #lobby msgid=" + ids[6], "msgid=" + ids[4], "9"), [5])
        self.assertEqual(history("AFTER #lobby timestamp=2000-01-01T00:00:00.000Z 2"), [1, 2])
        self.assertEqual(history("BEFORE #lobby timestamp=2999-01-01T00:00:00Z 2"), [5, 6])
        self.assertEqual(history("LATEST #elsewhere * 5"),
                         ":testroom FAIL CHATHISTORY INVALID_TARGET LATEST #elsewhere "
                         ":Messages could not be retrieved")
        self.assertEqual(history("BEFORE #lobby msgid=4-00000000 5"),   # another room's
                         ":testroom FAIL CHATHISTORY INVALID_PARAMS BEFORE "
                         ":Unknown message reference")
        self.assertEqual(history("LATEST bob * 5"), [])   # conversations are not kept
        self.assertIn("FAIL CHATHISTORY INVALID_PARAMS SIDEWAYS", history("SIDEWAYS #lobby * 5"))
        peer.irc("TAGMSG #lobby", "PRIVMSG #lobby :mine")   # a typing notice: no error
        tags, line = irc_tagged(peer.next_line())
        self.assertEqual((line, tags["msgid"].split("-")[0]),
                         (":eve!eve@chat PRIVMSG #lobby :mine", "7"))
        self.assertEqual(bob.expect(r"<eve> .*"), "<eve> mine")
        self.assertEqual(plain.expect(r".*PRIVMSG #lobby :mine"),
                         ":eve!eve@chat PRIVMSG #lobby :mine")   # no tags unasked
        bob.say("/msg eve just you")   # private: a time, and an id that is not a number
        tags, line = irc_tagged(peer.expect(r".*PRIVMSG eve .*"))
        self.assertEqual((sorted(tags), line),
                         (["msgid", "time"], ":bob!bob@chat PRIVMSG eve :just you"))
        self.assertEqual(history("AROUND #lobby msgid=" + tags["msgid"], "3"),
                         ":testroom FAIL CHATHISTORY INVALID_PARAMS AROUND "
                         ":Unknown message reference")

    def test_whox_answers_the_fields_asked_in_its_order(self):
        alice, bob = self.irc_peer("alice"), self.irc_peer("bob")
        alice.irc("AWAY :lunch")
        alice.numeric("306")
        bob.irc("WHO alice %tnfuar,42", "WHO alice %raufnt,42", "WHO alice %tn,1234",
                "WHO alice %il", "WHO #lobby %cnf", "WHO #lobby o%n", "WHO #lobby o",
                "WHO alice %zz")
        for _ in "12":
            self.assertEqual(bob.numeric("354"), ":testroom 354 bob 42 alice alice G 0 "
                                                 ":alice the tester")
        self.assertEqual(bob.numeric("354"), ":testroom 354 bob 0 alice")   # a bad token: 0
        self.assertRegex(bob.numeric("354"), r"^:testroom 354 bob 255\.255\.255\.255 \d+$")
        self.assertEqual(bob.lines_until(r":testroom 315 bob #lobby :.*")[1:],
                         [":testroom 354 bob #lobby alice G", ":testroom 354 bob #lobby bob H"])
        self.assertEqual(bob.next_line(), ":testroom 315 bob #lobby :End of /WHO list")
        self.assertEqual(bob.next_line(), ":testroom 315 bob #lobby :End of /WHO list")
        self.assertRegex(bob.next_line(), r"^:testroom 352 bob \* alice ")   # no field: plain

    def test_monitor_tells_when_watched_nicks_come_and_go(self):
        alice, bob = self.irc_peer("alice"), self.irc_peer("bob")
        alice.irc("MONITOR + bob,Carol,*!x@y,BOB,bob", "MONITOR L")   # each nick once

        def news():
            return alice.expect(r":testroom (432|73[0-4]) .*")
        self.assertEqual(news(), ":testroom 432 alice *!x@y :Erroneous nickname: "
                                            "a nick may contain only letters, digits, _ and -")
        self.assertEqual(news(), ":testroom 730 alice :bob")
        self.assertEqual(news(), ":testroom 731 alice :Carol")
        self.assertEqual(news(), ":testroom 732 alice :bob,Carol")
        self.assertEqual(news(), ":testroom 733 alice :End of MONITOR list")
        carol = self.connect("carol")   # from nc: a nick is a nick
        self.assertEqual(news(), ":testroom 730 alice :carol")
        bob.irc("NICK BOB", "NICK robert")   # a change of case is no news
        self.assertEqual(news(), ":testroom 731 alice :BOB")
        carol.say("/quit")
        self.assertEqual(news(), ":testroom 731 alice :carol")
        alice.irc("MONITOR - bob", "MONITOR S", "MONITOR + " + ",".join(
            "n%d" % n for n in range(120)))
        self.assertEqual(news(), ":testroom 731 alice :Carol")
        self.assertRegex(news(), r"^:testroom 734 alice 100 n99,n100,.*,n119 "
                                            r":Monitor list is full$")
        alice.irc("MONITOR L")
        offline = alice.lines_until(r":testroom 733 .*")
        listed = ",".join(line.split(":")[2] for line in offline if " 732 " in line)
        self.assertEqual(sorted(listed.split(",")), sorted(["Carol"] + ["n%d" % n for n in range(99)]))
        self.assertTrue(all(len(line.encode()) <= 510 for line in offline), offline)
        alice.irc("MONITOR + Carol")   # already watched: no room needed
        self.assertEqual(news(), ":testroom 731 alice :Carol")
        alice.irc("MONITOR C", "MONITOR L")
        self.assertEqual(alice.expect(r":testroom 73[23] .*"),
                         ":testroom 733 alice :End of MONITOR list")
        watcher = self.irc_peer("watcher")
        watcher.irc("MONITOR + dora")
        watcher.numeric("731")
        watcher.sock.close()   # a watcher that leaves is no longer told
        self.connect("dora")
        alice.irc("MONITOR + dora")
        self.assertEqual(alice.numeric("730"), ":testroom 730 alice :dora")

    def test_shared_replies_fit_512_bytes_whoever_reads_them(self):
        wide = "\U00020000"   # a letter of four bytes
        alice = self.irc_peer()
        alice.irc("NICK " + wide * 20, "USER a 0 * :" + wide * 50, "JOIN #" + wide * 30)
        alice.expect(r":\S+ 366 .*")
        bob = self.irc_peer()
        bob.irc("NICK " + "\U00020001" * 20, "USER b 0 * :b", "JOIN #" + wide * 30,
                "WHO #%s %%tcuihsnfdlaor,999" % (wide * 30), "WHO #" + wide * 30,
                "NAMES #" + wide * 30)
        lines = bob.lines_until(r":\S+ 315 .*") + bob.lines_until(r":\S+ 315 .*")
        lines += bob.lines_until(r":\S+ 366 .*")
        self.assertTrue([line for line in lines if " 354 " in line])
        self.assertTrue(all(len(line.encode()) <= 510 for line in lines),
                        max(len(line.encode()) for line in lines))

    def tags_peer(self, nick, caps="message-tags echo-message batch labeled-response"):
        peer = self.irc_peer()
        peer.irc("CAP LS 302", "NICK " + nick, "USER %s 0 * :x" % nick, "CAP REQ :" + caps,
                 "CAP END", "JOIN #lobby")
        peer.lines_until(r":testroom 366 %s .*" % nick)
        return peer

    def test_bot_mode_marks_a_program_wherever_irc_looks(self):
        bot, user = self.tags_peer("beep", "message-tags echo-message"), self.tags_peer("user")
        plain = self.irc_peer("plain")
        bot.irc("MODE beep +B", "MODE beep")
        self.assertEqual(bot.expect(r".* MODE beep .*"), ":beep!beep@chat MODE beep +B")
        self.assertEqual(bot.numeric("221"), ":testroom 221 beep +B")
        bot.irc("PRIVMSG #lobby :beep boop", "PRIVMSG user :psst")
        for peer, line in ((user, "#lobby :beep boop"), (user, "user :psst"),
                           (bot, "#lobby :beep boop")):
            tags, _ = irc_tagged(peer.expect(r".* PRIVMSG %s" % line))
            self.assertEqual(tags.get("bot"), "", (peer, line, tags))
        self.assertEqual(plain.expect(r".* PRIVMSG #lobby :beep boop"),
                         ":beep!beep@chat PRIVMSG #lobby :beep boop")   # no tags unasked
        user.irc("WHOIS beep", "WHO #lobby")
        self.assertEqual(user.numeric("335"), ":testroom 335 user beep :is a bot")
        who = [line for line in user.lines_until(r":testroom 315 .*") if " 352 " in line]
        self.assertEqual([line.split()[8] for line in who if line.split()[7] == "beep"], ["HB"])
        bot.irc("MODE beep -B+B-B+B-B", "PRIVMSG #lobby :a person again")   # told once
        self.assertEqual(bot.expect(r".* MODE beep .*"), ":beep!beep@chat MODE beep -B")
        tags, _ = irc_tagged(user.expect(r".* PRIVMSG #lobby :a person again"))
        self.assertNotIn("bot", tags)

    def test_client_tags_go_to_the_clients_that_read_them(self):
        """IRCv3 client-only tags (replies, reactions, typing notices) go with a message to
        the clients that took message-tags, checked and in one escaping; a TAGMSG reaches
        nobody else."""
        alice, bob = self.tags_peer("alice"), self.tags_peer("bob")
        plain, nc = self.irc_peer("plain"), self.connect("carol")
        web = WsPeer(self.address)
        self.addCleanup(web.close)
        web.say("/nick dave")
        web.expect(type="room")
        for peer in (alice, bob):
            peer.barrier()
        alice.irc("@+draft/reply=1-x;+react=a\\:b\\sc;label=l1;+bad=\x07;other=no;+typing;"
                  "+bad!key=1 PRIVMSG #lobby :hi")
        relayed = {"+draft/reply": "1-x", "+react": "a;b c", "+typing": ""}
        tags, line = irc_tagged(bob.expect(r".* PRIVMSG #lobby :hi"))
        self.assertEqual(({key: tags[key] for key in tags if key != "msgid"}, line),
                         (relayed, ":alice!alice@chat PRIVMSG #lobby :hi"))
        echo, _ = irc_tagged(alice.expect(r".* PRIVMSG #lobby :hi"))
        self.assertEqual(echo, dict(relayed, label="l1", msgid=tags["msgid"]))
        self.assertEqual(plain.expect(r".* PRIVMSG #lobby :hi"), ":alice!alice@chat PRIVMSG #lobby :hi")
        alice.irc("@+draft/react=\U0001f44d;label=l2 TAGMSG #lobby", "@+typing=active TAGMSG bob",
                  "@+typing=done TAGMSG plain,carol", "TAGMSG #lobby", "PRIVMSG #lobby :after")
        tags, line = irc_tagged(bob.next_line())
        self.assertEqual((sorted(tags), tags["+draft/react"], line),
                         (["+draft/react", "msgid"], "\U0001f44d", ":alice!alice@chat TAGMSG #lobby"))
        echo, _ = irc_tagged(alice.next_line())   # the labeled answer: its echo
        self.assertEqual(echo, dict(tags, label="l2"))
        tags, line = irc_tagged(bob.next_line())
        self.assertEqual((tags["+typing"], line), ("active", ":alice!alice@chat TAGMSG bob"))
        self.assertRegex(bob.next_line(), r".* PRIVMSG #lobby :after")   # a TAGMSG without tags:
        self.assertEqual(plain.next_line(), ":alice!alice@chat PRIVMSG #lobby :after")   # nothing
        self.assertEqual(nc.expect(r"<alice> .*"), "<alice> hi")
        self.assertEqual(nc.next_line(), "<alice> after")
        self.assertEqual([web.expect(type="said")["text"] for _ in "12"], ["hi", "after"])
        self.assertFalse([line for line in nc.sync() if "alice" in line])   # nothing more
        plain.irc("@+x=1 PRIVMSG #lobby :untagged")   # tags from a client that did not ask
        tags, line = irc_tagged(bob.expect(r".* PRIVMSG #lobby :untagged"))
        self.assertEqual(sorted(tags), ["msgid"])

    def test_client_tags_are_bounded_and_follow_the_rules_of_talk(self):
        alice, bob = self.tags_peer("alice"), self.tags_peer("bob")
        alice.barrier()
        alice.irc("@+big=%s TAGMSG #lobby" % ("a" * 4089))   # 4094 bytes of tags: the most
        tags, _ = irc_tagged(bob.expect(r".* TAGMSG #lobby"))
        self.assertEqual(len(tags["+big"]), 4089)
        alice.irc("@+big=%s TAGMSG #lobby" % ("a" * 4090), "@+big=%s PRIVMSG #lobby :%s" % (
            "a" * 4090, "b" * 400))
        self.assertEqual(alice.expect(r".* 417 .*"), ":testroom 417 alice :Input line was too long")
        self.assertEqual(alice.next_line(), ":testroom 417 alice :Input line was too long")
        alice.irc("JOIN #quiet", "MODE #quiet +m")
        bob.irc("JOIN #quiet")
        alice.expect(r":bob!bob@chat JOIN #quiet")
        bob.irc("@+typing=active TAGMSG #quiet", "@+r=1 TAGMSG #nowhere", "@+r=1 TAGMSG nobody")
        self.assertEqual(bob.expect(r":testroom 404 .*"),
                         ":testroom 404 bob #quiet :Cannot send to channel")
        self.assertEqual(bob.expect(r":testroom 401 .*"), ":testroom 401 bob #nowhere :No such nick/channel")
        self.assertEqual(bob.next_line(), ":testroom 401 bob nobody :No such nick/channel")
        alice.irc("@+a=b PRIVMSG bob :\u200b")   # words that tidy away are no TAGMSG
        self.assertFalse([line for line in alice.barrier() if "TAGMSG" in line])
        self.assertFalse([line for line in bob.barrier() if "alice" in line])
        alice.irc("IGNORE bob")
        alice.expect(r".*ignoring bob.*")
        bob.irc("@+typing=active TAGMSG #lobby", "@+typing=active TAGMSG alice")
        bob.expect(r"\S+ :bob!bob@chat TAGMSG #lobby")   # its echoes: both were sent
        bob.expect(r"\S+ :bob!bob@chat TAGMSG alice")
        self.assertFalse([line for line in alice.barrier() if "TAGMSG" in line])

    def test_a_message_relayed_whole_or_refused(self):
        alice, bob = self.irc_peer("alice"), self.irc_peer("bob")
        alice.expect(r":bob!bob@chat JOIN #lobby")
        room = 512 - len(":alice!alice@chat PRIVMSG bob :\r\n".encode())
        for payload in ("a" * room, "a" * (room - 4) + "\U0001f603"):
            alice.irc("PRIVMSG bob :" + payload)
            self.assertEqual(bob.next_line(), ":alice!alice@chat PRIVMSG bob :" + payload)
        alice.irc("PRIVMSG bob :" + "a" * (room + 1), "PRIVMSG bob,#lobby :" + "b" * (room - 3))
        self.assertEqual(alice.next_line(), ":testroom 417 alice :Input line was too long (it "
                                            "would not fit one line as relayed)")
        self.assertEqual(bob.next_line(), ":alice!alice@chat PRIVMSG bob :" + "b" * (room - 3))
        self.assertEqual(bob.next_line(), ":alice!alice@chat PRIVMSG #lobby :" + "b" * (room - 3))
        nc = self.connect("carol")
        nc.say("\u00e9" * 600)   # 1200 bytes from nc: in lines that fit, characters whole
        lines = [bob.expect(r":carol\S* PRIVMSG .*"), bob.next_line(), bob.next_line()]
        self.assertEqual("".join(line.partition(" :")[2] for line in lines), "\u00e9" * 600)
        self.assertTrue(all(len(line.encode()) <= 510 for line in lines))

    def test_away_notify_and_extended_join(self):
        bob = self.connect("bob")
        plain = self.irc_peer("plain")
        peer = self.irc_peer()
        peer.irc("CAP LS 302", "NICK eve", "USER eve 0 * :Eve Tester",
                 "CAP REQ :away-notify extended-join setname invite-notify", "CAP END",
                 "JOIN #lobby")
        self.assertIn(":eve!eve@chat JOIN #lobby * :Eve Tester",
                      peer.lines_until(r":testroom 366 eve .*"))
        bob.say("/away at lunch")
        self.assertEqual(peer.expect(r":bob\S* AWAY.*"), ":bob!bob@chat AWAY :at lunch")
        bob.say("/away")
        self.assertEqual(peer.next_line(), ":bob!bob@chat AWAY")
        carol = self.irc_peer()
        carol.irc("NICK carol", "USER carol 0 * :Carol C", "AWAY :not here", "JOIN #lobby")
        self.assertEqual(peer.next_line(), ":carol!carol@chat JOIN #lobby * :Carol C")
        self.assertEqual(peer.next_line(), ":carol!carol@chat AWAY :not here")
        carol.irc("SETNAME :Carol Cee", "SETNAME :")
        self.assertEqual(peer.expect(r".* SETNAME .*"), ":carol!carol@chat SETNAME :Carol Cee")
        self.assertEqual(carol.expect(r".* FAIL .*"), ":testroom FAIL SETNAME INVALID_REALNAME "
                                                      ":A real name must not be empty")
        peer.irc("JOIN #mine")
        carol.irc("JOIN #mine", "INVITE bob #mine", "WHOIS carol")
        self.assertEqual(peer.expect(r".* INVITE .*"), ":carol!carol@chat INVITE bob #mine")
        self.assertEqual(carol.numeric("311"), ":testroom 311 carol carol carol chat * :Carol Cee")
        lines = plain.barrier()   # neither shape for a client that did not ask
        self.assertIn(":carol!carol@chat JOIN #lobby", lines)
        self.assertFalse([line for line in lines if " AWAY" in line], lines)

    def test_capabilities_echo_multi_prefix_and_userhost_in_names(self):
        peer = self.irc_peer()
        peer.irc("CAP LS 302", "NICK eve", "USER eve 0 * :Eve")
        self.assertEqual(peer.next_line(), ":testroom CAP * LS :" + IRC_CAPS)
        peer.irc("CAP REQ :echo-message multi-prefix userhost-in-names", "CAP LIST", "CAP END")
        self.assertEqual(peer.next_line(), ":testroom CAP * ACK :echo-message multi-prefix "
                                           "userhost-in-names")
        self.assertEqual(peer.next_line(), ":testroom CAP * LIST :echo-message multi-prefix "
                                           "userhost-in-names")
        bob = self.connect("bob")
        peer.irc("JOIN #dev")
        bob.say("/join #dev")
        peer.expect(r":bob\S* JOIN #dev")
        peer.irc("MODE #dev +v eve", "NAMES #dev", "PRIVMSG #dev :echoed", "PRIVMSG bob :me too")
        self.assertEqual(peer.expect(r":testroom 353 .*"),
                         ":testroom 353 eve = #dev :@+eve!eve@chat bob!bob@chat")
        self.assertEqual(peer.expect(r":eve\S* PRIVMSG .*"), ":eve!eve@chat PRIVMSG #dev :echoed")
        self.assertEqual(peer.next_line(), ":eve!eve@chat PRIVMSG bob :me too")
        self.assertEqual(bob.expect(r"<eve> .*"), "<eve> echoed")
        peer.irc("CAP REQ :-echo-message", "PRIVMSG #dev :not echoed", "PING :end")
        self.assertEqual(peer.expect(r".* CAP .*"), ":testroom CAP eve ACK :-echo-message")
        self.assertEqual(peer.next_line(), ":testroom PONG testroom :end")

    def test_registration_and_nick_errors_as_rfc_2812_says(self):
        peer = self.irc_peer()
        peer.irc("NICK :", "NICK dave", "USER dave 0 * :", "PING :one")
        self.assertEqual(peer.next_line(), ":testroom 431 * :No nickname given")
        self.assertRegex(peer.next_line(), r":testroom 461 \* USER :Not enough parameters.*")
        self.assertEqual(peer.next_line(), ":testroom PONG testroom :one")
        peer.irc("USER dave 0 * :Dave")
        peer.expect(r":testroom 376 dave :.*")
        peer.irc("NICK dave", "NICK Dave", "OPER dave secret")
        self.assertEqual(peer.next_line(), ":dave!dave@chat NICK :Dave")   # nothing for "dave"
        self.assertEqual(peer.next_line(), ":testroom 491 Dave :No O-lines for your host")

    def test_who_by_channel_nick_and_mask(self):
        alice = self.irc_peer("alice")
        self.irc_peer("bob").irc("AWAY :lunch")
        alice.expect(r":bob\S* JOIN #lobby")
        wait_for(lambda: "lunch" in repr(self.server.run_in_loop(
            lambda: self.server.hub.find_member("bob").away)), message="bob away")
        alice.irc("WHO #lobby", "WHO bob", "WHO b*", "WHO nobody")
        self.assertEqual(alice.lines_until(r":testroom 315 alice #lobby :.*"), [
            ":testroom 352 alice #lobby alice chat testroom alice H :0 alice the tester",
            ":testroom 352 alice #lobby bob chat testroom bob G :0 bob the tester"])
        self.assertEqual(alice.lines_until(r":testroom 315 alice bob :.*"), [
            ":testroom 352 alice * bob chat testroom bob G :0 bob the tester"])
        self.assertEqual(alice.lines_until(r":testroom 315 alice b\* :.*"), [
            ":testroom 352 alice * bob chat testroom bob G :0 bob the tester"])
        self.assertEqual(alice.lines_until(r":testroom 315 alice nobody :.*"), [])

    def test_lusers_whowas_help_time_info_and_list(self):
        alice, bob = self.irc_peer("alice"), self.irc_peer("bob")
        bob.irc("JOIN #dev,#ops", "QUIT :bye")
        alice.expect(r":bob\S* QUIT .*")
        alice.irc("LUSERS", "WHOWAS bob", "WHOWAS nobody", "HELP PRIVMSG", "HELP NOPE", "TIME",
                  "INFO", "LIST >0", "WHOIS alice")
        lusers = alice.lines_until(r":testroom 266 .*")
        self.assertIn(":testroom 251 alice :There are 1 users and 0 invisible on 1 servers",
                      lusers)
        self.assertIn(":testroom 265 alice 1 2 :Current local users 1, max 2", lusers)
        self.assertEqual(alice.next_line(), ":testroom 314 alice bob bob chat * :bob the tester")
        self.assertRegex(alice.next_line(), r":testroom 312 alice bob testroom :\w+ .*")
        self.assertEqual(alice.next_line(), ":testroom 369 alice bob :End of WHOWAS")
        self.assertEqual(alice.next_line(), ":testroom 406 alice nobody :There was no such "
                                            "nickname")
        self.assertEqual(alice.next_line(), ":testroom 369 alice nobody :End of WHOWAS")
        self.assertRegex(alice.next_line(), r":testroom 704 alice PRIVMSG :.*")
        self.assertEqual(alice.next_line(), ":testroom 706 alice PRIVMSG :End of /HELP")
        self.assertEqual(alice.next_line(), ":testroom 524 alice NOPE :No help available on "
                                            "this topic")
        self.assertRegex(alice.next_line(), r":testroom 391 alice testroom :\w+ .*")
        self.assertEqual(alice.expect(r":testroom 374 .*"), ":testroom 374 alice :End of /INFO list")
        self.assertEqual(alice.next_line(), ":testroom 321 alice Channel :Users  Name")
        self.assertEqual(alice.next_line(), ":testroom 322 alice #lobby 1 :")   # not #dev: gone
        self.assertEqual(alice.next_line(), ":testroom 323 alice :End of /LIST")
        self.assertEqual(alice.expect(r":testroom 319 .*"), ":testroom 319 alice alice :#lobby")
        alice.irc("JOIN #dev,#d-v,#ops", "LIST *ev,#o?s,#d-v", "LIST !#d*", "LIST #D-V",
                  "LIST !*,<1,>0")

        def listed():
            return [line.split()[3] for line in alice.lines_until(r":testroom 323 .*")
                    if " 322 " in line]
        self.assertEqual(sorted(listed()), ["#d-v", "#dev", "#ops"])   # masks (ELIST=M)
        self.assertEqual(sorted(listed()), ["#lobby", "#ops"])          # not (ELIST=N)
        self.assertEqual(listed(), ["#d-v"])   # a name, in any case
        self.assertEqual(listed(), [])
        alice.irc("PART #d-v,#ops", "WHOIS alice", "KICK #dev alice")
        self.assertEqual(alice.expect(r":testroom 319 .*"), ":testroom 319 alice alice :#lobby @#dev")
        self.assertEqual(alice.expect(r":\S+ KICK .*"), ":alice!alice@chat KICK #dev alice :alice")

    def test_part_reasons_reach_irc_as_given_and_nc_marked(self):
        alice, carol = self.irc_peer("alice"), self.connect("carol")
        bob = self.irc_peer("bob")
        bob.irc("PART #lobby :server lost")
        self.assertEqual(alice.expect(r":bob\S* PART .*"), ":bob!bob@chat PART #lobby :server lost")
        self.assertEqual(carol.expect(r"\*\*\* bob left .*"), "*** bob left (part: server lost)")

    def test_nick_rules_are_those_of_every_dialect(self):
        self.connect("alice")
        peer = self.irc_peer()
        peer.irc("NICK alice", "NICK аӏісе", "NICK a.b", "NICK bob\u034f", "NICK bob",
                 "USER bob 0 * :Bob")
        self.assertEqual(peer.next_line(), ":testroom 433 * alice :Nickname is already in use")
        self.assertEqual(peer.next_line(), ":testroom 433 * аӏісе :Nickname looks like alice, "
                                           "who is online")
        self.assertRegex(peer.next_line(), r":testroom 432 \* a\.b :Erroneous nickname: .*")
        self.assertRegex(peer.next_line(), r":testroom 432 \* bob.? :Erroneous nickname: .*"
                                           r"invisible.*")
        self.assertEqual(peer.next_line(), ":testroom 001 bob :Welcome to testroom, bob!bob@chat")

    def test_malformed_and_early_input(self):
        peer = self.irc_peer()
        peer.irc("NICK", "JOIN #early", "USER x", "NICK early")
        self.assertEqual(peer.next_line(), ":testroom 461 * NICK :Not enough parameters")
        self.assertEqual(peer.next_line(), ":testroom 451 * :You have not registered")
        self.assertEqual(peer.next_line(), ":testroom 461 * USER :Not enough parameters")
        peer.irc("USER early 0 * :Early Bird", "JOIN #lobby")
        peer.lines_until(r":testroom 366 early #lobby :.*")
        peer.send(b":early PRIVMSG #lobby :with a prefix\rFROBNICATE\r\nPRIVMSG #lobby\r\n"
                  b"PRIVMSG\nPRIVMSG #nowhere :hi\nUSER again 0 * :x\n"
                  + b"PRIVMSG #lobby :" + b"x" * 5000 + b"\r\n")
        self.assertEqual(peer.next_line(), ":testroom 421 early FROBNICATE :Unknown command")
        self.assertEqual(peer.next_line(), ":testroom 412 early :No text to send")
        self.assertEqual(peer.next_line(), ":testroom 411 early :No recipient given")
        self.assertEqual(peer.next_line(), ":testroom 401 early #nowhere :No such nick/channel")
        self.assertEqual(peer.next_line(), ":testroom 462 early :You may not reregister")
        self.assertEqual(peer.next_line(), ":testroom 417 early :Input line was too long")
        bob = self.connect("bob")
        self.assertRegex(bob.next_line(), r"\*\*\* --- last 1 message .*")
        self.assertRegex(bob.next_line(), r"\*\*\* \[\d\d:\d\d\] <early> with a prefix")
        peer.irc("PRIVMSG #lobby trailing-without-colon")
        self.assertEqual(bob.expect(r"<early> .*"), "<early> trailing-without-colon")

    def test_irc_and_nc_users_talk_both_ways(self):
        alice = self.irc_peer("alice")
        bob = self.connect("bob")
        self.assertEqual(alice.expect(r":bob!.* JOIN .*"), ":bob!bob@chat JOIN #lobby")
        bob.say("hi from nc", "/me waves", "/msg alice psst")
        self.assertEqual(alice.next_line(), ":bob!bob@chat PRIVMSG #lobby :hi from nc")
        self.assertEqual(alice.next_line(), ":bob!bob@chat PRIVMSG #lobby :\x01ACTION waves\x01")
        self.assertEqual(alice.next_line(), ":bob!bob@chat PRIVMSG alice :psst")
        alice.irc("PRIVMSG #lobby :hi from IRC \x02bold\x02 \x0304red \x1b[2J",
                  "PRIVMSG #lobby :\x01ACTION nods\x01", "PRIVMSG bob :\x01VERSION\x01",
                  "PRIVMSG bob :private reply", "NOTICE #lobby :a notice")
        self.assertEqual(bob.expect(r"<alice> .*"), "<alice> hi from IRC bold red")
        self.assertEqual(bob.next_line(), "* alice nods")
        self.assertEqual(bob.next_line(), "*alice* private reply")   # the CTCP VERSION went nowhere
        self.assertEqual(bob.next_line(), "-alice- a notice")
        alice.irc("JOIN #dev", "PRIVMSG #dev :only in dev")
        alice.expect(r":testroom 366 alice #dev .*")
        self.assertEqual(bob.sync(), [])   # bob is not in #dev
        bob.say("/join #dev")
        self.assertEqual(bob.expect(r"\*\*\* \[\d\d:\d\d\] .*")[-19:], "<alice> only in dev")
        self.assertEqual(alice.expect(r":bob!.*"), ":bob!bob@chat PART #lobby :left for #dev")
        self.assertEqual(alice.next_line(), ":bob!bob@chat JOIN #dev")
        alice.irc("NICK alicia", "PART #dev :see you", "QUIT :gone home")
        self.assertEqual(alice.expect(r":alice!.*"), ":alice!alice@chat NICK :alicia")
        self.assertEqual(bob.lines_until(r"\*\*\* alicia left \(part: see you\)")[-1],
                         "*** alice is now known as alicia")
        self.assertEqual(alice.expect(r"ERROR .*"), "ERROR :Closing link: bye")

    def test_history_is_marked_as_past_and_lines_fit_512_bytes(self):
        bob = self.connect("bob")
        long_text = "ünïcödé " * 300   # 3600 bytes, most of them two-byte characters
        bob.say("earlier", long_text.strip())
        bob.sync()
        alice = self.irc_peer()
        lines = alice.register("alice") + alice.lines_until(r".* :--- end of history ---")
        lines.append(alice.transcript[-1])
        past = [line for line in lines if " NOTICE #lobby :" in line]
        self.assertEqual(past[0], ":testroom NOTICE #lobby :--- last 2 messages in #lobby ---")
        self.assertRegex(past[1], r":testroom NOTICE #lobby :\[\d\d:\d\d\] <bob> earlier$")
        self.assertEqual(past[-1], ":testroom NOTICE #lobby :--- end of history ---")
        bob.say(long_text.strip())
        bob.sync()
        said = alice.barrier()
        self.assertGreaterEqual(len(said), 7)
        for line in said:
            self.assertLessEqual(len(line.encode()) + 2, 512)
            self.assertTrue(line.startswith(":bob!bob@chat PRIVMSG #lobby :"), line)
        self.assertEqual("".join(line.split(" :", 1)[1] for line in said), long_text.strip())
        self.assertFalse([line for line in lines + said if re.search(r"127\.0\.0\.1", line)])

    def test_queries(self):
        alice, bob = self.irc_peer("alice"), self.connect("bob")
        alice.irc("JOIN #dev,#ops", "TOPIC #dev :ship it", "NAMES #lobby", "WHO #lobby",
                  "WHOIS bob", "LIST", "MODE #dev", "MODE #dev b", "MODE alice", "ISON bob nobody",
                  "USERHOST bob", "TOPIC #dev", "WHOIS nobody")
        self.assertEqual(alice.expect(r".* TOPIC .*"), ":alice!alice@chat TOPIC #dev :ship it")
        self.assertEqual(alice.numeric("353"), ":testroom 353 alice = #lobby :alice bob")
        self.assertEqual(alice.numeric("352"), ":testroom 352 alice #lobby alice chat testroom "
                                               "alice H :0 alice the tester")
        self.assertEqual(alice.numeric("311"), ":testroom 311 alice bob bob chat * :bob")
        self.assertEqual(alice.numeric("319"), ":testroom 319 alice bob :#lobby")
        self.assertEqual(alice.numeric("322"), ":testroom 322 alice #lobby 2 :")
        self.assertEqual(alice.numeric("324"), ":testroom 324 alice #dev +n")
        self.assertEqual(alice.numeric("368"), ":testroom 368 alice #dev :End of channel ban list")
        self.assertEqual(alice.numeric("221"), ":testroom 221 alice +")
        self.assertEqual(alice.numeric("303"), ":testroom 303 alice :bob")
        self.assertEqual(alice.numeric("302"), ":testroom 302 alice :bob=+bob@chat")
        self.assertEqual(alice.numeric("332"), ":testroom 332 alice #dev :ship it")
        self.assertEqual(alice.numeric("401"), ":testroom 401 alice nobody :No such nick/channel")
        bob.say("/topic")
        self.assertEqual(bob.expect(r"\*\*\* no topic .*"), "*** no topic is set in #lobby")

    def test_echoed_parameters_are_safe_and_fit_a_line(self):
        irc = self.irc_peer("ircy")
        irc.irc("CAP REQ :a\x00b\x07c", "PING :" + "p\x07" * 600, "NICK :two words!")
        self.assertEqual(irc.expect(r".* CAP .*"), ":testroom CAP ircy NAK :abc")
        pong = irc.expect(r".* PONG .*")
        self.assertNotIn("\x07", pong)
        self.assertLessEqual(len(pong.encode()) + 2, 512)
        self.assertRegex(irc.numeric("432"), r":testroom 432 ircy two_words! :Erroneous .*")

    def test_a_member_of_several_rooms_hears_a_nick_change_once(self):
        alice, carol = self.irc_peer("alice"), self.irc_peer("carol")
        for peer, nick in ((alice, "alice"), (carol, "carol")):
            peer.irc("JOIN #a,#b")
            peer.expect(r":testroom 366 %s #b .*" % nick)
        alice.barrier()
        carol.irc("NICK caroline", "QUIT :bye")
        carol.expect_closed()
        said = alice.barrier()
        self.assertEqual(said, [":carol!carol@chat NICK :caroline",
                                ":caroline!caroline@chat QUIT :quit: bye"])


class IrcAmplificationTest(ServerTestCase):
    """One connection's requests cannot make the server hold more than its queue limit
    of replies, however many targets or lines it sends without reading."""

    options = {"greet_delay": 5.0, "queue_limit": 32 * 1024}

    def test_requests_wait_while_their_replies_are_not_read(self):
        for i in range(60):
            self.connect("n%02d%s" % (i, "x" * 17))
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(TIMEOUT)
        sock.connect(self.address)
        self.addCleanup(sock.close)
        sock.sendall(b"NICK greedy\r\nUSER g 0 * :g\r\n")
        wait_for(lambda: self.member("greedy"), message="greedy to register")
        names = b"NAMES " + b",".join([b"#lobby"] * 500) + b"\r\n"
        sending = threading.Thread(target=lambda: self.send_quietly(sock, names * 4000),
                                   daemon=True)
        sending.start()   # about 17 MB of requests for some 80 MB of replies
        wait_for(lambda: self.member("greedy").backlog > 16 * 1024, message="a backlog")
        self.assertLess(self.server.stats()["backlog"], 32 * 1024 + 16 * 1024)
        self.assertTrue(sending.is_alive(), "the server read every request")

    @staticmethod
    def send_quietly(sock, data):
        try:
            sock.sendall(data)
        except OSError:
            pass

    def test_who_and_names_in_a_big_room_are_right_for_each_asker(self):
        alice = self.connect("alice")
        irc = IrcPeer(socket.create_connection(self.address, timeout=TIMEOUT))
        self.addCleanup(irc.sock.close)
        irc.register("ircy")
        for nick in ("ircy", "ircy2"):
            if nick == "ircy2":
                irc.irc("NICK ircy2")
                irc.expect(r":ircy!\S+ NICK :ircy2")
            irc.irc("WHO #lobby", "NAMES #lobby,#lobby,#lobby,#lobby,#lobby,#lobby")
            who = irc.lines_until(r":\S+ 315 %s #lobby :End of /WHO list" % nick)
            self.assertEqual(sorted(line.split()[7] for line in who), ["alice", nick])
            self.assertTrue(all(line.split()[2] == nick for line in who))
            names = irc.lines_until(r":\S+ 366 %s #lobby(,#lobby){5} :.*" % nick)
            self.assertEqual(len(names), 4)   # TARGMAX: four of the six, then one end
            self.assertTrue(all(" 353 %s = #lobby :" % nick in line for line in names))
        self.assertEqual(alice.sync(), ["*** ircy joined", "*** ircy is now known as ircy2"])


class IrcPasswordTest(ServerTestCase):

    options = {"greet_delay": 5.0, "password": "open sesame", "wrong_password_delay": 0.1}

    def test_pass_before_nick_and_user(self):
        peer = IrcPeer(socket.create_connection(self.address, timeout=TIMEOUT))
        self.addCleanup(peer.sock.close)
        peer.irc("PASS :open sesame", "NICK alice", "USER alice 0 * :A")
        self.assertEqual(peer.next_line(), ":testroom 001 alice :Welcome to testroom, "
                                           "alice!alice@chat")
        wrong = IrcPeer(socket.create_connection(self.address, timeout=TIMEOUT))
        self.addCleanup(wrong.sock.close)
        wrong.irc("PASS guess", "NICK bob", "USER bob 0 * :B")
        self.assertEqual(wrong.expect_closed(), [":testroom 464 * :Password incorrect",
                                                 "ERROR :Closing link: wrong password"])


class IrcKeepAliveTest(ServerTestCase):

    options = {"greet_delay": 5.0, "irc_ping_interval": 0.2, "irc_ping_timeout": 0.3}

    def test_the_server_pings_and_drops_who_never_answers(self):
        bob = self.connect("bob")
        alice = IrcPeer(socket.create_connection(self.address, timeout=TIMEOUT))
        self.addCleanup(alice.sock.close)
        alice.register("alice")
        self.assertEqual(alice.expect(r"PING .*"), "PING :testroom")
        alice.irc("PONG :testroom")
        self.assertEqual(alice.expect(r"PING .*"), "PING :testroom")   # alive: pinged again
        self.assertEqual(alice.expect_closed()[-1], "ERROR :Closing link: no answer to PING")
        self.assertEqual(bob.expect(r"\*\*\* alice left .*"), "*** alice left (ping timeout)")


class Tmux:
    """A program in a terminal of tmux's (its own tmux server), read off its screen."""

    def __init__(self, test, command, cols=120, rows=40):
        self.socket = "chat-test-%d-%d" % (os.getpid(), id(self))
        subprocess.run(["tmux", "-L", self.socket, "new-session", "-d", "-x", str(cols),
                        "-y", str(rows), command], check=True, env=child_env(TERM="xterm"))
        test.addCleanup(subprocess.run, ["tmux", "-L", self.socket, "kill-server"],
                        capture_output=True)

    def screen(self):
        return subprocess.run(["tmux", "-L", self.socket, "capture-pane", "-p", "-S", "-200"],
                              capture_output=True, text=True).stdout

    def type(self, text):
        subprocess.run(["tmux", "-L", self.socket, "send-keys", "-l", text], check=True)
        subprocess.run(["tmux", "-L", self.socket, "send-keys", "Enter"], check=True)

    def wait_for(self, pattern):
        deadline = time.monotonic() + TIMEOUT
        while not re.search(pattern, self.screen()):
            if time.monotonic() > deadline:
                raise AssertionError("no %r on the screen:\n%s" % (pattern, self.screen()))
            time.sleep(0.05)


class LineReader:
    """A subprocess's output, gathered line by line by a thread, waited for by pattern."""

    def __init__(self, stream):
        self.lines = []
        self.ended = False
        self._text = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), name="reader", daemon=True).start()

    def _read(self, stream):
        with stream:
            for raw in stream:
                text = raw.decode("utf-8", "replace")
                with self._changed:
                    self._text.append(text)
                    self.lines.append(text.rstrip("\r\n"))
                    self._changed.notify_all()
        with self._changed:
            self.ended = True
            self._changed.notify_all()

    def wait_for(self, pattern):
        """The first line that matches; AssertionError if none comes in time."""
        with self._changed:
            self._changed.wait_for(lambda: self.ended or self._find(pattern) is not None, TIMEOUT)
            found = self._find(pattern)
            if found is None:
                raise AssertionError("no line like %r in %r" % (pattern, self.lines[-10:]))
            return found

    def _find(self, pattern):
        return next((line for line in self.lines if re.search(pattern, line)), None)

    def text(self):
        """All of it, exactly, once the stream has ended."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.ended, TIMEOUT):
                raise AssertionError("the output never ended: %r" % self.lines[-10:])
            return "".join(self._text)


class RealIrcClientTest(ServerTestCase):
    """IRC clients from Debian join, talk with an nc user both ways and change rooms."""

    options = {"greet_delay": 5.0}

    @unittest.skipUnless(shutil.which("sic"), "sic is not installed")
    def test_sic(self):
        nina = self.connect("nina")
        nina.say("/join #dev")
        nina.expect(r"\*\*\* you are in #dev: .*")
        sic = subprocess.Popen(["sic", "-h", "127.0.0.1", "-p", str(self.address[1]), "-n", "sicko"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
        self.addCleanup(sic.stdout.close)
        self.addCleanup(sic.stdin.close)
        self.addCleanup(sic.wait, TIMEOUT)
        self.addCleanup(sic.kill)
        output = LineReader(sic.stdout)
        output.wait_for(r"376 \(sicko\)")

        def type_line(line):   # sic reads one line per wake-up: one at a time
            sic.stdin.write(line.encode() + b"\n")
            sic.stdin.flush()
        type_line(":j #dev")
        output.wait_for(r"366 \(sicko #dev\)")
        type_line(":m #dev hello from sic")
        self.assertEqual(nina.expect(r"<sicko> .*"), "<sicko> hello from sic")
        nina.say("hello sic, from nc")
        output.wait_for(r"<nina> hello sic, from nc")
        type_line(":l #dev")
        self.assertRegex(nina.expect(r"\*\*\* sicko left.*"), r"\*\*\* sicko left \(part.*\)")

    @unittest.skipUnless(shutil.which("irssi") and shutil.which("tmux"), "irssi or tmux missing")
    def test_irssi(self):
        home = tempfile.mkdtemp(prefix="chat-irssi-")
        self.addCleanup(shutil.rmtree, home, True)
        with open(os.path.join(home, "config"), "w") as config:
            config.write('settings = { "irc/core" = { cmd_queue_speed = "0"; };\n'
                         '  "fe-common/irc" = { group_multi_mode = "no"; }; };\n')   # modes at once
        nina = self.connect("nina")
        irssi = Tmux(self, "irssi --home=%s -n ircbob -c 127.0.0.1 -p %d"
                     % (home, self.address[1]))
        irssi.wait_for(r"End of /MOTD")
        irssi.type("/join #lobby")
        self.assertEqual(nina.expect(r"\*\*\* ircbob .*"), "*** ircbob joined")
        irssi.type("/window goto #lobby")
        irssi.wait_for(r"Total of 2 nicks")
        nina.say("hi irc folks")
        irssi.wait_for(r"< ?nina> hi irc folks")
        irssi.type("hello nina, from irssi")
        self.assertEqual(nina.expect(r"<ircbob> .*"), "<ircbob> hello nina, from irssi")
        irssi.type("/join #dev")   # IRC users may be in several rooms at once
        irssi.wait_for(r"Total of 1 nicks")
        nina.say("/join #dev")
        self.assertEqual(nina.expect(r"\*\*\* you are in #dev: .*"),
                         "*** you are in #dev: 2 online: @ircbob, nina")
        nina.say("in dev now")
        irssi.wait_for(r"< ?nina> in dev now")
        irssi.type("/me smiles")
        self.assertEqual(nina.expect(r"\* ircbob .*"), "* ircbob smiles")
        irssi.type("/op nina")   # the room's first member runs it, from irssi too
        self.assertEqual(nina.expect(r"\*\*\* ircbob gave .*"),
                         "*** ircbob gave nina operator status in #dev")
        nina.say("/mode +m", "/mode +b troll")
        irssi.wait_for(r"mode/#dev \[\+m\] by nina")
        irssi.wait_for(r"mode/#dev \[\+b troll!\*@\*\] by nina")
        irssi.type("/names")
        irssi.wait_for(r"\[@ircbob\] \[@nina\]")   # irssi's nick list has both operators
        irssi.type("/part")
        self.assertEqual(nina.expect(r"\*\*\* ircbob .*"), "*** ircbob left (part)")

    @unittest.skipUnless(shutil.which("weechat-headless"), "weechat-headless is not installed")
    def test_weechat(self):
        nina = self.connect("nina")
        nina.say("/join #dev")   # nina's room: she runs it
        nina.expect(r"\*\*\* you are in #dev: .*")
        weechat = WeeChat(self, self.address[1], "wbob", "#dev", "/msg nina hello from weechat")
        self.assertEqual(nina.expect(r".*hello from weechat"), "*wbob* hello from weechat")
        weechat.wait_for(r"Channel #dev: 2 nicks \(1 op, 0 voices, 1 normal\)")
        nina.say("/mode +o wbob", "/mode +mk sesame", "/mode +b troll", "modes set")
        weechat.wait_for(r"Mode #dev \[\+o wbob\] by nina")
        weechat.wait_for(r"Mode #dev \[\+mk sesame\] by nina|Mode #dev \[\+k sesame\] by nina")
        weechat.wait_for(r"Mode #dev \[\+b troll!\*@\*\] by nina")
        weechat.wait_for(r"@nina\tmodes set")
        nina.say("/kick wbob enough")
        weechat.wait_for(r"nina has kicked wbob \(enough\)")


class WeeChat:
    """weechat-headless (WeeChat with no screen, and here no FIFO or scripts) joined to
    room, after which it runs command; read back from the room's log, which it writes
    line by line."""

    def __init__(self, test, port, nick, room, command):
        home = tempfile.mkdtemp(prefix="chat-weechat-")
        test.addCleanup(shutil.rmtree, home, True)
        self.log = os.path.join(home, "logs", "irc.chatpy.%s.weechatlog" % room)
        server = "irc.server.chatpy."
        setup = ["/set logger.file.flush_delay 0", "/server add chatpy 127.0.0.1/%d" % port,
                 "/set %snicks %s" % (server, nick), "/set %sautojoin %s" % (server, room),
                 '/set %scommand "%s"' % (server, command), "/set %santi_flood_prio_high 0" % server,
                 "/set %sssl off" % server, "/set %stls off" % server,   # WeeChat 3 and 4 names
                 "/connect chatpy"]   # (its flood control would send a line each 2 s)
        proc = subprocess.Popen(["weechat-headless", "-d", home, "-r", ";".join(setup)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=child_env())
        test.addCleanup(proc.wait, TIMEOUT)
        test.addCleanup(proc.kill)
        self.room = room

    def text(self):
        try:
            with open(self.log, encoding="utf-8", errors="replace") as file:
                return file.read()
        except FileNotFoundError:
            return ""

    def wait_for(self, pattern):
        try:
            wait_for(lambda: re.search(pattern, self.text()))
        except AssertionError:
            raise AssertionError("no %r in WeeChat's log of %s:\n%s"
                                 % (pattern, self.room, self.text())) from None

# --- The browser: HTTP, WebSocket, the page ---

class WsPeer:
    """A WebSocket client on a raw socket, as a browser or a bot would be."""

    def __init__(self, address, origin=None, version="13", key=None, path="/ws", host=None):
        self.sock = socket.create_connection(address, timeout=TIMEOUT)
        self.key = key if key is not None else base64.b64encode(os.urandom(16)).decode()
        host = host or "%s:%d" % address[:2]
        lines = ["GET %s HTTP/1.1" % path, "Host: " + host, "Upgrade: websocket",
                 "Connection: Upgrade", "Sec-WebSocket-Version: " + version]
        if self.key:
            lines.append("Sec-WebSocket-Key: " + self.key)
        if origin:
            lines.append("Origin: " + origin)
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.data = b""
        while b"\r\n\r\n" not in self.data:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            self.data += chunk
        head, _, self.data = self.data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ")[1])
        self.headers = {name.lower(): value.strip() for name, _, value in
                        (line.partition(":") for line in lines[1:])}

    def close(self):
        self.sock.close()

    def frame(self, opcode, payload=b"", fin=True, mask=True, rsv=0):
        """The bytes of one client frame."""
        head = bytes(((0x80 if fin else 0) | rsv | opcode,))
        size = len(payload)
        length = size if size < 126 else (126 if size < 65536 else 127)
        head += bytes(((0x80 if mask else 0) | length,))
        if length == 126:
            head += size.to_bytes(2, "big")
        elif length == 127:
            head += size.to_bytes(8, "big")
        if not mask:
            return head + payload
        key = os.urandom(4)
        return head + key + bytes(byte ^ key[i % 4] for i, byte in enumerate(payload))

    def send(self, data):
        self.sock.sendall(data)

    def say(self, *lines):
        self.send(b"".join(self.frame(0x1, line.encode()) for line in lines))

    def _read(self, size):
        while len(self.data) < size:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("closed with %r left" % self.data)
            self.data += chunk
        got, self.data = self.data[:size], self.data[size:]
        return got

    def recv_frame(self):
        """(opcode, payload) of the next frame from the server (never masked)."""
        first, second = self._read(2)
        assert not second & 0x80, "the server masked a frame"
        size = second & 0x7F
        if size >= 126:
            size = int.from_bytes(self._read(2 if size == 126 else 8), "big")
        return first & 0x0F, self._read(size)

    def event(self):
        opcode, payload = self.recv_frame()
        if opcode != 0x1:
            return {"type": "frame", "opcode": opcode, "payload": payload}
        return json.loads(payload)

    def expect(self, **fields):
        """Skip events up to one with all these fields; return it."""
        while True:
            event = self.event()
            if all(event.get(name) == value for name, value in fields.items()):
                return event

    def close_code(self):
        """The code of the close frame that comes next, after any other frames."""
        while True:
            opcode, payload = self.recv_frame()
            if opcode == 0x8:
                return int.from_bytes(payload[:2], "big")


def http(address, request):
    """Send raw request bytes; return (status, headers, body) of the first response: to
    the end of its Content-Length, or of the stream."""
    with socket.create_connection(address, timeout=TIMEOUT) as sock:
        sock.sendall(request)
        return http_response(sock.makefile("rb"), request.partition(b" ")[0].decode("latin-1"))


def http_response(reader, method="GET"):
    """(status, headers, body) of the next response from a socket's file."""
    status = reader.readline()
    headers = {}
    for line in iter(reader.readline, b"\r\n"):
        if not line:
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.lower()] = value.strip()
    length = int(headers.get("content-length", -1)) if method != "HEAD" else 0
    body = reader.read(length) if length >= 0 else reader.read()
    return int(status.split(b" ")[1]), headers, body


class HttpTest(ServerTestCase):
    """The page and its headers; every other request gets the status it deserves."""

    def get(self, path="/", method="GET", extra=""):
        return http(self.address, ("%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n%s\r\n" % (
            method, path, self.address[1], extra)).encode())

    def test_the_page_and_its_headers(self):
        status, headers, body = self.get()
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], "text/html; charset=utf-8")
        self.assertEqual(headers["x-content-type-options"], "nosniff")
        self.assertEqual(headers["referrer-policy"], "no-referrer")
        self.assertEqual(int(headers["content-length"]), len(body))
        page = body.decode()
        script = re.search(r"<script>(.*)</script>", page, re.S).group(1)
        style = re.search(r"<style>(.*)</style>", page, re.S).group(1)
        csp = headers["content-security-policy"]
        for inline, directive in ((script, "script-src"), (style, "style-src")):
            digest = base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode()
            self.assertIn("%s 'sha256-%s'" % (directive, digest), csp)
        self.assertIn("default-src 'none'", csp)
        self.assertIn("ws://127.0.0.1:%d" % self.address[1], csp)
        self.assertNotRegex(page, r"(src|href)=\S*//")   # nothing fetched from elsewhere
        self.assertIn('name="viewport"', page)
        self.assertIn('aria-live="polite"', page)
        status, headers, body = self.get(method="HEAD")
        self.assertEqual((status, body, int(headers["content-length"])), (200, b"", len(page.encode())))
        status, _, _ = self.get(extra="If-None-Match: %s\r\n" % headers["etag"])
        self.assertEqual(status, 304)

    def test_other_requests(self):
        self.assertEqual(self.get("/secret")[0], 404)
        status, headers, _ = self.get(method="POST")
        self.assertEqual((status, headers["allow"]), (405, "GET, HEAD"))
        self.assertEqual(http(self.address, b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n")[0], 400)
        self.assertEqual(http(self.address, b"GET / HTTP/1.1\r\n\r\n")[0], 400)   # no Host
        self.assertEqual(self.get(extra="X-Big: %s\r\n" % ("b" * 9000))[0], 431)

    def test_only_known_host_names_are_served(self):
        for host in ("127.0.0.1:%d" % self.address[1], "[::1]:80", "localhost", "LOCALHOST.",
                     "app.localhost:8080", socket.gethostname()):
            self.assertEqual(http(self.address, (
                "GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host).encode())[0], 200, host)
        for host in ("rebind.example", "rebind.example:%d" % self.address[1], "127.0.0.1.evil",
                     "[::1].evil.example"):
            status, _, body = http(self.address, ("GET / HTTP/1.1\r\nHost: %s\r\n\r\n"
                                                  % host).encode())
            self.assertEqual(status, 421, host)
            self.assertIn(b"--web-host", body)
            web = WsPeer(self.address, host=host)
            self.addCleanup(web.close)
            self.assertEqual(web.status, 421)


class WebHostTest(ServerTestCase):

    options = {"web_hosts": ("Chat.Example",)}

    def test_names_given_with_web_host_are_served(self):
        for host, status in (("chat.example", 200), ("chat.example:7777", 200),
                             ("other.example", 421)):
            self.assertEqual(http(self.address, ("GET / HTTP/1.1\r\nHost: %s\r\n\r\n"
                                                 % host).encode())[0], status, host)

    def test_a_request_that_never_ends_is_cut_off_at_the_registration_timeout(self):
        self.server.options.register_timeout = 0.3
        with socket.create_connection(self.address, timeout=TIMEOUT) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")   # and nothing more
            self.assertEqual(sock.recv(100), b"")


class NoWebTest(ServerTestCase):

    options = {"web": False}

    def test_without_the_web_a_request_is_refused_not_chat(self):
        alice = self.connect("alice")
        status, _, body = http(self.address, b"POST / HTTP/1.1\r\nHost: x\r\n\r\nhello\n")
        self.assertEqual(status, 404)
        self.assertIn(b"no web page", body)
        self.assertEqual(alice.sync(), [])


def raw_exchange(address, *parts, gap=None):
    """Send parts (after waiting for gap, a regex the server's output must match first);
    return everything the server sent until it closed."""
    with socket.create_connection(address, timeout=TIMEOUT) as sock:
        data = b""
        if gap:
            while not re.search(gap.encode(), data):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        for part in parts:
            sock.sendall(part)
        try:
            sock.shutdown(socket.SHUT_WR)
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return data
                data += chunk
        except OSError:   # reset: the server closed before it read all this
            return data


class DialectDecisionTest(ServerTestCase):
    """Only a whole first line decides a dialect, and no HTTP or IRC registration
    bytes ever reach a room, however late, long or split they come."""

    def assert_room_heard_nothing(self, alice):
        heard = alice.sync()
        self.assertEqual(heard, [])
        self.assertEqual([room.members for room in self.server.rooms()], [("alice",)])

    def test_a_request_after_the_silent_greeting_is_closed_unanswered(self):
        alice = self.connect("alice")
        alice.say("hi")
        request = (b"GET / HTTP/1.1\r\nHost: x\r\nCookie: secret=1\r\n"
                   b"User-Agent: Chromium\r\n\r\n")
        got = raw_exchange(self.address, request, gap=r"type /help")
        self.assertNotIn(b"HTTP/1.1", got)
        self.assert_room_heard_nothing(alice)
        newcomer = self.connect("newcomer")
        self.assertNotIn("Cookie", " ".join(history_of(newcomer)))

    def test_a_late_irc_client_registers_and_nothing_is_said(self):
        alice = self.connect("alice")
        with socket.create_connection(self.address, timeout=TIMEOUT) as sock:
            irc = Peer(sock)
            irc.expect(r"\*\*\* type /help for commands")   # it was taken for nc
            irc.send(b"PASS its-password\r\nNICK late\r\nUSER late 0 * :Late\r\n")
            irc.expect(r":\S+ 001 late .*")
            irc.send(b"JOIN #lobby\r\n")
            self.assertEqual(alice.lines_until(r"\*\*\* late joined"), [])
        self.assertNotIn("PASS", " ".join(alice.sync()))

    def test_long_split_and_other_version_requests_are_never_chat(self):
        alice = self.connect("alice")
        form = b"POST /?" + b"a" * 17000 + b" HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain"
        form += b"\r\n\r\n/nick attacker\nhello from another site\n"
        self.assertEqual(http(self.address, form)[0], 414)
        for request in (b"GET / HTTP/1.2\r\nHost: x\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                        b"GET /x\r\n"):
            self.assertEqual(http(self.address, request)[0], 505, request)
        for request, status in ((b"GET /\xc3\xa9 HTTP/1.1\r\nHost: localhost\r\n\r\n", 404),
                                (b"GET\t/ HTTP/1.1\r\n\r\n", 400)):
            self.assertEqual(http(self.address, request)[0], status, request)
        with socket.create_connection(self.address, timeout=TIMEOUT) as sock:
            for byte in b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n":   # a byte at a time
                sock.send(bytes((byte,)))
            self.assertTrue(sock.recv(100).startswith(b"HTTP/1.1 200"))
        self.assert_room_heard_nothing(alice)

    def test_an_nc_line_that_looks_like_irc_is_chat(self):
        alice = self.connect("alice")
        peer = self.open_peer()
        peer.say("nick bob is here", "cap this")
        self.assertRegex(peer.next_line(), r"\*\*\* welcome to testroom, you are guest\d+")
        self.assertRegex(alice.next_line(), r"\*\*\* guest\d+ joined")
        self.assertRegex(alice.next_line(), r"<guest\d+> nick bob is here")

    def test_replies_reach_a_client_that_half_closed(self):
        got = raw_exchange(self.address, b"hello\n/who\n/quit\n")
        self.assertRegex(got.decode(), r"\*\*\* 1 online: guest\d+\n\*\*\* bye\n$")


class WebSocketTest(ServerTestCase):
    """RFC 6455, defensively: handshakes, framing rules, and chat with everyone else."""

    options = {"greet_delay": 5.0, "max_line": 1000, "history": 5}

    def ws(self, nick=None, **kwargs):
        peer = WsPeer(self.address, **kwargs)
        self.addCleanup(peer.close)
        if nick:
            self.assertEqual(peer.status, 101)
            peer.say("/nick " + nick)
            peer.expect(type="room")
        return peer

    def test_handshakes(self):
        good = self.ws()
        self.assertEqual(good.status, 101)
        expected = base64.b64encode(hashlib.sha1(
            (good.key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
        self.assertEqual(good.headers["sec-websocket-accept"], expected)
        same_site = self.ws(origin="http://127.0.0.1:%d" % self.address[1])
        self.assertEqual(same_site.status, 101)
        self.assertEqual(self.ws(origin="https://evil.example").status, 403)
        self.assertEqual(self.ws(origin="http://127.0.0.1:1").status, 403)
        wrong_version = self.ws(version="8")
        self.assertEqual((wrong_version.status, wrong_version.headers["sec-websocket-version"]),
                         (426, "13"))
        self.assertEqual(self.ws(key="").status, 400)
        self.assertEqual(self.ws(key="short").status, 400)
        plain = http(self.address, ("GET /ws HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n"
                                    % self.address[1]).encode())
        self.assertEqual(plain[0], 426)

    def test_chat_with_nc_users_both_ways(self):
        bob = self.connect("bob")
        bob.say("said before")
        web = self.ws()
        web.say("/nick webby")
        self.assertEqual(web.event(), {"type": "welcome", "server": "testroom", "nick": "webby"})
        self.assertEqual(web.event(), {"type": "room", "room": "#lobby", "topic": None,
                                       "modes": "n", "seq": 1,
                                       "count": 2, "members": ["bob", "webby"],
                                       "operators": [], "voiced": []})
        history = web.expect(type="history")
        self.assertEqual([(line["type"], line["nick"], line["text"]) for line in history["lines"]],
                         [("said", "bob", "said before")])
        self.assertEqual(bob.expect(r"\*\*\* webby .*"), "*** webby joined")
        web.say("hello from the web", "/me waves", "/msg bob psst", "/join #dev")
        self.assertEqual(bob.next_line(), "<webby> hello from the web")
        self.assertEqual(bob.next_line(), "* webby waves")
        self.assertEqual(bob.next_line(), "*webby* psst")
        events = [web.event() for _ in range(3)]   # its own lines come back, numbered
        self.assertEqual([(event["type"], event.get("seq"), event["text"]) for event in events],
                         [("said", 2, "hello from the web"), ("acted", 3, "waves"),
                          ("private", None, "psst")])
        sent = events[2]
        self.assertEqual((sent["to"], sent["text"], sent["sent"]), ("bob", "psst", True))
        web.expect(type="room", room="#dev")
        bob.say("/join #dev", "<script>alert(1)</script>", "/me \x1b[31mgrins")
        joined = web.expect(type="joined")
        self.assertEqual((joined["room"], joined["nick"]), ("#dev", "bob"))
        said = web.expect(type="said")
        self.assertEqual((said["nick"], said["text"], said["room"]),
                         ("bob", "<script>alert(1)</script>", "#dev"))
        self.assertRegex(said["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        self.assertEqual(web.expect(type="acted")["text"], "grins")
        web.say("/nick taken!")
        error = web.expect(type="error")
        self.assertEqual((error["code"], error["name"]), ("invalid_nick", "taken!"))
        web.say("/quit")
        self.assertEqual(web.expect(type="notice")["code"], "bye")
        self.assertEqual(web.close_code(), 1000)
        self.assertEqual(bob.expect(r"\*\*\* webby .*"), "*** webby left (quit)")

    def test_nobody_is_listed_twice(self):
        guest = self.open_peer()
        guest.say("")                  # a guest, not announced yet
        guest.expect(r"\*\*\* type /help for commands")
        web = self.ws("webby")
        nc = self.connect("ncuser")
        guest.say("now I speak")
        events = []
        while not events or events[-1].get("type") != "said":
            events.append(web.event())
        joined = [event["nick"] for event in events if event["type"] == "joined"]
        self.assertEqual(sorted(joined), ["guest1", "ncuser"])
        web.say("/who")
        who = web.expect(type="who")
        self.assertEqual(sorted(who["members"]), ["guest1", "ncuser", "webby"])
        self.assertEqual(nc.lines_until(r"<guest1> now I speak"), ["*** guest1 joined"])

    def test_fragments_control_frames_and_partial_reads(self):
        bob = self.connect("bob")
        web = self.ws("webby")
        bob.expect(r"\*\*\* webby joined")
        text = "ünïcödé".encode()
        web.send(web.frame(0x1, text[:3], fin=False) + web.frame(0x9, b"are you there")
                 + web.frame(0x0, text[3:8], fin=False) + web.frame(0x0, text[8:]))
        frame = web.recv_frame()
        while frame[0] == 0x1:   # the rest of the greeting
            frame = web.recv_frame()
        self.assertEqual(frame, (0xA, b"are you there"))   # the pong, mid-message
        self.assertEqual(bob.next_line(), "<webby> ünïcödé")
        frames = web.frame(0x1, b"one") + web.frame(0x1, b"two") + web.frame(0x1, b"three")
        for byte in frames[:10]:                 # a byte at a time, then the rest at once
            web.send(bytes((byte,)))
        web.send(frames[10:])
        self.assertEqual([bob.next_line() for _ in range(3)],
                         ["<webby> one", "<webby> two", "<webby> three"])

    def test_protocol_violations_close_with_the_right_code(self):
        cases = [
            (lambda w: w.frame(0x1, b"plain", mask=False), 1002),        # unmasked
            (lambda w: w.frame(0x1, b"x", rsv=0x40), 1002),              # a reserved bit
            (lambda w: w.frame(0x3, b"x"), 1002),                        # a reserved opcode
            (lambda w: w.frame(0x2, b"\x00\x01"), 1003),                 # binary
            (lambda w: w.frame(0x0, b"x"), 1002),                        # continuation first
            (lambda w: w.frame(0x1, b"a", fin=False) + w.frame(0x1, b"b"), 1002),
            (lambda w: w.frame(0x9, b"p" * 126), 1002),                  # a control frame > 125
            (lambda w: w.frame(0x1, b"x" * 1001), 1009),                 # over --max-line
            (lambda w: w.frame(0x1, b"\xc3", fin=False) + w.frame(0x0, b"(x"), 1007),
            (lambda w: w.frame(0x8, (1005).to_bytes(2, "big")), 1002),   # a reserved close code
            (lambda w: w.frame(0x8, b"\x03"), 1002),                     # a one-byte close
            (lambda w: w.frame(0x8, (1000).to_bytes(2, "big") + b"bye"), 1000),   # a clean close
        ]
        for make, code in cases:
            with self.subTest(code=code):
                web = WsPeer(self.address)
                self.addCleanup(web.close)
                web.say("/nick w%d" % len(self.server.connections()))
                web.expect(type="room")
                web.send(make(web))
                self.assertEqual(web.close_code(), code)
                self.assertEqual(web.sock.recv(100), b"")

    def test_a_long_message_header_is_refused_before_it_is_buffered(self):
        web = self.ws("webby")
        web.send(bytes((0x81, 0xFF)) + (1 << 40).to_bytes(8, "big"))   # claims a terabyte
        self.assertEqual(web.close_code(), 1009)


class PageApiTest(ServerTestCase):
    """What the page needs of its WebSocket: several rooms at once, where its lines go,
    pages of past lines by number, and a nick refused before it joins."""

    options = {"greet_delay": 5.0, "history": 5}

    def ws(self, *lines):
        peer = WsPeer(self.address)
        self.addCleanup(peer.close)
        peer.say(*lines)
        return peer

    def test_a_page_member_is_in_several_rooms(self):
        bob = self.connect("bob")
        bob.say("/join #dev")
        web = self.ws("/join #dev", "/join #ops", "/nick webby")
        self.assertEqual(web.event()["type"], "welcome")
        self.assertEqual([web.expect(type="room")["room"] for _ in range(2)], ["#dev", "#ops"])
        self.assertEqual(bob.expect(r"\*\*\* webby .*"), "*** webby joined")
        bob.say("/away at lunch")
        bob.expect(r"\*\*\* you are away: at lunch")
        self.assertEqual(web.expect(type="away"), {"type": "away", "room": "#dev", "nick": "bob",
                                                   "text": "at lunch"})
        web.say("/focus #ops", "to ops", "/focus #dev", "to dev", "/me nods")
        self.assertEqual(bob.next_line(), "<webby> to dev")   # nothing of #ops
        self.assertEqual(bob.next_line(), "* webby nods")
        self.assertEqual(sorted((event["room"], event["text"]) for event in   # grouped by room
                                (web.expect(type="said"), web.expect(type="said"))),
                         [("#dev", "to dev"), ("#ops", "to ops")])
        web.say("/focus #lobby")
        self.assertEqual(web.expect(type="error")["code"], "not_in_room")
        web.say("/rooms")
        rooms = web.expect(type="rooms")
        self.assertEqual(rooms["joined"], ["#dev", "#ops"])
        self.assertEqual({room["name"]: room["joined"] for room in rooms["rooms"]},
                         {"#dev": True, "#ops": True, "#lobby": False})
        web.say("/join #lobby", "/focus #dev", "/part")   # the focused room
        self.assertEqual(web.expect(type="left")["room"], "#dev")
        self.assertEqual(bob.expect(r"\*\*\* webby .*"), "*** webby left (part)")
        web.say("shown in the first room left", "/part #ops", "/part #lobby", "in no room")
        self.assertEqual(web.expect(type="said")["room"], "#ops")
        self.assertEqual([web.expect(type="left")["room"] for _ in range(2)], ["#ops", "#lobby"])
        self.assertEqual(web.expect(type="error")["code"], "error")
        bob.say("/msg webby still here?")
        self.assertEqual(web.expect(type="private")["text"], "still here?")

    def test_a_taken_nick_is_refused_before_joining(self):
        bob = self.connect("bob")
        web = self.ws("/nick Bob")
        error = web.event()
        self.assertEqual((error["type"], error["code"]), ("error", "nick_taken"))
        web.say("/nick b0b", "/nick webby")
        self.assertEqual(web.event()["code"], "nick_lookalike")
        self.assertEqual(web.event(), {"type": "welcome", "server": "testroom", "nick": "webby"})
        self.assertEqual(bob.expect(r"\*\*\* webby .*"), "*** webby joined")

    def test_a_taken_nick_on_a_password_server(self):
        self.restart_server(password="pw")
        bob = self.open_peer()
        bob.say("/pass pw", "/nick bob")
        bob.expect(r"\*\*\* type /help for commands")
        web = self.ws("/nick bob")
        self.assertEqual(web.event()["code"], "password_required")
        web.say("/pass pw")
        self.assertEqual(web.event()["code"], "nick_taken")
        web.say("/nick webby")
        self.assertEqual(web.event()["type"], "welcome")

    def test_pages_of_past_lines_by_number(self):
        alice = self.connect("alice")
        alice.say(*("line %02d" % number for number in range(1, 31)))
        alice.sync()
        web = self.ws("/nick webby")
        replay = web.expect(type="history")
        self.assertEqual(([line["seq"] for line in replay["lines"]], replay["more"]),
                         ([26, 27, 28, 29, 30], True))

        def page(line):
            web.say(line)
            found = web.expect(type="history")
            return [entry["seq"] for entry in found["lines"]], found["more"]
        self.assertEqual(page("/history #lobby before 26 10"), (list(range(16, 26)), True))
        self.assertEqual(page("/history after 27"), ([28, 29, 30], False))
        self.assertEqual(page("/history #lobby after 20 4"), ([21, 22, 23, 24], True))
        self.assertEqual(page("/history before 3"), ([1, 2], False))
        self.assertEqual(page("/history 2"), ([29, 30], True))
        for wrong in ("/history before", "/history #lobby before x", "/history after \u00b2",
                      "/history 1 2", "/history before 99999999999999999999"):
            web.say(wrong)
            self.assertEqual(web.expect(type="error")["code"], "usage", wrong)
        web.say("/history #nowhere")
        self.assertEqual(web.expect(type="error")["code"], "not_in_room")
        alice.expect(r"\*\*\* webby joined")
        alice.say("/history before 3")
        self.assertEqual([HISTORY_ENTRY.sub("", line) for line in
                          alice.lines_until(r"\*\*\* --- end of history ---")], [
            "*** --- 2 messages of #lobby, numbered 1 to 2 ---", "<alice> line 01",
            "<alice> line 02"])
        alice.say("/history after 30")
        self.assertEqual(alice.next_line(), "*** --- no such lines in #lobby ---")


class WebFloodTest(ServerTestCase):

    options = {"greet_delay": 5.0, "rate": 50, "burst": 5, "flood_lag": 0.2}

    def test_flood_control_applies_to_browsers(self):
        web = WsPeer(self.address)
        self.addCleanup(web.close)
        web.say("/nick flood")
        web.expect(type="room")
        web.say(*("line %d" % i for i in range(200)))
        self.assertEqual(web.expect(type="error")["code"], "excess_flood")
        self.assertEqual(web.close_code(), 1008)

    def test_pings_and_empty_fragments_count_as_messages_before_any_password(self):
        for flood in (lambda w: w.frame(0x9, b"p"), lambda w: w.frame(0x0, b"", fin=False),
                      lambda w: w.frame(0xA, b"")):
            web = WsPeer(self.address)
            self.addCleanup(web.close)
            web.send(web.frame(0x1, b"", fin=False) + flood(web) * 300)
            self.assertEqual(web.close_code(), 1008)


class WebSocketBoundsTest(ServerTestCase):
    """Without flood control, frames are still bounded: fragments by the message limit,
    and a read of many tiny frames costs time linear in its size."""

    options = {"greet_delay": 5.0, "max_line": 1000}

    def test_endless_empty_fragments_end_at_the_message_limit(self):
        web = WsPeer(self.address)
        self.addCleanup(web.close)
        web.send(web.frame(0x1, b"", fin=False) + web.frame(0x0, b"", fin=False) * 200000)
        self.assertEqual(web.close_code(), 1009)

    def test_a_ping_storm_is_answered_without_stalling_the_loop(self):
        bob = self.connect("bob")
        web = WsPeer(self.address)
        self.addCleanup(web.close)
        count = 60000
        threading.Thread(target=web.send, args=(web.frame(0x9, b"") * count,),
                         daemon=True).start()
        for _ in range(count):
            self.assertEqual(web.recv_frame(), (0xA, b""))
        self.assertEqual(bob.sync(), [])

    def test_a_cjk_close_reason_is_cut_at_a_character(self):
        frame = chat.ws_close(1008, "踢" * 100)
        self.assertEqual(len(frame), 2 + 2 + 123 // 3 * 3)
        frame[4:].decode("utf-8")


class Chromium:
    """Headless Chromium driven over its DevTools pipe (fds 3 and 4). One process serves
    every test that needs a browser (started by the first, ended with the module): each
    test gets a tab in a browser context of its own, as fresh as a new profile."""

    running = None

    @classmethod
    def tab(cls, test, width=1280, height=800, mobile=False):
        if cls.running is None or cls.running.proc.poll() is not None:
            cls.running = cls()
        return Tab(test, cls.running, width, height, mobile)

    @classmethod
    def stop(cls):
        if cls.running is not None:
            cls.running.close()
            cls.running = None

    def __init__(self):
        self.profile = tempfile.mkdtemp(prefix="chat-chromium-")
        commands_r, self.commands = os.pipe()
        self.replies_r, replies_w = os.pipe()
        flags = ("--headless --no-sandbox --disable-gpu --disable-quic --no-first-run "
                 "--disable-background-networking --disable-component-update --disable-sync "
                 "--user-data-dir=%s --remote-debugging-pipe about:blank" % self.profile)
        self.proc = subprocess.Popen(
            ["bash", "-c", "exec %s %s 3<&%d 4>&%d" % (CHROMIUM, flags, commands_r, replies_w)],
            pass_fds=(commands_r, replies_w), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env())
        os.close(commands_r)
        os.close(replies_w)
        self.replies = {}
        self._changed = threading.Condition()
        self._ids = itertools.count(1)
        threading.Thread(target=self._read, name="devtools", daemon=True).start()

    def _read(self):
        data = b""
        while True:
            chunk = os.read(self.replies_r, 1 << 20)
            if not chunk:
                return
            data += chunk
            while b"\0" in data:
                message, data = data.split(b"\0", 1)
                reply = json.loads(message)
                if "id" in reply:
                    with self._changed:
                        self.replies[reply["id"]] = reply
                        self._changed.notify_all()

    def call(self, method, session=None, **params):
        number = next(self._ids)
        message = {"id": number, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        with self._changed:
            if not self._changed.wait_for(lambda: number in self.replies, TIMEOUT):
                raise AssertionError("Chromium did not answer %s" % method)
            reply = self.replies.pop(number)
        if "error" in reply:
            raise AssertionError("Chromium: %s" % reply["error"])
        return reply["result"]

    def close(self):
        try:
            self.call("Browser.close")   # its helper processes end with it, none left over
            self.proc.wait(TIMEOUT)
        except (AssertionError, OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        os.close(self.commands)
        self.proc.wait(TIMEOUT)
        os.close(self.replies_r)
        shutil.rmtree(self.profile, True)


class Tab:
    """A page of the browser, in a context of its own, and what a person does in it."""

    def __init__(self, test, browser, width, height, mobile):
        self.browser = browser
        self.context = browser.call("Target.createBrowserContext")["browserContextId"]
        test.addCleanup(self.close)
        target = browser.call("Target.createTarget", url="about:blank",
                              browserContextId=self.context)["targetId"]
        self.session = browser.call("Target.attachToTarget", targetId=target,
                                    flatten=True)["sessionId"]
        self.page("Page.enable")   # for scripts added to every new document
        self.resize(width, height, mobile)

    def call(self, method, **params):
        return self.browser.call(method, **params)

    def grant(self, origin, permissions):
        self.call("Browser.grantPermissions", origin=origin, permissions=permissions,
                  browserContextId=self.context)

    def close(self):
        if self.browser.proc.poll() is None:
            self.call("Target.disposeBrowserContext", browserContextId=self.context)

    def page(self, method, **params):
        return self.browser.call(method, self.session, **params)

    def resize(self, width, height, mobile=False):
        self.page("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=2 if mobile else 1, mobile=mobile)

    def js(self, expression):
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError("JavaScript failed: %s" % result["exceptionDetails"])
        return result["result"].get("value")

    def wait(self, expression):
        deadline = time.monotonic() + TIMEOUT
        while not self.js(expression):
            if time.monotonic() > deadline:
                raise AssertionError("never true in the page: %s; the log: %r" % (
                    expression, self.js("document.getElementById('log').innerText")[-600:]))
            time.sleep(0.03)

    def open(self, url):
        self.page("Page.navigate", url=url)
        self.wait("document.readyState === 'complete' && !!document.getElementById('nick')")

    def reload(self):
        self.page("Page.reload")
        self.wait("document.readyState === 'complete' && !!document.getElementById('nick')")

    # What a person does

    def login(self, nick, password="", op_password=""):
        self.wait("!document.getElementById('login').hidden")
        self.js("document.getElementById('nick').value = %s;"
                "document.getElementById('password').value = %s;"
                "document.getElementById('op-password').value = %s;"
                "document.getElementById('login-form').requestSubmit()"
                % (json.dumps(nick), json.dumps(password), json.dumps(op_password)))

    def type(self, text):
        self.js("document.getElementById('line').value = %s;"
                "document.getElementById('send').requestSubmit()" % json.dumps(text))

    def reading(self):
        return self.js("document.getElementById('title').textContent")

    def log_lines(self):
        """The text of the lines in the log being read, without their times."""
        return self.js("[...document.querySelectorAll('#log .msg')].map(d => "
                       "d.textContent.slice(d.querySelector('time').textContent.length))")

    def sidebar(self):
        """{view name: what a screen reader says of it} for rooms and conversations, in order."""
        return self.js("Object.fromEntries([...document.querySelectorAll('#rooms .view, #queries .view')]"
                       ".map(b => [b.querySelector('.name').textContent, b.querySelector('.name').textContent"
                       " + b.querySelector('.sr-only').textContent]))")

    def choose(self, name):
        self.js("[...document.querySelectorAll('.view')].find(b => "
                "b.querySelector('.name').textContent === %s).click()" % json.dumps(name))
        self.wait("document.getElementById('title').textContent === %s" % json.dumps(name))



@unittest.skipUnless(CHROMIUM and shutil.which("bash"), "Chromium is not installed")
class PageTestCase(ServerTestCase):
    """The page in a real browser, with nc users; each test its own Chromium and profile."""

    DEFAULTS = dict(ServerTestCase.DEFAULTS, greet_delay=5.0)

    def setUp(self):
        super().setUp()
        self.url = "http://127.0.0.1:%d/" % self.address[1]

    def nc(self, nick, *rooms, password=None):
        """An nc user called nick, in the last of rooms (or #lobby)."""
        peer = self.open_peer()
        if password:
            peer.say("/pass " + password)
        peer.say("/nick " + nick)
        peer.expect(r"\*\*\* type /help for commands")
        for room in rooms:
            peer.say("/join " + room)
            peer.expect(r"\*\*\* you are in %s: .*" % re.escape(room))
        return peer

    def browser(self, url=None, **size):
        browser = Chromium.tab(self, **size)
        browser.open(url or self.url)
        return browser

    def logged_in(self, nick="webby", **size):
        browser = self.browser(**size)
        browser.login(nick)
        browser.wait("document.getElementById('login').hidden && "
                     "document.getElementById('title').textContent === '#lobby'")
        return browser

    @staticmethod
    def lines_of(browser, pattern):
        return [line for line in browser.log_lines() if re.search(pattern, line)]


class PageRoomsTest(PageTestCase):

    def test_several_rooms_with_unread_counts_as_nc_users_talk(self):
        bob, carol = self.nc("bob", "#dev"), self.nc("carol", "#ops")
        page = self.logged_in()
        page.type("/join #dev")
        page.wait("document.getElementById('title').textContent === '#dev'")
        page.wait("document.getElementById('members').innerText.includes('bob')")
        self.assertEqual(bob.expect(r"\*\*\* webby .*"), "*** webby joined")
        page.type("/join #ops")
        page.wait("document.getElementById('title').textContent === '#ops'")
        self.assertEqual(list(page.sidebar()), ["#lobby", "#dev", "#ops"])
        page.type("hello ops")   # after a switch: /focus first, then the line
        self.assertEqual(carol.expect(r"<webby> .*"), "<webby> hello ops")
        page.wait("document.querySelectorAll('#log .msg.mine').length === 1")   # shown once, as it came back
        bob.say("first in dev", "second in dev")
        page.wait("document.title === '(2) #ops - chat'")
        self.assertEqual(page.sidebar()["#dev"], "#dev, 2 unread")
        bob.say("webby: are you there?")
        page.wait("document.title.startsWith('(3) ')")
        self.assertEqual(page.sidebar()["#dev"], "#dev, 3 unread, you were mentioned")
        self.assertEqual(page.js("document.querySelector('#rooms li:nth-child(2) .badge').textContent"), "@3")
        carol.say("more in ops")   # the room being read: nothing unread
        page.wait("document.getElementById('log').innerText.includes('more in ops')")
        self.assertEqual(page.sidebar()["#ops"], "#ops")
        page.js("document.dispatchEvent(new KeyboardEvent('keydown', {key: 'ArrowUp', altKey: true}))")
        self.assertEqual(page.reading(), "#dev")   # Alt+Up: the room above
        self.assertEqual(page.sidebar()["#dev"], "#dev")
        self.assertEqual(page.js("document.title"), "#dev - chat")
        self.assertEqual(page.js("document.querySelector('#log .marker').nextElementSibling.textContent.endsWith('first in dev')"), True)
        self.assertEqual(self.lines_of(page, "webby: are you there"), ["bob: webby: are you there?"])
        self.assertEqual(page.js("document.querySelectorAll('#log .mention').length"), 1)
        page.type("back in dev")
        self.assertEqual(bob.expect(r"<webby> .*"), "<webby> back in dev")
        page.js("document.querySelector('#rooms li:nth-child(3) .close').click()")   # leave #ops: one tap
        self.assertEqual(carol.expect(r"\*\*\* webby .*"), "*** webby left (part)")
        page.wait("!document.getElementById('rooms').innerText.includes('#ops')")
        page.type("/part")   # leaves the room being read
        self.assertEqual(bob.expect(r"\*\*\* webby .*"), "*** webby left (part)")
        page.wait("document.getElementById('title').textContent === '#lobby'")
        self.assertEqual(json.loads(page.js("localStorage.getItem('chat-rooms')")), ["#lobby"])

    def test_a_guest_keeps_its_name_across_a_reload(self):
        bob = self.nc("bob")
        page = self.logged_in("")   # no nick: the server names a guest
        guest = bob.expect(r"\*\*\* guest\d+ joined").split()[1]
        page.wait("document.getElementById('log').innerText.includes('you are %s')" % guest)
        page.reload()
        page.wait("document.getElementById('login').hidden && "
                  "document.getElementById('log').innerText.includes('you are %s')" % guest)
        bob.say("/who")
        self.assertRegex(bob.expect(r"\*\*\* \d+ online: .*"), r"2 online: bob, %s$" % guest)

    def test_people_lists_marks_topics_and_modes_live(self):
        bob = self.nc("bob", "#dev")   # the first in #dev: its operator
        page = self.logged_in()
        page.type("/join #dev")
        page.wait("document.getElementById('members').innerText.includes('@bob')")
        carol = self.nc("carol", "#dev")
        page.wait("document.getElementById('members').innerText.includes('carol')")
        bob.say("/mode +v carol", "/topic release on friday", "/mode +m")
        page.wait("document.getElementById('members').innerText.includes('+carol')")
        page.wait("document.getElementById('topic').textContent === 'release on friday'")
        page.wait("document.getElementById('modes').textContent.includes('m')")
        carol.say("/nick caroline")
        page.wait("document.getElementById('members').innerText.includes('+caroline')")
        carol.say("/quit")
        page.wait("!document.getElementById('members').innerText.includes('caroline')")
        bob.say("/join #lobby")   # nc moves: left #dev for #lobby
        page.wait("document.getElementById('people-title').textContent === 'People in #dev (1)'")
        people = page.js("[...document.querySelectorAll('#members li')].map(b => b.textContent)")
        self.assertEqual(people, ["webby (you)"])
        page.choose("#lobby")
        people = page.js("[...document.querySelectorAll('#members [data-nick]')].map(b => b.dataset.nick)")
        self.assertEqual(sorted(people), ["bob", "webby"])   # nobody twice


class PageKeyboardAndKickTest(PageTestCase):

    options = {"op_password": "op secret"}

    def key(self, page, key, **modifiers):
        page.js("document.getElementById('line').dispatchEvent(new KeyboardEvent('keydown', "
                "Object.assign({key: %s, bubbles: true, cancelable: true}, %s)))"
                % (json.dumps(key), json.dumps(modifiers)))

    def complete(self, page, text):
        page.js("line.value = %s; line.selectionStart = line.selectionEnd = line.value.length" % json.dumps(text))
        self.key(page, "Tab")
        return page.js("line.value")

    def test_completion_recall_and_being_kicked(self):
        bob = self.nc("bob", "#dev")
        page = self.logged_in()
        page.type("/join #dev")
        page.wait("document.getElementById('members').innerText.includes('bob')")
        self.assertEqual(self.complete(page, "/jo"), "/join ")
        self.assertEqual(self.complete(page, "/join #d"), "/join #dev ")
        self.assertEqual(self.complete(page, "bo"), "bob: ")
        page.type("first")
        page.type("second")
        bob.expect(r"<webby> second")
        page.js("line.value = ''")
        self.key(page, "ArrowUp")
        self.key(page, "ArrowUp")
        self.assertEqual(page.js("line.value"), "first")
        self.key(page, "ArrowDown")
        self.assertEqual(page.js("line.value"), "second")
        bob.say("/kick webby not here")   # out of #dev: the page says so and drops it
        page.wait("document.getElementById('title').textContent === '#lobby'")
        page.wait("document.getElementById('log').innerText.includes("
                  "'You were kicked from #dev by bob (not here).')")
        self.assertEqual(list(page.sidebar()), ["#lobby"])
        bob.say("/op op secret", "/join #lobby", "/kick webby that will do")   # out of the chat
        page.wait("document.getElementById('state').textContent.includes('reload the page')")
        self.assertEqual(page.js("document.getElementById('state').textContent"),
                         "you were kicked by bob (that will do); reload the page to come back")


class PageConversationTest(PageTestCase):

    def test_a_private_conversation(self):
        bob = self.nc("bob")
        page = self.logged_in()
        page.wait("document.getElementById('members').innerText.includes('bob')")
        bob.say("/msg webby psst, just for you")
        page.wait("document.getElementById('queries').innerText.includes('bob')")
        self.assertEqual(page.sidebar()["bob"], "bob, 1 unread, new private message")
        self.assertEqual(self.lines_of(page, "psst"), [])   # not in the room's log
        page.choose("bob")
        self.assertEqual(self.lines_of(page, "psst"), ["bob: psst, just for you"])
        page.type("hi bob <b>not bold</b>")
        self.assertEqual(bob.expect(r"\*webby\* .*"), "*webby* hi bob <b>not bold</b>")
        page.wait("document.querySelectorAll('#log .msg.mine').length === 1")
        self.assertEqual(page.js("document.querySelectorAll('#log b').length"), 0)
        page.choose("#lobby")   # a nick in the people list opens its conversation
        page.js("document.querySelector('#members button[data-nick=bob]').click()")
        page.wait("document.getElementById('title').textContent === 'bob'")
        bob.say("/nick robert")
        page.wait("document.getElementById('title').textContent === 'robert'")
        page.type("still there?")
        self.assertEqual(bob.expect(r"\*webby\* .*"), "*webby* still there?")
        page.wait("document.getElementById('log').innerText.includes('still there?')")
        page.reload()   # conversations live in this tab's storage
        page.wait("document.getElementById('title').textContent === 'robert' && "
                  "document.getElementById('log').innerText.includes('still there?')")
        self.assertEqual(len(self.lines_of(page, "psst")), 1)


class PageScrollbackTest(PageTestCase):

    options = {"history": 10}

    def test_scrolling_up_loads_older_lines_keeping_the_place(self):
        alice = self.nc("alice")
        alice.say(*("line %03d" % number for number in range(1, 121)))
        alice.sync()
        page = self.logged_in()
        # 10 lines replayed do not fill the log: the 50 before them come at once.
        page.wait("document.querySelectorAll('#log .msg.said').length === 60")
        page.wait("!!document.querySelector('#top button')")
        for shown in (110, 120):
            first = page.js("document.querySelector('#log .msg.said').textContent")
            page.js("log.scrollTop = 0")
            page.wait("document.querySelectorAll('#log .msg.said').length === %d" % shown)
            # The line that was at the top is where it was: nothing jumped.
            self.assertLess(abs(page.js(
                "[...document.querySelectorAll('#log .msg.said')].find(d => d.textContent === %s)"
                ".getBoundingClientRect().top - log.getBoundingClientRect().top" % json.dumps(first))), 80)
            page.wait("!document.getElementById('top').textContent.includes('Loading')")
        texts = [line.split(": ", 1)[1] for line in self.lines_of(page, r"^alice: ")]
        self.assertEqual(texts, ["line %03d" % number for number in range(1, 121)])
        page.wait("document.getElementById('top').textContent.includes('start of #lobby')")


class PageReconnectTest(PageTestCase):

    def setUp(self):
        self.data = tempfile.mkdtemp(prefix="chat-page-data-")
        self.addCleanup(shutil.rmtree, self.data, True)
        self.options = {"data_dir": self.data, "history": 3}
        super().setUp()

    def test_a_restarted_server_fills_the_gap_once(self):
        gate = Cable(self, self.address)
        bob = self.nc("bob", "#dev")
        page = self.browser("http://127.0.0.1:%d/" % gate.address[1])
        page.login("webby")
        page.wait("document.getElementById('title').textContent === '#lobby'")
        page.type("/join #dev")
        page.wait("document.getElementById('title').textContent === '#dev'")
        bob.say("before 1", "before 2")
        page.wait("document.getElementById('log').innerText.includes('before 2')")
        gate.cut(refuse=True)   # the network is gone...
        page.wait("document.getElementById('state').textContent.includes('Reconnecting')")
        self.restart_server()   # ...and the server restarts, keeping its data directory
        bob = self.nc("bob", "#dev")
        bob.say(*("missed %d" % number for number in range(1, 7)))
        bob.sync()
        gate.reopen()
        page.wait("document.getElementById('log').innerText.includes('missed 6')")
        page.wait("document.getElementById('state').textContent === ''")
        page.wait("document.querySelectorAll('#log .msg.said').length === 8")
        self.assertEqual([line.split(": ", 1)[1] for line in self.lines_of(page, r"^bob: ")],
                         ["before 1", "before 2"] + ["missed %d" % n for n in range(1, 7)])
        bob.say("after it")
        page.wait("document.getElementById('log').innerText.includes('after it')")
        self.assertEqual(len(self.lines_of(page, r"^bob: ")), 9)   # never a line twice
        self.assertEqual(page.js("document.getElementById('rooms').innerText.includes('#dev')"), True)


class PageNotificationTest(PageTestCase):

    # document.hidden as the test says, and every Notification the page makes, recorded.
    HIDDEN = """(() => {
      let hidden = false;
      Object.defineProperty(Document.prototype, "hidden", {get: () => hidden, configurable: true});
      Object.defineProperty(Document.prototype, "visibilityState",
                            {get: () => (hidden ? "hidden" : "visible"), configurable: true});
      window.setHidden = (value) => { hidden = value; document.dispatchEvent(new Event("visibilitychange")); };
      window.shown = [];
      const Real = window.Notification;
      window.Notification = class extends Real {
        constructor(title, options) { super(title, options); window.shown.push([title, options.body]); }
      };
    })();"""

    def test_mentions_and_private_messages_notify_while_hidden(self):
        bob = self.nc("bob")
        page = Chromium.tab(self)
        page.grant(self.url.rstrip("/"), ["notifications"])
        page.page("Page.addScriptToEvaluateOnNewDocument", source=self.HIDDEN)
        page.open(self.url)
        page.login("webby")
        page.wait("document.getElementById('title').textContent === '#lobby'")
        self.assertEqual(page.js("Notification.permission"), "granted")
        bob.say("webby: seen while visible")
        page.wait("document.getElementById('log').innerText.includes('seen while visible')")
        page.js("setHidden(true)")
        bob.say("no mention here", "webby, lunch?", "/msg webby a secret")
        page.wait("window.shown.length === 2")
        self.assertEqual(page.js("window.shown"), [["bob in #lobby", "webby, lunch?"],
                                                   ["from bob", "a secret"]])
        page.wait("document.title === '(3) #lobby - chat'")
        page.js("setHidden(false)")
        page.js("document.getElementById('bell').click()")   # this room: no more notifications
        self.assertEqual(page.js("document.getElementById('bell').getAttribute('aria-pressed')"), "false")
        page.js("setHidden(true)")
        bob.say("webby: quiet now", "/msg webby but this one")
        page.wait("window.shown.length === 3")
        self.assertEqual(page.js("window.shown[2]"), ["from bob", "but this one"])
        page.wait("document.getElementById('announce').textContent === 'Message from bob: but this one'")


class PagePhoneLayoutTest(PageTestCase):

    # Each visible part: its box, whether it lies inside the viewport, and pairs that overlap.
    GEOMETRY = """(() => {
      const boxes = {};
      for (const [name, node] of Object.entries({
          menu: document.getElementById("menu"), heading: document.getElementById("heading"),
          bell: document.getElementById("bell"), state: document.getElementById("state"),
          log: document.getElementById("log"), line: document.getElementById("line"),
          send: document.getElementById("send-button")})) {
        const r = node.getBoundingClientRect();
        if (r.width && r.height) boxes[name] = [r.left, r.top, r.right, r.bottom];
      }
      const outside = Object.keys(boxes).filter((name) => { const [l, t, r, b] = boxes[name];
        return l < 0 || t < 0 || r > innerWidth + 0.5 || b > innerHeight + 0.5; });
      const names = Object.keys(boxes), overlaps = [];
      for (const a of names) for (const b of names) {
        if (a >= b) continue;
        const [l1, t1, r1, b1] = boxes[a], [l2, t2, r2, b2] = boxes[b];
        if (Math.min(r1, r2) - Math.max(l1, l2) > 0.5 && Math.min(b1, b2) - Math.max(t1, t2) > 0.5) overlaps.push(a + "/" + b);
      }
      const small = [...document.querySelectorAll("button, input")].filter((node) => {
        const r = node.getBoundingClientRect();
        return r.width && node.closest("#main, #drawer.open, #login:not([hidden])") && (r.width < 43.5 || r.height < 43.5);
      }).map((node) => node.id || node.textContent);
      const wide = document.documentElement.scrollWidth > innerWidth ||
        document.getElementById("line").getBoundingClientRect().width < innerWidth / 2;   // room to type
      return {names, outside, overlaps, small, wide, width: innerWidth, height: innerHeight};
    })()"""

    # Inside the open drawer: every button and field within it, and the drawer on screen.
    DRAWER = """(() => {
      const d = document.getElementById("drawer").getBoundingClientRect();
      const out = [...document.querySelectorAll("#drawer button, #drawer input")].filter((node) => {
        const r = node.getBoundingClientRect();
        return r.width && (r.left < d.left - 0.5 || r.right > d.right + 0.5 || r.left < 0 || r.right > innerWidth);
      }).map((node) => node.textContent || node.id);
      return {out, inside: d.left >= 0 && d.right <= innerWidth && d.top >= 0 && d.bottom <= innerHeight + 0.5};
    })()"""

    def check_layout(self, page, what):
        geometry = page.js(self.GEOMETRY)
        self.assertEqual((geometry["outside"], geometry["overlaps"], geometry["small"], geometry["wide"]),
                         ([], [], [], False), "%s: %r" % (what, geometry))
        self.assertTrue({"menu", "heading", "bell", "log", "line", "send"} <= set(geometry["names"]), what)

    def check_phone(self, width, height):
        self.nc("bob", "#dev").say("a-very-long-word-" * 12 + " https://example.com/" + "x" * 80)
        page = self.logged_in(width=width, height=height, mobile=True)
        self.assertEqual(page.js("innerWidth"), width)
        page.type("/join #dev")
        page.wait("document.getElementById('log').innerText.includes('example.com')")
        self.check_layout(page, "%dx%d" % (width, height))
        self.assertTrue(page.js("log.scrollWidth <= log.clientWidth"), "long words wrap")
        page.js("document.getElementById('menu').click()")
        page.wait("document.getElementById('drawer').getBoundingClientRect().left >= 0")
        self.assertEqual(page.js("document.getElementById('menu').getAttribute('aria-expanded')"), "true")
        self.assertEqual(page.js(self.DRAWER), {"out": [], "inside": True})
        page.js("document.dispatchEvent(new KeyboardEvent('keydown', {key: 'Escape'}))")   # Esc closes
        self.assertEqual(page.js("document.getElementById('menu').getAttribute('aria-expanded')"), "false")
        self.assertEqual(page.js("document.activeElement.id"), "menu")
        page.js("document.getElementById('menu').click()")
        page.choose("#lobby")   # a choice closes the drawer
        self.assertEqual(page.js("document.getElementById('menu').getAttribute('aria-expanded')"), "false")
        self.assertFalse(page.js("document.getElementById('main').inert"))
        # The on-screen keyboard takes 40 % of the height: the input stays in sight.
        page.resize(width, int(height * 0.6), mobile=True)
        page.wait("document.getElementById('line').getBoundingClientRect().bottom <= innerHeight")
        self.check_layout(page, "keyboard")
        page.resize(width, height, mobile=True)
        page.js("document.documentElement.style.fontSize = '200%'")   # text at 200 %
        self.check_layout(page, "200%")
        return page

    def test_390_by_844(self):
        self.check_phone(390, 844)

    def test_360_by_640(self):
        self.check_phone(360, 640)


class PagePasswordTest(PageTestCase):

    options = {"password": "letmein", "op_password": "op secret"}

    def test_login_with_a_server_password(self):
        watcher = self.nc("watcher", password="letmein")
        page = self.browser()
        page.login("webby")   # no password: the form asks for it
        page.wait("document.getElementById('login-error').textContent === 'This server needs a password.'")
        self.assertEqual(page.js("document.activeElement.id"), "password")
        page.login("webby", "wrong")
        page.wait("document.getElementById('login-error').textContent === 'Error: wrong password'")
        page.login("watcher", "letmein")   # taken: explained on the form, before joining
        page.wait("document.getElementById('login-error').textContent.includes('nick watcher is taken')")
        self.assertFalse(page.js("document.getElementById('login').hidden"))
        page.login("webby", "letmein", "op secret")
        self.assertEqual(watcher.expect(r"\*\*\* webby .*"), "*** webby joined")
        page.wait("document.getElementById('login').hidden")
        page.wait("document.getElementById('log').innerText.includes('you are an operator now')")
        self.assertEqual(page.js("sessionStorage.getItem('chat-session')"),
                         json.dumps({"nick": "webby", "password": "letmein"}, separators=(",", ":")))


class PageReloadTest(PageTestCase):

    options = {"password": "letmein", "greet_delay": chat.GREET_DELAY}

    def test_twenty_reloads_in_a_row(self):
        watcher = self.nc("watcher", "#dev", password="letmein")
        page = self.browser()
        page.login("webby", "letmein")
        page.wait("document.getElementById('title').textContent === '#lobby'")
        page.type("/join #dev")
        page.wait("document.getElementById('title').textContent === '#dev'")
        watcher.say("one line before the reloads")
        page.wait("document.getElementById('log').innerText.includes('one line before')")
        for number in range(20):
            page.reload()
            page.wait("document.getElementById('title').textContent === '#dev' && "
                      "document.getElementById('login').hidden && "
                      "document.getElementById('log').innerText.includes('one line before') && "
                      "document.getElementById('state').textContent === ''")
        self.assertEqual(len(self.lines_of(page, "one line before")), 1)
        page.type("still here after 20 reloads")
        self.assertEqual(watcher.expect(r"<webby> .*"), "<webby> still here after 20 reloads")
        watcher.say("/who")
        self.assertRegex(watcher.expect(r"\*\*\* #dev: \d+ online: .*|\*\*\* \d+ online: .*"),
                         r"2 online: (webby, @watcher|@watcher, webby)$")
        self.assertEqual(list(page.sidebar()), ["#lobby", "#dev"])


class HttpKeepAliveTest(ServerTestCase):

    def test_a_connection_serves_requests_until_an_error(self):
        with socket.create_connection(self.address, timeout=TIMEOUT) as sock:
            get = b"GET %s HTTP/1.1\r\nHost: localhost\r\n\r\n"
            sock.sendall(get % b"/" + get % b"/favicon.ico")   # two at once
            reader = sock.makefile("rb")
            status, headers, body = http_response(reader)
            self.assertEqual((status, headers["connection"]), (200, "keep-alive"))
            self.assertEqual(http_response(reader)[0], 404)
            sock.sendall(b"POST / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            status, headers, _ = http_response(reader)
            self.assertEqual((status, headers["connection"]), (405, "close"))
            self.assertEqual(sock.recv(100), b"")
        status, headers, _ = http(self.address, b"GET / HTTP/1.0\r\n\r\n")
        self.assertEqual((status, headers["connection"]), (200, "close"))


# --- The programs, as processes ---

class ServerProcess:
    """chat.py server in a subprocess; its stderr is collected by a thread."""

    def __init__(self, test, *args, preexec_fn=None, env=None, as_script=False):
        start = [sys.executable, CHAT] if as_script else RUN_CHAT
        argv = start + ["server", "--port", "0", "--name", "proc"] + list(args)
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, preexec_fn=preexec_fn,
                                     env=child_env(**(env or {})))
        test.addCleanup(self.stop)
        self.log = LineReader(self.proc.stderr)
        self.lines, self.wait_for = self.log.lines, self.log.wait_for
        listening = self.wait_for(r"listening on .*")
        self.port = int(listening.rsplit(":", 1)[1])

    @property
    def stderr(self):
        return "\n".join(line for line in list(self.lines) if line)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)


def run_cli(*args, env=None):
    return subprocess.run(RUN_CHAT + list(args), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=TIMEOUT * 2,
                          env=child_env(**(env or {})))


def run_clis(argument_lists):
    """run_cli for each list of arguments, the processes side by side; results in order."""
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda args: run_cli(*args), argument_lists))


class CommandLineTest(unittest.TestCase):

    def test_a_log_nobody_reads_does_not_stop_the_server(self):
        """Standard error piped to a reader that goes away (a log shipper, head): the log
        lines are lost, the chat goes on."""
        proc = subprocess.Popen(RUN_CHAT + ["server", "--host", "127.0.0.1", "--port", "0",
                                            "--name", "proc"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=child_env())
        self.addCleanup(proc.wait, TIMEOUT)
        self.addCleanup(proc.kill)
        port = int(proc.stderr.readline().decode().rsplit(":", 1)[1])
        proc.stderr.close()   # every later log line meets a broken pipe
        for nick in ("alice", "bob", "carol"):
            peer = Peer(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT))
            self.addCleanup(peer.sock.close)
            peer.say("/nick " + nick)
            self.assertEqual(peer.expect(r"\*\*\* welcome .*"), "*** welcome to proc, you are "
                             + nick)
        self.assertIsNone(proc.poll())

    def peer(self, port, host="127.0.0.1"):
        sock = socket.create_connection((host, port), timeout=TIMEOUT)
        self.addCleanup(sock.close)
        peer = Peer(sock)
        peer.say("")   # a blank first line: greeted at once, as a guest
        peer.expect(r"\*\*\* type /help for commands")
        return peer

    def test_help_explains_every_flag(self):
        top, server_help, client_help, version = (result.stdout for result in run_clis(
            [("--help",), ("server", "--help"), ("client", "--help"), ("--version",)]))
        self.assertIn("server", top)
        self.assertIn("client", top)
        for flag in ("--host", "--port", "-4", "-6", "--max-clients", "--max-line",
                     "--announce-limit", "--name", "--verbose", "--quiet", "--tls-cert",
                     "--tls-key", "--password-file", "CHAT_PASSWORD", "--register-timeout",
                     "--rate", "--burst", "--max-per-ip", "--room", "--max-rooms", "--history"):
            self.assertIn(flag, server_help)
        for flag in ("--host", "--port", "-4", "-6", "--nick", "--tls", "--tls-ca",
                     "--tls-fingerprint", "--password-file", "CHAT_PASSWORD", "--listen-only"):
            self.assertIn(flag, client_help)
        self.assertEqual(version.strip(), "chat.py " + chat.__version__)

    def test_bad_arguments_are_usage_errors(self):
        wrong = (("server", "--port", "70000"), ("server", "--max-line", "0"), (),
                 ("client", "--port", "0"), ("server", "--room", "#a b"))
        for args, result in zip(wrong, run_clis(wrong)):
            self.assertEqual(result.returncode, 2, args)
            self.assertIn("usage:", result.stderr)
            self.assertNotIn("Traceback", result.stderr)

    def test_unusable_files_are_clear_errors(self):
        cases = [(("server", "--tls-cert", "/nonexistent.pem"), "cannot use the TLS certificate"),
                 (("server", "--tls-cert", PKI["ca"]), "cannot use the TLS certificate"),
                 (("server", "--tls-key", PKI["key"]), "--tls-key needs --tls-cert"),
                 (("server", "--password-file", "/nonexistent"), "cannot read the password file"),
                 (("client", "--tls-fingerprint", "abc"), "invalid --tls-fingerprint"),
                 (("client", "--tls-ca", "/nonexistent.pem"), "cannot use --tls-ca"),
                 (("client", "--nick", "a b"), "invalid --nick"),
                 (("client", "--nick", ""), "invalid --nick: a nick is 1 to 20 characters"),
                 (("client", "--host", "box:80", "--port", "81"), "not the one --port says"),
                 (("server", "--host", "127.0.0.1:notaport"), "is not a port number"),
                 (("server", "--port", "0", "--data-dir", PKI["ca"]), "is not a directory")]
        for (args, message), result in zip(cases, run_clis([args for args, _ in cases])):
            with self.subTest(args=args):
                self.assertEqual(result.returncode, 1)
                self.assertIn(message, result.stderr)
                self.assertNotIn("Traceback", result.stderr)
                self.assertNotIn("[SSL]", result.stderr)

    def test_host_forms(self):
        self.assertEqual(chat.split_host("[::1]", None), ("::1", 7777))
        self.assertEqual(chat.split_host("[::1]:8000", None), ("::1", 8000))
        self.assertEqual(chat.split_host("box:8000", 8000), ("box", 8000))
        self.assertEqual(chat.split_host("::1", 9), ("::1", 9))
        self.assertEqual(chat.split_host("box", None), ("box", 7777))
        self.assertEqual(chat.split_host(None, 0), (None, 0))

    @unittest.skipIf(ssl is None, "no ssl module")
    def test_tls_server_logs_its_fingerprint(self):
        server = ServerProcess(self, "--host", "127.0.0.1", "--tls-cert", PKI["both"])
        server.wait_for(r"INFO tls fingerprint " + TEST_CERT_FINGERPRINT + "$")
        self.assertRegex(server.lines[0], r"^listening on 127\.0\.0\.1:\d+$")   # scripts read it first
        context = ssl.create_default_context(cafile=PKI["ca"])
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
        sock = context.wrap_socket(raw, server_hostname="localhost")
        self.addCleanup(sock.close)
        peer = Peer(sock)
        peer.say("")   # a blank first line: greeted at once, as a guest
        peer.expect(r"\*\*\* welcome to proc, you are guest1")

    @unittest.skipUnless(POSIX, "signals are POSIX")
    def test_password_from_environment_is_never_logged(self):
        server = ServerProcess(self, "--host", "127.0.0.1", "-v",
                               env={"CHAT_PASSWORD": "s3cret PASS"})
        server.wait_for(r"WARNING a password is set without TLS")
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
        self.addCleanup(sock.close)
        peer = Peer(sock)
        peer.say("/pass s3cret PASS", "/quit")
        peer.expect(r"\*\*\* bye")
        server.wait_for(r"#1 guest1 .* disconnected: quit")
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(TIMEOUT)
        self.assertIn("password accepted", server.stderr)
        self.assertNotIn("s3cret", server.stderr)

    def test_busy_port_is_a_clear_error(self):
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            result = run_cli("server", "--host", "127.0.0.1", "--port", str(port))
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr, "chat.py: cannot listen on 127.0.0.1:%d: port %d is in use "
                         "(is another server running there?)\n" % (port, port))
        self.assertNotIn("Traceback", result.stderr)

    @unittest.skipUnless(ipv6_available() and socket.has_dualstack_ipv6(), "no dual-stack IPv6")
    def test_default_is_dual_stack_with_real_port(self):
        server = ServerProcess(self)
        self.assertRegex(server.lines[0], r"^listening on \[::\]:\d+$")
        self.assertNotEqual(server.port, 0)
        alice, bob = self.peer(server.port, "127.0.0.1"), self.peer(server.port, "::1")
        alice.say("/nick alice", "over v4")
        self.assertEqual(bob.expect(r"<alice> .*"), "<alice> over v4")

    def test_started_as_a_script_it_runs_from_compiled_code(self):
        server = ServerProcess(self, "--host", "127.0.0.1", as_script=True)
        self.peer(server.port)   # it serves
        if not (sys.platform.startswith("linux") and sys.version_info >= (3, 10)):
            return   # elsewhere it runs as it was started
        with open("/proc/%d/cmdline" % server.proc.pid, "rb") as file:   # the same process
            argv = file.read().decode().split("\0")
        self.assertEqual(argv[1], "-c")   # the loader of the compiled code...
        self.assertEqual(argv[3:5], [CHAT, "server"])   # ...and chat.py, as ps shows it
        folder = "/proc/%d/fd" % server.proc.pid
        targets = [os.readlink(os.path.join(folder, name)) for name in os.listdir(folder)]
        self.assertFalse([target for target in targets if "memfd" in target])   # closed once read

    def test_ipv4_only(self):
        server = ServerProcess(self, "-4")
        self.assertRegex(server.lines[0], r"^listening on 0\.0\.0\.0:\d+$")
        self.peer(server.port)

    @unittest.skipUnless(ipv6_available(), "no IPv6 on this machine")
    def test_ipv6_only_and_one_address(self):
        server = ServerProcess(self, "-6")
        self.assertRegex(server.lines[0], r"^listening on \[::\]:\d+$")
        self.peer(server.port, "::1")
        with self.assertRaises(OSError):
            socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT).close()
        server = ServerProcess(self, "--host", "::1")
        self.assertRegex(server.lines[0], r"^listening on \[::1\]:\d+$")

    @unittest.skipUnless(POSIX, "signals are POSIX")
    def test_sigterm_and_ctrl_c_shut_down_cleanly(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            with self.subTest(signal=signum):
                server = ServerProcess(self, "--host", "127.0.0.1")
                alice, bob = self.peer(server.port), self.peer(server.port)
                server.proc.send_signal(signum)
                self.assertEqual(alice.expect_closed(), ["*** server shutting down"])
                self.assertEqual(bob.expect_closed(), ["*** server shutting down"])
                self.assertEqual(server.proc.wait(TIMEOUT), 0)
                server.wait_for(r"INFO stopped")
                self.assertNotIn("Traceback", server.stderr)

    @unittest.skipUnless(POSIX, "signals are POSIX")
    def test_quiet_still_prints_listening_and_logs_no_message_text(self):
        quiet = ServerProcess(self, "--host", "127.0.0.1", "-q")
        self.peer(quiet.port).say("/quit")
        quiet.proc.send_signal(signal.SIGTERM)
        quiet.proc.wait(TIMEOUT)
        self.assertRegex(quiet.stderr, r"^listening on 127\.0\.0\.1:\d+$")

        server = ServerProcess(self, "--host", "127.0.0.1", "-v")
        alice, bob = self.peer(server.port), self.peer(server.port)
        alice.say("/nick alice", "SECRET-1", "/me SECRET-2", "/msg guest2 SECRET-3",
                  "/quit SECRET-4")
        self.assertEqual(bob.expect(r"\*\*\* alice left.*"), "*** alice left (quit: SECRET-4)")
        server.wait_for(r"#1 alice .* disconnected: quit")
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(TIMEOUT)
        log_text = server.stderr
        self.assertRegex(log_text, r"\d\d:\d\d:\d\d,\d+ INFO #1 \(127\.0\.0\.1:\d+\) connected")
        self.assertIn("#1 alice (127.0.0.1", log_text)   # the rename
        self.assertNotIn("SECRET", log_text)

    @unittest.skipUnless(POSIX, "resource limits are POSIX")
    def test_out_of_file_descriptors_pauses_accepting(self):
        import resource

        def limit_files():
            resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))

        server = ServerProcess(self, "--host", "127.0.0.1", preexec_fn=limit_files)
        server.wait_for(r"open-file limit is 48")
        socks = []
        for _ in range(60):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
            self.addCleanup(sock.close)
            socks.append(sock)
        server.wait_for(r"cannot accept: Too many open files; pausing")
        first = Peer(socks[0])
        first.say("/nick first")   # speaking first spares the wait to be greeted
        self.assertEqual(first.expect(r"\*\*\* welcome.*"), "*** welcome to proc, you are first")
        for sock in socks[1:-1]:   # frees far more descriptors than the backlog needs
            sock.close()
        last = Peer(socks[-1])   # accepted once descriptors are free again
        last.say("/nick last")
        self.assertEqual(last.expect(r"\*\*\* welcome.*"), "*** welcome to proc, you are last")


class ClientProcess:
    """chat.py client in a subprocess with piped stdin, stdout and stderr."""

    def __init__(self, test, port, *args, stdin_data=None, env=None):
        argv = RUN_CHAT + ["client", "--host", "127.0.0.1", "--port", str(port)]
        self.proc = subprocess.Popen(argv + list(args), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=child_env(**(env or {})))
        test.addCleanup(self.kill)
        self.out, self.err = LineReader(self.proc.stdout), LineReader(self.proc.stderr)
        if stdin_data is not None:
            self.proc.stdin.write(stdin_data)
            self.proc.stdin.flush()

    def finish(self):
        """Close stdin (EOF for the client) and wait: (exit code, stdout, stderr)."""
        if self.proc.stdin:
            self.proc.stdin.close()
            self.proc.stdin = None
        self.proc.wait(TIMEOUT * 2)
        return self.proc.returncode, self.out.text(), self.err.text()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdin:
            self.proc.stdin.close()


class ClientTest(ServerTestCase):
    """The real client, piped, as bots and scripts use it."""

    def test_piped_line_is_sent_then_client_quits_cleanly(self):
        alice = self.connect("alice")
        client = ClientProcess(self, self.address[1], "--nick", "ci",
                               stdin_data="build passed ✓\n".encode())
        code, out, err = client.finish()
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(alice.lines_until(r"\*\*\* ci left \(quit\)"),
                         ["*** ci joined", "<ci> build passed ✓"])
        self.assertEqual(out.splitlines()[0], "*** welcome to testroom, you are ci")
        self.assertNotIn("\x1b", out)

    def test_piped_output_is_utf8_whatever_the_locale(self):
        alice = self.connect("alice")
        env = {"PYTHONIOENCODING": "ascii", "LC_ALL": "C", "LANG": "C"}
        client = ClientProcess(self, self.address[1], "--nick", "reader", env=env)
        alice.expect(r"\*\*\* reader joined")
        alice.say("grüße 日本 🎉", "/msg reader done")
        alice.sync()   # both lines are out before the client's /quit
        code, out, err = client.finish()
        self.assertEqual((code, err), (0, ""))
        self.assertIn("<alice> grüße 日本 🎉\n*alice* done\n", out)

    def test_taken_nick_gets_a_free_variant(self):
        self.connect("ci")
        self.connect("ci2")
        client = ClientProcess(self, self.address[1], "--nick", "CI", stdin_data=b"hi\n")
        code, out, err = client.finish()
        self.assertEqual(code, 0, err)
        self.assertIn("*** you are now known as CI3", out.splitlines())

    def test_server_gone_is_one_line_and_exit_1_without_reconnect(self):
        client = ClientProcess(self, self.address[1], "--nick", "ci", "--no-reconnect")
        wait_for(lambda: self.member("ci"), message="the client to join")
        self.server.shutdown()
        client.proc.wait(TIMEOUT)   # it leaves by itself; only then is stdin closed
        code, out, err = client.finish()
        self.assertEqual(code, 1)
        self.assertTrue(out.endswith("*** server shutting down\n"), out)
        self.assertEqual(err, "chat.py: connection to 127.0.0.1:%d lost: the server closed it\n"
                         % self.address[1])

    @unittest.skipUnless(POSIX, "signals are POSIX")
    def test_ctrl_c_leaves_cleanly(self):
        alice = self.connect("alice")
        client = ClientProcess(self, self.address[1], "--nick", "ci")
        client.out.wait_for(r"\*\*\* type /help")   # in: before, Ctrl+C just stops connecting
        client.proc.send_signal(signal.SIGINT)
        code, out, err = client.finish()
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(alice.expect(r"\*\*\* ci left.*"), "*** ci left (quit)")

    def test_cannot_connect_is_one_clear_line(self):
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            port = unused.getsockname()[1]
        result = run_cli("client", "--host", "127.0.0.1", "--port", str(port))
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr, "chat.py: cannot connect to 127.0.0.1:%d: "
                         "Connection refused\n" % port)
        unknown = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        with mock.patch.object(socket, "getaddrinfo", side_effect=unknown):
            with self.assertRaises(chat.ChatError) as failure:
                chat.open_connection("nowhere.example", 7777)
        self.assertEqual(str(failure.exception),
                         "cannot connect to nowhere.example:7777: Name or service not known")

    def test_a_tls_client_at_a_plaintext_server_says_so(self):
        result = run_cli("client", "--host", "127.0.0.1", "--port", str(self.address[1]),
                         "--tls-ca", PKI["ca"])
        self.assertEqual(result.returncode, 1)
        self.assertIn("the server does not speak TLS", result.stderr)
        self.assertNotIn("WRONG_VERSION_NUMBER", result.stderr)

    def test_listen_only_keeps_listening_with_nothing_on_stdin(self):
        alice = self.connect("alice")
        client = ClientProcess(self, self.address[1], "--nick", "logger", "--listen-only",
                               "--no-reconnect")
        client.proc.stdin.close()   # as from a script: stdin at its end at once
        client.proc.stdin = None
        alice.expect(r"\*\*\* logger joined")
        alice.say("for the log")
        alice.sync()
        self.server.shutdown()
        code, out, err = client.finish()
        self.assertEqual(code, 1)   # the server went away
        self.assertTrue(out.endswith("<alice> for the log\n*** server shutting down\n"), out)

    def test_host_may_carry_the_port(self):
        alice = self.connect("alice")
        result = subprocess.run(   # "python chat.py", exactly as people start it
            [sys.executable, CHAT, "client", "--host", "127.0.0.1:%d" % self.address[1],
             "--nick", "ci"], input=b"by host:port\n", capture_output=True, timeout=TIMEOUT * 2,
            env=child_env())
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(alice.expect(r"<ci> .*"), "<ci> by host:port")

    def test_client_enables_keepalive(self):
        with socket.socket() as sock:
            chat.enable_keepalive(sock)
            self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 1)
            if hasattr(socket, "TCP_KEEPIDLE"):   # Linux: probes after a minute of silence
                self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE), 60)


@unittest.skipIf(ssl is None, "no ssl module")
class ClientTLSTest(TLSServerMixin, ServerTestCase):
    """The client verifies the server: CA file, pinned fingerprint, or a clear refusal."""

    def run_client(self, *args):
        alice = self.connect("alice")
        client = ClientProcess(self, self.address[1], "--nick", "ci", *args,
                               stdin_data=b"secure hello\n")
        code, out, err = client.finish()
        return alice, code, err

    def test_ca_file_is_trusted(self):
        alice, code, err = self.run_client("--tls-ca", PKI["ca"])
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(alice.expect(r"<ci> .*"), "<ci> secure hello")

    def test_pinned_fingerprint_is_trusted(self):
        pin = TEST_CERT_FINGERPRINT[7:].replace(":", "").upper()
        alice, code, err = self.run_client("--tls-fingerprint", pin)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(alice.expect(r"<ci> .*"), "<ci> secure hello")

    def test_untrusted_certificate_is_refused_with_its_fingerprint(self):
        alice, code, err = self.run_client("--tls")
        self.assertEqual(code, 1)
        self.assertRegex(err, r"^chat.py: the TLS certificate of 127.0.0.1:\d+ is not trusted: ")
        self.assertIn("fingerprint is " + TEST_CERT_FINGERPRINT, err)
        self.assertIn("connect with: --tls-fingerprint " + TEST_CERT_FINGERPRINT[7:], err)
        self.assertEqual(alice.sync(), [])

    def test_a_plaintext_client_on_the_tls_port_is_told_at_once(self):
        result = run_cli("client", "--host", "127.0.0.1", "--port", str(self.address[1]),
                         "--nick", "plain")
        self.assertEqual(result.returncode, 1)
        self.assertRegex(result.stderr, r"^chat.py: 127.0.0.1:\d+ speaks TLS: connect with --tls")

    def test_wrong_fingerprint_is_refused(self):
        alice, code, err = self.run_client("--tls-fingerprint", "ab" * 32)
        self.assertEqual(code, 1)
        self.assertIn("does not match --tls-fingerprint", err)
        self.assertIn("connect with: --tls-fingerprint " + TEST_CERT_FINGERPRINT[7:], err)
        self.assertEqual(alice.sync(), [])


class ClientPasswordTest(ServerTestCase):

    options = {"password": "two words", "wrong_password_delay": 0.1}

    def run_client(self, *args, env=None):
        client = ClientProcess(self, self.address[1], "--nick", "ci", *args,
                               stdin_data=b"let me in\n", env=env)
        return client.finish()

    def test_password_file_and_environment(self):
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as file:
            file.write("two words\n")
        self.addCleanup(os.unlink, file.name)
        code, out, err = self.run_client("--password-file", file.name)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out.splitlines()[0], "*** welcome to testroom, you are ci")
        code, out, err = self.run_client(env={"CHAT_PASSWORD": "two words"})
        self.assertEqual((code, err), (0, ""))

    def test_wrong_or_missing_password_exits_1(self):
        code, out, err = self.run_client(env={"CHAT_PASSWORD": "guess"})
        self.assertEqual(code, 1)
        self.assertRegex(err, r"^chat.py: 127.0.0.1:\d+ refused the password\n$")
        code, out, err = self.run_client()
        self.assertEqual(code, 1)
        self.assertIn("requires a password: give it with --password-file", err)


# --- The terminal client ---

class LineEditorTest(unittest.TestCase):
    """The editing rules, without a terminal."""

    def test_insert_and_move(self):
        editor = chat.LineEditor()
        editor.insert("hello wrld")
        for _ in range(3):
            editor.left()
        editor.insert("o")
        self.assertEqual((editor.text, editor.cursor), ("hello world", 8))
        editor.home()
        editor.insert(">")
        editor.end()
        editor.insert("!")
        self.assertEqual(editor.text, ">hello world!")

    def test_deleting(self):
        editor = chat.LineEditor()
        editor.insert("one two three")
        editor.kill_word()
        self.assertEqual(editor.text, "one two ")
        editor.backspace()
        editor.home()
        editor.delete()
        self.assertEqual(editor.text, "ne two")
        editor.word_right()
        editor.kill_to_end()
        self.assertEqual(editor.text, "ne")
        editor.kill_to_start()
        self.assertEqual((editor.text, editor.cursor), ("", 0))

    def test_combining_marks_move_with_their_letter(self):
        editor = chat.LineEditor()
        editor.insert("ae\u0301b")          # a, e + combining acute, b
        editor.left()
        editor.left()
        self.assertEqual(editor.cursor, 1)   # before the e, not inside it
        editor.right()
        editor.backspace()
        self.assertEqual(editor.text, "ab")

    def test_flags_skin_tones_and_joined_emoji_move_and_delete_whole(self):
        editor = chat.LineEditor()
        editor.insert("a🇫🇷👍🏽👨\u200d👩\u200d👧b")
        editor.left()
        self.assertEqual(editor.text[editor.cursor:], "b")
        editor.left()
        self.assertEqual(editor.text[editor.cursor:], "👨\u200d👩\u200d👧b")
        editor.backspace()
        self.assertEqual(editor.text, "a🇫🇷👨\u200d👩\u200d👧b")
        editor.backspace()
        self.assertEqual(editor.text, "a👨\u200d👩\u200d👧b")
        editor.right()
        self.assertEqual(editor.text[editor.cursor:], "b")
        self.assertEqual(chat.text_width("🇫🇷👍🏽e\u0301"), 5)

    def test_history(self):
        editor = chat.LineEditor()
        for line in ("first", "second", "/op sesame", "/PASS sesame"):   # no passwords kept
            editor.insert(line)
            self.assertEqual(editor.submit(), line)
        editor.insert("draft")
        editor.previous()
        self.assertEqual(editor.text, "second")
        editor.previous()
        editor.previous()
        self.assertEqual(editor.text, "first")
        editor.next()
        editor.next()
        self.assertEqual(editor.text, "draft")

    def test_completion(self):
        nicks = {"alice", "Alan", "bob"}
        editor = chat.LineEditor()
        editor.insert("b")
        self.assertEqual(editor.complete(chat.COMMAND_WORDS, nicks), [])
        self.assertEqual(editor.text, "bob: ")
        editor.insert("hi al")
        self.assertEqual(editor.complete(chat.COMMAND_WORDS, nicks), ["Alan", "alice"])
        editor.insert("i")
        editor.complete(chat.COMMAND_WORDS, nicks)
        self.assertEqual(editor.text, "bob: hi alice ")
        editor.kill_to_start()
        editor.insert("/wh")
        self.assertEqual(editor.complete(chat.COMMAND_WORDS, nicks), [])
        self.assertEqual(editor.text, "/who")
        self.assertEqual(editor.complete(chat.COMMAND_WORDS, nicks), ["/who", "/whois"])
        editor.insert("i")
        editor.complete(chat.COMMAND_WORDS, nicks)
        self.assertEqual(editor.text, "/whois ")

    def test_parse_keys(self):
        keys, rest = chat.parse_keys("ab\x1b[Dc\x01\x1b[3~\r\x1b[1;5Cé\x1b[")
        self.assertEqual(keys, [("text", "ab"), "left", ("text", "c"), "home", "delete", "enter",
                                "word_right", ("text", "é")])
        self.assertEqual(rest, "\x1b[")                 # completed by the next read
        self.assertEqual(chat.parse_keys("\x1b[2~x\x7f")[0], [("text", "x"), "backspace"])

    def test_char_width(self):
        self.assertEqual([chat.char_width(c) for c in "a日\u0301🎉\u200d"], [1, 2, 0, 2, 0])


class RosterTest(ServerTestCase):
    """What Tab completes comes from the lines the server really sends."""

    options = {"op_password": "op secret"}

    def test_nicks_and_rooms_follow_what_is_shown(self):
        alice, carol = self.connect("alice"), self.connect("carol")
        self.connect("bob")
        carol.say("/join #dev")
        carol.expect(r"\*\*\* you are in #dev.*")
        alice.say("/op op secret", "/who", "/rooms", "/kick bob enough")
        alice.expect(r"\*\*\* bob was kicked .*")
        roster = chat.Roster()
        for line in alice.transcript:   # all alice was shown, her greeting first
            roster.note(line)
        self.assertEqual(roster.nicks, {"alice"})   # not "@alice"; carol left, bob was kicked
        self.assertEqual(roster.rooms, {"#lobby", "#dev"})


class LineStyleTest(unittest.TestCase):

    def test_plain_style_leaves_lines_untouched(self):
        style = chat.LineStyle()
        for line in ("<bob> hi alice", "*bob* psst", "*** error: x", "*** [12:00] <a> b"):
            self.assertEqual(style.render(line, "alice"), line)

    def test_colours_mentions_and_bell(self):
        style = chat.LineStyle(colour=True, bell=True)
        chat_line = style.render("<bob> hi there", "alice")
        self.assertIn("\x1b[%smbob\x1b[0m" % chat.LineStyle.nick_colour("bob"), chat_line)
        self.assertNotIn("\x07", chat_line)
        self.assertTrue(style.render("<bob> hi ALICE!", "alice").endswith("\x07"))
        self.assertNotIn("\x07", style.render("<bob> hi malice", "alice"))
        self.assertTrue(style.render("*bob* psst", "alice").endswith("\x07"))
        self.assertTrue(style.render("*** error: nope", "alice").startswith("\x1b[31m"))
        self.assertTrue(style.render("*** bob joined", "alice").startswith("\x1b[2m"))
        self.assertEqual(chat.LineStyle.nick_colour("bob"), chat.LineStyle.nick_colour("BOB"))

    def test_timestamps_and_history_times(self):
        style = chat.LineStyle(timestamps=True)
        self.assertRegex(style.render("<bob> hi"), r"^\[\d\d:\d\d\] <bob> hi$")
        self.assertEqual(style.render("*** [09:15] <bob> earlier"), "[09:15] <bob> earlier")

    def test_colour_rules(self):
        tty = mock.Mock(isatty=lambda: True)
        pipe = mock.Mock(isatty=lambda: False)
        with mock.patch.dict(os.environ, {"TERM": "xterm"}, clear=False):
            os.environ.pop("NO_COLOR", None)
            self.assertTrue(chat.colour_wanted(tty))
            self.assertFalse(chat.colour_wanted(tty, no_color=True))
            self.assertFalse(chat.colour_wanted(pipe))
            with mock.patch.dict(os.environ, {"NO_COLOR": "1"}):
                self.assertFalse(chat.colour_wanted(tty))
            with mock.patch.dict(os.environ, {"TERM": "dumb"}):
                self.assertFalse(chat.colour_wanted(tty))

    def test_echo_of_own_lines(self):
        self.assertEqual(chat.echo_of("hello\tthere", "me"), "<me> hello there")
        self.assertEqual(chat.echo_of("//etc", "me"), "<me> /etc")
        self.assertEqual(chat.echo_of("/ME  waves ", "me"), "* me waves")
        self.assertIsNone(chat.echo_of("/msg bob hi", "me"))
        self.assertIsNone(chat.echo_of("   ", "me"))


class Screen:
    """A small VT100 model: what a terminal of rows x cols would show, and its cursor.

    Knows what the client writes: text (wide and combining characters), CR,
    LF, BS, cursor moves (CSI A B C D G H), erasing (CSI J K), the cursor
    report request (CSI 6 n, answered through reports), and ignores colours;
    wraps and scrolls like xterm, including the pending wrap. resize() acts
    like xterm (rows are cut or padded) or, with reflow, like tmux, VTE and
    kitty (lines that wrapped are joined and wrapped again at the new width).
    """

    _CSI = re.compile(r"\x1b\[([0-9;?]*)([@-~])")

    def __init__(self, rows, cols):
        self.rows, self.cols = rows, cols
        self.grid = [self._blank() for _ in range(rows)]
        self.wrapped = [False] * rows   # the row's text goes on in the next row
        self.row = self.col = 0
        self.wrap_next = False
        self.partial = ""
        self.reports = []               # answers to cursor report requests, to be typed

    def _blank(self):
        return [" "] * self.cols

    def feed(self, text):
        text, self.partial = self.partial + text, ""
        i = 0
        while i < len(text):
            char = text[i]
            if char == "\x1b":
                match = self._CSI.match(text, i)
                if not match:
                    if re.fullmatch(r"\x1b(\[[0-9;?]*)?", text[i:]):
                        self.partial = text[i:]
                        return
                    i += 2
                    continue
                self._control(match.group(1), match.group(2))
                i = match.end()
                continue
            if char == "\r":
                self.col, self.wrap_next = 0, False
            elif char == "\n":
                self._line_feed()
            elif char == "\b":
                self.col, self.wrap_next = max(self.col - 1, 0), False
            elif char >= " " and char != "\x7f":
                self._put(char)
            i += 1

    def _put(self, char):
        width = chat.char_width(char)
        if width == 0:
            column = max(self.col - 1, 0) if not self.wrap_next else self.col
            self.grid[self.row][column] += char
            return
        if self.wrap_next or self.col + width > self.cols:
            self.wrapped[self.row] = True
            self.col, self.wrap_next = 0, False
            self._line_feed()
        self.grid[self.row][self.col] = char
        if width == 2:
            self.grid[self.row][self.col + 1] = ""
        self.col += width
        if self.col >= self.cols:
            self.col, self.wrap_next = self.cols - 1, True

    def _line_feed(self):
        self.wrap_next = False
        if self.row == self.rows - 1:
            self.grid.pop(0)
            self.wrapped.pop(0)
            self.grid.append(self._blank())
            self.wrapped.append(False)
        else:
            self.row += 1

    def _control(self, params, final):
        numbers = [int(p) for p in params.split(";") if p.isdigit()] or [0]
        count = max(numbers[0], 1)
        self.wrap_next = False
        if final == "A":
            self.row = max(self.row - count, 0)
        elif final == "B":
            self.row = min(self.row + count, self.rows - 1)
        elif final == "C":
            self.col = min(self.col + count, self.cols - 1)
        elif final == "D":
            self.col = max(self.col - count, 0)
        elif final == "G":
            self.col = min(count - 1, self.cols - 1)
        elif final == "H":
            self.row = min(max(numbers[0], 1) - 1, self.rows - 1)
            self.col = min(max(numbers[1] if len(numbers) > 1 else 1, 1) - 1, self.cols - 1)
        elif final == "J":
            if numbers[0] == 2:
                self.grid = [self._blank() for _ in range(self.rows)]
                self.wrapped = [False] * self.rows
            else:
                self._erase_row_from_cursor()
                for row in range(self.row + 1, self.rows):
                    self.grid[row], self.wrapped[row] = self._blank(), False
        elif final == "K":
            self._erase_row_from_cursor()
        elif final == "n" and numbers[0] == 6:
            self.reports.append("\x1b[%d;%dR" % (self.row + 1, self.col + 1))

    def _erase_row_from_cursor(self):
        self.grid[self.row][self.col:] = [" "] * (self.cols - self.col)
        self.wrapped[self.row] = False

    def resize(self, rows, cols, reflow=False):
        """The terminal gets a new size; the content follows the terminal's habit."""
        if reflow:
            self._reflow(cols)
        else:
            self.grid = [(row + [" "] * cols)[:cols] for row in self.grid]
            self.col = min(self.col, cols - 1)
        self.cols = cols
        while len(self.grid) > rows:   # what no longer fits scrolls off the top
            drop = 0 if self.row > 0 else len(self.grid) - 1
            self.grid.pop(drop)
            self.wrapped.pop(drop)
            self.row -= drop == 0
        while len(self.grid) < rows:
            self.grid.append(self._blank())
            self.wrapped.append(False)
        self.rows = rows
        self.wrap_next = False

    def _reflow(self, cols):
        lines, line = [], []   # rows joined where they wrapped; the cursor as (line, cell)
        for index, row in enumerate(self.grid):
            if index == self.row:
                cursor_line, cursor_cell = len(lines), len(line) + self.col
            line += row
            if not self.wrapped[index]:
                lines.append(line)
                line = []
        if line:
            lines.append(line)
        grid, wrapped, cursor = [], [], None
        for number, cells in enumerate(lines):
            here = number == cursor_line
            end = len(cells)
            while end and cells[end - 1] == " " and not (here and end - 1 <= cursor_cell):
                end -= 1
            row = []
            for position in range(end):
                cell = cells[position]
                if cell == "":   # the right half of a wide character
                    continue
                width = 2 if chat.char_width(cell[0]) == 2 else 1
                if len(row) + width > cols:
                    grid.append(row + [" "] * (cols - len(row)))
                    wrapped.append(True)
                    row = []
                if here and position == cursor_cell:
                    cursor = (len(grid), len(row))
                row += [cell] + [""] * (width - 1)
            grid.append(row + [" "] * (cols - len(row)))
            wrapped.append(False)
        self.grid, self.wrapped = grid, wrapped
        self.row, self.col = cursor or (len(grid) - 1, 0)

    def lines(self):
        return ["".join(row).rstrip() for row in self.grid]

    def cursor(self):
        return self.row, self.col

    def __str__(self):
        return "\n".join("|%s|" % line for line in self.lines()) + "\ncursor %r" % (self.cursor(),)


class ScreenTest(unittest.TestCase):
    """The screen model itself, so the terminal tests rest on something tested."""

    def test_wrapping_wide_characters_and_erasing(self):
        screen = Screen(3, 5)
        screen.feed("abcde")
        self.assertEqual((screen.cursor(), screen.wrap_next), ((0, 4), True))
        screen.feed("日本語")
        self.assertEqual(screen.lines(), ["abcde", "日本", "語"])
        screen.feed("\x1b[2A\r\x1b[J12\x1b[31mx\x1b[0m")
        self.assertEqual(screen.lines(), ["12x", "", ""])
        screen.feed("\r\n\r\n\r\nscrolled")
        self.assertEqual(screen.lines(), ["", "scrol", "led"])


@unittest.skipUnless(POSIX, "pseudo-terminals are POSIX")
class TerminalSession:
    """The real client on a pseudo-terminal, its output fed to a Screen."""

    def __init__(self, test, port, *args, rows=12, cols=60, env=None):
        import fcntl
        import pty
        import struct
        import termios
        self.test = test
        self.screen = Screen(rows, cols)
        self.raw = b""
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.slave_attributes = termios.tcgetattr(slave)
        self.slave = os.dup(slave)   # to read the terminal mode after the client exits
        environment = child_env(**dict({"TERM": "xterm-256color"}, **(env or {})))
        argv = RUN_CHAT + ["client", "--host", "127.0.0.1", "--port", str(port)]
        self.proc = subprocess.Popen(argv + list(args), stdin=slave, stdout=slave, stderr=slave,
                                     env=environment, start_new_session=True)
        os.close(slave)
        test.addCleanup(self.close)
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="pty-reader", daemon=True)
        self._reader.start()

    def _read(self):
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                data = b""
            with self._changed:
                if not data:
                    self.raw += b"<EOF>"
                    self._changed.notify_all()
                    return
                self.raw += data
                self.screen.feed(decoder.decode(data))
                reports, self.screen.reports = self.screen.reports, []
                self._changed.notify_all()
            for report in reports:   # the terminal answers where its cursor is
                self.type(report)

    def type(self, *keys):
        for key in keys:
            os.write(self.master, key.encode())

    def resize(self, rows, cols, reflow):
        """Resize the terminal, which rewraps its screen (reflow) or cuts it, then tell the
        client (SIGWINCH)."""
        import fcntl
        import struct
        import termios
        with self._changed:
            self.screen.resize(rows, cols, reflow)
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.proc.send_signal(signal.SIGWINCH)

    def wait(self, condition, what):
        """Wait until condition(screen) holds; fail with the screen shown."""
        with self._changed:
            if not self._changed.wait_for(lambda: condition(self.screen), TIMEOUT):
                self.test.fail("timed out waiting for %s; screen:\n%s" % (what, self.screen))

    def wait_line(self, pattern):
        """Wait for a screen row matching pattern; return its index."""
        self.wait(lambda s: any(re.fullmatch(pattern, line) for line in s.lines()), pattern)
        return [re.fullmatch(pattern, line) is not None for line in self.screen.lines()].index(True)

    def finish(self):
        """Wait for the client to exit: its exit code; final_mode is the terminal it left."""
        import termios
        code = self.proc.wait(TIMEOUT)
        self.final_mode = termios.tcgetattr(self.slave)
        self._close_slave()   # the last slave descriptor: the reader now sees the end
        self._reader.join(TIMEOUT)
        return code

    def _close_slave(self):
        if self.slave is not None:
            os.close(self.slave)
            self.slave = None

    def close(self):
        """Stop the client, let the reader reach the end, only then free the master:
        a reader still looping on a closed descriptor number would read whatever
        terminal is opened next under that number."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_slave()
        self._reader.join(TIMEOUT)
        os.close(self.master)


@unittest.skipUnless(POSIX, "pseudo-terminals are POSIX")
class TerminalClientTest(ServerTestCase):
    """The real client in a terminal: typing is never clobbered."""

    STAMP = r"\[\d\d:\d\d\] "
    PROMPT = "#lobby alice> "

    def start(self, *args, **kwargs):
        session = TerminalSession(self, self.address[1], "--nick", "alice", *args, **kwargs)
        session.wait(lambda s: s.lines()[s.row].endswith(">") and "type/helpforcommands" in
                     "".join(s.lines()).replace(" ", ""),   # shown once the console is up
                     "the prompt, after the greeting: the terminal is raw by then")
        return session

    def test_incoming_lines_go_above_the_half_typed_line(self):
        bob = self.connect("bob")
        term = self.start()
        bob.expect(r"\*\*\* alice joined")
        term.type("hello wor", "\x1b[D" * 3)
        term.wait(lambda s: s.cursor()[1] == len(self.PROMPT + "hello "), "the cursor to move left")
        bob.say("interrupting you")

        def typing_intact_below_bob(screen):
            lines = screen.lines()
            row = screen.row
            return (row > 0 and re.fullmatch(self.STAMP + "<bob> interrupting you", lines[row - 1])
                    and lines[row] == self.PROMPT + "hello wor"
                    and screen.col == len(self.PROMPT + "hello "))
        term.wait(typing_intact_below_bob, "bob's line above the intact half line")
        term.type("X")
        term.wait(lambda s: s.lines()[s.row] == self.PROMPT + "hello Xwor"
                  and s.col == len(self.PROMPT + "hello X"), "the insertion at the cursor")
        term.type("\r")
        self.assertEqual(bob.expect(r"<alice> .*"), "<alice> hello Xwor")
        term.wait(lambda s: re.fullmatch(self.STAMP + "<alice> hello Xwor", s.lines()[s.row - 1])
                  and s.lines()[s.row] == self.PROMPT.rstrip(),
                  "our own line, formatted, and a new prompt")

    def test_editing_keys(self):
        bob = self.connect("bob")
        term = self.start()
        bob.expect(r"\*\*\* alice joined")
        term.type("first line\r", "second line\r")
        bob.expect(r"<alice> second line")
        term.type("two words here", "\x17",                 # Ctrl+W: "two words "
                  "\x01", "\x1b[3~", "T",                    # Home, Delete, insert: "Two words "
                  "\x05", "now", "\x1b[D\x1b[D\x7f",         # End, type, left twice, backspace
                  "\x0b")                                    # Ctrl+K
        term.wait(lambda s: s.lines()[s.row] == self.PROMPT + "Two words"
                  and s.col == len(self.PROMPT + "Two words "), "the edited line")
        term.type("\x15", "\x1b[A", "\x1b[A", "\x1b[B")     # Ctrl+U, history up, up, down
        term.wait(lambda s: s.lines()[s.row] == self.PROMPT + "second line", "the history line")
        term.type("\x1b[H", "re: ", "\r")
        self.assertEqual(bob.expect(r"<alice> re.*"), "<alice> re: second line")

    def test_pasted_lines_are_sent_one_by_one(self):
        bob = self.connect("bob")
        term = self.start()
        bob.expect(r"\*\*\* alice joined")
        term.type("pasted one\rpasted two\rpasted three\r")   # a paste arrives in one read
        self.assertEqual(bob.lines_until(r"<alice> pasted three"),
                         ["<alice> pasted one", "<alice> pasted two"])

    def test_dumb_terminal_falls_back_to_plain_lines(self):
        import termios
        bob = self.connect("bob")
        term = TerminalSession(self, self.address[1], "--nick", "dumb", env={"TERM": "dumb"})
        bob.expect(r"\*\*\* dumb joined")
        self.assertTrue(termios.tcgetattr(term.slave)[3] & termios.ICANON)   # no raw mode
        term.type("plain and simple\n")
        self.assertEqual(bob.expect(r"<dumb> .*"), "<dumb> plain and simple")
        self.assertNotIn(b"\x1b[", term.raw)

    def test_a_long_line_scrolls_sideways_in_one_row(self):
        bob = self.connect("bob")
        term = self.start(cols=20)   # too narrow for the prompt: it becomes "> "
        bob.expect(r"\*\*\* alice joined")
        text = "日本語のテキストです" + "abcdefghijklmnopqrstuvwxyz"   # 20 + 26 columns

        def one_row(shown, column):
            def check(screen):
                lines = screen.lines()
                return (lines[screen.row] == "> " + shown and screen.col == column
                        and not any(lines[screen.row + 1:]))
            return check
        term.type(text)
        term.wait(one_row("klmnopqrstuvwxyz", 18), "the end of the line, the cursor after it")
        bob.say("bump")   # a redraw
        term.wait(lambda s: re.fullmatch(self.STAMP + "<bob> bump", s.lines()[s.row - 1])
                  and one_row("klmnopqrstuvwxyz", 18)(s), "the row redrawn below bob's line")
        term.type("\x01")   # Home: the start of the line comes into view
        term.wait(one_row("日本語のテキスト", 2), "the start of the line")
        term.type("\x1b[C" * 9)   # the cursor on す: the view follows it
        term.wait(one_row("語のテキストですa", 16), "the view following the cursor")
        term.type("\r")
        self.assertEqual(bob.expect(r"<alice> .*"), "<alice> " + text)

    def test_tab_completion(self):
        bob = self.connect("bobby")
        self.connect("alan")
        dev = self.connect("dev")
        dev.say("/join #devops")
        dev.expect(r"\*\*\* you are in #devops: .*")
        term = self.start()
        bob.say("anyone?")
        term.wait_line(self.STAMP + "<bobby> anyone.")
        term.type("bo\t", "yes\r")
        self.assertEqual(bob.expect(r"<alice> .*"), "<alice> bobby: yes")
        term.type("hi al\t")   # alan, not alice herself
        term.wait(lambda s: s.lines()[s.row] == self.PROMPT + "hi alan", "the completed nick")
        term.type("\x15/wh\t")
        term.wait(lambda s: s.lines()[s.row] == self.PROMPT + "/who", "the completed command")
        term.type("\x15/rooms\r")
        term.wait_line(self.STAMP + r"\*\*\* 2 rooms: .*")
        term.type("/join #d\t")
        term.wait(lambda s: s.lines()[s.row] == self.PROMPT + "/join #devops",
                  "the completed room")
        term.type("\r")
        term.wait(lambda s: s.lines()[s.row] == "#devops alice>", "the room in the prompt")

    def check_resize(self, reflow):
        """Narrow the terminal under a long draft, and widen it again: every line stays,
        once, and the draft is not left behind."""
        bob = self.connect("bob")
        term = self.start(cols=40)
        bob.say("first line from bob", "second line from bob")
        term.wait_line(self.STAMP + "<bob> second line from bob")
        draft = "a draft long enough to fill the row"
        term.type(draft)
        term.wait(lambda s: s.lines()[s.row].endswith("fill the row"), "the draft")
        term.resize(12, 20, reflow)
        term.wait(lambda s: s.lines()[s.row] == "> " + draft[-16:], "the draft at 20 columns")
        bob.say("narrow now")
        term.wait(lambda s: s.lines()[s.row] == "> " + draft[-16:]
                  and "<bob> narrow" in "".join(s.lines()), "a line printed above it")
        term.resize(12, 40, reflow)
        bob.say("wide again")
        term.wait_line(self.STAMP + "<bob> wide again")
        term.wait(lambda s: s.lines()[s.row] == self.PROMPT + draft[-24:], "the draft redrawn")
        screen = "\n".join(term.screen.lines())
        for said in ("first line from bob", "second line from bob", "narrow now"):
            if reflow:   # a rewrapping terminal keeps whole lines
                self.assertEqual(screen.count(said), 1, term.screen)
            else:        # a terminal that cuts lines keeps what fitted
                self.assertEqual(screen.count(said.split()[0]), 1, term.screen)
        self.assertEqual(screen.count("fill the row"), 1, term.screen)   # one draft, no copy
        self.assertEqual(screen.count("alice>"), 1, term.screen)
        term.type("\r")
        self.assertEqual(bob.expect(r"<alice> .*"), "<alice> " + draft)

    def test_resize_in_a_terminal_that_rewraps(self):
        self.check_resize(reflow=True)

    def test_resize_in_a_terminal_that_cuts_lines(self):
        self.check_resize(reflow=False)

    def test_colour_and_no_color(self):
        bob = self.connect("bob")
        term = self.start()
        bob.expect(r"\*\*\* alice joined")
        bob.say("hi alice")
        term.wait_line(self.STAMP + "<bob> hi alice")
        self.assertIn(b"\x1b[1m", term.raw)   # the mention is highlighted...
        self.assertIn(b"\x07", term.raw)      # ...and rings the bell
        plain = TerminalSession(self, self.address[1], "--nick", "carol",
                                env={"NO_COLOR": "1"})
        plain.wait(lambda s: s.lines()[s.row] == "#lobby carol>", "the prompt")
        bob.say("hi carol")
        plain.wait_line(self.STAMP + "<bob> hi carol")
        self.assertIsNone(re.search(rb"\x1b\[[0-9;]*m", plain.raw), plain.raw)

    def test_ctrl_d_leaves_and_restores_the_terminal(self):
        import termios
        bob = self.connect("bob")
        term = self.start()
        raw_mode = termios.tcgetattr(term.slave)
        self.assertFalse(raw_mode[3] & termios.ICANON)
        term.type("\x04")
        self.assertEqual(term.finish(), 0)
        self.assertEqual(bob.expect(r"\*\*\* alice left.*"), "*** alice left (quit)")
        self.assertEqual(term.final_mode, term.slave_attributes)

    def test_ctrl_c_leaves(self):
        term = self.start()
        term.type("half typed\x03")
        self.assertEqual(term.finish(), 0)
        self.assertNotIn(b"Traceback", term.raw)

    def test_lines_typed_while_disconnected_are_sent_on_reconnect(self):
        term = self.start()
        lines = ["offline %04d" % i for i in range(chat.KEYBOARD_QUEUE + 200)]   # more than fit

        def paste_while_down():   # the client retries after 0.75 s at the earliest
            term.wait_line(self.STAMP + r"\*\*\* connection to .* lost; reconnecting.*")
            threading.Thread(target=term.type, args=("\r".join(lines) + "\r",), name="paster",
                             daemon=True).start()   # blocks once the client's queue is full
        self.restart_server(before_start=paste_while_down, history=len(lines))
        bob = self.connect("bob")   # whenever bob joins, history plus live lines are all of it
        last = r"(\*\*\* \[\d\d:\d\d\] )?<alice> offline %04d" % (len(lines) - 1)
        received = bob.lines_until(last) + [bob.transcript[-1]]
        said = [HISTORY_ENTRY.sub("", line) for line in received]
        self.assertEqual([line for line in said if line.startswith("<alice>")],
                         ["<alice> " + line for line in lines])

    def test_ctrl_c_during_reconnect_backoff_exits_at_once(self):
        term = self.start()
        port = self.address[1]
        self.server.shutdown()
        self.server.server_close()
        # Whether Ctrl+C lands in the backoff or in the next attempt, which meets a server
        # that accepts and never greets, only Ctrl+C can end the client within the timeout.
        mute = socket.create_server(("127.0.0.1", port))
        self.addCleanup(mute.close)
        term.wait_line(self.STAMP + r"\*\*\* connection to 127.0.0.1:\d+ lost; reconnecting.*")
        term.type("\x03")
        self.assertEqual(term.finish(), 0)


class RecordingConsole:
    """A console for in-process client tests: records what would be shown."""

    interactive = True   # a person is typing

    def __init__(self):
        self.lines = []
        self.notices = []
        self.room = None
        self._changed = threading.Condition()
        self.client = None

    def start(self, client):
        self.client = client

    def show(self, *lines):
        with self._changed:
            self.lines.extend(lines)
            self._changed.notify_all()

    def show_own(self, line):
        self.show(line)

    def notice(self, text):
        with self._changed:
            self.notices.append(text)
            self._changed.notify_all()

    def set_nick(self, nick):
        pass

    def set_room(self, room):
        self.room = room

    def close(self):
        pass

    def wait(self, condition, what):
        with self._changed:
            if not self._changed.wait_for(condition, TIMEOUT):
                raise AssertionError("timed out waiting for %s; lines %r, notices %r"
                                     % (what, self.lines[-10:], self.notices))


class ReconnectTest(ServerTestCase):
    """Connection life: reconnect with backoff, history without repeats."""

    def start_client(self, address=None, **kwargs):
        console = RecordingConsole()
        settings = dict(nick="ci", console=console, retry_delay=0.05, retry_max=0.2)
        settings.update(kwargs)
        client = chat.ChatClient(*(address or self.address), **settings)
        result = {}
        thread = threading.Thread(target=lambda: result.update(code=self.run_client(client)),
                                  name="client", daemon=True)
        thread.start()
        self.addCleanup(thread.join, TIMEOUT)
        self.addCleanup(self.stop_client, client, thread)
        console.wait(lambda: "*** welcome to testroom, you are ci" in console.lines, "the nick")
        return client, console, thread, result

    @staticmethod
    def stop_client(client, thread):
        if thread.is_alive():
            try:
                client.interrupt()
            except KeyboardInterrupt:   # it was connecting: its socket times out
                pass

    @staticmethod
    def run_client(client):
        try:
            return client.run()
        except chat.ChatError as exc:
            return exc

    def test_reconnects_after_a_server_restart_and_keeps_its_nick(self):
        client, console, thread, result = self.start_client()
        self.restart_server()
        console.wait(lambda: any(n.startswith("connection to 127.0.0.1") for n in console.notices),
                     "the lost connection")
        console.wait(lambda: "reconnected to 127.0.0.1:%d" % self.address[1] in console.notices,
                     "the reconnection")
        alice = self.connect("alice")
        client.post("line", "back again")
        self.assertEqual(alice.expect(r"<.*"), "<ci> back again")
        self.assertEqual(console.lines.count("*** welcome to testroom, you are ci"), 2)

    def test_history_after_a_reconnect_shows_only_what_was_missed(self):
        alice = self.connect("alice")
        alice.say("one", "two")
        cable = Cable(self, self.address)
        client, console, thread, result = self.start_client(cable.address)
        alice.say("three")
        console.wait(lambda: "<alice> three" in console.lines, "a live line")
        client.post("line", "mine")
        alice.expect(r"<ci> mine")
        cable.cut()   # the network drops us
        console.wait(lambda: console.notices, "the lost connection")
        alice.say("four")
        console.wait(lambda: "reconnected to 127.0.0.1:%d" % cable.address[1] in console.notices,
                     "the reconnection")
        client.post("line", "after")
        alice.expect(r"<ci> after")
        said = [HISTORY_ENTRY.sub("", line) for line in console.lines
                if line.startswith("<") or HISTORY_ENTRY.match(line)]
        for line in ("<alice> one", "<alice> two", "<alice> three", "<ci> mine", "<alice> four"):
            self.assertEqual(said.count(line), 1, (line, console.lines))
        headers = [line for line in console.lines if line.startswith("*** --- last")]
        self.assertEqual(headers, ["*** --- last 2 messages in #lobby ---",   # says what it shows
                                   "*** --- last 1 message in #lobby ---"])

    def test_ctrl_c_during_backoff_exits_at_once(self):
        # The backoff (at least 22 s) outlasts the join below: only an interrupt ends it.
        client, console, thread, result = self.start_client(retry_delay=30, retry_max=30)
        self.server.shutdown()
        console.wait(lambda: console.notices, "the lost connection")
        client.interrupt()
        thread.join(TIMEOUT)
        self.assertFalse(thread.is_alive(), "the client waited out its backoff")
        self.assertEqual(result, {"code": 0})

    def leave_during_backoff(self, kind, text=None):
        # The backoff (at least 22 s) outlasts the join below: only leaving ends it.
        client, console, thread, result = self.start_client(retry_delay=30, retry_max=30)
        self.server.shutdown()
        console.wait(lambda: console.notices, "the lost connection")
        client.post(kind, text)
        thread.join(TIMEOUT)
        self.assertFalse(thread.is_alive(), "the client waited out its backoff")
        self.assertEqual(result, {"code": 0})

    def test_ctrl_d_during_backoff_leaves_at_once(self):
        self.leave_during_backoff("eof")

    def test_quit_during_backoff_leaves_at_once(self):
        self.leave_during_backoff("line", "/quit see you")

    def test_the_wait_shown_is_never_above_the_maximum(self):
        with mock.patch.object(chat.random, "uniform", return_value=1.25):   # the most jitter
            client, console, thread, result = self.start_client(retry_delay=30, retry_max=30)
            self.server.shutdown()
            console.wait(lambda: console.notices, "the lost connection")
        self.assertRegex(console.notices[0], r"; reconnecting in 30 s$")

    def test_a_reconnected_client_goes_back_to_its_room(self):
        client, console, thread, result = self.start_client()
        client.post("line", "/join #dev")
        console.wait(lambda: console.room == "#dev", "the move")
        self.restart_server()
        console.wait(lambda: console.lines.count("*** you are in #dev: 1 online: @ci") == 2,
                     "the way back to #dev")
        alice = self.connect("alice")
        alice.say("/who #dev")
        self.assertEqual(alice.expect(r"\*\*\* #dev: .*"), "*** #dev: 1 online: @ci")

    def test_the_room_passed_through_after_a_reconnect_shows_no_history(self):
        alice = self.connect("alice")
        cable = Cable(self, self.address)
        client, console, thread, result = self.start_client(cable.address)
        alice.say("said in the lobby")
        console.wait(lambda: "<alice> said in the lobby" in console.lines, "the lobby line")
        client.post("line", "/join #dev")
        console.wait(lambda: console.room == "#dev", "the move")
        bob = self.connect("bob")
        bob.say("/join #dev", "said in dev")
        console.wait(lambda: "<bob> said in dev" in console.lines, "the line in #dev")
        cable.cut()
        console.wait(lambda: console.lines.count("*** you are in #dev: 2 online: bob, ci") == 1,
                     "the way back to #dev")
        client.post("line", "/who")
        console.wait(lambda: "*** 2 online: bob, ci" in console.lines, "the answer")
        self.assertEqual([line for line in console.lines if "last" in line and "#lobby" in line],
                         [], console.lines)

    def test_a_muted_client_does_not_show_lines_as_said_until_the_mute_runs_out(self):
        self.server.options.op_password = "op"
        alice = self.connect("alice")
        alice.say("/op op")
        alice.expect(r"\*\*\* you are an operator now")
        client, console, thread, result = self.start_client()
        alice.say("/mute ci 1s")
        console.wait(lambda: any("muted you" in line for line in console.lines), "the mute")
        client.post("line", "hush")
        console.wait(lambda: any("you are muted" in line for line in console.lines), "refusal")
        self.assertNotIn("<ci> hush", console.lines)
        console.wait(lambda: "*** you may talk again" in console.lines, "the end of the mute")
        client.post("line", "free")
        self.assertEqual(alice.expect(r"<ci> .*"), "<ci> free")
        console.wait(lambda: "<ci> free" in console.lines, "the line shown as said")

    def test_a_line_over_the_limit_is_shown_refused_not_said(self):
        self.server.options.max_line = 100
        alice = self.connect("alice")
        client, console, thread, result = self.start_client()
        for _ in range(2):   # the server refuses the first; the client knows the next
            client.post("line", "x" * 150)
            console.wait(lambda: console.lines.count(
                "*** error: line too long (over 100 bytes), not sent") == _ + 1, "the refusal")
        self.assertNotIn("<ci> " + "x" * 150, console.lines[-1:])
        client.post("line", "short")
        self.assertEqual(alice.expect(r"<ci> .*"), "<ci> short")

    def test_no_reconnect_fails_with_the_reason(self):
        client, console, thread, result = self.start_client(reconnect=False)
        self.server.shutdown()
        thread.join(TIMEOUT)
        self.assertIsInstance(result["code"], chat.ChatError)
        self.assertIn("connection to 127.0.0.1:%d lost" % self.address[1], str(result["code"]))


class HistoryTest(ServerTestCase):

    options = {"history": 3}

    def test_newcomer_gets_the_last_public_lines(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        alice.say("one", "two", "/me three", "/msg bob private", "four")
        bob.expect(r"<alice> four")
        peer = self.open_peer()
        peer.expect(r"\*\*\* type /help for commands")
        self.assertEqual(peer.next_line(), "*** --- last 3 messages in #lobby ---")
        for expected in ("<alice> two", "* alice three", "<alice> four"):
            self.assertRegex(peer.next_line(), r"^\*\*\* \[\d\d:\d\d\] " + re.escape(expected) + "$")
        self.assertEqual(peer.next_line(), "*** --- end of history ---")
        bob.say("live")
        self.assertEqual(peer.next_line(), "<bob> live")

    def test_no_history_block_in_a_quiet_room(self):
        self.connect("alice")
        peer = self.open_peer()
        peer.expect(r"\*\*\* type /help for commands")
        peer.say("/who")
        self.assertRegex(peer.next_line(), r"\*\*\* 2 online: .*")


class PipedClientTest(ServerTestCase):

    def test_piped_output_is_exactly_the_protocol_lines(self):
        alice = self.connect("alice")
        alice.say("before ci came")
        client = ClientProcess(self, self.address[1], "--nick", "ci")
        alice.expect(r"\*\*\* ci joined")
        alice.say("héllo ✓", "/me waves", "/msg ci psst")
        alice.sync()
        code, out, err = client.finish()
        self.assertEqual((code, err), (0, ""))
        history = re.sub(rb"\[\d\d:\d\d\]", b"[HH:MM]", out.encode())
        self.assertEqual(history, (
            "*** welcome to testroom, you are ci\n*** you are in #lobby: 2 online: alice, ci\n"
            "*** type /help for commands\n*** --- last 1 message in #lobby ---\n"
            "*** [HH:MM] <alice> before ci came\n*** --- end of history ---\n"
            "<alice> héllo ✓\n* alice waves\n*alice* psst\n*** bye\n").encode())

    def test_a_hostile_server_cannot_drive_the_terminal(self):
        with socket.create_server(("127.0.0.1", 0)) as fake:
            client = ClientProcess(self, fake.getsockname()[1], "--no-reconnect")
            conn, _ = fake.accept()
            with conn:
                conn.recv(100)
                conn.sendall(b"*** welcome to evil, you are bob\n\x1b]0;pwned\x07<evil> \x1b[2Jhi"
                             b"\xc2\x9b31m there\xe2\x80\xae\n\x1b[?1049h*** bye\n")
            code, out, err = client.finish()
        self.assertEqual(out, "*** welcome to evil, you are bob\n<evil> hi there\n*** bye\n")
        self.assertEqual(code, 1)   # the server went away

    def test_a_hostile_server_cannot_exhaust_the_client(self):
        with socket.create_server(("127.0.0.1", 0)) as fake:
            client = ClientProcess(self, fake.getsockname()[1], "--no-reconnect")
            conn, _ = fake.accept()
            with conn:
                conn.recv(100)   # the client's nick: read, so the close is no reset
                conn.sendall(b"*** welcome to evil, you are bob\n" + b"x" * (3 << 20) + b"\n")
                conn.sendall(b"*** --- last 50 messages in #lobby ---\n*** [10:00] <a> said\n"
                             b"<b> no end of history came\n*** bye\n")
            code, out, err = client.finish()
        self.assertEqual(out, "*** welcome to evil, you are bob\n"
                         "*** --- last 1 message in #lobby ---\n*** [10:00] <a> said\n"
                         "<b> no end of history came\n*** bye\n")
        self.assertIn("the server sent a line of over 1048576 bytes; it is left out", err)

    def test_timestamps_on_request(self):
        alice = self.connect("alice")
        client = ClientProcess(self, self.address[1], "--nick", "ci", "--timestamps")
        alice.expect(r"\*\*\* ci joined")
        alice.say("stamped")
        alice.sync()
        code, out, err = client.finish()
        self.assertIn("] <alice> stamped\n", out)
        self.assertRegex(out, r"(?m)^\[\d\d:\d\d\] <alice> stamped$")


if __name__ == "__main__":
    unittest.main()


class HistoryMemoryTest(ServerTestCase):
    """All rooms' histories share one bound: the rooms quiet the longest give first."""

    options = {"history": 10, "history_memory": 12 * (chat.HistoryBudget.LINE + 100 + 3)}

    def test_the_quietest_rooms_lose_their_oldest_lines_first(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        alice.say("/join #a")   # keeps it: an empty room goes, with its history
        alice.expect(r"\*\*\* you are in #a: .*")
        for room in ("#a", "#b"):
            bob.say("/join " + room, *("%s %02d %s" % (room, i, "x" * 93) for i in range(10)))
        bob.sync()
        carol = self.connect("carol")
        carol.say("/join #b")
        self.assertEqual(len(history_of(carol)), 10)
        carol.say("/join #a")
        self.assertEqual([line[6:11] for line in history_of(carol)], ["#a 08", "#a 09"])


# --- Several nodes through Redis ---

REDIS_SERVER = shutil.which("redis-server")


class RedisServer:
    """A real redis-server on a unix socket in a temporary folder, stopped at the end."""

    def __init__(self, test, *options):
        self.folder = tempfile.mkdtemp(prefix="chat-redis-")
        test.addCleanup(shutil.rmtree, self.folder, True)
        self.path = os.path.join(self.folder, "redis.sock")
        self.url = "unix://" + self.path
        self.options = list(options)
        self.proc = None
        self.start()
        test.addCleanup(self.stop)

    def start(self):
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", "0", "--unixsocket", self.path, "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", self.folder] + self.options,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._answers, message="redis-server to start")

    def _answers(self):
        try:
            return self.call("PING") == "PONG"
        except chat.RedisError:
            return False

    def call(self, *args):
        conn = chat.RespConnection.open(chat.RedisTarget.parse(self.url), TIMEOUT)
        try:
            if self.options[:1] == ["--requirepass"]:
                conn.call("AUTH", self.options[1])
            return conn.call(*args)
        finally:
            conn.close()

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(TIMEOUT)

    def pause(self, test):
        os.kill(self.proc.pid, signal.SIGSTOP)
        test.addCleanup(self.resume)

    def resume(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)


@unittest.skipUnless(REDIS_SERVER and POSIX, "needs redis-server")
class ClusterTestCase(unittest.TestCase):
    """Nodes of one chat, real ChatServers in threads, linked by a real redis-server."""

    NODES = 3
    DEFAULTS = dict(host="127.0.0.1", name="testroom", rate=0, greet_delay=5.0,
                    close_linger=0.5, shutdown_timeout=1.0, node_timeout=1.0,
                    redis_timeout=1.0, op_password="op secret")

    def setUp(self):
        self.redis = RedisServer(self)
        self.nodes = [self.start_node(letter) for letter in "ABC"[:self.NODES]]

    def start_node(self, name, **options):
        settings = dict(self.DEFAULTS, port=0, redis=self.redis.url, node=name)
        settings.update(options)
        server = chat.ChatServer(chat.ServerOptions(**settings))
        self.addCleanup(server.server_close)
        thread = threading.Thread(target=server.serve_forever, name="node-" + name, daemon=True)
        thread.start()
        self.addCleanup(thread.join, TIMEOUT)
        self.addCleanup(server.shutdown)
        return server

    def peer(self, node, source="127.0.0.1"):
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.settimeout(TIMEOUT)
        sock.bind((source, 0))
        sock.connect(self.nodes[node].addresses[0])
        return Peer(sock)

    def connect(self, node, nick, source="127.0.0.1"):
        peer = self.peer(node, source)
        peer.say("/nick " + nick)
        peer.expect(r"\*\*\* type /help for commands")
        return peer

    def irc(self, node, nick):
        sock = socket.create_connection(self.nodes[node].addresses[0], timeout=TIMEOUT)
        self.addCleanup(sock.close)
        peer = IrcPeer(sock)
        peer.register(nick)
        return peer

    def ws(self, node, nick):
        peer = WsPeer(self.nodes[node].addresses[0])
        self.addCleanup(peer.close)
        peer.say("/nick " + nick)
        peer.expect(type="room")
        return peer

    def wait_listed(self, node, *nicks, room="#lobby"):
        """Wait until node lists nicks in room (the other nodes have told it)."""
        def listed():
            found = {info.name: info for info in self.nodes[node].rooms()}
            return room in found and set(nicks) <= set(self.listed(node, room))
        wait_for(listed, message="%s listed on node %d" % (", ".join(nicks), node))

    def listed(self, node, room="#lobby"):
        peer = self.connect(node, "seer%d" % next(SEERS))
        peer.say("/who " + room)
        names = peer.expect(r"\*\*\* (%s: )?\d+ online: .*" % re.escape(room))
        peer.say("/quit")
        return [name.lstrip("@") for name in names.split(": ")[-1].split(", ")]


SEERS = itertools.count(1)


class ClusterTest(ClusterTestCase):
    """Three nodes are one chat, for every kind of client."""

    def test_nc_irc_and_browser_on_three_nodes_talk_as_one(self):
        alice = self.connect(0, "alice")
        bob = self.irc(1, "bob")
        carol = self.ws(2, "carol")
        self.assertEqual(alice.expect(r"\*\*\* carol .*"), "*** carol joined")
        dave = self.ws(0, "dave")
        carol.expect(type="joined", nick="dave")
        alice.say("hello from nc")
        self.assertEqual(bob.expect(r":alice\S* PRIVMSG .*"),
                         ":alice!alice@chat PRIVMSG #lobby :hello from nc")
        said = carol.expect(type="said")
        self.assertEqual(said["text"], "hello from nc")
        self.assertGreater(said["seq"], 0)
        self.assertEqual(dave.expect(type="said")["seq"], said["seq"])   # one number, everywhere
        bob.irc("PRIVMSG #lobby :hello from irc")
        self.assertEqual(alice.expect(r"<bob> .*"), "<bob> hello from irc")
        carol.say("hello from the web")
        self.assertEqual(alice.expect(r"<carol> .*"), "<carol> hello from the web")
        self.assertEqual(bob.expect(r":carol\S* PRIVMSG .*"),
                         ":carol!carol@chat PRIVMSG #lobby :hello from the web")
        alice.say("/who")
        self.assertEqual(alice.expect(r"\*\*\* \d+ online: .*"),
                         "*** 4 online: alice, bob, carol, dave")
        bob.irc("NAMES #lobby")
        self.assertRegex(bob.numeric("353"), r"^:\S+ 353 bob = #lobby :.*")

    def test_client_tags_cross_nodes_and_come_back_from_redis(self):
        alice, bob, carol = self.irc(0, "alice"), self.irc(1, "bob"), self.irc(2, "carol")
        for peer in (alice, bob, carol):
            peer.irc("CAP REQ :message-tags")
            peer.expect(r":\S+ CAP \S+ ACK :message-tags")
        self.wait_listed(0, "bob", "carol")
        self.wait_listed(1, "alice")
        alice.irc("MODE alice +B")   # a bot, and every node knows
        alice.expect(r".* MODE alice \+B")
        wait_for(lambda: ":is a bot" in "\n".join(self.irc_whois(bob, "alice")), message="335")
        alice.irc("@+draft/reply=7-x;+a=b\\sc PRIVMSG #lobby :hi", "@+typing=active TAGMSG #lobby",
                  "@+typing=paused TAGMSG bob", "@+r=1 PRIVMSG bob :psst")
        tags, line = irc_tagged(bob.expect(r".* PRIVMSG #lobby :hi"))
        self.assertEqual((tags["+draft/reply"], tags["+a"], tags["bot"]), ("7-x", "b c", ""))
        said_id = tags["msgid"]
        tags, line = irc_tagged(bob.next_line())
        self.assertEqual((tags["+typing"], line), ("active", ":alice!alice@chat TAGMSG #lobby"))
        tags, line = irc_tagged(bob.next_line())
        self.assertEqual((tags["+typing"], line), ("paused", ":alice!alice@chat TAGMSG bob"))
        tags, line = irc_tagged(bob.next_line())
        self.assertEqual((tags["+r"], line), ("1", ":alice!alice@chat PRIVMSG bob :psst"))
        self.assertRegex(tags["msgid"], r"^m\d+-")
        self.assertEqual(irc_tagged(carol.expect(r".* TAGMSG #lobby"))[0]["+typing"], "active")
        newcomer = self.irc(2, "dave")   # the line comes back from Redis' stream, tags and all
        newcomer.irc("CAP REQ :message-tags batch draft/chathistory", "CHATHISTORY LATEST #lobby * 5")
        tags, _ = irc_tagged(newcomer.expect(r".* PRIVMSG #lobby :hi"))
        self.assertEqual((tags["msgid"], tags["+draft/reply"]), (said_id, "7-x"))

    @staticmethod
    def irc_whois(peer, nick):
        peer.irc("WHOIS " + nick)
        return peer.lines_until(r":\S+ 318 .*")

    def test_monitor_sees_nicks_come_and_go_on_other_nodes(self):
        alice = self.irc(0, "alice")
        alice.irc("MONITOR + bob")
        alice.numeric("731")
        bob = self.connect(1, "bob")
        self.assertRegex(alice.numeric("730"), r"^:\S+ 730 alice :bob$")
        bob.say("/quit")
        self.assertRegex(alice.numeric("731"), r"^:\S+ 731 alice :bob$")
        alice.irc("MONITOR + later")
        alice.numeric("731")
        later = IrcPeer(socket.create_connection(self.nodes[1].addresses[0], timeout=TIMEOUT))
        self.addCleanup(later.sock.close)
        later.irc("NICK later", "USER l 0 * :L")   # in no room: still online everywhere
        later.numeric("376")
        self.assertRegex(alice.numeric("730"), r"^:\S+ 730 alice :later$")

    def test_every_member_sees_one_order_once(self):
        alice, dave = self.connect(0, "alice"), self.connect(1, "dave")
        watchers = [self.connect(node, "w%d" % node) for node in range(3)]
        self.wait_listed(2, "alice", "dave", "w0", "w1", "w2")
        for number in range(40):
            alice.say("a%02d" % number)
            dave.say("d%02d" % number)
        seen = []
        for watcher in watchers:
            lines = []
            while len(lines) < 80:
                line = watcher.next_line()
                if line.startswith(("<alice>", "<dave>")):
                    lines.append(line)
            seen.append(lines)
            self.assertNotRegex("\n".join(watcher.sync()), r"<(alice|dave)>")   # no repeats
        self.assertEqual(seen[0], seen[1])
        self.assertEqual(seen[0], seen[2])
        self.assertEqual(sorted(seen[0]), sorted(["<alice> a%02d" % n for n in range(40)]
                                                 + ["<dave> d%02d" % n for n in range(40)]))

    def test_nicks_are_unique_across_nodes(self):
        self.connect(0, "alice")
        self.wait_listed(1, "alice")
        other = self.peer(1)
        other.say("/nick ALICE", "/nick a1ice", "/nick bob")
        self.assertEqual(other.expect(r"\*\*\* error: nick .*"), "*** error: nick ALICE is taken")
        self.assertEqual(other.expect(r"\*\*\* error: nick .*"),
                         "*** error: nick a1ice looks like alice, who is online")
        other.expect(r"\*\*\* you are now known as bob")

    def test_private_words_topics_away_and_whois_across_nodes(self):
        alice, bob = self.connect(0, "alice"), self.connect(1, "bob")
        carol = self.connect(2, "carol")
        self.wait_listed(0, "bob", "carol")
        alice.say("/msg bob psst")
        self.assertEqual(bob.expect(r"\*alice\* .*"), "*alice* psst")
        bob.say("/away lunch")
        bob.expect(r"\*\*\* you are away.*")
        alice.say("/topic the plan")
        self.assertEqual(carol.expect(r"\*\*\* alice set .*"),
                         "*** alice set the topic of #lobby: the plan")
        wait_for(lambda: self.nodes[2].rooms()[0].topic == "the plan", message="the topic")
        wait_for(lambda: "lunch" in "\n".join(self.whois(0, "bob")), message="bob's away")
        alice.say("/msg bob are you there?")
        self.assertEqual(alice.expect(r"\*\*\* bob is away.*"), "*** bob is away: lunch")
        self.assertEqual(bob.expect(r"\*alice\* .*"), "*alice* are you there?")
        carol.say("/ignore alice")
        carol.expect(r"\*\*\* ignoring .*")
        alice.say("/msg carol hello?", "/msg bob last")
        bob.expect(r"\*alice\* last")
        self.assertNotIn("*alice* hello?", carol.sync())

    def whois(self, node, nick):
        peer = self.connect(node, "asker%d" % next(SEERS))
        peer.say("/whois " + nick, "/who")
        return peer.lines_until(r"\*\*\* \d+ online: .*")

    def test_a_newcomer_on_another_node_gets_the_history(self):
        alice, watcher = self.connect(0, "alice"), self.connect(2, "watcher")
        alice.say("first", "second")
        watcher.expect(r"<alice> second")
        late = self.peer(2)
        late.say("/nick late")
        self.assertEqual(history_of(late), ["<alice> first", "<alice> second"])

    def test_operators_act_on_members_of_other_nodes(self):
        alice = self.connect(0, "alice")
        alice.say("/op op secret")
        alice.expect(r"\*\*\* you are an operator now")
        bob = self.connect(1, "bob", "127.0.0.2")
        carol = self.connect(2, "carol", "127.0.0.3")
        dave = self.connect(2, "dave", "127.0.0.4")
        self.wait_listed(0, "bob", "carol", "dave")
        alice.say("/kick bob enough")
        self.assertEqual(bob.expect_closed()[-1], "*** you were kicked by alice (enough)")
        self.assertEqual(carol.expect(r"\*\*\* bob was .*"), "*** bob was kicked by alice (enough)")
        alice.say("/mute carol 10m")
        self.assertRegex(carol.expect(r"\*\*\* alice muted you.*"), r"for (10m|9m \d+s)")
        carol.say("can I talk?")
        self.assertEqual(carol.expect(r"\*\*\* error.*"),
                         "*** error: you are muted; you may still /msg an operator")
        alice.say("/ban dave 1h spam")
        self.assertEqual(dave.expect_closed()[-1], "*** you were kicked by alice (banned: spam)")
        again = self.peer(1, "127.0.0.4")
        again.say("/nick dave")
        self.assertEqual(again.expect_closed(), ["*** error: banned"])


class ClusterFaultTest(ClusterTestCase):
    """A node killed, Redis restarted or paused: local service goes on, nothing said
    is lost or told twice."""

    NODES = 2

    def said_lines(self, peer, count):
        """The next count lines said in rooms (and the notices between them)."""
        lines = []
        while sum(line.startswith("<") for line in lines) < count:
            lines.append(peer.next_line())
        return [line for line in lines if line.startswith("<")]

    def test_a_killed_node_is_noticed_and_its_members_leave(self):
        node = ServerProcess(self, "--redis", self.redis.url, "--node-timeout", "1",
                             "--node", "doomed")
        sock = socket.create_connection(("127.0.0.1", node.port), timeout=TIMEOUT)
        self.addCleanup(sock.close)
        bob = Peer(sock)
        bob.say("/nick bob")
        bob.expect(r"\*\*\* type /help for commands")
        alice = self.connect(0, "alice")
        self.wait_listed(0, "bob")
        node.proc.kill()
        killed = time.monotonic()
        self.assertEqual(alice.expect(r"\*\*\* bob left .*"), "*** bob left (server lost)")
        self.assertLess(time.monotonic() - killed, 1.2 * 1.0 + 1.0)   # the bound, and slack
        alice.say("/nick bob")
        self.assertEqual(alice.next_line(), "*** you are now known as bob")

    def test_redis_restarted_mid_conversation_loses_and_repeats_nothing(self):
        alice, bob = self.connect(0, "alice"), self.connect(1, "bob")
        self.wait_listed(1, "alice")
        alice.say("before")
        bob.expect(r"<alice> before")
        self.redis.stop()
        for peer in (alice, bob):
            peer.expect(r"\*\*\* the other servers of this chat are out of reach.*")
        alice.say("a1", "a2")
        bob.say("b1")
        carol = self.connect(1, "carol")   # local service goes on
        bob.say("b2")
        self.assertEqual(self.said_lines(carol, 1), ["<bob> b2"])
        self.redis.start()
        for peer in (alice, bob):
            peer.expect(r"\*\*\* the other servers of this chat are back in reach")
        alice.say("after")
        self.assertEqual(self.said_lines(bob, 3), ["<alice> a1", "<alice> a2", "<alice> after"])
        self.assertEqual(self.said_lines(alice, 2), ["<bob> b1", "<bob> b2"])
        bob.say("/who")
        self.assertEqual(bob.expect(r"\*\*\* \d+ online: .*"), "*** 3 online: alice, bob, carol")
        for peer in (alice, bob):
            self.assertNotRegex("\n".join(peer.sync()), "<")   # nothing twice

    def test_a_paused_redis_costs_no_local_service(self):
        alice, bob = self.connect(0, "alice"), self.connect(1, "bob")
        carol = self.connect(0, "carol")
        self.wait_listed(1, "alice", "carol")
        self.redis.pause(self)
        alice.say("while paused")
        self.assertEqual(self.said_lines(carol, 1), ["<alice> while paused"])
        self.redis.resume()
        alice.expect(r"\*\*\* the other servers of this chat are back in reach")
        alice.say("resumed")
        self.assertEqual(self.said_lines(bob, 2), ["<alice> while paused", "<alice> resumed"])
        self.assertEqual(self.said_lines(carol, 1), ["<alice> resumed"])
        self.assertNotRegex("\n".join(bob.sync() + carol.sync()), "<")

    def test_a_subscriber_cut_by_its_buffer_limit_catches_up_from_the_streams(self):
        self.redis.call("CONFIG", "SET", "client-output-buffer-limit", "pubsub 4kb 4kb 0")
        alice, bob = self.connect(0, "alice"), self.connect(1, "bob")
        self.wait_listed(1, "alice")
        hold = threading.Event()
        self.addCleanup(hold.set)
        threading.Thread(target=self.nodes[1].run_in_loop, args=(lambda: hold.wait(TIMEOUT),),
                         daemon=True).start()
        lines = ["line %03d %s" % (number, "x" * 100) for number in range(200)]
        alice.say(*lines)
        wait_for(lambda: self.redis.call("INFO", "stats").count(b"client_output_buffer_limit_"
                                                                b"disconnections:0") == 0,
                 message="Redis to cut the subscriber")
        hold.set()
        self.assertEqual(self.said_lines(bob, 200), ["<alice> " + line for line in lines])
        self.assertNotRegex("\n".join(bob.sync()), "<")


@unittest.skipUnless(REDIS_SERVER and POSIX, "needs redis-server")
class ClusterCommandLineTest(unittest.TestCase):
    """Starting a node: plain words when Redis cannot be used; --workers; /healthz and
    /metrics."""

    def test_redis_that_cannot_be_used_is_a_clear_error(self):
        redis = RedisServer(self, "--requirepass", "right")
        cases = [("unix:///nonexistent/redis.sock", r"cannot reach Redis at unix:///nonexistent"),
                 ("http://localhost:6379", r"must start with redis://, rediss:// or unix://"),
                 ("redis://localhost:notaport", r"port .* is not a number"),
                 ("unix://:wrong@" + redis.path, r"Redis refused the password: WRONGPASS"),
                 ("unix://:right@" + redis.path + "?db=99", r"Redis refused database 99"),
                 ("unix://" + redis.path, r"Redis refused INFO: NOAUTH"),
                 ("redis://:right%40@127.0.0.1:1", r"cannot reach Redis at redis://:\*\*\*@127.0.0.1:1/0"),
                 ("redis://u:right@127.0.0.1:99999", r"not a number from 1 to 65535")]
        results = run_clis([("server", "--port", "0", "--redis", url) for url, _ in cases])
        for (url, message), result in zip(cases, results):
            with self.subTest(url=url):
                self.assertEqual(result.returncode, 1, result.stderr)
                self.assertRegex(result.stderr, r"chat.py: (invalid --redis: )?.*" + message)
                self.assertNotIn("Traceback", result.stderr)
                self.assertNotIn("right", result.stderr.replace("--requirepass", ""))

    def test_a_server_that_is_not_redis_is_a_clear_error(self):
        with socket.create_server(("127.0.0.1", 0)) as listener:
            def answer():
                conn, _ = listener.accept()
                with conn:
                    conn.recv(1024)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            threading.Thread(target=answer, daemon=True).start()
            result = run_cli("server", "--port", "0", "--redis",
                             "redis://127.0.0.1:%d" % listener.getsockname()[1])
        self.assertEqual(result.returncode, 1)
        self.assertIn("chat.py: not a Redis reply", result.stderr)

    def test_the_url_may_come_from_the_environment(self):
        redis = RedisServer(self)
        node = ServerProcess(self, env={"CHAT_REDIS_URL": redis.url})
        wait_for(lambda: len(redis.call("ZRANGE", "chat:nodes", 0, -1)) == 1,
                 message="the node in Redis")
        node.stop()

    @unittest.skipUnless(sys.platform.startswith("linux"), "needs Linux's SO_REUSEPORT")
    def test_workers_share_one_port_and_one_chat(self):
        redis = RedisServer(self)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        proc = subprocess.Popen([sys.executable, CHAT, "server", "--host", "127.0.0.1",
                                 "--port", str(port), "--redis", redis.url, "--workers", "2"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=child_env())
        self.addCleanup(proc.wait, TIMEOUT)
        self.addCleanup(proc.terminate)
        wait_for(lambda: len(redis.call("ZRANGE", "chat:nodes", 0, -1)) == 2,
                 message="two workers in Redis")
        peers = []
        for number in range(8):
            sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
            self.addCleanup(sock.close)
            peer = Peer(sock)
            peer.say("/nick p%d" % number)
            peer.expect(r"\*\*\* type /help for commands")
            peers.append(peer)
        peers[0].say("to every worker")
        for peer in peers[1:]:
            self.assertEqual(peer.expect(r"<p0> .*"), "<p0> to every worker")
        nodes = {node.decode().rsplit("~", 1)[0] for node in
                 redis.call("ZRANGE", "chat:nodes", 0, -1)}
        self.assertEqual(nodes, {"%s:%d-w1" % (socket.gethostname(), port),
                                 "%s:%d-w2" % (socket.gethostname(), port)})

    def test_workers_need_redis(self):
        result = run_cli("server", "--port", "7777", "--workers", "2")
        self.assertEqual(result.returncode, 1)
        self.assertIn("--workers needs --redis", result.stderr)


class HealthTest(ClusterTestCase):
    """What a load balancer and Prometheus ask, on the chat's port."""

    NODES = 1

    def get(self, path, source="127.0.0.1", host="anything.example", node=0):
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.settimeout(TIMEOUT)
        sock.bind((source, 0))
        sock.connect(self.nodes[node].addresses[0])
        sock.sendall(("GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path, host)).encode())
        return http_response(sock.makefile("rb"))

    def test_healthz_says_whether_the_node_serves_linked(self):
        self.assertEqual(self.get("/healthz")[::2], (200, b"ok\n"))
        self.redis.stop()
        wait_for(lambda: self.get("/healthz")[0] == 503, message="503 without Redis")
        status, _, body = self.get("/healthz")
        self.assertRegex(body.decode(), r"^Redis is out of reach: .+\n$")
        self.redis.start()
        wait_for(lambda: self.get("/healthz")[0] == 200, message="200 with Redis back")

    def test_metrics_in_the_prometheus_text_format(self):
        alice = self.connect(0, "alice")
        alice.say("one", "two")
        alice.sync()
        status, headers, body = self.get("/metrics")
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], "text/plain; version=0.0.4; charset=utf-8")
        samples, declared = {}, {}
        for line in body.decode().splitlines():
            help_line = re.fullmatch(r"# HELP (chat_\w+) \S.*", line)
            type_line = re.fullmatch(r"# TYPE (chat_\w+) (gauge|counter)", line)
            sample = re.fullmatch(r'(chat_\w+)(\{dialect="\w+"\})? (\d+(\.\d+)?)', line)
            self.assertTrue(help_line or type_line or sample, "not Prometheus text: %r" % line)
            if type_line:
                declared[type_line.group(1)] = type_line.group(2)
            if sample:
                self.assertIn(sample.group(1), declared, "a sample before its TYPE")
                samples[sample.group(1) + (sample.group(2) or "")] = float(sample.group(3))
        for name, kind in declared.items():
            self.assertEqual(name.endswith("_total"), kind == "counter", name)
        self.assertEqual(samples['chat_connections{dialect="line"}'], 1)
        self.assertEqual(samples['chat_connections{dialect="http"}'], 1)
        self.assertEqual(samples["chat_local_members"], 1)
        self.assertGreaterEqual(samples["chat_room_lines_total"], 2)
        self.assertGreaterEqual(samples["chat_messages_received_total"], 4)
        self.assertEqual(samples["chat_redis_up"], 1)

    def test_metrics_are_only_for_allowed_addresses(self):
        self.nodes.append(self.start_node("D", metrics_allow=("127.0.0.1/32",)))
        self.assertEqual(self.get("/metrics", source="127.0.0.2", node=1)[0], 403)
        self.assertEqual(self.get("/healthz", source="127.0.0.2", node=1)[0], 200)
        self.assertEqual(self.get("/metrics", node=1)[0], 200)
        self.assertEqual(self.get("/metrics", source="127.0.0.2")[0], 200)   # loopback


class RoomRightsTest(ServerTestCase):
    """Rooms their own people run, the same from nc, IRC and the page."""

    options = {"greet_delay": 5.0, "op_password": "op secret"}

    def irc_peer(self, nick):
        peer = IrcPeer(socket.create_connection(self.address, timeout=TIMEOUT))
        self.addCleanup(peer.sock.close)
        peer.register(nick)
        return peer

    def test_the_first_member_runs_the_room_from_nc(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        alice.say("/join #dev")
        self.assertEqual(alice.expect(r"\*\*\* you are in #dev.*"), "*** you are in #dev: 1 online: @alice")
        bob.say("/join #dev", "/mode +m")
        self.assertEqual(bob.expect(r"\*\*\* error.*"), "*** error: only operators of #dev may do that")
        alice.say("/mode +v bob", "/mode +mt", "/mode +o nobody")
        self.assertEqual(bob.expect(r"\*\*\* alice gave .*"), "*** alice gave bob a voice in #dev")
        self.assertEqual(bob.next_line(), "*** alice made #dev moderated, topic-locked")
        self.assertEqual(alice.expect(r"\*\*\* error.*"), "*** error: no such nick nobody")
        carol = self.connect("carol")
        carol.say("/join #dev", "muted by the mode", "/topic mine")
        self.assertEqual(carol.expect(r"\*\*\* error.*"), "*** error: #dev is moderated: only "
                                                          "its operators and voiced members talk")
        self.assertEqual(carol.next_line(), "*** error: only operators of #dev may do that")
        bob.say("voiced, I talk", "/who")
        self.assertEqual(alice.expect(r"<bob> .*"), "<bob> voiced, I talk")
        self.assertEqual(bob.expect(r"\*\*\* \d online: .*"), "*** 3 online: @alice, +bob, carol")
        alice.say("/mode -v+o bob carol", "/mode")
        self.assertEqual(carol.expect(r"\*\*\* alice took .*"),
                         "*** alice took the voice of bob in #dev")
        self.assertEqual(carol.next_line(), "*** alice gave carol operator status in #dev")
        self.assertEqual(alice.expect(r"\*\*\* #dev is .*"), "*** #dev is moderated, "
                                                             "closed to outsiders, topic-locked")
        carol.say("/kick bob enough")
        self.assertEqual(bob.expect(r"\*\*\* bob was kicked .*"),
                         "*** bob was kicked by carol (enough)")
        self.assertEqual(bob.expect(r"\*\*\* you are in .*"), "*** you are in #lobby: 1 online: bob")

    def test_keys_limits_invitations_and_secret_rooms(self):
        alice, bob, carol = self.connect("alice"), self.connect("bob"), self.connect("carol")
        alice.say("/join #den", "/mode +ks hush", "/mode +l 2")
        alice.expect(r"\*\*\* alice made #den limited to 2")
        bob.say("/rooms", "/join #den", "/join #den wrong", "/join #den hush")
        self.assertEqual(bob.expect(r"\*\*\* \d+ rooms?: .*"), "*** 1 rooms: #lobby (2)")
        self.assertEqual(bob.expect(r"\*\*\* error.*"), "*** error: #den needs its key: /join #den KEY")
        self.assertEqual(bob.expect(r"\*\*\* error.*"), "*** error: #den needs its key: /join #den KEY")
        bob.expect(r"\*\*\* you are in #den: 2 online: @alice, bob")
        carol.say("/join #den hush")
        self.assertEqual(carol.expect(r"\*\*\* error.*"), "*** error: #den is full")
        alice.say("/mode -l+i-k *", "/invite carol")
        self.assertEqual(carol.expect(r"\*\*\* alice invites .*"),
                         "*** alice invites you to #den: /join #den")
        self.assertEqual(alice.expect(r"\*\*\* invited .*"), "*** invited carol to #den")
        carol.say("/join #den")
        carol.expect(r"\*\*\* you are in #den: 3 online: .*")
        carol.say("/part", "/join #den")
        self.assertEqual(carol.expect(r"\*\*\* error.*"), "*** error: #den is invite-only: ask "
                                                          "one of its operators")

    def test_irc_clients_run_rooms_as_on_any_server(self):
        alice, bob = self.irc_peer("alice"), self.irc_peer("bob")
        alice.irc("JOIN #chan", "MODE #chan")
        self.assertEqual(alice.expect(r":testroom 353 .*"), ":testroom 353 alice = #chan :@alice")
        self.assertEqual(alice.numeric("324"), ":testroom 324 alice #chan +n")
        self.assertRegex(alice.numeric("329"), r":testroom 329 alice #chan \d+")
        bob.irc("JOIN #chan", "MODE #chan +i", "KICK #chan alice")
        self.assertEqual(bob.numeric("482"), ":testroom 482 bob #chan :You're not channel operator")
        self.assertEqual(bob.numeric("482"), ":testroom 482 bob #chan :You're not channel operator")
        alice.irc("MODE #chan +ov-x bob bob", "MODE #chan +k sesame", "INVITE bob #chan")
        self.assertEqual(alice.numeric("472"), ":testroom 472 alice x :is unknown mode char to me")
        self.assertEqual(alice.next_line(), ":alice!alice@chat MODE #chan +ov bob bob")
        self.assertEqual(bob.expect(r":\S+ MODE #chan \+ov.*"), ":alice!alice@chat MODE #chan +ov bob bob")
        self.assertEqual(alice.numeric("443"), ":testroom 443 alice bob #chan :is already on channel")
        carol = self.irc_peer("carol")
        carol.irc("JOIN #chan", "JOIN #chan wrong")
        self.assertEqual(carol.numeric("475"), ":testroom 475 carol #chan :Cannot join channel (+k)")
        alice.irc("INVITE carol #chan", "MODE #chan +i-k *")
        self.assertEqual(alice.numeric("341"), ":testroom 341 alice carol #chan")
        self.assertEqual(carol.expect(r":\S+ INVITE .*"), ":alice!alice@chat INVITE carol :#chan")
        carol.irc("INVITE", "INVITE x")   # where one is invited: 336s and 337
        self.assertEqual(carol.next_line(), ":testroom 336 carol #chan")
        self.assertEqual(carol.next_line(), ":testroom 337 carol :End of /INVITE list")
        self.assertEqual(carol.next_line(), ":testroom 461 carol INVITE :Not enough parameters")
        carol.irc("JOIN #chan")
        self.assertEqual(carol.expect(r":testroom 353 .*"), ":testroom 353 carol = #chan :@alice @bob carol")
        bob.irc("KICK #chan carol,alice :out")
        self.assertEqual(carol.expect(r":\S+ KICK .*"), ":bob!bob@chat KICK #chan carol :out")
        self.assertEqual(alice.expect(r":\S+ KICK #chan alice .*"), ":bob!bob@chat KICK #chan alice :out")
        alice.irc("JOIN #chan")
        self.assertEqual(alice.numeric("473"), ":testroom 473 alice #chan :Cannot join channel (+i)")

    def test_topic_lock_and_who_set_the_topic(self):
        alice, bob = self.irc_peer("alice"), self.irc_peer("bob")
        alice.irc("JOIN #t", "MODE #t +t", "TOPIC #t :ops only")
        alice.expect(r":alice\S* TOPIC #t :ops only")
        bob.irc("JOIN #t", "TOPIC #t :mine now")
        self.assertEqual(bob.expect(r":testroom 332 .*"), ":testroom 332 bob #t :ops only")
        self.assertRegex(bob.next_line(), r":testroom 333 bob #t alice \d{10}")
        self.assertEqual(bob.numeric("482"), ":testroom 482 bob #t :You're not channel operator")

    def test_a_server_operator_runs_every_room(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        bob.say("/join #dev", "/mode +i")
        bob.expect(r"\*\*\* bob made #dev invite-only")
        alice.say("/op op secret", "/join #dev", "/mode -o bob")
        alice.expect(r"\*\*\* you are in #dev: 2 online: @bob, @alice")
        self.assertEqual(bob.expect(r"\*\*\* alice took .*"),
                         "*** alice took operator status from bob in #dev")

    def test_rights_and_modes_reach_the_page(self):
        alice = self.connect("alice")
        web = WsPeer(self.address)
        self.addCleanup(web.close)
        web.say("/nick webby", "/join #dev")
        web.expect(type="room", room="#dev")
        alice.say("/join #dev")
        web.expect(type="joined", nick="alice")
        web.say("/mode +v alice")
        self.assertEqual(web.expect(type="mode"), {"type": "mode", "room": "#dev", "nick": "webby",
                                                   "changes": "+v", "args": ["alice"]})
        alice.say("/who")
        self.assertEqual(alice.expect(r"\*\*\* \d online: .*"), "*** 2 online: +alice, @webby")


class RoomModesKeptTest(ServerTestCase):
    """With a data directory, a room's modes, key and limit survive a restart."""

    def setUp(self):
        self.folder = tempfile.mkdtemp(prefix="chat-modes-")
        self.addCleanup(shutil.rmtree, self.folder, True)
        self.options = {"data_dir": self.folder, "greet_delay": 5.0}
        super().setUp()

    def test_modes_survive_a_restart(self):
        alice = self.connect("alice")
        alice.say("/join #den", "/mode +sk hush", "/mode +l 5")
        alice.expect(r"\*\*\* alice made #den limited to 5")
        self.restart_server()
        bob = self.connect("bob")
        bob.say("/join #den", "/join #den hush", "/mode")
        self.assertEqual(bob.expect(r"\*\*\* error.*"), "*** error: #den needs its key: /join #den KEY")
        bob.expect(r"\*\*\* you are in #den: 1 online: @bob")
        self.assertEqual(bob.expect(r"\*\*\* #den is .*"),
                         "*** #den is closed to outsiders, secret, with a key, limited to 5")


@unittest.skipUnless(REDIS_SERVER and POSIX, "needs redis-server")
class ClusterRoomRightsTest(ClusterTestCase):
    """Room rights and modes are the same on every node."""

    NODES = 2

    def test_modes_and_rights_cross_nodes(self):
        alice, bob = self.connect(0, "alice"), self.connect(1, "bob")
        alice.say("/join #dev")
        alice.expect(r"\*\*\* you are in #dev: 1 online: @alice")
        self.wait_listed(1, "alice", room="#dev")
        bob.say("/join #dev")
        bob.expect(r"\*\*\* you are in #dev: 2 online: .*")
        self.wait_listed(0, "bob", room="#dev")
        alice.say("/mode +v bob", "/mode +m")
        self.assertEqual(bob.expect(r"\*\*\* alice gave .*"), "*** alice gave bob a voice in #dev")
        self.assertEqual(bob.expect(r"\*\*\* alice made .*"), "*** alice made #dev moderated")
        carol = self.connect(1, "carol")
        carol.say("/join #dev", "hello?")
        self.assertEqual(carol.expect(r"\*\*\* error.*"), "*** error: #dev is moderated: only "
                                                          "its operators and voiced members talk")
        self.wait_listed(0, "carol", room="#dev")
        alice.say("/kick carol out")
        self.assertEqual(carol.expect(r"\*\*\* carol was kicked .*"),
                         "*** carol was kicked by alice (out)")
        self.assertEqual(carol.expect(r"\*\*\* you are in .*"),
                         "*** you are in #lobby: 1 online: carol")
        wait_for(lambda: "carol" not in self.listed(0, "#dev"), message="carol out of #dev")
        alice.say("/mode +i", "/invite carol")
        self.assertEqual(carol.expect(r"\*\*\* alice invites .*"),
                         "*** alice invites you to #dev: /join #dev")
        carol.say("/join #dev")
        carol.expect(r"\*\*\* you are in #dev: .*")
        carol.say("/part")
        self.nodes.append(self.start_node("late"))   # learns ranks from the members' states
        late = self.connect(2, "late")
        late.say("/who #dev")
        self.assertEqual(late.expect(r"\*\*\* #dev: .*"), "*** #dev: 2 online: @alice, +bob")


@unittest.skipUnless(REDIS_SERVER and POSIX and ssl, "needs redis-server and ssl")
class RedisTlsTest(ServerTestCase):
    """rediss://: the link to Redis over TLS, in the loop without blocking."""

    def setUp(self):
        folder = tempfile.mkdtemp(prefix="chat-redis-tls-")
        self.addCleanup(shutil.rmtree, folder, True)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        proc = subprocess.Popen(
            [REDIS_SERVER, "--port", "0", "--tls-port", str(port), "--tls-cert-file",
             PKI["cert"], "--tls-key-file", PKI["key"], "--tls-ca-cert-file", PKI["ca"],
             "--tls-auth-clients", "no", "--save", "", "--dir", folder],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(proc.wait, TIMEOUT)
        self.addCleanup(proc.kill)
        patcher = mock.patch.dict(os.environ, {"SSL_CERT_FILE": PKI["ca"]})
        patcher.start()
        self.addCleanup(patcher.stop)
        url = "rediss://localhost:%d" % port

        def up():
            try:
                chat.RespConnection.open(chat.RedisTarget.parse(url), TIMEOUT).close()
                return True
            except chat.RedisError:
                if proc.poll() is not None:
                    self.skipTest("this redis-server has no TLS")
                return False
        wait_for(up, message="redis-server with TLS")
        self.options = {"redis": url, "greet_delay": 5.0}
        super().setUp()

    def test_lines_go_through_redis_over_tls(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        alice.say("over TLS")
        self.assertEqual(bob.expect(r"<alice> .*"), "<alice> over TLS")


class ClusterApartTest(ClusterTestCase):
    """While the nodes are apart, words for a member elsewhere are refused, not lost."""

    NODES = 2

    def test_a_private_message_to_a_node_out_of_reach_is_refused(self):
        alice = self.connect(0, "alice")
        self.connect(1, "bob")
        self.wait_listed(0, "bob")
        self.redis.stop()
        alice.expect(r"\*\*\* the other servers of this chat are out of reach.*")
        alice.say("/msg bob are you there?")
        self.assertEqual(alice.expect(r"\*\*\* error.*"), "*** error: bob is on another "
                         "server, out of reach just now: try again in a while")

    def test_a_member_who_leaves_while_apart_leaves_everywhere(self):
        alice, bob = self.connect(0, "alice"), self.connect(1, "bob")
        self.wait_listed(0, "bob")
        self.redis.pause(self)   # Redis keeps what it holds: bob's state and nick
        bob.expect(r"\*\*\* the other servers of this chat are out of reach.*")
        bob.say("/quit")
        bob.expect_closed()
        self.redis.resume()
        self.assertRegex(alice.expect(r"\*\*\* bob left .*"), r"\*\*\* bob left \((left|quit)\)")
        bob = self.connect(1, "bob")   # the nick is free again
        bob.say("/nick bob")
        self.assertEqual(bob.expect(r"\*\*\* (you are|bob was).*"), "*** you are now known as bob")
        self.wait_listed(0, "bob")


class RespReaderTest(unittest.TestCase):
    """Our RESP2 parser: replies cut anywhere, and bytes that are not Redis's."""

    def test_replies_cut_anywhere_come_out_whole(self):
        data = (b"*3\r\n$3\r\nabc\r\n*2\r\n:5\r\n$-1\r\n+OK\r\n-NOSCRIPT no\r\n*0\r\n"
                b"$0\r\n\r\n*-1\r\n")
        expected = [[b"abc", [5, None], "OK"], "NOSCRIPT no", [], b"", None]
        for step in (1, 2, 3, 7, len(data)):
            reader, got = chat.RespReader(), []
            for at in range(0, len(data), step):
                got += reader.feed(data[at:at + step])
            self.assertEqual(got, expected, "fed %d bytes at a time" % step)
            self.assertIsInstance(got[1], chat.ReplyError)

    def test_what_is_not_redis_is_an_error(self):
        for data in (b"HTTP/1.1 400 Bad Request\r\n", b"*x\r\n", b"$99999999999\r\n",
                     b"*1\r\n" * 20, b"x" * 70000):
            with self.subTest(data=data[:20]), self.assertRaises(chat.RedisError):
                chat.RespReader().feed(data)


class RedisLiesTest(ClusterTestCase):
    """What Redis says is checked like a client's words: planted entries and messages
    neither stop a room nor leave members nobody can remove."""

    NODES = 2

    def test_a_member_of_a_node_that_never_beats_goes(self):
        alice = self.connect(0, "alice")
        state = {"id": "ghost~1/1", "node": "ghost~1", "nick": "ghost", "op": False,
                 "rooms": ["#lobby"], "away": None, "real": "", "addr": ""}
        self.redis.call("PUBLISH", "chat:events", "E" + json.dumps(
            {"n": "ghost~1", "e": None, "s": state, "t": True}))
        self.assertEqual(alice.expect(r"\*\*\* ghost .*"), "*** ghost joined")
        self.assertEqual(alice.expect(r"\*\*\* ghost .*"), "*** ghost left (server lost)")

    def test_planted_stream_entries_and_numbers_do_not_stop_a_room(self):
        alice, bob = self.connect(0, "alice"), self.connect(1, "bob")
        self.wait_listed(1, "alice")
        alice.say("one")
        bob.expect(r"<alice> one")
        self.redis.call("XADD", "chat:log:#lobby", "5-0", "bogus", "x")
        self.redis.call("XADD", "chat:log:#lobby", "900-0", "e", "not json")
        self.redis.call("PUBLISH", "chat:events", "L999999999999 " + json.dumps(
            {"n": "liar~1", "i": 1, "r": "#lobby", "k": "liar", "x": "\x1b[2Jplanted",
             "a": False, "w": 1.0}))
        self.assertEqual(bob.expect(r"<liar> .*"), "<liar> planted")
        alice.say("two", "three")
        self.assertEqual([bob.expect(r"<alice> .*") for _ in range(2)],
                         ["<alice> two", "<alice> three"])
