#!/usr/bin/env python3
"""chat.py: a zero-install terminal chat, server and client in one file.

    python chat.py server                  # on one machine (port 7777)
    python chat.py client --host HOST      # on the others, or: nc HOST 7777

Wire protocol: UTF-8 text lines ending in LF (CRLF accepted).
  client -> server  a chat line, or a command: /nick NAME, /me ACTION,
                    /msg NICK TEXT, /who, /help, /quit [REASON], and
                    /pass PASSWORD first when the server has a password
                    ("//text" sends the literal line "/text")
  server -> client  <alice> text      a chat line
                    * alice waves     an action
                    *alice* text      a private message to you
                    -> *bob* text     your private message, as sent
                    *** text          everything from the server

Standard library only; Python 3.8+ on Linux, macOS and Windows.
"""

import _thread
import argparse
import codecs
import collections
import errno
import getpass
import hashlib
import heapq
import hmac
import itertools
import logging
import os
import queue
import random
import re
import select
import selectors
import signal
import socket
import sys
import threading
import time
import unicodedata
import zlib
from dataclasses import dataclass
from typing import Optional

try:
    import ssl
except ImportError:   # Python built without OpenSSL: everything but TLS works
    ssl = None
try:
    import termios
except ImportError:   # Windows: the console uses msvcrt instead
    termios = None
try:
    import msvcrt
except ImportError:   # POSIX
    msvcrt = None

__version__ = "1.0.0"

DEFAULT_PORT = 7777
WINDOWS = sys.platform == "win32"
# select() on Windows watches at most 512 sockets.
DEFAULT_MAX_CLIENTS = 500 if WINDOWS else 10000
DEFAULT_MAX_LINE = 4096              # bytes per line, newline excluded
DEFAULT_ANNOUNCE_LIMIT = 200         # join/leave/rename notices only in rooms this small
SEND_QUEUE_LIMIT = 1 << 20           # bytes queued for one client before it is dropped
JOIN_NOTICE_DELAY = 2.0              # seconds a newcomer has to pick a nick before "joined"
SHUTDOWN_FLUSH_TIMEOUT = 2.0         # seconds to flush "server shutting down" to everyone
CLOSE_LINGER = 2.0                   # seconds a closing peer gets to read its last lines
REGISTER_TIMEOUT = 30.0              # seconds to finish TLS and /pass before being dropped
WRONG_PASSWORD_DELAY = 1.0           # seconds before a wrong /pass is closed: slows guessing
DEFAULT_RATE = 5.0                   # lines per second a client may send, on average...
DEFAULT_BURST = 30                   # ...and at once, so a pasted block of 20 lines goes through
DEFAULT_HISTORY = 50                 # public lines replayed to a newcomer
ACCEPT_PAUSE = 0.5                   # seconds to stop accepting when out of file descriptors
ACCEPT_BATCH = 256                   # accepts per loop turn, so reads are not starved
GATHER_POLLS = 8                     # extra zero-wait polls per turn while lines keep coming
LISTEN_BACKLOG = 4096                # the kernel caps it at somaxconn
RECV_SIZE = 256 * 1024
PACED_RECV_SIZE = 16 * 1024          # reads under flood control: a paused client holds little
SEND_CHUNK = 64 * 1024               # most bytes joined for one send()
GREETING_NAMES = 20                  # names listed in the greeting before "and N more"
MAX_NICK = 20                        # code points
MAX_REASON = 100                     # code points of a /quit reason
RESERVED_FDS = 32                    # descriptors for listeners, logs, the selector...
CONNECT_TIMEOUT = 10.0
KEEPALIVE_IDLE = 60                  # seconds of silence before TCP probes a peer...
KEEPALIVE_INTERVAL = 15              # ...every this many seconds...
KEEPALIVE_COUNT = 4                  # ...and gives up after this many unanswered probes
KEYBOARD_QUEUE = 1000                # typed or piped lines buffered before stdin backs off
RETRY_DELAY = 1.0                    # seconds before the first reconnect, doubling...
RETRY_MAX = 30.0                     # ...up to this
SEEN_LINES = 500                     # public lines remembered to skip replayed history

log = logging.getLogger("chat")

# What a non-blocking socket raises when it has to wait; TLS adds its own two.
WOULD_BLOCK = (BlockingIOError, InterruptedError)
if ssl is not None:
    WOULD_BLOCK += (ssl.SSLWantReadError, ssl.SSLWantWriteError)


# --- Protocol text ---

# Escape sequences are removed whole, so no stray "[31m" is left behind:
# CSI up to its final byte; OSC, DCS, SOS, PM and APC up to BEL, ST or the end
# of the line; any other ESC with its intermediate and final bytes.
_ESCAPE_SEQUENCE = re.compile(
    r"(?:\x1b\[|\x9b)[\x20-\x3f]*[\x40-\x7e]?"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d-\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[\x20-\x2f]*[\x30-\x7e]?")
# C0 and C1 controls (TAB is turned into a space first), DEL, bidi controls
# that reorder the rest of the terminal line, and line/paragraph separators.
_UNSAFE_CHARS = re.compile(
    "[\x00-\x08\x0a-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
# Telnet option negotiation (IAC ...): 0xFF never occurs in UTF-8 text.
_TELNET_COMMAND = re.compile(rb"\xff(?:\xfa.*?(?:\xff\xf0|$)|[\xfb-\xfe].?|.?)", re.S)
_CONFUSABLE_SCRIPTS = frozenset(("LATIN", "GREEK", "CYRILLIC"))
_PRINTABLE_ASCII = bytes(range(0x20, 0x7f))
_PEM_CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def sanitize(text):
    """Return text with nothing a terminal would obey: no controls, escapes or bidi marks."""
    if text.isprintable():
        return text
    text = _ESCAPE_SEQUENCE.sub("", text).replace("\t", " ")
    return _UNSAFE_CHARS.sub("", text)


def strip_transport(raw):
    """A received line (without its LF) without its CR and telnet commands."""
    if raw[-1:] == b"\r":
        raw = raw[:-1]
    if b"\xff" in raw:
        raw = _TELNET_COMMAND.sub(b"", raw)
    return raw


def decode_line(raw):
    """A received line as text; invalid UTF-8 becomes U+FFFD, never an exception."""
    return strip_transport(raw).decode("utf-8", "replace")


def clean_text(raw):
    """Safe UTF-8 bytes for relayed text (CR and telnet commands already stripped).

    Plain printable ASCII, the common case, is proven safe without decoding it
    (translate() deleting every printable byte leaves nothing), and relayed as is.
    """
    if not raw.translate(None, _PRINTABLE_ASCII):
        return raw
    return sanitize(raw.decode("utf-8", "replace")).encode()


def _is_nick_char(char, position):
    category = unicodedata.category(char)
    return (category[0] == "L" or category == "Nd" or char in "_-"
            or (category[0] == "M" and position > 0))


def normalize_nick(name):
    """Return the stored form of a nick, or raise ValueError saying what is wrong.

    NFKC first, so full-width and compatibility forms collapse to one spelling;
    letters, marks, digits, _ and - in any script, but Latin, Greek and Cyrillic
    letters may not be mixed: that is how look-alike nicks are built.
    """
    nick = unicodedata.normalize("NFKC", name)
    if not 1 <= len(nick) <= MAX_NICK:
        raise ValueError("a nick is 1 to %d characters" % MAX_NICK)
    if not all(_is_nick_char(char, i) for i, char in enumerate(nick)):
        raise ValueError("a nick may contain only letters, digits, _ and -")
    scripts = {unicodedata.name(char, "").split(" ")[0] for char in nick if char.isalpha()}
    if len(scripts & _CONFUSABLE_SCRIPTS) > 1:
        raise ValueError("a nick may not mix Latin, Greek and Cyrillic letters")
    return nick


def nick_key(nick):
    """The form two nicks are compared in: "Alice" and "ALICE" are one nick."""
    return unicodedata.normalize("NFKC", nick.casefold())


def make_valid_nick(name):
    """Best valid nick for a login name ("john.doe" -> "john_doe"), or None."""
    name = unicodedata.normalize("NFKC", name or "")
    cleaned = "".join(c if _is_nick_char(c, i) else "_" for i, c in enumerate(name))
    cleaned = cleaned.strip("_")[:MAX_NICK]
    try:
        return normalize_nick(cleaned)
    except ValueError:
        return None


def nick_variant(nick, number):
    """The number-th alternative to a taken nick: alice2, alice3, ..."""
    suffix = str(number)
    return nick[:MAX_NICK - len(suffix)] + suffix


def format_address(host, port):
    """host:port, with IPv6 hosts in brackets."""
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def peer_ip(address):
    """The IP a peer counts as: IPv4-mapped IPv6 addresses are their IPv4 address."""
    host = address[0] if isinstance(address, tuple) else str(address)
    return host[7:] if host.startswith("::ffff:") and "." in host else host


def describe_error(exc):
    """Short reason for a failed socket, as shown in leave notices and logs."""
    reasons = {errno.ECONNRESET: "connection reset", errno.EPIPE: "connection closed",
               errno.ETIMEDOUT: "timed out", errno.ECONNABORTED: "connection aborted"}
    return reasons.get(exc.errno) or exc.strerror or str(exc) or type(exc).__name__


# The keepalive knobs this platform has: Linux names the idle time TCP_KEEPIDLE,
# macOS TCP_KEEPALIVE; Windows sets all three with one ioctl.
_KEEPALIVE_OPTIONS = tuple(
    (getattr(socket, name), value) for name, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE), ("TCP_KEEPALIVE", KEEPALIVE_IDLE),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL), ("TCP_KEEPCNT", KEEPALIVE_COUNT))
    if hasattr(socket, name))


def enable_keepalive(sock):
    """Let TCP notice a dead peer (sleeping laptop, dropped NAT entry) by itself."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in _KEEPALIVE_OPTIONS:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
        except OSError:
            pass
    if hasattr(socket, "SIO_KEEPALIVE_VALS"):
        sock.ioctl(socket.SIO_KEEPALIVE_VALS,
                   (1, KEEPALIVE_IDLE * 1000, KEEPALIVE_INTERVAL * 1000))


# --- Sockets ---

class BufferedSocket:
    """A non-blocking socket with an output queue that never blocks its owner.

    Queued output is a deque of shared bytes (a broadcast is encoded once for
    all receivers) with an offset into the first chunk, so a backed-up peer
    costs an append per message, never a copy of its whole queue.
    """

    __slots__ = ("sock", "outbox", "queued", "head", "retry")

    def __init__(self, sock):
        self.sock = sock
        self.outbox = collections.deque()
        self.queued = 0                 # bytes in outbox, minus the sent head
        self.head = 0                   # bytes of outbox[0] already sent
        self.retry = None               # buffer to send again after a would-block

    def queue(self, data):
        self.outbox.append(data)
        self.queued += len(data)

    def send_pending(self):
        """Send what the kernel takes of the queue; return True once it is empty.

        A buffer that would block is kept and sent again as it was: TLS needs the
        very same bytes retried, and it costs plain sockets nothing.
        """
        while self.outbox:
            data = self.retry or self._next_buffer()
            try:
                sent = self.sock.send(data)
            except WOULD_BLOCK:
                self.retry = data
                return False
            self.retry = None
            self._consume(sent)
            if sent < len(data):
                return False
        return True

    def _next_buffer(self):
        first = self.outbox[0]
        if self.head:
            first = memoryview(first)[self.head:]
        if len(self.outbox) == 1 or len(first) >= SEND_CHUNK:
            return first
        parts, size = [first], len(first)
        for chunk in itertools.islice(self.outbox, 1, None):
            if size >= SEND_CHUNK:
                break
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts)

    def _consume(self, sent):
        self.queued -= sent
        outbox = self.outbox
        while sent:
            left = len(outbox[0]) - self.head
            if sent < left:
                self.head += sent
                return
            sent -= left
            outbox.popleft()
            self.head = 0


def drain(sock):
    """Read and forget everything a non-blocking (wake-up) socket holds."""
    try:
        while sock.recv(4096):
            pass
    except OSError:
        pass


def certificate_fingerprint(der):
    """SHA256:ab:cd:... of a DER certificate, the form people compare and pin."""
    return "SHA256:" + ":".join("%02x" % byte for byte in hashlib.sha256(der).digest())


def normalize_fingerprint(text):
    """The hex digits of a fingerprint as typed: colons, case and "SHA256:" ignored."""
    text = text.strip().lower()
    if text.startswith("sha256:"):
        text = text[7:]
    digits = text.replace(":", "")
    if not re.fullmatch(r"[0-9a-f]{64}", digits):
        raise ValueError("a SHA-256 fingerprint is 64 hex digits (colons optional)")
    return digits


def server_tls_context(cert_file, key_file=None):
    """A TLS server context and its certificate's fingerprint (key_file may be in cert_file)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    with open(cert_file, encoding="ascii", errors="replace") as pem:
        block = _PEM_CERTIFICATE.search(pem.read())
    return context, certificate_fingerprint(ssl.PEM_cert_to_DER_cert(block.group()))


# --- Server ---

HELP_TEXT = (
    "commands:",
    "  /nick NAME       change your nick",
    "  /me ACTION       say what you do: /me waves -> * you waves",
    "  /msg NICK TEXT   private message to NICK",
    "  /who             who is online",
    "  /quit [REASON]   leave",
    "  //text           send a line that starts with /",
)
HELP_REPLY = "".join("*** %s\n" % line for line in HELP_TEXT).encode()


@dataclass
class ServerOptions:
    """Everything a ChatServer can be told; every timer is here so tests can shorten it."""
    host: Optional[str] = None          # None: all interfaces
    port: int = DEFAULT_PORT
    family: Optional[int] = None        # socket.AF_INET / AF_INET6 to restrict, None for both
    name: Optional[str] = None          # shown in the greeting; default: the host name
    max_clients: int = DEFAULT_MAX_CLIENTS
    max_line: int = DEFAULT_MAX_LINE
    announce_limit: int = DEFAULT_ANNOUNCE_LIMIT
    queue_limit: int = SEND_QUEUE_LIMIT
    join_delay: float = JOIN_NOTICE_DELAY
    shutdown_timeout: float = SHUTDOWN_FLUSH_TIMEOUT
    close_linger: float = CLOSE_LINGER
    tls_context: Optional["ssl.SSLContext"] = None   # set: clients must speak TLS
    password: Optional[str] = None     # set: clients must send /pass first
    register_timeout: float = REGISTER_TIMEOUT
    wrong_password_delay: float = WRONG_PASSWORD_DELAY
    rate: float = DEFAULT_RATE         # lines/s per client; 0 turns flood control off
    burst: int = DEFAULT_BURST
    max_per_ip: int = 0                # 0: no limit
    history: int = DEFAULT_HISTORY     # public lines replayed to newcomers; 0: none


@dataclass(frozen=True)
class ConnectionInfo:
    """What the server can tell about one connection (see ChatServer.connections())."""
    number: int                 # in accept order, from 1
    nick: Optional[str]         # None before it is in the chat
    address: str                # ip:port of the peer
    stage: str                  # "handshake", "password", "chat", "denied" or "closing"
    backlog: int                # bytes queued for it that its socket has not taken yet
    buffered_input: int         # bytes received from it and not handled yet
    reading: bool               # False while flood control holds its input back


class Connection(BufferedSocket):
    """One client of the server: its socket and buffers, and its place in the room.

    Only the server's loop touches a connection; the server decides, the
    connection only holds state and moves bytes.
    """

    __slots__ = ("number", "peer", "ip", "tls", "stage", "nick", "key", "prefix", "inbuf",
                 "discarding", "events", "reading", "want_write", "peer_done", "join_pending",
                 "announced", "synced_batch", "synced", "tokens", "refilled")

    def __init__(self, sock, peer, number, burst):
        super().__init__(sock)
        self.number = number
        self.peer = peer
        self.ip = peer_ip(peer)
        self.tls = False                # the socket is an SSLSocket
        self.stage = None               # one of ChatServer's stages
        self.nick = None
        self.key = None
        self.prefix = b""               # b"<nick> ", the start of each chat line
        self.inbuf = b""                # received bytes not yet handled
        self.discarding = False         # inside an over-long line, dropping to its end
        self.events = 0                 # selector interest as registered
        self.reading = True             # False: input is paused or over
        self.want_write = False         # output is waiting for the socket to drain
        self.peer_done = False          # a closing peer has closed its side too
        self.join_pending = False       # join notice not sent yet
        self.announced = False          # join notice was broadcast
        self.synced_batch = -1          # see ChatServer._sync
        self.synced = 0
        self.tokens = burst             # flood control: lines it may send right now
        self.refilled = time.monotonic()

    def __repr__(self):
        who = " " + self.nick if self.nick else ""
        return "#%d%s (%s)" % (self.number, who, format_address(self.ip, self.peer[1]))

    def read(self, size):
        """Up to size received bytes, b"" at end of stream; raises WOULD_BLOCK when there are none.

        A TLS socket hands out one record (16 KB at most) per recv(), so keep
        reading while records are there: the selector cannot see decrypted data.
        """
        data = self.sock.recv(size)
        if not self.tls or not data:
            return data
        parts = [data]
        got = len(data)
        while got < size:
            try:
                more = self.sock.recv(size - got)
            except WOULD_BLOCK:
                break
            if not more:
                break   # the end of stream shows again on the next read
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def info(self):
        return ConnectionInfo(self.number, self.nick, format_address(self.ip, self.peer[1]),
                              self.stage, self.queued, len(self.inbuf), self.reading)

    def take_tokens(self, wanted, rate, burst):
        """How many of wanted lines the flood allowance lets through now."""
        now = time.monotonic()
        self.tokens = min(burst, self.tokens + (now - self.refilled) * rate)
        self.refilled = now
        allowed = min(wanted, int(self.tokens))
        self.tokens -= allowed
        return allowed

    def seconds_to_next_token(self, rate):
        return max(0.0, (1 - self.tokens) / rate)


class ChatServer:
    """A single-threaded chat room on non-blocking sockets and one selector.

    The loop reads every ready socket, handles complete lines, and only at the
    end of the turn writes: broadcasts of the turn are joined once and each
    receiver gets them with one send(), so the cost per receiver does not grow
    with the number of lines. Usable as a context manager; shutdown() may be
    called from any thread.
    """

    COMMANDS = frozenset(("nick", "me", "msg", "who", "help", "quit", "pass"))  # _cmd_ methods

    # The stages of a connection's life, in order; TLS and PASSWORD only when enabled.
    TLS = "handshake"        # the TLS handshake is running
    PASSWORD = "password"    # waiting for the right /pass
    ROOM = "chat"            # in the chat: receives broadcasts, may talk
    DENIED = "denied"        # sent a wrong password: unheard until closed after a pause
    CLOSING = "closing"      # leaving: last output is flushed, input ignored
    CLOSED = "closed"

    def __init__(self, options=None):
        self.options = options or ServerOptions()
        self.name = self.options.name or socket.gethostname()
        self._selector = selectors.DefaultSelector()
        self._listeners = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._conns = {}               # every open connection, in accept order
        self._members = {}             # connections in the room, in join order
        self._nicks = {}               # nick_key -> connection
        self._who_reply = None         # cached answer to /who, None after the room changed
        self._per_ip = collections.Counter()
        self._numbers = itertools.count(1)
        self._guest_numbers = itertools.count(1)
        self._timers = []              # heap of (when, seq, callback, args)
        self._timer_seq = itertools.count()
        self._turn_chunks = []         # broadcasts of this turn, not yet sent
        self._batch = 0                # counts delivered batches of _turn_chunks
        self._dirty = set()            # connections with direct output this turn
        self._failed = []              # (connection, reason) to drop after the turn
        self._history = collections.deque(maxlen=self.options.history)   # "*** [HH:MM] <a> x\n"
        self._read_size = PACED_RECV_SIZE if self.options.rate else RECV_SIZE
        self._clock = (None, b"")      # (minute, b"HH:MM") for history lines
        self._accepting = False
        self._stop_requested = False
        self._started = False
        self._finished = threading.Event()
        self._calls = collections.deque()   # (function, result box, event) from other threads
        self._calls_lock = threading.Lock()
        self._loop_thread = None           # the thread in serve_forever(), while it runs
        try:
            self._bind()
            for sock in (self._wake_r, self._wake_w):
                sock.setblocking(False)
            self._selector.register(self._wake_r, selectors.EVENT_READ)
            self._start_accepting()
        except BaseException:
            self.server_close()
            raise

    # Life cycle

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.server_close()

    @property
    def addresses(self):
        """(host, port) of every listening socket, with the real bound port."""
        return [sock.getsockname()[:2] for sock in self._listeners]

    @property
    def wakeup_fd(self):
        """A descriptor for signal.set_wakeup_fd(): a byte written to it wakes the loop."""
        return self._wake_w.fileno()

    def serve_forever(self):
        """Run the loop until shutdown() or request_shutdown(), then say goodbye and close."""
        self._started = True
        self._loop_thread = threading.current_thread()
        try:
            while not self._stop_requested:
                self._run_once()
            self._shut_down_clients()
        finally:
            with self._calls_lock:
                self._loop_thread = None
            self._run_calls()
            self._finished.set()

    def request_shutdown(self):
        """Ask the loop to stop; safe from signal handlers and other threads."""
        self._stop_requested = True
        self._wake()

    def shutdown(self):
        """Stop the loop and wait until every client has been told and closed."""
        self.request_shutdown()
        if self._started:
            self._finished.wait()

    # Inspection, safe from any thread

    def run_in_loop(self, function):
        """Call function() in the server's thread, between two turns, and return its result.

        The server's state belongs to its loop; other threads (an embedding
        program, the tests) look at it or change it only through this.
        """
        with self._calls_lock:
            direct = self._loop_thread in (None, threading.current_thread())
            if not direct:
                box, done = [], threading.Event()
                self._calls.append((function, box, done))
        if direct:
            return function()
        self._wake()
        done.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def connections(self):
        """A ConnectionInfo for every open connection, in accept order."""
        return self.run_in_loop(lambda: [conn.info() for conn in self._conns])

    def members(self):
        """A ConnectionInfo for every member of the chat, in join order."""
        return self.run_in_loop(lambda: [conn.info() for conn in self._members])

    def stats(self):
        """Counts: connections, members, handshakes in progress, bytes queued for output."""
        def count():
            stages = collections.Counter(conn.stage for conn in self._conns)
            return {"connections": len(self._conns), "members": len(self._members),
                    "handshaking": stages[self.TLS], "backlog": sum(c.queued for c in self._conns)}
        return self.run_in_loop(count)

    def _run_calls(self):
        while True:
            with self._calls_lock:
                if not self._calls:
                    return
                function, box, done = self._calls.popleft()
            try:
                box.append(function())
            except BaseException as exc:   # handed to the caller, who raises it
                box.append(exc)
            done.set()

    def _wake(self):
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def server_close(self):
        """Release every socket (the loop must have stopped)."""
        for conn in list(self._conns):
            self._finish(conn)
        for sock in self._listeners + [self._wake_r, self._wake_w]:
            sock.close()
        self._listeners = []
        self._selector.close()

    def _bind(self):
        opts = self.options
        if not opts.host and opts.family is None and socket.has_dualstack_ipv6():
            self._listeners.append(socket.create_server(
                ("", opts.port), family=socket.AF_INET6, dualstack_ipv6=True,
                backlog=LISTEN_BACKLOG))
        else:
            host = opts.host or ("::" if opts.family == socket.AF_INET6 else "0.0.0.0")
            infos = socket.getaddrinfo(host, opts.port, opts.family or socket.AF_UNSPEC,
                                       socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
            port = opts.port
            for family, _, _, _, address in dict.fromkeys(infos):
                address = (address[0], port) + tuple(address[2:])
                sock = socket.create_server(address, family=family, backlog=LISTEN_BACKLOG)
                self._listeners.append(sock)
                port = sock.getsockname()[1]   # with --port 0, every listener shares the first port
        for sock in self._listeners:
            sock.setblocking(False)

    # The loop

    def _run_once(self):
        self._poll(self._select_timeout())
        self._gather_more()
        self._run_due_timers()
        self._flush_turn()

    def _gather_more(self):
        """Before writing a turn's broadcasts, read what arrived meanwhile.

        Senders' lines trickle in a segment at a time; each line caught now
        rides the same send() to every member instead of costing one of its
        own. Zero-wait polls only, and a bounded number: no added latency.
        """
        for _ in range(GATHER_POLLS):
            pending = len(self._turn_chunks)
            if not pending or sum(map(len, self._turn_chunks)) >= SEND_CHUNK:
                return
            self._poll(0)
            if len(self._turn_chunks) == pending:
                return

    def _poll(self, timeout):
        """Handle every socket that is ready within timeout."""
        for key, mask in self._selector.select(timeout):
            if key.data is None:
                self._handle_service_socket(key.fileobj)
            else:
                self._handle_events(key.data, mask)

    def _select_timeout(self):
        timeout = None
        if self._timers:
            timeout = max(0.0, self._timers[0][0] - time.monotonic())
        if WINDOWS:   # Ctrl+C does not interrupt select() there
            timeout = 0.5 if timeout is None else min(timeout, 0.5)
        return timeout

    def _handle_service_socket(self, sock):
        if sock is self._wake_r:
            drain(sock)
            self._run_calls()
        else:
            self._accept_from(sock)

    def _handle_events(self, conn, mask):
        if conn.stage is self.CLOSED:   # dropped earlier in this turn
            return
        try:
            if conn.stage is self.TLS:
                self._continue_handshake(conn)
                return
            if mask & selectors.EVENT_WRITE:
                self._write(conn)
            if mask & selectors.EVENT_READ and conn.stage is not self.CLOSED:
                self._handle_read(conn)
        except Exception:
            log.exception("%r: unexpected error, dropping the connection", conn)
            self._drop(conn, "internal error")

    def _call_later(self, delay, callback, *args):
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq),
                                      callback, args))

    def _run_due_timers(self):
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, callback, args = heapq.heappop(self._timers)
            try:
                callback(*args)
            except Exception:
                log.exception("timer %r failed", callback)
                if args and isinstance(args[0], Connection):
                    self._drop(args[0], "internal error")

    # Accepting

    def _start_accepting(self):
        if not self._accepting:
            for sock in self._listeners:
                self._selector.register(sock, selectors.EVENT_READ)
            self._accepting = True

    def _stop_accepting(self):
        if self._accepting:
            for sock in self._listeners:
                self._selector.unregister(sock)
            self._accepting = False

    def _accept_from(self, listener):
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = listener.accept()
            except WOULD_BLOCK:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("cannot accept: %s; pausing new connections for %.1f s",
                              exc.strerror, ACCEPT_PAUSE)
                    self._stop_accepting()
                    self._call_later(ACCEPT_PAUSE, self._start_accepting)
                    return
                log.debug("accept failed: %s", exc)
                continue
            self._admit(sock, peer)

    def _admit(self, sock, peer):
        refusal = self._refusal_for(peer)
        if refusal:
            self._refuse(sock, peer, refusal)
            return
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            enable_keepalive(sock)
        except OSError as exc:
            log.debug("%s: setup failed: %s", format_address(*peer[:2]), exc)
            sock.close()
            return
        conn = Connection(sock, peer, next(self._numbers), self.options.burst)
        self._conns[conn] = None
        self._per_ip[conn.ip] += 1
        self._update_interest(conn)
        log.info("%r connected", conn)
        if self.options.tls_context or self.options.password:
            self._call_later(self.options.register_timeout, self._expire_registration, conn)
        if self.options.tls_context:
            conn.stage = self.TLS
        else:
            self._start_session(conn)

    def _refusal_for(self, peer):
        if len(self._conns) >= self.options.max_clients:
            return "server full"
        if self.options.max_per_ip and self._per_ip[peer_ip(peer)] >= self.options.max_per_ip:
            return "too many connections from your address"
        return None

    def _refuse(self, sock, peer, reason):
        log.warning("refused %s: %s", format_address(*peer[:2]), reason)
        try:
            sock.setblocking(False)
            sock.send(b"*** error: %s\n" % reason.encode())
        except OSError:
            pass
        sock.close()

    # Registration: TLS, then the password, then the room

    def _continue_handshake(self, conn):
        """Advance a TLS handshake without blocking; a plaintext peer is told and dropped."""
        if not conn.tls and not self._wrap_tls(conn):
            return
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            conn.want_write = False
        except ssl.SSLWantWriteError:
            conn.want_write = True
        except OSError as exc:   # SSLError included
            log.info("%r: TLS handshake failed: %s", conn, getattr(exc, "reason", None) or exc)
            self._drop(conn, "TLS handshake failed")
            return
        else:
            conn.want_write = False
            self._update_interest(conn)
            log.debug("%r: TLS %s established", conn, conn.sock.version())
            self._start_session(conn)
            if conn.stage is not self.CLOSED:
                self._handle_read(conn)   # the client may have written already
            return
        self._update_interest(conn)

    def _wrap_tls(self, conn):
        """Start TLS once the first byte shows a TLS record; else answer in plaintext."""
        try:
            first = conn.sock.recv(1, socket.MSG_PEEK)
        except WOULD_BLOCK:
            return False
        except OSError as exc:
            self._drop(conn, describe_error(exc))
            return False
        if not first:
            self._drop(conn, "connection closed")
            return False
        if first != b"\x16":   # not a TLS handshake record: a plaintext client
            log.info("%r: plaintext client on the TLS port", conn)
            self._queue(conn, b"*** error: this server speaks TLS: connect with "
                              b"'chat.py client --tls' or 'openssl s_client'\n")
            self._close(conn, "no TLS")
            return False
        self._selector.unregister(conn.sock)
        conn.events = 0
        conn.sock = self.options.tls_context.wrap_socket(
            conn.sock, server_side=True, do_handshake_on_connect=False)
        conn.tls = True
        self._update_interest(conn)
        return True

    def _start_session(self, conn):
        if self.options.password:
            conn.stage = self.PASSWORD
            self._tell(conn, "password required: /pass PASSWORD")
        else:
            self._enter_room(conn)

    def _check_password(self, conn, text):
        command, _, password = text.partition(" ")
        if command.lower() == "/quit":
            self._close(conn, "quit", farewell="bye")
        elif command.lower() != "/pass":
            self._tell(conn, "error: password required")
        elif hmac.compare_digest(password.encode(), self.options.password.encode()):
            log.info("%r: password accepted", conn)
            self._enter_room(conn)
        else:
            log.info("%r: wrong password", conn)
            self._tell(conn, "error: wrong password")
            conn.stage = self.DENIED
            conn.reading = False
            self._update_interest(conn)
            self._call_later(self.options.wrong_password_delay, self._close, conn,
                             "wrong password")

    def _expire_registration(self, conn):
        if conn.stage in (self.TLS, self.PASSWORD):
            log.info("%r: registration timed out in stage %s", conn, conn.stage)
            if conn.stage is self.PASSWORD:
                self._tell(conn, "error: registration timed out")
                self._close(conn, "registration timed out")
            else:
                self._drop(conn, "registration timed out")

    # Reading

    def _handle_read(self, conn):
        try:
            data = conn.read(self._read_size)
        except WOULD_BLOCK:
            return
        except OSError as exc:
            self._drop(conn, describe_error(exc))
            return
        if conn.stage is self.CLOSING:
            if not data:
                self._closing_peer_done(conn)
            return
        if not data:
            self._handle_eof(conn)
            return
        if conn.discarding:
            end = data.find(b"\n")
            if end < 0:
                return
            conn.discarding = False
            data = data[end + 1:]
        conn.inbuf = conn.inbuf + data if conn.inbuf else data
        self._handle_input(conn)

    def _handle_eof(self, conn):
        """The peer will send no more: what it sent before still counts."""
        if conn.inbuf and not conn.discarding:
            conn.inbuf += b"\n"
            self._handle_input(conn)
        if conn.stage in (self.PASSWORD, self.ROOM):
            conn.peer_done = True
            self._close(conn, "connection closed")

    def _handle_input(self, conn):
        """Handle the complete lines in the input buffer that the flood allowance lets
        through; the rest wait there while reading pauses, so TCP slows the sender."""
        lines = conn.inbuf.split(b"\n")
        conn.inbuf = lines.pop()
        if self.options.rate and lines:
            allowed = conn.take_tokens(len(lines), self.options.rate, self.options.burst)
            if allowed < len(lines):
                conn.inbuf = b"\n".join(lines[allowed:] + [conn.inbuf])
                del lines[allowed:]
                self._pause_input(conn)
        for raw in lines:
            if conn.stage is not self.ROOM and conn.stage is not self.PASSWORD:
                return
            if len(raw) > self.options.max_line + raw.endswith(b"\r"):
                self._reject_long_line(conn)
            else:
                self._handle_line(conn, strip_transport(raw))
        if conn.reading and len(conn.inbuf) > self.options.max_line + 1:
            conn.inbuf = b""
            conn.discarding = True
            self._reject_long_line(conn)

    def _pause_input(self, conn):
        conn.reading = False
        self._update_interest(conn)
        self._call_later(conn.seconds_to_next_token(self.options.rate), self._resume_input, conn)

    def _resume_input(self, conn):
        if conn.stage is self.ROOM or conn.stage is self.PASSWORD:
            conn.reading = True
            self._update_interest(conn)
            self._handle_input(conn)

    def _reject_long_line(self, conn):
        self._tell(conn, "error: line too long (over %d bytes), not sent" % self.options.max_line)

    def _handle_line(self, conn, raw):
        """One line from a client, CR and telnet commands already stripped."""
        if conn.stage is self.PASSWORD:
            self._check_password(conn, raw.decode("utf-8", "replace"))
        elif raw[:1] == b"/" and raw[:2] != b"//":
            self._run_command(conn, raw.decode("utf-8", "replace"))
        else:
            text = clean_text(raw[1:] if raw[:1] == b"/" else raw)
            if text and not text.isspace():
                if conn.join_pending:
                    self._announce_join(conn)
                self._say(conn, conn.prefix + text + b"\n")

    # Commands

    def _run_command(self, conn, text):
        name, _, argument = text[1:].partition(" ")
        name = name.lower()
        if name not in self.COMMANDS:
            self._tell(conn, "error: unknown command /%s (try /help)" % sanitize(name)[:30])
            return
        if name not in ("nick", "quit", "pass"):
            self._announce_join(conn)
        getattr(self, "_cmd_" + name)(conn, argument.strip())

    def _cmd_nick(self, conn, argument):
        if not argument:
            self._tell(conn, "error: usage: /nick NAME (you are %s)" % conn.nick)
            return
        try:
            nick = normalize_nick(argument)
        except ValueError as exc:
            self._tell(conn, "error: invalid nick %s: %s" % (sanitize(argument)[:40], exc))
            return
        holder = self._nicks.get(nick_key(nick))
        if holder is not None and holder is not conn:
            self._tell(conn, "error: nick %s is taken" % nick)
            return
        old = conn.nick
        self._set_nick(conn, nick)
        log.info("%r was %s", conn, old)
        self._tell(conn, "you are now known as %s" % nick)
        if conn.announced and old != nick:
            self._notice("%s is now known as %s" % (old, nick), exclude=conn)
        self._announce_join(conn)

    def _cmd_me(self, conn, argument):
        action = sanitize(argument)
        if not action.strip():
            self._tell(conn, "error: usage: /me ACTION")
            return
        self._say(conn, b"* %s %s\n" % (conn.nick.encode(), action.encode()))

    def _cmd_msg(self, conn, argument):
        target_name, _, text = argument.partition(" ")
        text = sanitize(text.strip())
        if not target_name or not text:
            self._tell(conn, "error: usage: /msg NICK TEXT")
            return
        target = self._nicks.get(nick_key(unicodedata.normalize("NFKC", target_name)))
        if target is None:
            self._tell(conn, "error: no such nick %s" % sanitize(target_name)[:40])
            return
        self._send(target, ("*%s* %s\n" % (conn.nick, text)).encode())
        self._send(conn, ("-> *%s* %s\n" % (target.nick, text)).encode())

    def _cmd_who(self, conn, argument):
        """The list of nicks, built once per change of the room and shared: in a big room
        it is large, and clients that ask without reading must not each pin a copy."""
        if self._who_reply is None:
            nicks = sorted((member.nick for member in self._members), key=nick_key)
            self._who_reply = ("*** %d online: %s\n" % (len(nicks), ", ".join(nicks))).encode()
        self._send(conn, self._who_reply)

    def _cmd_help(self, conn, argument):
        self._send(conn, HELP_REPLY)

    def _cmd_pass(self, conn, argument):
        self._tell(conn, "error: you are already in")

    def _cmd_quit(self, conn, argument):
        reason = sanitize(argument)[:MAX_REASON].strip()
        self._close(conn, "quit: " + reason if reason else "quit", farewell="bye")

    # The room

    def _enter_room(self, conn):
        conn.stage = self.ROOM
        self._set_nick(conn, self._free_guest_nick())
        self._members[conn] = None
        conn.synced_batch, conn.synced = self._batch, len(self._turn_chunks)
        self._send(conn, self._greeting(conn))
        if self._history:
            self._send(conn, b"".join(itertools.chain(
                (b"*** --- last %d messages ---\n" % len(self._history),), self._history,
                (b"*** --- end of history ---\n",))))
        conn.join_pending = True
        self._call_later(self.options.join_delay, self._announce_join, conn)

    def _free_guest_nick(self):
        while True:
            nick = "guest%d" % next(self._guest_numbers)
            if nick_key(nick) not in self._nicks:
                return nick

    def _set_nick(self, conn, nick):
        self._who_reply = None
        if conn.key is not None:
            del self._nicks[conn.key]
        conn.nick, conn.key = nick, nick_key(nick)
        conn.prefix = ("<%s> " % nick).encode()
        self._nicks[conn.key] = conn

    def _greeting(self, conn):
        names = [member.nick for member in itertools.islice(self._members, GREETING_NAMES)]
        more = len(self._members) - len(names)
        if more:
            names.append("and %d more" % more)
        return ("*** welcome to %s, you are %s\n*** %d online: %s\n*** type /help for commands\n"
                % (self.name, conn.nick, len(self._members), ", ".join(names))).encode()

    def _say(self, conn, line):
        """A public line (chat or action): to everyone else, and into the history."""
        self._broadcast(line, exclude=conn)
        if self.options.history:
            self._history.append(b"*** [%s] %s" % (self._clock_text(), line))

    def _clock_text(self):
        """b"HH:MM" of the server's local time, formatted once a minute."""
        now = time.time()
        minute = int(now // 60)
        if minute != self._clock[0]:
            self._clock = (minute, time.strftime("%H:%M", time.localtime(now)).encode())
        return self._clock[1]

    def _announce_join(self, conn):
        """Send the deferred join notice, under the nick the newcomer has by now."""
        if conn.join_pending and conn.stage is self.ROOM:
            conn.join_pending = False
            conn.announced = self._notice("%s joined" % conn.nick, exclude=conn)

    def _leave_room(self, conn, reason):
        if conn not in self._members:
            return
        if conn.announced:
            self._notice("%s left (%s)" % (conn.nick, reason), exclude=conn)
        del self._members[conn]
        del self._nicks[conn.key]
        self._who_reply = None

    def _notice(self, text, exclude=None):
        """Broadcast a join/leave/rename notice unless the room is too big for them."""
        if len(self._members) > self.options.announce_limit:
            return False
        self._broadcast(("*** %s\n" % text).encode(), exclude)
        return True

    # Output

    def _broadcast(self, data, exclude=None):
        """Queue data for every member but exclude; it is sent at the end of the turn."""
        chunks = self._turn_chunks
        if exclude is None:
            chunks.append(data)
            return
        if exclude.synced_batch != self._batch or exclude.synced != len(chunks):
            self._sync(exclude)   # not for a sender's second line in a row
        chunks.append(data)
        exclude.synced = len(chunks)

    def _sync(self, conn):
        """Queue for a member the broadcasts of this turn it has not got yet.

        A member's position in the turn's broadcasts is (synced_batch, synced):
        before anything is queued for it directly, or a broadcast skips it, it is
        brought up to date, so its lines keep the order in which they happened.
        """
        chunks = self._turn_chunks
        start = conn.synced if conn.synced_batch == self._batch else 0
        conn.synced_batch, conn.synced = self._batch, len(chunks)
        if start < len(chunks):
            self._queue(conn, b"".join(chunks[start:]))

    def _send(self, conn, data):
        """Queue data for one connection, after the broadcasts it is due first."""
        if conn.stage is self.ROOM:
            self._sync(conn)
        self._queue(conn, data)

    def _tell(self, conn, text):
        self._send(conn, ("*** %s\n" % text).encode())

    def _queue(self, conn, data):
        """Queue output; a client already over the limit has stopped keeping up and goes.

        The limit is checked before adding, so one large burst never costs a
        reader its connection: only more output for a backlog that is still full.
        """
        if conn.queued > self.options.queue_limit:
            self._failed.append((conn, "send queue exceeded"))
            return
        conn.queue(data)
        if not conn.want_write:
            self._dirty.add(conn)

    def _flush_turn(self):
        while self._turn_chunks or self._dirty or self._failed:
            if self._turn_chunks:
                self._deliver_broadcasts()
            failed, self._failed = self._failed, []
            for conn, reason in failed:
                self._drop(conn, reason)
            dirty, self._dirty = self._dirty, set()
            for conn in dirty:
                if conn.stage is not self.CLOSED:
                    self._write(conn)

    def _deliver_broadcasts(self):
        """Send the turn's broadcasts: one join, then one send() per member.

        This is the hot path of the server: a member with nothing queued gets the
        shared bytes straight from send(); only what the kernel does not take is
        queued (as a view, not a copy).
        """
        chunks, batch = self._turn_chunks, self._batch
        self._turn_chunks = []
        self._batch += 1
        everything = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        failed = self._failed
        for conn in self._members:
            if conn.synced_batch == batch:
                if conn.synced == len(chunks):
                    continue
                data = b"".join(chunks[conn.synced:])
            else:
                data = everything
            if conn.outbox:
                self._queue(conn, data)
                continue
            try:
                sent = conn.sock.send(data)
            except WOULD_BLOCK:
                conn.retry = data   # TLS must retry with this very buffer
                self._queue(conn, data)
                continue
            except OSError as exc:
                failed.append((conn, describe_error(exc)))
                continue
            if sent < len(data):
                self._queue(conn, memoryview(data)[sent:])

    def _write(self, conn):
        try:
            done = conn.send_pending()
        except OSError as exc:
            self._drop(conn, describe_error(exc))
            return
        if done and conn.stage is self.CLOSING:
            self._half_close(conn)
        elif done != (not conn.want_write):
            conn.want_write = not done
            self._update_interest(conn)

    def _update_interest(self, conn):
        """Register what the connection waits for: the one place that calls the selector."""
        events = ((selectors.EVENT_READ if conn.reading else 0)
                  | (selectors.EVENT_WRITE if conn.want_write else 0))
        if events == conn.events:
            return
        if not events:
            self._selector.unregister(conn.sock)
        elif not conn.events:
            self._selector.register(conn.sock, events, conn)
        else:
            self._selector.modify(conn.sock, events, conn)
        conn.events = events

    # Leaving

    def _close(self, conn, reason, farewell=None):
        """Let a connection go politely: leave notice, last words flushed, then FIN."""
        log.info("%r disconnected: %s", conn, reason.split(":")[0])
        self._leave_room(conn, reason)
        if farewell:
            self._tell(conn, farewell)
        conn.stage = self.CLOSING
        conn.inbuf = b""
        if conn.peer_done and not conn.outbox:
            self._finish(conn)   # nothing to say and nothing to hear: the common hang-up
            return
        conn.reading = not conn.peer_done   # read, and discard, until the peer closes too
        self._update_interest(conn)
        self._call_later(self.options.close_linger, self._finish, conn)
        if not conn.outbox:
            self._half_close(conn)

    def _half_close(self, conn):
        """All output is out: send FIN, and keep reading until the peer closes too,
        so unread input does not turn our close into a reset that eats the last lines."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._finish(conn)
            return
        if conn.peer_done:
            self._finish(conn)
            return
        conn.want_write = False
        self._update_interest(conn)

    def _closing_peer_done(self, conn):
        """A closing peer sent EOF: close now, or once its last output is out."""
        if conn.outbox:
            conn.peer_done = True
            conn.reading = False
            self._update_interest(conn)
        else:
            self._finish(conn)

    def _drop(self, conn, reason):
        """Close a connection at once (it failed, or cannot keep up)."""
        if conn.stage is self.CLOSED:
            return
        if conn.stage is not self.CLOSING:
            level = logging.WARNING if reason == "send queue exceeded" else logging.INFO
            log.log(level, "%r disconnected: %s", conn, reason)
            self._leave_room(conn, reason)
        self._finish(conn)

    def _finish(self, conn):
        if conn.stage is self.CLOSED:
            return
        self._leave_room(conn, "closed")
        conn.stage = self.CLOSED
        del self._conns[conn]
        self._per_ip[conn.ip] -= 1
        if not self._per_ip[conn.ip]:
            del self._per_ip[conn.ip]
        self._dirty.discard(conn)
        if conn.events:
            self._selector.unregister(conn.sock)
        conn.sock.close()
        conn.outbox.clear()

    def _shut_down_clients(self):
        """Tell everyone, flush for at most shutdown_timeout, close everything."""
        log.info("shutting down, %d connected", len(self._conns))
        self._stop_accepting()
        for conn in list(self._conns):
            if conn.stage is self.PASSWORD or conn.stage is self.ROOM:
                self._tell(conn, "server shutting down")
                conn.stage = self.CLOSING
            elif conn.stage is not self.CLOSING:   # mid-handshake or denied: nothing to say
                self._finish(conn)
        self._flush_turn()
        deadline = time.monotonic() + self.options.shutdown_timeout
        while any(conn.outbox for conn in self._conns):
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
            self._poll(timeout)
            self._flush_turn()
        for conn in list(self._conns):
            self._finish(conn)
        log.info("stopped")


# --- Client ---

class ChatError(Exception):
    """A failure main() reports on stderr, without a traceback, before exiting with 1."""


class RefusedError(ChatError):
    """The server was refused (TLS verification) or refused us (password): retrying is futile."""


def open_connection(host, port, family=socket.AF_UNSPEC, timeout=CONNECT_TIMEOUT):
    """Connect to the first address of host that answers (IPv4 or IPv6)."""
    try:
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ChatError("cannot connect to %s: %s" % (format_address(host, port), exc.strerror))
    error = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    reason = "timed out" if isinstance(error, socket.timeout) else describe_error(error)
    raise ChatError("cannot connect to %s: %s" % (format_address(host, port), reason))


def fetch_fingerprint(host, port, family=socket.AF_UNSPEC):
    """The fingerprint of the certificate a TLS server presents, unverified; None on failure."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with open_connection(host, port, family) as sock:
            with context.wrap_socket(sock, server_hostname=host) as tls:
                return certificate_fingerprint(tls.getpeercert(binary_form=True))
    except (ChatError, OSError):
        return None


def client_tls_context(ca_file=None, pinned=False):
    """Verify the server against the system CAs (or ca_file), unless its key is pinned."""
    if pinned:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE   # the pin is checked after the handshake
    else:
        context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def default_nick():
    """The login name, made a valid nick; None (a guest nick) when there is none."""
    try:
        return make_valid_nick(getpass.getuser())
    except Exception:   # getuser() raises whatever the platform lookup raises
        return None


def echo_of(text, nick):
    """The line others receive when we send text, or None (commands, blank lines).

    Mirrors what the server relays, so our own lines look like everyone else's
    and can be matched against the history the server replays.
    """
    lower = text[:4].lower()
    if lower == "/me ":
        body, shape = sanitize(text[4:]).strip(), "* %s %s"
    elif text[:2] == "//" or text[:1] != "/":
        body, shape = sanitize(text[1:] if text[:2] == "//" else text), "<%s> %s"
    else:
        return None
    return shape % (nick, body) if body.strip() else None


# Rendering received lines

_NICK_COLOURS = ("31", "32", "33", "34", "35", "36", "91", "92", "93", "94", "95", "96")
_HISTORY_ENTRY = re.compile(r"\*\*\* \[(\d\d:\d\d)\] (.*)$")
_CHAT_LINE = re.compile(r"<([^>\s]+)> (.*)$")
_ACTION_LINE = re.compile(r"\* (\S+) (.*)$")
_PRIVATE_LINE = re.compile(r"\*([^*\s]+)\* (.*)$")


def char_width(char):
    """Terminal columns of a character: 2 for wide East Asian forms, 0 for combining marks."""
    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in "WF" else 1


def colour_wanted(stream, no_color=False):
    """Colour only on a terminal, and not with --no-color, NO_COLOR (no-color.org) or TERM=dumb."""
    return (not no_color and stream.isatty() and not os.environ.get("NO_COLOR")
            and os.environ.get("TERM") != "dumb")


def paint(code, text):
    return "\x1b[%sm%s\x1b[0m" % (code, text)


class LineStyle:
    """How a protocol line is shown: timestamp, colours, bell.

    With everything off a line comes back untouched, which is what pipes get.
    """

    def __init__(self, colour=False, timestamps=False, bell=False):
        self.colour, self.timestamps, self.bell = colour, timestamps, bell

    def render(self, line, nick=None):
        """The text to print for a line (bell included when it is for us)."""
        stamp = time.strftime("[%H:%M] ") if self.timestamps else ""
        replayed = _HISTORY_ENTRY.match(line)
        if replayed and self.timestamps:   # history keeps the time it was said
            stamp, line = "[%s] " % replayed.group(1), replayed.group(2)
        for_me = self._for_me(line, nick)
        text = self._paint(line, for_me) if self.colour else line
        if self.colour and (stamp or replayed):
            stamp = paint("2", stamp)
            text = paint("2", line) if replayed else text
        return stamp + text + ("\x07" if for_me and self.bell else "")

    def _paint(self, line, for_me):
        """Nicks in their colours; lines for us bold, errors red, notices dim."""
        chat, action = _CHAT_LINE.match(line), _ACTION_LINE.match(line)
        if chat or action:
            who, text = (chat or action).groups()
            name = paint(self.nick_colour(who), who)
            shown = "<%s> %s" % (name, text) if chat else "* %s %s" % (name, text)
            return paint("1", shown) if for_me else shown
        if _PRIVATE_LINE.match(line):
            return paint("1;35", line)
        if line.startswith("*** error:"):
            return paint("31", line)
        if line.startswith(("*** ", "-> ")):
            return paint("2", line)
        return line

    def _for_me(self, line, nick):
        """A private message, or someone else's line that mentions our nick."""
        if _PRIVATE_LINE.match(line):
            return True
        said = _CHAT_LINE.match(line) or _ACTION_LINE.match(line)
        return bool(said) and said.group(1) != nick and self._mentions(said.group(2), nick)

    @staticmethod
    def _mentions(text, nick):
        return bool(nick) and re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(nick), text,
                                        re.IGNORECASE) is not None

    @staticmethod
    def nick_colour(nick):
        """A stable colour per nick (crc32, not hash(): the same every run)."""
        return _NICK_COLOURS[zlib.crc32(nick_key(nick).encode()) % len(_NICK_COLOURS)]


class Roster:
    """Nicks seen in the room, for Tab completion; fed every line shown."""

    _PATTERNS = (
        (re.compile(r"\*\*\* welcome to .*, you are (\S+)$"), "add"),
        (re.compile(r"\*\*\* (\S+) joined$"), "add"),
        (re.compile(r"\*\*\* (\S+) left \(.*\)$"), "remove"),
        (re.compile(r"<(\S+)> "), "add"),
        (re.compile(r"\* (\S+) "), "add"),
        (re.compile(r"\*(\S+)\* "), "add"),
    )
    _RENAMED = re.compile(r"\*\*\* (\S+) is now known as (\S+)$")
    _WHO = re.compile(r"\*\*\* \d+ online: (.*)$")

    def __init__(self):
        self.nicks = set()

    def note(self, line):
        renamed, who = self._RENAMED.match(line), self._WHO.match(line)
        if renamed:
            self.nicks.discard(renamed.group(1))
            self.nicks.add(renamed.group(2))
        elif who:
            names = who.group(1).split(", ")
            self.nicks.update(name for name in names if not name.startswith("and "))
        else:
            for pattern, action in self._PATTERNS:
                found = pattern.match(line)
                if found:
                    getattr(self.nicks, "add" if action == "add" else "discard")(found.group(1))
                    return


class PlainConsole:
    """Lines in, lines out: pipes, files, dumb terminals, or no raw mode.

    Output goes out as UTF-8 (whatever the console encoding) and is flushed
    after every line, so `client > log` and `client | grep` see each at once.
    Notes from the client itself go to stderr, so stdout stays protocol lines.
    """

    def __init__(self, style=None, stdin=None, stdout=None, stderr=None):
        self.style = style or LineStyle()
        self._stdin = stdin or sys.stdin
        self._stdout = stdout or sys.stdout
        self._stderr = stderr or sys.stderr
        self._tty = self._stdout.isatty()
        self.nick = None

    def start(self, client):
        """Read lines in a daemon thread and post them to the client, then "eof"."""
        threading.Thread(target=self._read_lines, args=(client,), name="keyboard",
                         daemon=True).start()

    def _read_lines(self, client):
        stream = getattr(self._stdin, "buffer", self._stdin)
        try:
            for raw in iter(stream.readline, b""):
                client.post("line", raw.rstrip(b"\r\n").decode("utf-8", "replace"))
        except (OSError, ValueError):
            pass
        client.post("eof")

    def set_nick(self, nick):
        self.nick = nick

    def show(self, *lines):
        text = "".join(self.style.render(line, self.nick) + "\n" for line in lines)
        if self._tty:
            self._stdout.write(text)
        else:
            self._stdout.buffer.write(text.encode("utf-8", "replace"))
        self._stdout.flush()

    def show_own(self, line):
        """Our own line, as others see it: only where a person is watching."""
        if self._tty:
            self.show(line)

    def notice(self, text):
        if self._tty:
            self.show("*** " + text)
        else:
            self._stderr.write("chat.py: %s\n" % text)
            self._stderr.flush()

    def close(self):
        pass


class LineEditor:
    """The line being typed: text, cursor, input history and completion.

    Pure state with no terminal behind it; the console maps keys to these
    methods and draws the result. The cursor moves over combining marks
    together with the character they belong to.
    """

    HISTORY_SIZE = 500

    def __init__(self):
        self.text = ""
        self.cursor = 0
        self.history = []
        self._browsing = None      # index into history while Up/Down browse it
        self._draft = ""           # the line being typed before browsing started

    def insert(self, text):
        self.text = self.text[:self.cursor] + text + self.text[self.cursor:]
        self.cursor += len(text)

    def _previous_stop(self, index):
        index -= 1
        while index > 0 and char_width(self.text[index]) == 0:
            index -= 1
        return max(index, 0)

    def _next_stop(self, index):
        index += 1
        while index < len(self.text) and char_width(self.text[index]) == 0:
            index += 1
        return min(index, len(self.text))

    def left(self):
        self.cursor = self._previous_stop(self.cursor)

    def right(self):
        self.cursor = self._next_stop(self.cursor)

    def home(self):
        self.cursor = 0

    def end(self):
        self.cursor = len(self.text)

    def word_left(self):
        while self.cursor and self.text[self.cursor - 1] == " ":
            self.cursor -= 1
        while self.cursor and self.text[self.cursor - 1] != " ":
            self.cursor -= 1

    def word_right(self):
        while self.cursor < len(self.text) and self.text[self.cursor] == " ":
            self.cursor += 1
        while self.cursor < len(self.text) and self.text[self.cursor] != " ":
            self.cursor += 1

    def backspace(self):
        start = self._previous_stop(self.cursor) if self.cursor else 0
        self.text = self.text[:start] + self.text[self.cursor:]
        self.cursor = start

    def delete(self):
        self.text = self.text[:self.cursor] + self.text[self._next_stop(self.cursor):]

    def kill_to_start(self):
        self.text, self.cursor = self.text[self.cursor:], 0

    def kill_to_end(self):
        self.text = self.text[:self.cursor]

    def kill_word(self):
        end = self.cursor
        self.word_left()
        self.text = self.text[:self.cursor] + self.text[end:]

    def previous(self):
        if self._browsing is None:
            if not self.history:
                return
            self._browsing, self._draft = len(self.history), self.text
        if self._browsing > 0:
            self._browsing -= 1
            self._replace(self.history[self._browsing])

    def next(self):
        if self._browsing is None:
            return
        self._browsing += 1
        if self._browsing >= len(self.history):
            self._browsing = None
            self._replace(self._draft)
        else:
            self._replace(self.history[self._browsing])

    def _replace(self, text):
        self.text, self.cursor = text, len(text)

    def submit(self):
        """The finished line; the editor is empty again and the line is in the history."""
        line = self.text
        if line.strip() and (not self.history or self.history[-1] != line):
            self.history = (self.history + [line])[-self.HISTORY_SIZE:]
        self._browsing = None
        self._replace("")
        return line

    def complete(self, commands, nicks):
        """Complete the word before the cursor: a command first on the line, else a nick.

        Returns the candidates when they are ambiguous and share no longer prefix,
        so the console can list them.
        """
        start = self.text.rfind(" ", 0, self.cursor) + 1
        word = self.text[start:self.cursor]
        if not word:
            return []
        pool = commands if start == 0 and word[0] == "/" else nicks
        folded = word.casefold()
        matches = sorted({name for name in pool if name.casefold().startswith(folded)},
                         key=str.casefold)
        if len(matches) == 1:
            ending = ": " if pool is nicks and start == 0 else " "
            completion = matches[0] + ending
        elif matches:
            completion = os.path.commonprefix([name.casefold() for name in matches])
            completion = matches[0][:len(completion)]
            if len(completion) <= len(word):
                return matches
        else:
            return []
        self.text = self.text[:start] + completion + self.text[self.cursor:]
        self.cursor = start + len(completion)
        return []


def parse_keys(text):
    """Split typed text into keys: ("text", chars) or a key name. Returns (keys, rest),
    rest being an escape sequence cut off by the end of the read."""
    keys = []
    start = 0
    for match in _KEY_TOKEN.finditer(text):
        token = match.group()
        if token[0] == "\x1b":
            if _PARTIAL_SEQUENCE.fullmatch(text, match.start()) and match.end() == len(text):
                return keys, text[match.start():]
            name = _ESCAPE_KEYS.get(token)
        else:
            name = _CONTROL_KEYS.get(token)
        if name:
            keys.append(name)
        elif token[0] not in "\x1b\x7f" and token >= " ":
            if keys and isinstance(keys[-1], tuple):
                keys[-1] = ("text", keys[-1][1] + token)
            else:
                keys.append(("text", token))
        start = match.end()
    return keys, text[start:]


_KEY_TOKEN = re.compile(
    r"\x1b(?:\[[\x30-\x3f]*[\x20-\x2f]*[\x40-\x7e]?|O.?|[^\[O])?|[\x00-\x1f\x7f]|[^\x00-\x1f\x7f\x1b]+",
    re.S)
_PARTIAL_SEQUENCE = re.compile(r"\x1b(?:\[[\x30-\x3f]*[\x20-\x2f]*|O)?")
_ESCAPE_KEYS = {
    "\x1b[A": "previous", "\x1b[B": "next", "\x1b[C": "right", "\x1b[D": "left",
    "\x1bOA": "previous", "\x1bOB": "next", "\x1bOC": "right", "\x1bOD": "left",
    "\x1b[H": "home", "\x1b[F": "end", "\x1bOH": "home", "\x1bOF": "end",
    "\x1b[1~": "home", "\x1b[7~": "home", "\x1b[4~": "end", "\x1b[8~": "end",
    "\x1b[3~": "delete", "\x1b[1;5D": "word_left", "\x1b[1;5C": "word_right",
    "\x1b[1;3D": "word_left", "\x1b[1;3C": "word_right", "\x1bb": "word_left", "\x1bf": "word_right",
}
_CONTROL_KEYS = {
    "\r": "enter", "\n": "enter", "\x7f": "backspace", "\x08": "backspace", "\t": "complete",
    "\x01": "home", "\x05": "end", "\x02": "left", "\x06": "right", "\x10": "previous",
    "\x0e": "next",
    "\x15": "kill_to_start", "\x0b": "kill_to_end", "\x17": "kill_word", "\x03": "interrupt",
    "\x04": "eof", "\x0c": "redraw", "\x1a": "suspend",
}
_WINDOWS_KEYS = {"H": "previous", "P": "next", "K": "left", "M": "right", "G": "home", "O": "end",
                 "S": "delete", "s": "word_left", "t": "word_right"}
COMMAND_WORDS = ("/nick", "/me", "/msg", "/who", "/help", "/quit")


class TerminalConsole:
    """The interactive terminal: a line editor in raw mode with incoming lines printed
    above it, so what the user is typing is never clobbered.

    Threads: the keyboard thread reads keys and edits the line; the main thread
    shows incoming lines. Both draw, so every write to the screen happens under
    one lock. The terminal is restored by close(), which run() always reaches.
    """

    ESCAPE_TIMEOUT = 0.05     # seconds after a lone ESC before it counts as the Esc key

    def __init__(self, style, stdin=None, stdout=None):
        self.style = style
        self._stdin = stdin or sys.stdin
        self._stdout = stdout or sys.stdout
        self._fd = self._stdin.fileno()
        self._lock = threading.RLock()
        self.editor = LineEditor()
        self.roster = Roster()
        self.nick = None
        self._client = None
        self._rows_above = 0      # rows from the prompt's first row down to the cursor
        self._saved_mode = None
        self._resize_r = self._resize_w = None
        self._closed = False

    @classmethod
    def usable(cls, stdin, stdout):
        """Raw mode needs both ends to be a terminal that understands cursor movement."""
        if not (stdin.isatty() and stdout.isatty()) or os.environ.get("TERM") == "dumb":
            return False
        return enable_windows_vt(stdout) if WINDOWS else termios is not None

    # Life cycle

    def start(self, client):
        self._client = client
        if not WINDOWS:
            self._enter_raw_mode()
            self._resize_r, self._resize_w = os.pipe()
            os.set_blocking(self._resize_w, False)
            signal.signal(signal.SIGWINCH, self._on_resize)
        with self._lock:
            self._redraw()
        reader = self._read_windows_keys if WINDOWS else self._read_keys
        threading.Thread(target=reader, name="keyboard", daemon=True).start()

    def close(self):
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._write(self._erase_input())
            self._leave_raw_mode()
            for fd in (self._resize_r, self._resize_w):
                if fd is not None:
                    os.close(fd)

    def _enter_raw_mode(self):
        self._saved_mode = termios.tcgetattr(self._fd)
        mode = termios.tcgetattr(self._fd)
        mode[0] &= ~(termios.BRKINT | termios.ICRNL | termios.INPCK | termios.ISTRIP | termios.IXON)
        mode[3] &= ~(termios.ECHO | termios.ICANON | termios.IEXTEN | termios.ISIG)
        mode[6][termios.VMIN], mode[6][termios.VTIME] = 1, 0
        termios.tcsetattr(self._fd, termios.TCSANOW, mode)

    def _leave_raw_mode(self):
        if self._saved_mode is not None:
            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved_mode)

    # Output from the main thread

    def set_nick(self, nick):
        """Use nick from the next drawing on: the line announcing it follows at once."""
        with self._lock:
            self.nick = nick

    def show(self, *lines):
        with self._lock:
            for line in lines:
                self.roster.note(line)
            self._print_above("".join(self.style.render(line, self.nick) + "\r\n"
                                      for line in lines))

    def show_own(self, line):
        self.show(line)

    def notice(self, text):
        self.show("*** " + text)

    # Drawing (always under the lock)

    def _write(self, text):
        self._stdout.write(text)
        self._stdout.flush()

    def _print_above(self, text):
        """Erase the input line, print text, draw the input line again: one write, so
        the screen never shows a half-done update."""
        if not self._closed:
            self._write(self._erase_input() + text + self._input_line())

    def _redraw(self):
        if not self._closed:
            self._write(self._erase_input() + self._input_line())

    def _erase_input(self):
        """Escape codes that go to the start of the input area and clear to the end."""
        up = "\x1b[%dA" % self._rows_above if self._rows_above else ""
        self._rows_above = 0
        return up + "\r\x1b[J"

    def _prompt(self):
        return "%s> " % self.nick if self.nick else "> "

    def _width(self):
        try:
            return max(os.get_terminal_size(self._stdout.fileno()).columns, 2)
        except (OSError, ValueError):
            return 80

    def _layout(self, width):
        """(cursor row, cursor column, end row, whether the end is exactly at the edge)
        of the prompt and line, wrapped at width as the terminal wraps them."""
        prompt = self._prompt()
        row = col = 0
        cursor = None
        for index, char in enumerate(prompt + self.editor.text):
            columns = char_width(char)
            if col + columns > width:   # a wide character never straddles two rows
                row, col = row + 1, 0
            if index == len(prompt) + self.editor.cursor:
                cursor = (row, col)
            col += columns
        at_edge = col >= width
        end = (row + 1, 0) if at_edge else (row, col)
        cursor = cursor or end
        if cursor[1] >= width:
            cursor = (cursor[0] + 1, 0)
        return cursor[0], cursor[1], end[0], at_edge

    def _input_line(self):
        """Prompt and line, written from the start of the input area, then the cursor
        placed where the editor's cursor is."""
        row, col, end_row, at_edge = self._layout(self._width())
        prompt = self._prompt()
        if self.style.colour and self.nick:
            prompt = paint(LineStyle.nick_colour(self.nick), self.nick) + "> "
        out = [prompt, self.editor.text, "\r\n" if at_edge else ""]
        if end_row > row:
            out.append("\x1b[%dA" % (end_row - row))
        out.append("\r" + ("\x1b[%dC" % col if col else ""))
        self._rows_above = row
        return "".join(out)

    # Input, in the keyboard thread

    def _read_keys(self):
        """Read, decode and handle keys until the terminal closes; then the client leaves."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        pending = ""
        try:
            while True:
                wait = self.ESCAPE_TIMEOUT if pending else None
                ready, _, _ = select.select([self._fd, self._resize_r], [], [], wait)
                if self._resize_r in ready:
                    os.read(self._resize_r, 64)
                    with self._lock:
                        self._redraw()
                if not ready and pending:       # a lone Esc: nothing follows it
                    pending = ""
                if self._fd not in ready:
                    continue
                data = os.read(self._fd, 4096)
                if not data:
                    break
                keys, pending = parse_keys(pending + decoder.decode(data))
                self._handle_keys(keys)
        except (OSError, ValueError):
            pass
        finally:
            self._client.post("eof")   # also after a bug here: leave cleanly, never hang

    def _read_windows_keys(self):
        while True:
            char = msvcrt.getwch()
            if char in ("\x00", "\xe0"):
                name = _WINDOWS_KEYS.get(msvcrt.getwch())
                keys = [name] if name else []
            else:
                keys = parse_keys(char)[0]
            self._handle_keys(keys)

    def _handle_keys(self, keys):
        """Edit and redraw under the lock; hand finished lines over outside it, since
        the client's queue may be full and must not stall the screen with it."""
        posts = []
        with self._lock:
            for key in keys:
                self._handle_key(key, posts)
            self._redraw()
        for kind, text in posts:
            self._client.post(kind, text)

    def _handle_key(self, key, posts):
        editor = self.editor
        if isinstance(key, tuple):
            editor.insert(key[1])
        elif key == "enter":
            line = editor.submit()
            if line:
                posts.append(("line", line))
        elif key == "eof":
            if editor.text:
                editor.delete()
            else:
                posts.append(("eof", None))
        elif key == "interrupt":
            interrupt_main_thread()   # its SIGINT handler decides, as for a real Ctrl+C
        elif key == "complete":
            candidates = editor.complete(COMMAND_WORDS, self.roster.nicks)
            if candidates:
                self._print_above("  ".join(candidates) + "\r\n")
        elif key == "redraw":
            self._write("\x1b[H\x1b[2J")
            self._rows_above = 0
        elif key == "suspend":
            self._suspend()
        else:
            getattr(editor, key)()

    def _suspend(self):
        """Ctrl+Z: give the terminal back, stop; on fg take it again."""
        if WINDOWS:
            return
        self._write(self._erase_input())
        self._leave_raw_mode()
        os.kill(os.getpid(), signal.SIGTSTP)
        self._enter_raw_mode()

    def _on_resize(self, signum, frame):
        try:
            os.write(self._resize_w, b"r")
        except OSError:
            pass


def interrupt_main_thread():
    """Deliver SIGINT to the main thread (Python runs handlers there), so a blocking
    connect() there is interrupted too; on Windows, simulate it."""
    if hasattr(signal, "pthread_kill"):
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    else:
        _thread.interrupt_main()


def enable_windows_vt(stream):
    """Turn on escape-sequence processing in a Windows console; False if it cannot be."""
    try:
        import ctypes
        kernel32 = ctypes.windll.kernel32
        handle = kernel32.GetStdHandle(-11)   # STD_OUTPUT_HANDLE
        mode = ctypes.c_uint32()
        if not kernel32.GetConsoleMode(handle, ctypes.byref(mode)):
            return False
        return bool(kernel32.SetConsoleMode(handle, mode.value | 0x0004))   # VT processing
    except (ImportError, AttributeError, OSError):
        return False


class ChatClient:
    """Connect to a server, send what the user types, show what the server sends.

    Threads: the console's daemon thread reads the keyboard (or a pipe) and
    posts each line to a queue, waking the main loop through a socketpair; the
    main loop alone owns the socket, so the connection needs no lock.
    A lost connection is reopened with backoff; lines typed meanwhile wait.
    """

    WELCOME = re.compile(r"\*\*\* welcome to .*, you are (\S+)$")
    RENAMED = re.compile(r"\*\*\* you are now known as (\S+)$")
    NICK_TAKEN = re.compile(r"\*\*\* error: nick (\S+) is taken$")
    HISTORY_START = re.compile(r"\*\*\* --- last \d+ messages? ---$")
    HISTORY_END = "*** --- end of history ---"

    def __init__(self, host="localhost", port=DEFAULT_PORT, family=socket.AF_UNSPEC,
                 nick=None, console=None, tls_context=None, tls_pin=None, password=None,
                 ask_password=None, reconnect=True, retry_delay=RETRY_DELAY,
                 retry_max=RETRY_MAX):
        self.host, self.port, self.family = host, port, family
        self.wanted_nick = nick
        self.nick = None
        self.console = console or PlainConsole()
        self.tls_context = tls_context  # None: plaintext
        self.tls_pin = tls_pin          # hex SHA-256 the server certificate must have
        self.password = password
        self.ask_password = ask_password   # callable prompting the user, or None
        self.reconnect = reconnect
        self.retry_delay, self.retry_max = retry_delay, retry_max
        self._events = queue.Queue(KEYBOARD_QUEUE)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._conn = None               # BufferedSocket once connected
        self._connecting = False
        self._inbuf = b""
        self._received = collections.deque()   # lines read but not handled yet
        self._nick_attempt = 0          # > 0 while asking for wanted_nick or a variant
        self._ready = False             # greeted and nick settled: typed lines may go out
        self._quitting = False
        self._interrupted = False
        self._history = None            # lines of a history block being received
        self._seen = collections.deque(maxlen=SEEN_LINES)   # public lines shown

    @property
    def where(self):
        return format_address(self.host, self.port)

    @property
    def wakeup_fd(self):
        """A descriptor for signal.set_wakeup_fd(): a signal then wakes the main loop."""
        return self._wake_w.fileno()

    # Called from other threads and signal handlers

    def post(self, kind, text=None):
        """Hand a keyboard event ("line", "eof") to the main loop."""
        self._events.put((kind, text))
        self._wake()

    def interrupt(self):
        """Ctrl+C (the SIGINT handler): leave, or at once if already leaving."""
        if self._connecting:
            raise KeyboardInterrupt   # blocked in connect(): nobody to say goodbye to
        self._interrupted = True
        self._wake()

    def _wake(self):
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    # Life cycle

    def run(self):
        """Chat until the user leaves (return 0); raise ChatError when it fails."""
        try:
            self._conn = BufferedSocket(self._connect())
            self.console.start(self)
            self.ask_password = None   # the console owns the keyboard from now on
            while not self._serve():
                if not self._reconnect():
                    break
            return 0
        finally:
            self.console.close()
            if self._conn:
                self._conn.sock.close()
            self._wake_r.close()
            self._wake_w.close()

    def _connect(self):
        """A connected, registered socket, greeting read: TCP, then TLS, then /pass."""
        self._connecting = True
        try:
            sock = open_connection(self.host, self.port, self.family)
            try:
                if self.tls_context:
                    sock = self._start_tls(sock)
                enable_keepalive(sock)
                sock.settimeout(REGISTER_TIMEOUT)
                self._register(sock)
                sock.setblocking(False)
                return sock
            except BaseException:
                sock.close()
                raise
        finally:
            self._connecting = False

    def _start_tls(self, sock):
        try:
            sock = self.tls_context.wrap_socket(sock, server_hostname=self.host)
        except ssl.SSLCertVerificationError as exc:
            raise RefusedError("the TLS certificate of %s is not trusted: %s\n%s" % (
                self.where, exc.verify_message, self._pin_advice()))
        except (ssl.SSLError, OSError) as exc:
            raise ChatError("TLS with %s failed: %s" % (
                self.where, getattr(exc, "reason", None) or describe_error(exc)))
        if self.tls_pin:
            actual = certificate_fingerprint(sock.getpeercert(binary_form=True))
            if normalize_fingerprint(actual) != self.tls_pin:
                sock.close()
                raise RefusedError("the TLS certificate of %s does not match --tls-fingerprint "
                                   "(someone may be in between, or the certificate changed)\n%s"
                                   % (self.where, self._pin_advice(actual)))
        return sock

    def _pin_advice(self, fingerprint=None):
        """Tell the server's fingerprint and how to trust it, the way ssh shows a host key."""
        fingerprint = fingerprint or fetch_fingerprint(self.host, self.port, self.family)
        if not fingerprint:
            return "  (could not read the server's certificate)"
        return ("  the server's certificate fingerprint is %s\n"
                "  if that is the right one, connect with: --tls-fingerprint %s"
                % (fingerprint, fingerprint[7:]))

    def _register(self, sock):
        """Read up to the greeting, answering a password request on the way."""
        self._inbuf = b""
        self._received.clear()
        self._ready = False
        self._nick_attempt = 0
        self._history = None
        error = None
        while True:
            line = self._next_line(sock)
            if line is None:
                raise ChatError("%s closed the connection%s"
                                % (self.where, ": " + error if error else ""))
            self.console.show(line)
            if line.startswith("*** password required"):
                sock.sendall(("/pass %s\n" % self._get_password()).encode())
            elif line == "*** error: wrong password":
                raise RefusedError("%s refused the password" % self.where)
            elif line.startswith("*** error: "):
                error = line[11:]
            welcome = self.WELCOME.match(line)
            if welcome:   # in the room: from now on Ctrl+C says goodbye first
                self._connecting = False
                self._set_nick(welcome.group(1))
                self._request_nick(sock)
                return

    def _next_line(self, sock):
        """The next line from the (blocking) socket, or None at its end."""
        while not self._received:
            try:
                data = sock.recv(RECV_SIZE)
            except socket.timeout:
                raise ChatError("%s did not greet us within %d s" % (self.where, REGISTER_TIMEOUT))
            except OSError as exc:
                raise ChatError("connection to %s failed: %s" % (self.where, describe_error(exc)))
            if not data:
                return None
            self._split_lines(data)
        return self._received.popleft()

    def _split_lines(self, data):
        lines = (self._inbuf + data).split(b"\n")
        self._inbuf = lines.pop()
        self._received.extend(sanitize(decode_line(raw)) for raw in lines)

    def _get_password(self):
        if self.password is None and self.ask_password:
            self.password = self.ask_password("password for %s: " % self.where)
        if self.password is None:
            raise RefusedError("%s requires a password: give it with --password-file FILE "
                               "or the CHAT_PASSWORD environment variable" % self.where)
        return self.password

    def _reconnect(self):
        """After a lost connection: retry with backoff until back (True) or the user
        leaves (False). Refusals (TLS, password) end the client."""
        self._conn.sock.close()
        reason = "the server closed it"
        if not self.reconnect:
            raise ChatError("connection to %s lost: %s" % (self.where, reason))
        delay = self.retry_delay
        message = "connection to %s lost" % self.where
        while True:
            wait = delay * random.uniform(0.75, 1.25)   # jitter: a restarted server is not stormed
            self.console.notice("%s; reconnecting in %.0f s" % (message, max(wait, 1)))
            if not self._pause(wait):
                return False
            try:
                self._conn = BufferedSocket(self._connect())
            except RefusedError:
                raise
            except ChatError as exc:
                message = str(exc)
                delay = min(delay * 2, self.retry_max)
                continue
            self._handle_received()   # the rest of the greeting, then the news
            self.console.notice("reconnected to %s" % self.where)
            return True

    def _pause(self, seconds):
        """Wait, but wake for Ctrl+C; False if the user wants out."""
        deadline = time.monotonic() + seconds
        while not self._interrupted:
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            if select.select([self._wake_r], [], [], left)[0]:
                drain(self._wake_r)
        return False

    # Serving one connection

    def _serve(self):
        """Relay lines until the user leaves (True) or the connection is lost (False)."""
        sock = self._conn.sock
        self._handle_received()
        while True:
            writers = [sock] if self._conn.outbox else []
            readable, writable, _ = select.select([sock, self._wake_r], writers, [])
            if writable:
                self._flush()
            if self._wake_r in readable:
                drain(self._wake_r)
            if self._interrupted:
                if self._quitting:
                    return True
                self._interrupted = False
                self._quit()
            if sock in readable and not self._receive():
                return self._quitting
            if self._ready:
                self._take_keyboard_events()

    def _take_keyboard_events(self):
        while self._conn.queued < SEND_CHUNK and not self._quitting:
            try:
                kind, text = self._events.get_nowait()
            except queue.Empty:
                return
            if kind == "line":
                self._send_typed(text)
            else:
                self._quit()

    def _send_typed(self, text):
        if text.split(" ", 1)[0] == "/quit":
            self._quit(text)
        elif text:
            self._send_line(text)
            echo = echo_of(text, self.nick)
            if echo:
                self._seen.append(echo)
                self.console.show_own(echo)

    def _quit(self, command="/quit"):
        """Say goodbye; the loop then waits for the server to close, so nothing sent is lost."""
        self._send_line(command)
        self._quitting = True

    def _send_line(self, text):
        self._conn.queue(text.encode("utf-8", "replace") + b"\n")
        self._flush()

    def _flush(self):
        try:
            self._conn.send_pending()
        except OSError:
            pass   # the read side reports the lost connection

    def _receive(self):
        """Read and handle what arrived; False at the end of the stream."""
        try:
            data = self._conn.sock.recv(RECV_SIZE)
        except WOULD_BLOCK:
            return True
        except OSError:
            data = b""
        if not data:
            return False
        self._split_lines(data)
        self._handle_received()
        return True

    def _handle_received(self):
        shown = []
        while self._received:
            line = self._received.popleft()
            if self._history is not None or self.HISTORY_START.match(line):
                self._collect_history(line, shown)
                continue
            shown.append(line)
            self._follow(line)
        if shown:
            self.console.show(*shown)

    def _follow(self, line):
        """Keep track of our nick, and of the public lines shown."""
        renamed = self.RENAMED.match(line)
        if renamed:
            if not self._nick_attempt:   # the user's own /nick: keep it across reconnects
                self.wanted_nick = renamed.group(1)
            self._set_nick(renamed.group(1))
            self._nick_settled()
        elif self._nick_attempt and self.NICK_TAKEN.match(line):
            self._request_nick()
        elif self._nick_attempt and line.startswith("*** error: invalid nick"):
            self._nick_settled()
        elif _CHAT_LINE.match(line) or _ACTION_LINE.match(line):
            self._seen.append(line)

    def _collect_history(self, line, shown):
        """Gather a history block; show only the part not shown before (after a reconnect)."""
        if self._history is None:
            self._history = []
        self._history.append(line)
        if line != self.HISTORY_END:
            return
        block, self._history = self._history, None
        said = [_HISTORY_ENTRY.match(entry) for entry in block[1:-1]]
        said = [entry.group(2) if entry else None for entry in said]
        known = self._overlap(said)
        if known < len(said):
            shown.extend([block[0]] + block[1 + known:])
            self._seen.extend(said[known:])

    def _overlap(self, said):
        """How many lines at the start of said are the last lines we have already shown."""
        seen = list(self._seen)
        for count in range(min(len(said), len(seen)), 0, -1):
            if said[:count] == seen[-count:]:
                return count
        return 0

    def _set_nick(self, nick):
        self.nick = nick
        self.console.set_nick(nick)

    def _nick_settled(self):
        self._nick_attempt = 0
        self._ready = True

    def _request_nick(self, sock=None):
        """Ask for the wanted nick, or its next variant when the last one was taken."""
        if not self.wanted_nick or nick_key(self.wanted_nick) == nick_key(self.nick or ""):
            self._nick_settled()
            return
        self._nick_attempt += 1
        attempt = self._nick_attempt
        line = "/nick " + (nick_variant(self.wanted_nick, attempt) if attempt > 1
                           else self.wanted_nick)
        if sock is not None:   # still registering, on the blocking socket
            sock.sendall(line.encode() + b"\n")
        else:
            self._send_line(line)


# --- Command line ---

def build_parser():
    parser = argparse.ArgumentParser(
        prog="chat.py",
        description="A terminal chat in one file: run a server, join it with the client or nc.",
        epilog="Run 'chat.py server --help' or 'chat.py client --help' for their options.")
    parser.add_argument("--version", action="version", version="chat.py " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="{server,client}")
    commands.required = True
    add_server_parser(commands)
    add_client_parser(commands)
    return parser


def add_server_parser(commands):
    server = commands.add_parser(
        "server", help="run a chat server",
        description="Run a chat server. Clients connect with 'chat.py client' or nc/telnet.",
        epilog="The password may also come from the CHAT_PASSWORD environment variable "
        "(never from the command line, where ps would show it).")
    add_network_arguments(server, "address to listen on (default: all interfaces, IPv4 and IPv6)")
    server.add_argument("--name", help="server name shown in the greeting (default: host name)")
    limits = server.add_argument_group("limits")
    limits.add_argument("--max-clients", type=positive_int, default=DEFAULT_MAX_CLIENTS,
                        metavar="N", help="connections accepted at once (default %(default)s" +
                        (", the most select() allows on Windows)" if WINDOWS else ")"))
    limits.add_argument("--max-per-ip", type=non_negative_int, default=0, metavar="N",
                        help="connections from one IP address (default 0: no limit)")
    limits.add_argument("--max-line", type=positive_int, default=DEFAULT_MAX_LINE,
                        metavar="BYTES", help="longest line accepted; longer ones are refused "
                        "(default %(default)s)")
    limits.add_argument("--rate", type=non_negative_float, default=DEFAULT_RATE, metavar="LINES",
                        help="lines per second one client may send on average; faster input "
                        "waits, nothing is dropped (default %(default)s; 0: no limit)")
    limits.add_argument("--burst", type=positive_int, default=DEFAULT_BURST, metavar="LINES",
                        help="lines one client may send at once, e.g. a paste (default %(default)s)")
    server.add_argument("--history", type=non_negative_int, default=DEFAULT_HISTORY, metavar="N",
                        help="public lines replayed to newcomers (default %(default)s; 0: none)")
    limits.add_argument("--announce-limit", type=non_negative_int, default=DEFAULT_ANNOUNCE_LIMIT,
                        metavar="N", help="announce joins, leaves and renames only while the room "
                        "has at most N members (default %(default)s)")
    limits.add_argument("--register-timeout", type=positive_float, default=REGISTER_TIMEOUT,
                        metavar="SECONDS", help="time to finish the TLS handshake and /pass "
                        "before being dropped (default %(default)s)")
    security = server.add_argument_group("security")
    security.add_argument("--tls-cert", metavar="FILE",
                          help="PEM certificate (it may hold the key too): serve TLS only")
    security.add_argument("--tls-key", metavar="FILE", help="PEM private key, if not in --tls-cert")
    security.add_argument("--password-file", metavar="FILE",
                          help="file holding the password clients must send with /pass")
    verbosity = server.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="log errors only")
    server.set_defaults(run=run_server)


def add_client_parser(commands):
    client = commands.add_parser(
        "client", help="join a chat server",
        description="Join a chat server. Type lines to talk; /help lists the commands; "
        "/quit, Ctrl+D or Ctrl+C leave. In a terminal, incoming lines appear above the line "
        "you type, which you edit with Left/Right, Home/End (Ctrl+A/E), Backspace/Delete, "
        "Ctrl+U/K/W, Up/Down (input history) and Tab (completes nicks and commands). "
        "Piped input is sent line by line and piped output is the plain protocol lines.",
        epilog="The password may also come from the CHAT_PASSWORD environment variable; "
        "without either, the client asks for it when the server wants one.")
    add_network_arguments(client, "server to connect to (default: localhost)", default="localhost")
    client.add_argument("--nick", help="nick to use (default: your login name; "
                        "a free variant such as alice2 is picked if it is taken)")
    client.add_argument("--no-reconnect", dest="reconnect", action="store_false",
                        help="exit with status 1 when the connection is lost, instead of "
                        "reconnecting (after 1 s, doubling up to 30 s)")
    display = client.add_argument_group("display")
    stamps = display.add_mutually_exclusive_group()
    stamps.add_argument("--timestamps", dest="timestamps", action="store_true", default=None,
                        help="put [HH:MM] before every line (the default in a terminal)")
    stamps.add_argument("--no-timestamps", dest="timestamps", action="store_false",
                        help="no [HH:MM] before lines")
    display.add_argument("--no-color", dest="color", action="store_false",
                         help="no colours (also off with NO_COLOR set, TERM=dumb, or output "
                         "that is not a terminal)")
    display.add_argument("--no-bell", dest="bell", action="store_false",
                         help="no terminal bell for private messages and mentions of your nick")
    security = client.add_argument_group("security")
    security.add_argument("--tls", action="store_true",
                          help="connect with TLS, verifying the server against the system CAs")
    security.add_argument("--tls-ca", metavar="FILE",
                          help="trust this CA or self-signed certificate instead (implies --tls)")
    security.add_argument("--tls-fingerprint", metavar="HEX",
                          help="trust only the server certificate with this SHA-256 fingerprint, "
                          "as the server logs it (implies --tls)")
    security.add_argument("--password-file", metavar="FILE",
                          help="file holding the server password")
    client.set_defaults(run=run_client)


def add_network_arguments(parser, host_help, default=None):
    parser.add_argument("--host", default=default, help=host_help)
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                        help="TCP port (default %(default)s; 0 for any free port)"
                        if default is None else "TCP port (default %(default)s)")
    family = parser.add_mutually_exclusive_group()
    family.add_argument("-4", dest="family", action="store_const", const=socket.AF_INET,
                        help="IPv4 only")
    family.add_argument("-6", dest="family", action="store_const", const=socket.AF_INET6,
                        help="IPv6 only")


def port_number(text):
    value = int(text) if text.isdigit() else -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("%r is not a port number (0-65535)" % text)
    return value


def positive_int(text):
    value = int(text) if text.isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError("%r is not a positive whole number" % text)
    return value


def non_negative_int(text):
    if not text.isdigit():
        raise argparse.ArgumentTypeError("%r is not a whole number" % text)
    return int(text)


def non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError("%r is not a number of 0 or more" % text)
    return value


def positive_float(text):
    value = non_negative_float(text)
    if not value:
        raise argparse.ArgumentTypeError("%r is not above 0" % text)
    return value


def read_password(path):
    """The password from a file (its trailing newline stripped) or $CHAT_PASSWORD, or None."""
    if path is None:
        return os.environ.get("CHAT_PASSWORD") or None
    try:
        with open(path, encoding="utf-8") as file:
            password = file.read().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ChatError("cannot read the password file %s: %s"
                        % (path, getattr(exc, "strerror", None) or exc))
    if not password:
        raise ChatError("the password file %s is empty" % path)
    return password


class LogFormatter(logging.Formatter):
    """The standard format, with the date text made once per second, not per line:
    a storm of connects logs thousands of lines a second."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(message)s")
        self._second = None
        self._date = ""

    def formatTime(self, record, datefmt=None):
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return "%s,%03d" % (self._date, record.msecs)


def configure_logging(args):
    # The logging HOWTO's advice for speed: skip caller, thread and process lookups.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogFormatter())
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.INFO)


def raise_open_file_limit(needed):
    """Raise the soft limit on open files as far as the hard limit allows; warn if short."""
    try:
        import resource
    except ImportError:   # Windows: no such limit
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning("the open-file limit is %d, below the %d that --max-clients needs; "
                    "raise it with 'ulimit -n'", soft, needed)


def server_options(args):
    """ServerOptions and the TLS fingerprint (or None) from the command line.

    Raises ChatError when a file cannot be used.
    """
    options = ServerOptions(
        host=args.host, port=args.port, family=args.family, name=args.name,
        max_clients=min(args.max_clients, DEFAULT_MAX_CLIENTS) if WINDOWS else args.max_clients,
        max_line=args.max_line, announce_limit=args.announce_limit,
        password=read_password(args.password_file), register_timeout=args.register_timeout,
        rate=args.rate, burst=args.burst, max_per_ip=args.max_per_ip, history=args.history)
    if args.tls_key and not args.tls_cert:
        raise ChatError("--tls-key needs --tls-cert")
    fingerprint = None
    if args.tls_cert:
        if ssl is None:
            raise ChatError("this Python has no ssl module, so TLS is not available")
        try:
            options.tls_context, fingerprint = server_tls_context(args.tls_cert, args.tls_key)
        except (OSError, ValueError, AttributeError) as exc:   # ssl.SSLError is an OSError
            raise ChatError("cannot use the TLS certificate %s: %s"
                            % (args.tls_cert, getattr(exc, "strerror", None) or exc))
    return options, fingerprint


def log_start_notes(args, options, fingerprint):
    """What an operator should know, logged once the listening lines are out."""
    if options.max_clients < args.max_clients:
        log.warning("--max-clients is capped at %d on Windows", options.max_clients)
    if fingerprint:
        log.info("tls fingerprint %s", fingerprint)
    if options.password and not options.tls_context:
        log.warning("a password is set without TLS: it and the chat cross the network in "
                    "plaintext")
    raise_open_file_limit(options.max_clients + RESERVED_FDS)


def run_server(args):
    configure_logging(args)
    options, fingerprint = server_options(args)
    try:
        server = ChatServer(options)
    except OSError as exc:
        where = format_address(args.host or "*", args.port)
        raise ChatError("cannot listen on %s: %s" % (where, exc.strerror or exc))
    with server:
        for host, port in server.addresses:
            print("listening on %s" % format_address(host, port), file=sys.stderr, flush=True)
        log_start_notes(args, options, fingerprint)
        install_shutdown_signals(server)
        server.serve_forever()
    return 0


def install_shutdown_signals(server):
    """Ctrl+C and SIGTERM stop the server cleanly; the wakeup fd makes select() return."""
    signal.set_wakeup_fd(server.wakeup_fd, warn_on_full_buffer=False)
    for name in ("SIGINT", "SIGTERM"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), lambda signum, frame: server.request_shutdown())


def client_from_args(args):
    """A ChatClient configured from the command line."""
    nick = default_nick()
    if args.nick:
        try:
            nick = normalize_nick(args.nick)
        except ValueError as exc:
            raise ChatError("invalid --nick: %s" % exc)
    tls_context = pin = None
    if args.tls or args.tls_ca or args.tls_fingerprint:
        if ssl is None:
            raise ChatError("this Python has no ssl module, so TLS is not available")
        try:
            pin = args.tls_fingerprint and normalize_fingerprint(args.tls_fingerprint)
            tls_context = client_tls_context(args.tls_ca, pinned=bool(pin))
        except ValueError as exc:
            raise ChatError("invalid --tls-fingerprint: %s" % exc)
        except OSError as exc:
            raise ChatError("cannot use --tls-ca %s: %s" % (args.tls_ca, exc.strerror or exc))
    ask = getpass.getpass if sys.stdin.isatty() else None
    return ChatClient(args.host, args.port, args.family or socket.AF_UNSPEC, nick=nick,
                      console=console_from_args(args), tls_context=tls_context, tls_pin=pin,
                      password=read_password(args.password_file), ask_password=ask,
                      reconnect=args.reconnect)


def console_from_args(args):
    """The line editor in a terminal; plain lines for pipes, files and dumb terminals."""
    on_terminal = sys.stdout.isatty()
    style = LineStyle(colour=colour_wanted(sys.stdout, not args.color),
                      timestamps=on_terminal if args.timestamps is None else args.timestamps,
                      bell=on_terminal and args.bell)
    if on_terminal:
        sys.stdout.reconfigure(errors="replace")
    if TerminalConsole.usable(sys.stdin, sys.stdout):
        return TerminalConsole(style)
    return PlainConsole(style)


def run_client(args):
    client = client_from_args(args)
    signal.set_wakeup_fd(client.wakeup_fd, warn_on_full_buffer=False)
    signal.signal(signal.SIGINT, lambda signum, frame: client.interrupt())
    for name in ("SIGTERM", "SIGHUP"):   # leave through run()'s cleanup: the terminal is restored
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), lambda signum, frame: sys.exit(128 + signum))
    try:
        return client.run()
    except KeyboardInterrupt:
        return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ChatError as exc:
        print("chat.py: %s" % exc, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
