#!/usr/bin/env python3
"""chat.py: a zero-install terminal chat, server and client in one file.

    python chat.py server                  # on one machine (port 7777)
    python chat.py client --host HOST      # on the others, or: nc HOST 7777

Wire protocol: UTF-8 text lines ending in LF (CRLF accepted).
  client -> server  a chat line, or a command: /nick NAME, /me ACTION,
                    /msg NICK TEXT, /who, /help, /quit [REASON]
                    ("//text" sends the literal line "/text")
  server -> client  <alice> text      a chat line
                    * alice waves     an action
                    *alice* text      a private message to you
                    -> *bob* text     your private message, as sent
                    *** text          everything from the server

Standard library only; Python 3.8+ on Linux, macOS and Windows.
"""

import argparse
import collections
import errno
import getpass
import heapq
import itertools
import logging
import os
import queue
import re
import select
import selectors
import signal
import socket
import sys
import threading
import time
import unicodedata
from dataclasses import dataclass
from typing import Optional

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
ACCEPT_PAUSE = 0.5                   # seconds to stop accepting when out of file descriptors
ACCEPT_BATCH = 256                   # accepts per loop turn, so reads are not starved
LISTEN_BACKLOG = 4096                # the kernel caps it at somaxconn
RECV_SIZE = 256 * 1024
SEND_CHUNK = 64 * 1024               # most bytes joined for one send()
GREETING_NAMES = 20                  # names listed in the greeting before "and N more"
MAX_NICK = 20                        # code points
MAX_REASON = 100                     # code points of a /quit reason
RESERVED_FDS = 32                    # descriptors for listeners, logs, the selector...
CONNECT_TIMEOUT = 10.0
KEYBOARD_QUEUE = 1000                # typed or piped lines buffered before stdin backs off

log = logging.getLogger("chat")


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


def sanitize(text):
    """Return text with nothing a terminal would obey: no controls, escapes or bidi marks."""
    if text.isprintable():
        return text
    text = _ESCAPE_SEQUENCE.sub("", text).replace("\t", " ")
    return _UNSAFE_CHARS.sub("", text)


def decode_line(raw):
    """Turn one received line (without its LF) into text: CR and telnet commands
    dropped, invalid UTF-8 replaced by U+FFFD."""
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    if b"\xff" in raw:
        raw = _TELNET_COMMAND.sub(b"", raw)
    return raw.decode("utf-8", "replace")


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


def enable_keepalive(sock, idle=60, interval=15, count=4):
    """Let TCP notice a dead peer (sleeping laptop, dropped NAT entry) by itself."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    options = (("TCP_KEEPIDLE", idle), ("TCP_KEEPALIVE", idle),
               ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count))
    for name, value in options:
        if hasattr(socket, name):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
            except OSError:
                pass
    if hasattr(socket, "SIO_KEEPALIVE_VALS"):
        sock.ioctl(socket.SIO_KEEPALIVE_VALS, (1, idle * 1000, interval * 1000))


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


class Connection:
    """One client socket: its input buffer, its output queue and its place in the room.

    Only the server's loop touches a connection. Queued output is a deque of
    shared bytes (a broadcast is encoded once for all receivers) with an offset
    into the first chunk, so a backed-up client costs an append per message,
    never a copy of its whole queue.
    """

    __slots__ = ("sock", "number", "peer", "ip", "stage", "nick", "key", "prefix",
                 "inbuf", "discarding", "outbox", "queued", "head", "retry", "events",
                 "reading", "want_write", "join_pending", "announced", "synced_batch", "synced")

    def __init__(self, sock, peer, number):
        self.sock = sock
        self.number = number
        self.peer = peer
        self.ip = peer_ip(peer)
        self.stage = ChatServer.ROOM
        self.nick = None
        self.key = None
        self.prefix = b""               # b"<nick> ", the start of each chat line
        self.inbuf = b""                # received bytes not yet handled
        self.discarding = False         # inside an over-long line, dropping to its end
        self.outbox = collections.deque()
        self.queued = 0                 # bytes in outbox, minus the sent head
        self.head = 0                   # bytes of outbox[0] already sent
        self.retry = None               # buffer to send again after a would-block
        self.events = 0                 # selector interest as registered
        self.reading = True             # False: input is paused or over
        self.want_write = False         # output is waiting for the socket to drain
        self.join_pending = False       # join notice not sent yet
        self.announced = False          # join notice was broadcast
        self.synced_batch = -1          # see ChatServer._sync
        self.synced = 0

    def __repr__(self):
        who = " " + self.nick if self.nick else ""
        return "#%d%s (%s)" % (self.number, who, format_address(self.ip, self.peer[1]))

    def fileno(self):
        return self.sock.fileno()

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


WOULD_BLOCK = (BlockingIOError, InterruptedError)


class ChatServer:
    """A single-threaded chat room on non-blocking sockets and one selector.

    The loop reads every ready socket, handles complete lines, and only at the
    end of the turn writes: broadcasts of the turn are joined once and each
    receiver gets them with one send(), so the cost per receiver does not grow
    with the number of lines. Usable as a context manager; shutdown() may be
    called from any thread.
    """

    COMMANDS = frozenset(("nick", "me", "msg", "who", "help", "quit"))   # each has a _cmd_ method

    ROOM = "room"            # in the chat: receives broadcasts, may talk
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
        self._per_ip = collections.Counter()
        self._numbers = itertools.count(1)
        self._guest_numbers = itertools.count(1)
        self._timers = []              # heap of (when, seq, callback, args)
        self._timer_seq = itertools.count()
        self._turn_chunks = []         # broadcasts of this turn, not yet sent
        self._batch = 0                # counts delivered batches of _turn_chunks
        self._dirty = set()            # connections with direct output this turn
        self._failed = []              # (connection, reason) to drop after the turn
        self._accepting = False
        self._stop_requested = False
        self._started = False
        self._finished = threading.Event()
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
        try:
            while not self._stop_requested:
                self._run_once()
            self._shut_down_clients()
        finally:
            self._finished.set()

    def request_shutdown(self):
        """Ask the loop to stop; safe from signal handlers and other threads."""
        self._stop_requested = True
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def shutdown(self):
        """Stop the loop and wait until every client has been told and closed."""
        self.request_shutdown()
        if self._started:
            self._finished.wait()

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
        events = self._selector.select(self._select_timeout())
        for key, mask in events:
            conn = key.data
            if conn is None:
                self._handle_service_socket(key.fileobj)
            else:
                self._handle_events(conn, mask)
        self._run_due_timers()
        self._flush_turn()

    def _select_timeout(self):
        timeout = None
        if self._timers:
            timeout = max(0.0, self._timers[0][0] - time.monotonic())
        if WINDOWS:   # Ctrl+C does not interrupt select() there
            timeout = 0.5 if timeout is None else min(timeout, 0.5)
        return timeout

    def _handle_service_socket(self, sock):
        if sock is self._wake_r:
            try:
                while sock.recv(4096):
                    pass
            except OSError:
                pass
        else:
            self._accept_from(sock)

    def _handle_events(self, conn, mask):
        try:
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
                log.exception("timer %s failed", callback.__name__)

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
        except OSError as exc:
            log.debug("%s: setup failed: %s", format_address(*peer[:2]), exc)
            sock.close()
            return
        conn = Connection(sock, peer, next(self._numbers))
        self._conns[conn] = None
        self._per_ip[conn.ip] += 1
        self._update_interest(conn)
        log.info("%r connected", conn)
        self._enter_room(conn)

    def _refusal_for(self, peer):
        if len(self._conns) >= self.options.max_clients:
            return "server full"
        return None

    def _refuse(self, sock, peer, reason):
        log.warning("refused %s: %s", format_address(*peer[:2]), reason)
        try:
            sock.setblocking(False)
            sock.send(b"*** error: %s\n" % reason.encode())
        except OSError:
            pass
        sock.close()

    # Reading

    def _handle_read(self, conn):
        try:
            data = conn.sock.recv(RECV_SIZE)
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
        if conn.stage is self.ROOM:
            self._close(conn, "connection closed")

    def _handle_input(self, conn):
        """Handle every complete line in the input buffer; guard the partial one's size."""
        lines = conn.inbuf.split(b"\n")
        conn.inbuf = lines.pop()
        for raw in lines:
            if conn.stage is not self.ROOM:
                return
            if len(raw) > self.options.max_line + raw.endswith(b"\r"):
                self._reject_long_line(conn)
            else:
                self._handle_line(conn, decode_line(raw))
        if len(conn.inbuf) > self.options.max_line + 1 and conn.stage is self.ROOM:
            conn.inbuf = b""
            conn.discarding = True
            self._reject_long_line(conn)

    def _reject_long_line(self, conn):
        self._tell(conn, "error: line too long (over %d bytes), not sent" % self.options.max_line)

    def _handle_line(self, conn, text):
        if not text.strip():
            return
        if text.startswith("/") and not text.startswith("//"):
            self._run_command(conn, text)
            return
        text = sanitize(text[1:] if text.startswith("//") else text)
        if text.strip():
            self._announce_join(conn)
            self._broadcast(conn.prefix + text.encode() + b"\n", exclude=conn)

    # Commands

    def _run_command(self, conn, text):
        name, _, argument = text[1:].partition(" ")
        name = name.lower()
        if name not in self.COMMANDS:
            self._tell(conn, "error: unknown command /%s (try /help)" % sanitize(name)[:30])
            return
        if name not in ("nick", "quit"):
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
        self._broadcast(b"* %s %s\n" % (conn.nick.encode(), action.encode()), exclude=conn)

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
        nicks = sorted((member.nick for member in self._members), key=nick_key)
        self._tell(conn, "%d online: %s" % (len(nicks), ", ".join(nicks)))

    def _cmd_help(self, conn, argument):
        self._send(conn, "".join("*** %s\n" % line for line in HELP_TEXT).encode())

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
        conn.join_pending = True
        self._call_later(self.options.join_delay, self._announce_join, conn)

    def _free_guest_nick(self):
        while True:
            nick = "guest%d" % next(self._guest_numbers)
            if nick_key(nick) not in self._nicks:
                return nick

    def _set_nick(self, conn, nick):
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
        lines = ("welcome to %s, you are %s" % (self.name, conn.nick),
                 "%d online: %s" % (len(self._members), ", ".join(names)),
                 "type /help for commands")
        return "".join("*** %s\n" % line for line in lines).encode()

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

    def _notice(self, text, exclude=None):
        """Broadcast a join/leave/rename notice unless the room is too big for them."""
        if len(self._members) > self.options.announce_limit:
            return False
        self._broadcast(("*** %s\n" % text).encode(), exclude)
        return True

    # Output

    def _broadcast(self, data, exclude=None):
        """Queue data for every member but exclude; it is sent at the end of the turn."""
        if exclude is not None:
            self._sync(exclude)
            self._turn_chunks.append(data)
            exclude.synced = len(self._turn_chunks)
        else:
            self._turn_chunks.append(data)

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
        conn.queue(data)
        if conn.queued > self.options.queue_limit:
            self._failed.append((conn, "send queue exceeded"))
        elif not conn.want_write:
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
                sent = 0
            except OSError as exc:
                failed.append((conn, describe_error(exc)))
                continue
            if sent < len(data):
                self._queue(conn, memoryview(data)[sent:] if sent else data)

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
        if not conn.reading:
            self._finish(conn)
            return
        conn.want_write = False
        self._update_interest(conn)

    def _closing_peer_done(self, conn):
        """A closing peer sent EOF: close now, or once its last output is out."""
        if conn.outbox:
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
            if conn.stage is not self.CLOSING:
                self._tell(conn, "server shutting down")
                conn.stage = self.CLOSING
        self._flush_turn()
        deadline = time.monotonic() + self.options.shutdown_timeout
        while any(conn.outbox for conn in self._conns):
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
            for key, mask in self._selector.select(timeout):
                if key.data is None:
                    self._handle_service_socket(key.fileobj)
                else:
                    self._handle_events(key.data, mask)
            self._flush_turn()
        for conn in list(self._conns):
            self._finish(conn)
        log.info("stopped")


# --- Client ---

class ClientError(Exception):
    """A failure the client reports in one line on stderr before exiting with 1."""


def open_connection(host, port, family=socket.AF_UNSPEC, timeout=CONNECT_TIMEOUT):
    """Connect to the first address of host that answers (IPv4 or IPv6)."""
    try:
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ClientError("cannot connect to %s: %s" % (format_address(host, port), exc.strerror))
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
    raise ClientError("cannot connect to %s: %s" % (format_address(host, port), reason))


class PlainConsole:
    """Line input and output for pipes, files and plain terminals.

    Output is written as UTF-8 and flushed after every line when it is not a
    terminal, so `client > log` and `client | grep` see each line at once.
    """

    def __init__(self, stdin=None, stdout=None):
        self._stdin = stdin or sys.stdin
        self._stdout = stdout or sys.stdout
        self._tty = self._stdout.isatty()

    def start(self, post):
        """Read lines in a daemon thread; post(kind, text) each one, then "eof"."""
        thread = threading.Thread(target=self._read_lines, args=(post,),
                                  name="keyboard", daemon=True)
        thread.start()

    def _read_lines(self, post):
        stream = getattr(self._stdin, "buffer", self._stdin)
        try:
            for raw in iter(stream.readline, b""):
                post("line", raw.rstrip(b"\r\n").decode("utf-8", "replace"))
        except (OSError, ValueError):
            pass
        post("eof", None)

    def show(self, text):
        if self._tty:
            self._stdout.write(text + "\n")
        else:
            self._stdout.buffer.write(text.encode("utf-8", "replace") + b"\n")
        self._stdout.flush()

    def close(self):
        pass


class ChatClient:
    """Connect to a server, send what the user types, show what the server sends.

    Threads: a daemon thread reads the keyboard (or a pipe) and posts each line
    to a queue, waking the main loop through a socketpair; the main loop alone
    owns the socket, so the connection needs no lock.
    """

    WELCOME = re.compile(r"\*\*\* welcome to .*, you are (\S+)$")
    RENAMED = re.compile(r"\*\*\* you are now known as (\S+)$")
    NICK_TAKEN = re.compile(r"\*\*\* error: nick (\S+) is taken$")

    def __init__(self, host="localhost", port=DEFAULT_PORT, family=socket.AF_UNSPEC,
                 nick=None, console=None):
        self.host, self.port, self.family = host, port, family
        self.wanted_nick = nick
        self.nick = None
        self.console = console or PlainConsole()
        self._events = queue.Queue(KEYBOARD_QUEUE)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sock = None
        self._inbuf = b""
        self._outbuf = bytearray()
        self._nick_attempt = 0          # > 0 while asking for wanted_nick or a variant
        self._ready = False             # greeted and nick settled: typed lines may go out
        self._quitting = False
        self._interrupted = False

    # Called from other threads and signal handlers

    def post(self, kind, text=None):
        """Hand a keyboard event ("line", "eof") to the main loop."""
        self._events.put((kind, text))
        self._wake()

    def interrupt(self):
        """Ctrl+C: leave, or at once if already leaving. Safe in a signal handler."""
        if self._sock is None:
            raise KeyboardInterrupt   # still connecting: nothing to say goodbye to
        self._interrupted = True
        self._wake()

    def _wake(self):
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    # The main loop

    def run(self):
        """Chat until the user leaves (return 0); raise ClientError when it fails."""
        self._sock = open_connection(self.host, self.port, self.family)
        try:
            enable_keepalive(self._sock)
            self._sock.setblocking(False)
            self.console.start(self.post)
            return self._loop()
        finally:
            self._sock.close()
            self._wake_r.close()
            self._wake_w.close()

    def _loop(self):
        while True:
            writers = [self._sock] if self._outbuf else []
            readable, writable, _ = select.select([self._sock, self._wake_r], writers, [])
            if writable:
                self._flush()
            if self._wake_r in readable:
                drain(self._wake_r)
            if self._interrupted:
                if self._quitting:
                    return 0
                self._interrupted = False
                self._quit()
            if self._sock in readable and not self._receive():
                if self._quitting:
                    return 0
                raise ClientError("connection to %s lost: the server closed it"
                                  % format_address(self.host, self.port))
            if self._ready:
                self._take_keyboard_events()

    def _take_keyboard_events(self):
        while len(self._outbuf) < SEND_CHUNK and not self._quitting:
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

    def _quit(self, command="/quit"):
        """Say goodbye; the loop then waits for the server to close, so nothing sent is lost."""
        self._send_line(command)
        self._quitting = True

    def _send_line(self, text):
        self._outbuf += text.encode("utf-8", "replace") + b"\n"
        self._flush()

    def _flush(self):
        try:
            sent = self._sock.send(self._outbuf)
        except WOULD_BLOCK:
            return
        except OSError:
            return   # the read side reports the lost connection
        del self._outbuf[:sent]

    def _receive(self):
        try:
            data = self._sock.recv(RECV_SIZE)
        except WOULD_BLOCK:
            return True
        except OSError:
            data = b""
        if not data:
            return False
        lines = (self._inbuf + data).split(b"\n")
        self._inbuf = lines.pop()
        for raw in lines:
            self._handle_server_line(sanitize(decode_line(raw)))
        return True

    def _handle_server_line(self, line):
        self.console.show(line)
        welcome = self.WELCOME.match(line)
        renamed = self.RENAMED.match(line)
        if welcome:
            self.nick = welcome.group(1)
            self._request_nick()
        elif renamed:
            self.nick = renamed.group(1)
            self._nick_settled()
        elif self._nick_attempt and self.NICK_TAKEN.match(line):
            self._request_nick()
        elif self._nick_attempt and line.startswith("*** error: invalid nick"):
            self._nick_settled()

    def _nick_settled(self):
        self._nick_attempt = 0
        self._ready = True

    def _request_nick(self):
        """Ask for the wanted nick, or its next variant when the last one was taken."""
        if not self.wanted_nick or nick_key(self.wanted_nick) == nick_key(self.nick or ""):
            self._nick_settled()
            return
        self._nick_attempt += 1
        attempt = self._nick_attempt
        self._send_line("/nick " + (nick_variant(self.wanted_nick, attempt) if attempt > 1
                                     else self.wanted_nick))


def drain(sock):
    try:
        while sock.recv(4096):
            pass
    except OSError:
        pass


def default_nick():
    """The login name, made a valid nick; None (a guest nick) when there is none."""
    try:
        return make_valid_nick(getpass.getuser())
    except Exception:   # getuser() raises whatever the platform lookup raises
        return None


# --- Command line ---

def build_parser():
    parser = argparse.ArgumentParser(
        prog="chat.py",
        description="A terminal chat in one file: run a server, join it with the client or nc.",
        epilog="Run 'chat.py server --help' or 'chat.py client --help' for their options.")
    parser.add_argument("--version", action="version", version="chat.py " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="{server,client}")
    commands.required = True

    server = commands.add_parser(
        "server", help="run a chat server",
        description="Run a chat server. Clients connect with 'chat.py client' or nc/telnet.")
    add_network_arguments(server, "address to listen on (default: all interfaces, IPv4 and IPv6)")
    server.add_argument("--max-clients", type=positive_int, default=DEFAULT_MAX_CLIENTS, metavar="N",
                        help="connections accepted at once (default %(default)s" +
                        (", the most select() allows on Windows)" if WINDOWS else ")"))
    server.add_argument("--max-line", type=positive_int, default=DEFAULT_MAX_LINE, metavar="BYTES",
                        help="longest line accepted; longer ones are refused (default %(default)s)")
    server.add_argument("--announce-limit", type=non_negative_int, default=DEFAULT_ANNOUNCE_LIMIT,
                        metavar="N", help="announce joins, leaves and renames only while the room "
                        "has at most N members (default %(default)s)")
    server.add_argument("--name", help="server name shown in the greeting (default: host name)")
    verbosity = server.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="log errors only")
    server.set_defaults(run=run_server)

    client = commands.add_parser(
        "client", help="join a chat server",
        description="Join a chat server. Type lines to talk; /help lists the commands; "
        "/quit, Ctrl+D or Ctrl+C leave. Piped input is sent line by line.")
    add_network_arguments(client, "server to connect to (default: localhost)", default="localhost")
    client.add_argument("--nick", help="nick to use (default: your login name; "
                        "a free variant such as alice2 is picked if it is taken)")
    client.set_defaults(run=run_client)
    return parser


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


def configure_logging(args):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
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


def run_server(args):
    configure_logging(args)
    max_clients = args.max_clients
    if WINDOWS and max_clients > DEFAULT_MAX_CLIENTS:
        log.warning("--max-clients is capped at %d on Windows", DEFAULT_MAX_CLIENTS)
        max_clients = DEFAULT_MAX_CLIENTS
    raise_open_file_limit(max_clients + RESERVED_FDS)
    options = ServerOptions(host=args.host, port=args.port, family=args.family, name=args.name,
                            max_clients=max_clients, max_line=args.max_line,
                            announce_limit=args.announce_limit)
    try:
        server = ChatServer(options)
    except OSError as exc:
        where = format_address(args.host or "*", args.port)
        print("chat.py: cannot listen on %s: %s" % (where, exc.strerror or exc), file=sys.stderr)
        return 1
    with server:
        for host, port in server.addresses:
            print("listening on %s" % format_address(host, port), file=sys.stderr, flush=True)
        install_shutdown_signals(server)
        server.serve_forever()
    return 0


def install_shutdown_signals(server):
    """Ctrl+C and SIGTERM stop the server cleanly; the wakeup fd makes select() return."""
    signal.set_wakeup_fd(server.wakeup_fd, warn_on_full_buffer=False)
    for name in ("SIGINT", "SIGTERM"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), lambda signum, frame: server.request_shutdown())


def run_client(args):
    nick = args.nick or default_nick()
    if args.nick:
        try:
            nick = normalize_nick(args.nick)
        except ValueError as exc:
            print("chat.py: invalid --nick: %s" % exc, file=sys.stderr)
            return 2
    client = ChatClient(args.host, args.port, args.family or socket.AF_UNSPEC, nick=nick)
    signal.signal(signal.SIGINT, lambda signum, frame: client.interrupt())
    try:
        return client.run()
    except ClientError as exc:
        print("chat.py: %s" % exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
