#!/usr/bin/env python3
"""chat.py: a zero-install chat, server and client in one file.

    python chat.py server                  # on one machine (port 7777)
    python chat.py client --host HOST      # on the others, or: nc HOST 7777,
                                           # an IRC client, http://HOST:7777/

Wire protocol: UTF-8 text lines ending in LF (CRLF accepted), in rooms.
  client -> server  a chat line, or a command: /nick NAME, /me ACTION,
                    /msg NICK TEXT, /join ROOM, /part, /rooms, /who [ROOM],
                    /topic [TEXT], /whois NICK, /away [TEXT], /ignore NICK,
                    /help, /quit [REASON], operators' /op /kick /ban /mute...,
                    and /pass PASSWORD first when the server has a password
                    ("//text" sends the literal line "/text")
  server -> client  <alice> text      a chat line in your room
                    * alice waves     an action
                    *alice* text      a private message to you
                    -> *bob* text     your private message, as sent
                    *** text          everything from the server
The server greets a connection after its first line (or a moment of silence);
every shape it sends is in the Wording table, which the client reads with.
A first line that registers IRC (CAP, NICK, USER, PASS) makes the connection
IRC; an HTTP request gets the browser page, or a WebSocket speaking JSON.

Standard library only; Python 3.8+ on Linux, macOS and Windows.
"""

import _thread
import argparse
import base64
import bisect
import calendar
import codecs
import concurrent.futures
import collections
import collections.abc
import contextlib
import dataclasses
import errno
import fnmatch
import functools
import gc
import getpass
import hashlib
import heapq
import hmac
import io
import ipaddress
import itertools
import json
import logging
import marshal
import math
import os
import random
import re
import select
import selectors
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import unicodedata
import urllib.parse
import weakref
import zlib
from dataclasses import dataclass, field
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
try:
    import fcntl
except ImportError:   # Windows: msvcrt locks the data directory instead
    fcntl = None

__version__ = "1.0.0"

DEFAULT_PORT = 7777
WINDOWS = sys.platform == "win32"
# select() on Windows watches at most 512 sockets.
DEFAULT_MAX_CLIENTS = 500 if WINDOWS else 10000
DEFAULT_MAX_LINE = 4096              # bytes per line, newline excluded
DEFAULT_ANNOUNCE_LIMIT = 200         # join/leave/rename notices only in rooms this small
DEFAULT_ROOM = "#lobby"              # where everyone starts
DEFAULT_MAX_ROOMS = 1000
SEND_QUEUE_LIMIT = 1 << 20           # bytes of unsent output a client may have while it takes
SEND_QUEUE_GRACE = 1.0               # none for this many seconds, before it is dropped...
SEND_QUEUE_LAG = 30.0                # ...or while it stays over the limit this long,
SEND_QUEUE_HARD = 4                  # ...or at once past this many times the limit
DELAY_LINE_SLACK = 0.05              # seconds a connection's greeting or deadline may wait
                                     # for others due soon after it (one turn for all)
GREET_DELAY = 1.0                    # seconds of silence before the line protocol greets:
                                     # IRC clients and browsers speak first, nc users wait
SHUTDOWN_FLUSH_TIMEOUT = 2.0         # seconds to flush "server shutting down" to everyone
CLOSE_LINGER = 2.0                   # seconds a closing peer gets to read its last lines
REGISTER_TIMEOUT = 30.0              # seconds to finish TLS and /pass before being dropped
WRONG_PASSWORD_DELAY = 1.0           # seconds before a wrong /pass is closed: slows guessing
DEFAULT_RATE = 5.0                   # lines per second a client may send, on average...
DEFAULT_BURST = 30                   # ...and at once, so a pasted block of 20 lines goes through
FLOOD_LAG = 20.0                     # seconds of lines beyond the burst a client may send
                                     # ahead of --rate before "excess flood" cuts it off...
FLOOD_QUEUE_BYTES = 64 * 1024        # ...or bytes of such lines
ROOM_CREATE_BURST = 5                # rooms one connection may create at once...
ROOM_CREATE_RATE = 0.2               # ...and then one per 1/RATE seconds
GUESS_LIMIT = 5                      # wrong passwords from one address (IPv6: /64)...
GUESS_WINDOW = 60.0                  # ...within this many seconds, then it waits
GUESSERS_TRACKED = 10000             # addresses remembered for that
IRC_PING_INTERVAL = 120.0            # seconds of silence before an IRC client is pinged...
IRC_PING_TIMEOUT = 60.0              # ...and before it is dropped if it does not answer
MAX_TARGETS = 4                      # rooms or nicks one IRC command may name
MAX_JOINED = 50                      # rooms one member may be in at once (a nick change
                                     # is told in each)
WATCH_LIMIT = 100                    # nicks one member may watch (IRC's MONITOR)
NICK_RUN = 250                       # bytes of nicks in one line of a member list
HTTP_HEAD_LIMIT = 8 * 1024           # bytes of an HTTP request's line and headers
WEB_MEMBERS = 1000                   # names a browser gets when it enters a room
DEFAULT_HISTORY = 50                 # public lines replayed to a newcomer
SCROLLBACK_KEPT = 1000               # public lines a room keeps in memory for scrolling back
SCROLLBACK_PAGE = 50                 # lines one /history answer gives by default...
SCROLLBACK_MAX = 200                 # ...and at most
STORE_READS = 20.0                   # reads of the store for /history, a second, for all...
STORE_READ_GAP = 0.3                 # ...and seconds between two of one member's
STATE_SAVE_DELAY = 0.5               # seconds a change of topics, bans... waits to be kept
HISTORY_MEMORY = 32 << 20            # bytes of text all rooms' histories hold at most
DEFAULT_LOG_MAX_BYTES = 1 << 20      # a room's log is rotated past this (--data-dir)
SYNC_INTERVAL = 1.0                  # seconds between fsyncs of the logs, at most
ACCEPT_PAUSE = 0.5                   # seconds to stop accepting when out of file descriptors
ACCEPT_BATCH = 256                   # accepts per loop turn, so reads are not starved
GATHER_POLLS = 8                     # extra zero-wait polls per turn while lines keep coming
FLUSH_GAP = 0.002                    # most seconds a turn's output waits after the last flush
LISTEN_BACKLOG = 4096                # the kernel caps it at somaxconn
RECV_SIZE = 256 * 1024
PACED_RECV_SIZE = 16 * 1024          # reads under flood control: a flooder is cut off early
SNIFF_LIMIT = 8 * 1024               # bytes read before a first line must have ended
SEND_CHUNK = 64 * 1024               # most bytes joined for one send()
GC_YOUNG_OBJECTS = 10000             # new objects between two young garbage collections
                                     # (Python's default, 700, doubles a storm's collecting)
GREETING_NAMES = 20                  # names listed in the greeting before "and N more"
ROOMS_LISTED = 20                    # rooms listed by /rooms before "and N more"
MAX_NICK = 20                        # code points
MAX_ROOM = 30                        # code points of a room name, after its "#"
MAX_REASON = 100                     # code points of a /quit reason
MAX_REALNAME = 50                    # code points of an IRC real name
WHO_MASK_LIMIT = 100                 # members one IRC WHO by mask lists
REMOTE_FACTOR = 16                   # members of other nodes listed here: this many --max-clients
MAX_TOPIC = 300                      # code points of a room topic
# Names nobody may take (nor a look-alike of): IRC clients send passwords to services
# by these nicks, and people trust what seems to come from the server.
RESERVED_NICKS = ("NickServ", "ChanServ", "OperServ", "MemoServ", "HostServ", "BotServ",
                  "SaslServ", "HelpServ", "InfoServ", "StatServ", "GroupServ", "Global",
                  "Alis", "Server", "chat", "chatpy", "admin", "root", "system", "services")
MAX_STORED_TEXT = 8192               # code points of a line read back from the data dir
MAX_CLIENT_TAGS = 4094               # bytes of tags a client may put on a message (IRCv3)
MAX_MARKS = 4                        # combining marks kept on one character
RESERVED_FDS = 32                    # descriptors for listeners, logs, the selector...
CONNECT_TIMEOUT = 10.0
KEEPALIVE_IDLE = 60                  # seconds of silence before TCP probes a peer...
KEEPALIVE_INTERVAL = 15              # ...every this many seconds...
KEEPALIVE_COUNT = 4                  # ...and gives up after this many unanswered probes
KEYBOARD_QUEUE = 1000                # typed or piped lines buffered before stdin backs off
RETRY_DELAY = 1.0                    # seconds before the first reconnect, doubling...
RETRY_MAX = 30.0                     # ...up to this
SEEN_LINES = 500                     # public lines remembered to skip replayed history
CLIENT_MAX_LINE = 1 << 20            # longest line the client takes from a server
MAX_HISTORY_BLOCK = 10000            # history lines the client gathers before showing them

log = logging.getLogger("chat")
LOG_STARTED = time.time()            # what log records' relativeCreated counts from

# What a non-blocking socket raises when it has to wait; TLS adds its own two.
WOULD_BLOCK = (BlockingIOError, InterruptedError)
if ssl is not None:
    WOULD_BLOCK += (ssl.SSLWantReadError, ssl.SSLWantWriteError)


# --- Logging ---

class LogHandler(logging.StreamHandler):
    """Log lines as "date,ms LEVEL message" on standard error.

    A storm of connects logs thousands of lines a second, so the date text is made
    once per second, the formatter's layers are skipped, and once the server's loop
    runs (hold_log_lines), its lines are written once per turn (flush_log), not with
    a system call each. Other threads' lines go out at once, and so does everything
    when standard error has no byte buffer to write through."""

    def __init__(self, stream):
        buffer = getattr(stream, "buffer", None)
        if buffer is not None:
            stream = io.TextIOWrapper(buffer, encoding=stream.encoding,
                                      errors="backslashreplace")
        super().__init__(stream)
        self.holds = buffer is not None
        self.holding_thread = None      # the thread whose lines wait for flush_log
        self._second = None
        self._date = ""

    def emit(self, record):
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        try:
            text = "%s,%03d %s %s\n" % (self._date, record.msecs, record.levelname,
                                        record.getMessage())
            if record.exc_info:
                text += self.formatter.formatException(record.exc_info) + "\n"
            self.stream.write(text)
            if threading.get_ident() != self.holding_thread:
                self.stream.flush()
        except Exception:
            self.handleError(record)


    def flush(self):
        try:
            super().flush()
        except (OSError, ValueError):   # a log nobody reads (closed pipe, full disk)
            pass                        # must not stop the chat; its lines are dropped


class LogLine(logging.LogRecord):
    """A log record made at a third of the cost: a storm logs each connection twice, and
    the standard record spends most of its time on the caller's file, thread and process,
    which configure_logging turned off and LogHandler never shows."""

    def __init__(self, name, level, pathname, lineno, msg, args, exc_info, func=None,
                 sinfo=None, **kwargs):
        created = time.time()
        if args and len(args) == 1 and isinstance(args[0], collections.abc.Mapping) \
                and args[0]:
            args = args[0]   # log.info("%(x)s", {"x": 1}), as logging allows
        self.name, self.msg, self.args = name, msg, args
        self.levelno, self.levelname = level, logging.getLevelName(level)
        self.pathname = self.filename = self.module = pathname
        self.lineno, self.funcName = lineno, func
        self.exc_info, self.exc_text, self.stack_info = exc_info, None, sinfo
        self.created, self.msecs = created, int(created * 1000) % 1000
        self.relativeCreated = (created - LOG_STARTED) * 1000
        self.thread = self.threadName = self.process = self.processName = None
        if sys.version_info >= (3, 12):   # before, extra={"taskName": ...} is allowed
            self.taskName = None


def hold_log_lines():
    """From now on, this thread's log lines wait for flush_log (see LogHandler)."""
    for handler in log.handlers:
        if isinstance(handler, LogHandler) and handler.holds:
            handler.holding_thread = threading.get_ident()


def flush_log():
    """Write what the loop logged in its turn (see LogHandler)."""
    for handler in log.handlers:
        handler.flush()


# --- Text safety ---

def number_word(word):
    """A word that is a whole number in ASCII digits, not a huge one, or None: int()
    refuses superscript digits that isdigit() takes, and numbers past 4300 digits."""
    return int(word) if word.isascii() and word.isdigit() and len(word) <= 15 else None


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
# Unicode's Default_Ignorable_Code_Point: characters that render as nothing,
# so "bob" and "bob" + U+034F would look the same.
_INVISIBLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e"
    "\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8\U0001bca0-\U0001bca3"
    "\U0001d173-\U0001d17a\U000e0000-\U000e0fff]")
_CONFUSABLE_SCRIPTS = frozenset(("LATIN", "GREEK", "CYRILLIC"))
_PRINTABLE_ASCII = bytes(range(0x20, 0x7f))
_PEM_CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
# Letters and digits of every script that look like Latin letters and digits,
# by the ASCII text they look like: the part of Unicode's confusables data
# (UTS #39, confusables.txt 14.0) that nicks and room names can contain after
# NFKC, marks on the prototype dropped (CHEROKEE NA is an O with a bar), and
# CYRILLIC SMALL PALOCHKA read as the tall stroke it is drawn as ("l"), not
# as the dotless i the data chains it through. Two names whose skeletons
# (each character replaced by what it looks like) are equal look the same.
_LOOKALIKE_SOURCES = (
    ('2', "\u01a7\u01bb\u03e8\u14bf\ua644\ua75a"),
    ('3', "\u01b7\u021c\u0417\u0498\u04e0\u2ccc\ua76a\ua7ab\U000118ca\U00016f3b"),
    ('4', "\u13ce\U000118af"), ('5', "\u01bc\U000118bb"), ('6', "\u0431\u13ee\u2cd2\U000118d5"),
    ('7', "\U000104d2\U000118c6"), ('8', "\u0222\u0223\u09ea\u0a6a\u0b03\U0001031a"),
    ('9', "\u09ed\u0a67\u0b68\u0d6d\u2cca\ua76e\U000118ac\U000118cc\U000118d6"),
    ('a', "\u01cd\u01ce\u0226\u0227\u0251\u0391\u03b1\u0410\u0430\u13aa\u15c5\ua4ee\U000102a0\U00016f40"),
    ('aa', "\ua732\ua733"), ('ae', "\u00c6\u00e6\u04d4\u04d5"), ('ao', "\ua734\ua735"),
    ('au', "\ua736\ua737"), ('av', "\ua738\ua739\ua73a\ua73b"), ('ay', "\ua73c\ua73d"),
    ('b', "\u0180\u0182\u0183\u0184\u0253\u0392\u0411\u0412\u042c\u0462\u0463\u048c\u048d\u13cf\u13f4\u1472\u1473\u15af\u15f7\ua4d0\ua7b4\U00010282\U000102a1\U00010301"),
    ('bl', "\u042b"),
    ('c', "\u00c7\u00e7\u023c\u0421\u0441\u04aa\u04ab\u13df\u1d04\u2ca4\u2ca5\ua4da\uabaf\U000102a2\U00010302\U00010415\U0001043d\U0001051c\U000118e9"),
    ('d', "\u00d0\u0110\u0111\u0189\u018c\u0256\u0257\u0501\u13a0\u13e7\u146f\u15de\u15ea\ua4d2\ua4d3"),
    ('dz', "\u02a3"),
    ('e', "\u011a\u011b\u0246\u0247\u0395\u0415\u0435\u04bd\u04bf\u13ac\u2d39\ua4f0\uab32\U00010286\U000118a6\U000118ae"),
    ('f', "\u0191\u0192\u03dc\u0584\u15b4\u1d6e\u1e9d\ua4dd\ua798\ua799\uab35\U00010287\U000102a5\U00010525\U000118a2\U000118c2"),
    ('g', "\u018d\u01e4\u01e5\u01e6\u01e7\u01f5\u0260\u0261\u050c\u0581\u13c0\u13f3\u1d83\ua4d6"),
    ('h', "\u0126\u0127\u0266\u0397\u041d\u045b\u04a2\u04bb\u04c7\u04c9\u0570\u13bb\u13c2\u13f2\u157c\u2c67\u2c8e\ua4e7\ua695\U000102cf"),
    ('i', "\u0131\u01cf\u01d0\u0268\u0269\u026a\u03b9\u0456\u13a5\u1d7b\u1d7c\ua647\uab75\U000118c3"),
    ('j', "\u0248\u0249\u037f\u03f3\u0408\u0458\u13ab\u148d\ua4d9\ua7b2"),
    ('k', "\u0199\u039a\u041a\u049a\u049e\u13e6\u16d5\u2c69\u2c94\ua4d7\ua740\U00010518"),
    ('l', "1I\u0141\u0142\u0196\u0197\u019a\u01c0\u026b\u026d\u0399\u0406\u04c0\u04cf\u05d5\u05df\u0625\u0627\u0661\u0673\u06f1\u07ca\u13de\u14aa\u16c1\u2c92\u2cd0\u2d4f\ua4e1\ua4f2\U0001028a\U00010309\U0001041b\U00010526\U000118a3\U000118b2\U00016f16\U00016f28"),
    ('ll', "\u01c1\u05f0"), ('lo', "\u042e"), ('ls', "\u02aa"), ('lz', "\u02ab"),
    ('m', "\u039c\u03fa\u041c\u04cd\u13b7\u15f0\u16d6\u2c98\ua4df\U000102b0\U00010311"),
    ('n', "\u019d\u019e\u0273\u039d\u03b7\u0578\u057c\u1d70\u2c9a\ua4e0\U00010513"),
    ('o', "0\u00d8\u00f8\u0150\u019f\u01d1\u01d2\u01fe\u0275\u0398\u039f\u03b8\u03bf\u03c3\u041e\u043e\u0472\u0473\u04e8\u04e9\u0555\u0585\u05e1\u0647\u0665\u06be\u06c1\u06d5\u06f5\u06ff\u07c0\u0966\u09e6\u0a66\u0ae6\u0b20\u0b66\u0be6\u0c02\u0c66\u0c82\u0ce6\u0d02\u0d20\u0d66\u0d82\u0e50\u0ed0\u101d\u1040\u10ff\u12d0\u13be\u13eb\u1d0f\u1d11\u2c9e\u2c9f\u2d31\u2d41\u2d54\ua4f3\ua74a\ua74b\uab3d\uab3e\uab74\uab8e\uabbb\U00010292\U000102ab\U00010404\U0001042c\U000104c2\U000104ea\U00010516\U000114d0\U000118b5\U000118c8\U000118d7\U000118e0"),
    ('oe', "\u0152\u0153"), ('oo', "\ua698\ua699\ua74e\ua74f"),
    ('p', "\u01a5\u03a1\u03c1\u0420\u0440\u13e2\u146d\u1d7d\u2ca2\u2ca3\ua4d1\U00010295"),
    ('q', "\u02a0\u051b\u0563\u0566\u2d55"),
    ('r', "\u01a6\u024d\u027c\u027d\u0433\u0493\u13a1\u13d2\u1587\u1d26\u1d72\u2c85\ua4e3\uab47\uab48\uab81\U000104b4\U00016f35"),
    ('rn', "m\u0271\u1d6f\U00011700\U000118e3"),
    ('s', "\u01bd\u0282\u0405\u0455\u054f\u13d5\u13da\u1d74\ua4e2\ua731\uabaa\U00010296\U00010420\U00010448\U000118c1\U00016f3a"),
    ('t', "\u0166\u0167\u01ad\u01ae\u021a\u023e\u03a4\u0422\u04ac\u13a2\u1d75\u2ca6\ua4d4\U00010297\U000102b1\U00010315\U000118bc\U00016f0a"),
    ('t3', "\ua728"), ('tf', "\ua777"), ('ts', "\u02a6"),
    ('u', "\u01d3\u01d4\u0244\u028b\u03c5\u054d\u057d\u1200\u13cc\u144c\u1d1c\u1d7e\ua4f4\ua79f\uab4e\uab52\uab9c\U000104ce\U000104f6\U000118b8\U000118d8\U00016f42"),
    ('ue', "\u1d6b"), ('uo', "\uab63"),
    ('v', "\u03bd\u0474\u0475\u05d8\u0667\u06f7\u13d9\u142f\u1d20\u2d38\ua4e6\ua6df\uaba9\U0001051d\U00011706\U000118a0\U000118c0\U00016f08"),
    ('w', "\u026f\u0461\u047d\u051c\u051d\u0561\u13b3\u13d4\u1d21\ua4ea\ua761\uab83\U000114c5\U0001170a\U0001170e\U0001170f\U000118e6"),
    ('x', "\u03a7\u0425\u0445\u04b2\u1541\u157d\u16b7\u2cac\u2d5d\ua4eb\ua7b3\U00010290\U000102b4\U00010317\U00010527"),
    ('y', "\u01b4\u024e\u024f\u0263\u028f\u03a5\u03b3\u0423\u0443\u04ae\u04af\u04b0\u04b1\u10e7\u13a9\u13bd\u1d8c\u1eff\u2ca8\ua4ec\uab5a\U000102b2\U000118a4\U000118dc\U00016f43"),
    ('z', "\u01b5\u01b6\u0224\u0225\u0290\u0396\u13c3\u1d22\u1d76\ua4dc\uab93\U000118a9\U000118c4\U000118e5"),
)
_LOOKALIKE = {ord(source): target for target, sources in _LOOKALIKE_SOURCES for source in sources}
# A target is mapped on too ("Μ", Greek Mu, is "m", and "m" looks like "rn"): one pass of
# the table then gives the same skeleton as two.
_LOOKALIKE = {source: target.translate(_LOOKALIKE) for source, target in _LOOKALIKE.items()}
# The ASCII part of it, as replacements: what they put in is never replaced again, so one
# after the other they do what the table does at once.
_ASCII_LOOKALIKE = tuple((chr(source), target) for source, target in _LOOKALIKE.items()
                         if source < 128)
assert not any(source in target for source, _ in _ASCII_LOOKALIKE
               for _, target in _ASCII_LOOKALIKE)


def sanitize(text):
    """Return text with nothing a terminal would obey: no controls, escapes or bidi marks."""
    if text.isprintable():
        return text
    text = _ESCAPE_SEQUENCE.sub("", text).replace("\t", " ")
    return _UNSAFE_CHARS.sub("", text)


# Characters that show as blanks but are not white space to str.split(): braille
# blank, the Hangul fillers.
_BLANK_LOOKALIKES = re.compile("[\u2800\u3164\uffa0\u115f\u1160]")
# Invisible characters that text has no use for (zero-width space, word joiner,
# invisible operators, soft hyphen...); the joiners and variation selectors that
# emoji and some scripts need stay, but not next to a blank, where they only hide it.
_NEEDLESS_INVISIBLES = re.compile("[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f"
                                  "\u200b\u200e\u200f\u202a-\u202e\u2060-\u206f\ufeff"
                                  "\U0001d173-\U0001d17a\U000e0000-\U000e0fff]")
_JOINERS_BY_BLANKS = re.compile(
    r"(?<!\S)[\u200c\u200d\ufe00-\ufe0f]+|[\u200c\u200d]+(?!\S)|(?<=[\u200c\u200d])[\u200c\u200d]+")


def tidy_text(text):
    """Relayed text (lines, topics, reasons) that cannot forge a row of a screen: runs of
    blanks become one space (a line padded to the terminal's width makes the next row
    look like the server's), invisible characters cannot hide blanks between them, and
    a character keeps at most MAX_MARKS combining marks (piled up, they spill over
    other rows)."""
    if not text.isascii():
        text = _NEEDLESS_INVISIBLES.sub("", _BLANK_LOOKALIKES.sub(" ", text))
        text = _JOINERS_BY_BLANKS.sub("", _cap_marks(text))
    return " ".join(text.split())


def _cap_marks(text):
    """At most MAX_MARKS combining marks on a character; joiners between them do not
    start a new count (a terminal piles marks on the last letter whatever comes
    between)."""
    kept, run = [], 0
    for char in text:
        category = unicodedata.category(char)
        if category in ("Mn", "Me"):
            run += 1
            if run > MAX_MARKS:
                continue
        elif category != "Cf":
            run = 0
        kept.append(char)
    return "".join(kept)


def stored_text(value):
    """Text read back from the data directory, made as safe as text a client sends: it
    may have been edited, or planted."""
    if not isinstance(value, str):
        raise TypeError("not text")
    return tidy_text(sanitize(value.encode("utf-8", "replace").decode("utf-8")))


_CLIENT_TAG_KEY = re.compile(r"\+(?:[A-Za-z0-9.-]+/)?[A-Za-z0-9-]+\Z")
_TAG_VALUE_ESCAPE = re.compile(r"\\(.?)")
_TAG_VALUE_ESCAPES = {":": ";", "s": " ", "\\": "\\", "r": "\r", "n": "\n"}


def client_tags(tags):
    """The client-only tags (IRCv3 message-tags: keys that start with "+") of a message's
    tags, as they are passed on: typing notices, reactions, replies. The chat keeps and
    relays them without reading them. Only well-formed keys whose values hold nothing a
    terminal would obey are kept (a character with MAX_MARKS combining marks at most),
    in one escaping, the last of a repeated key winning, as many as fit MAX_CLIENT_TAGS
    bytes; "" for none. Tags read back (the data dir, Redis) go through here too, and
    what is not text there has no tags."""
    if not isinstance(tags, str):
        return ""
    kept = {}
    for item in tags[:2 * MAX_CLIENT_TAGS].encode("utf-8", "replace").decode().split(";"):
        key, _, value = item.partition("=")
        if key[:1] == "+" and _CLIENT_TAG_KEY.match(key):
            value = _TAG_VALUE_ESCAPE.sub(lambda m: _TAG_VALUE_ESCAPES.get(m[1], m[1]), value)
            if sanitize(value) == value:
                kept[key] = value if value.isascii() else _cap_marks(value)
    out, size = [], -1
    for key, value in kept.items():
        item = key + "=" + value.replace("\\", "\\\\").replace(";", "\\:").replace(
            " ", "\\s") if value else key
        size += 1 + len(item.encode())
        if size > MAX_CLIENT_TAGS:
            break
        out.append(item)
    return ";".join(out)


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
    """Safe text from received bytes (CR and telnet commands already stripped).

    Plain printable ASCII, the common case, is proven safe without looking at
    it character by character: translate() deleting every printable byte
    leaves nothing.
    """
    if not raw.translate(None, _PRINTABLE_ASCII):
        return raw.decode("ascii")
    return sanitize(raw.decode("utf-8", "replace"))


def _is_name_char(char, position):
    category = unicodedata.category(char)
    return (category[0] == "L" or category == "Nd" or char in "_-"
            or (category[0] == "M" and position > 0))


_ASCII_NAME = re.compile(r"[A-Za-z0-9_-]+")


def normalize_name(name, limit, what="nick"):
    """The stored form of a nick or room name, or ValueError saying what is wrong.

    NFKC first, so full-width and compatibility forms collapse to one spelling;
    letters, marks, digits, _ and - in any script, but nothing invisible, and
    Latin, Greek and Cyrillic letters may not be mixed: that is how look-alikes
    of other names are built.
    """
    if _ASCII_NAME.fullmatch(name) and len(name) <= limit:
        return name   # the common case, settled without a look at each character
    text = unicodedata.normalize("NFKC", name)
    if not 1 <= len(text) <= limit:
        raise ValueError("a %s is 1 to %d characters" % (what, limit))
    if _INVISIBLE.search(text):
        raise ValueError("a %s may not contain invisible characters" % what)
    if not all(_is_name_char(char, i) for i, char in enumerate(text)):
        raise ValueError("a %s may contain only letters, digits, _ and -" % what)
    if not text.isascii() and _cap_marks(text) != text:
        raise ValueError("a %s may have at most %d marks on a letter" % (what, MAX_MARKS))
    scripts = {unicodedata.name(char, "").split(" ")[0] for char in text if char.isalpha()}
    if len(scripts & _CONFUSABLE_SCRIPTS) > 1:
        raise ValueError("a %s may not mix Latin, Greek and Cyrillic letters" % what)
    return text


def normalize_nick(name):
    return normalize_name(name, MAX_NICK)


def normalize_room(name):
    """"#dev" from "dev" or "#dev"; ValueError when the rest breaks the nick rules."""
    return "#" + normalize_name(name[1:] if name.startswith("#") else name, MAX_ROOM, "room name")


def name_key(name):
    """The form two names are compared in: "Alice" and "ALICE" are one nick."""
    if name.isascii():   # most names: the same, without the Unicode tables
        return name.lower()
    return unicodedata.normalize("NFKC", name.casefold())


def _skeleton(text):
    if text.isascii():   # most names (every guest's): the same, a few times faster
        for source, target in _ASCII_LOOKALIKE:
            text = text.replace(source, target)
        return text.lower()
    decomposed = unicodedata.normalize("NFD", text)
    return unicodedata.normalize("NFD", decomposed.translate(_LOOKALIKE)).casefold()


@functools.lru_cache(maxsize=4096)
def lookalike_keys(name):
    """The skeletons of a name (UTS #39, for look-alikes of Latin letters and digits), as
    written and case-folded: two names that share one look alike ("alice", "аӏісе", "aIice")."""
    return frozenset((_skeleton(name), _skeleton(name.casefold())))


def make_valid_nick(name):
    """Best valid nick for a login name ("john.doe" -> "john_doe"), or None."""
    name = _INVISIBLE.sub("", unicodedata.normalize("NFKC", name or ""))
    cleaned = "".join(c if _is_name_char(c, i) else "_" for i, c in enumerate(name))
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


def set_stream_options(sock):
    """A chat connection's options: no Nagle delay for short lines, and keepalive."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    enable_keepalive(sock)


def stream_options_inherited(sock):
    """Whether sock, just accepted, has the options set on its listening socket
    already (Linux and the BSDs copy them; Windows' keepalive cannot be read back):
    then every later connection is spared five system calls."""
    if hasattr(socket, "SIO_KEEPALIVE_VALS"):
        return False
    try:
        return (sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
                and sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0
                and all(sock.getsockopt(socket.IPPROTO_TCP, option) == value
                        for option, value in _KEEPALIVE_OPTIONS))
    except OSError:
        return False


# --- Wording ---

class Wording:
    """Every line shape of the line protocol, in one table.

    The server renders its lines from it and the client reads them with it,
    so the two cannot drift apart. Shapes are tried in order when parsing:
    the specific ones come before the general ones they would also match.
    """

    SHAPES = (
        ("said", "<{nick}> {text}"),
        ("noticed", "-{nick}- {text}"),
        ("acted", "* {nick} {text}"),
        ("private", "*{nick}* {text}"),
        ("private_sent", "-> *{nick}* {text}"),
        ("history_entry", "*** [{time}] {line}"),
        ("history_start", "*** --- last {count} {noun} in {room} ---"),
        ("history_end", "*** --- end of history ---"),
        ("history_page", "*** --- {count} {noun} of {room}, numbered {first} to {last} ---"),
        ("history_none", "*** --- no such lines in {room} ---"),
        ("history_busy", "*** error: older lines of {room} are being read: ask again in a "
                         "second"),
        ("welcome", "*** welcome to {server}, you are {nick}"),
        ("in_room", "*** you are in {room}: {count} online: {names}"),
        ("who_room", "*** {room}: {count} online: {names}"),
        ("who", "*** {count} online: {names}"),
        ("help_hint", "*** type /help for commands"),
        ("pace", "*** flood control: {burst} lines at once, then {rate} a second"),
        ("renamed_self", "*** you are now known as {nick}"),
        ("nick_collision", "*** {nick} was taken on another server at the same moment: you "
                           "are {new} now"),
        ("cluster_down", "*** the other servers of this chat are out of reach: until they "
                         "are back you hear only the people on this one"),
        ("cluster_up", "*** the other servers of this chat are back in reach"),
        ("unreachable", "*** error: {nick} is on another server, out of reach just now: "
                        "try again in a while"),
        ("renamed", "*** {nick} is now known as {new}"),
        ("moved", "*** {nick} left for {room}"),
        ("left", "*** {nick} left ({reason})"),
        ("joined", "*** {nick} joined"),
        ("topic", "*** topic of {room}: {text}"),
        ("no_topic", "*** no topic is set in {room}"),
        ("topic_set", "*** {nick} set the topic of {room}: {text}"),
        ("rooms", "*** {count} rooms: {list}"),
        ("room_entry", "{room} ({count})"),   # an item of that list
        ("kicked", "*** {nick} was kicked by {by} ({reason})"),
        ("kicked_you", "*** you were kicked by {by} ({reason})"),
        ("opped", "*** you are an operator now"),
        ("now_operator", "*** {nick} is now an operator"),
        ("gave_op", "*** {nick} gave {target} operator status in {room}"),
        ("took_op", "*** {nick} took operator status from {target} in {room}"),
        ("gave_voice", "*** {nick} gave {target} a voice in {room}"),
        ("took_voice", "*** {nick} took the voice of {target} in {room}"),
        ("room_mode_set", "*** {nick} made {room} {what}"),
        ("room_modes", "*** {room} is {what}"),
        ("invited_you", "*** {nick} invites you to {room}: /join {room}"),
        ("invite_sent", "*** invited {target} to {room}"),
        ("not_in_room", "*** error: you are not in {room}"),
        ("ban_added", "*** banned {target} ({network}) {span}: {reason}"),
        ("ban_entry", "*** ban {target} ({network}) by {by}, {span}: {reason}"),
        ("ban_covers_you", "*** note: the ban covers your own address: you could not "
                           "reconnect from it"),
        ("no_bans", "*** no bans"),
        ("mute_entry", "*** mute {target} ({network}) by {by}, {span}: {reason}"),
        ("no_mutes", "*** no mutes"),
        ("unbanned", "*** unbanned {target}"),
        ("muted", "*** {nick} is muted {span}"),
        ("muted_you", "*** {by} muted you {span}; you may still /msg an operator"),
        ("unmuted_you", "*** you may talk again"),
        ("unmuted", "*** {target} may talk again"),
        ("away_set", "*** you are away: {text}"),
        ("away_cleared", "*** you are back"),
        ("is_away", "*** {nick} is away: {text}"),
        ("ignoring", "*** ignoring {nick} (/unignore {nick} to hear them again)"),
        ("unignoring", "*** no longer ignoring {nick}"),
        ("watched_online", "*** online: {nicks}"),
        ("watched_offline", "*** offline: {nicks}"),
        ("watch_list", "*** watching: {nicks}"),
        ("watch_list_end", "*** end of the watch list"),
        ("watch_list_full", "*** error: you may watch {limit} nicks at most; not watched: {nicks}"),
        ("bye", "*** bye"),
        ("shutting_down", "*** server shutting down"),
        ("password_required", "*** password required: /pass PASSWORD"),
        ("unknown_command", "*** error: unknown command /{name} (try /help)"),
        ("usage", "*** error: usage: {usage}"),
        ("invalid_nick", "*** error: invalid nick {name}: {reason}"),
        ("nick_taken", "*** error: nick {nick} is taken"),
        ("nick_lookalike", "*** error: nick {nick} looks like {other}, who is online"),
        ("no_such_nick", "*** error: no such nick {nick}"),
        ("line_too_long", "*** error: line too long (over {limit} bytes), not sent"),
        ("password_needed", "*** error: password required"),
        ("wrong_password", "*** error: wrong password"),
        ("guesses_throttled", "*** error: too many wrong passwords from your address; "
                              "try again in {seconds} s"),
        ("already_in", "*** error: you are already in"),
        ("registration_timeout", "*** error: registration timed out"),
        ("excess_flood", "*** error: excess flood (over {seconds} s of lines ahead of the "
                         "rate limit)"),
        ("server_full", "*** error: server full"),
        ("too_many_from_address", "*** error: too many connections from your address"),
        ("speaks_tls", "*** error: this server speaks TLS: connect with 'chat.py client --tls' "
                       "or 'openssl s_client'"),
        ("invalid_room", "*** error: invalid room {name}: {reason}"),
        ("room_lookalike", "*** error: room {room} looks like {other}"),
        ("too_many_rooms", "*** error: {count} rooms exist, the most this server allows; "
                           "join one of them (/rooms)"),
        ("rooms_too_fast", "*** error: you are creating rooms too fast; try again in {seconds} s"),
        ("no_such_room", "*** error: no such room {room}"),
        ("too_many_joined", "*** error: you are in {count} rooms, the most one may be in: "
                            "/part one before you join {room}"),
        ("already_in_room", "*** error: you are in {room} already"),
        ("in_default_room", "*** error: you are in {room}, where everyone starts; "
                            "/quit leaves the chat"),
        ("ping_timeout", "*** error: no answer to PING"),
        ("banned", "*** error: banned"),
        ("not_operator", "*** error: only operators may /{name}"),
        ("wallops", "*** to operators, from {nick}: {text}"),
        ("not_room_operator", "*** error: only operators of {room} may do that"),
        ("not_in_that_room", "*** error: {target} is not in {room}"),
        ("already_there", "*** error: {target} is already in {room}"),
        ("unknown_mode", "*** error: no room mode {mode}: modes are +o +v +b +e +I +i +k +l "
                         "+m +n +s +t (see /help)"),
        ("invite_only", "*** error: {room} is invite-only: ask one of its operators"),
        ("bad_room_key", "*** error: {room} needs its key: /join {room} KEY"),
        ("banned_from_room", "*** error: you are banned from {room}"),
        ("banned_in_room", "*** error: you are banned from {room}: you may not talk there"),
        ("room_list_full", "*** error: {room} has {count} {list} already: lift one first"),
        ("masks_kept_full", "*** error: this server's rooms have {count} bans and exceptions "
                            "already: lift some first"),
        ("room_ban_entry", "*** {room} bans {mask} (set by {by})"),
        ("room_bans_end", "*** end of the bans of {room}"),
        ("room_exception_entry", "*** {room} lets {mask} in despite its bans (set by {by})"),
        ("room_exceptions_end", "*** end of the ban exceptions of {room}"),
        ("room_invitation_entry", "*** {room} lets {mask} in without an invitation "
                                  "(set by {by})"),
        ("room_invitations_end", "*** end of the invite exceptions of {room}"),
        ("room_banned", "*** {nick} banned {target} from {room}"),
        ("room_unbanned", "*** {nick} lifted the ban on {target} in {room}"),
        ("room_excepted", "*** {nick} lets {target} into {room} despite its bans"),
        ("room_unexcepted", "*** {nick} no longer lets {target} into {room} despite its bans"),
        ("room_invexed", "*** {nick} lets {target} into {room} without an invitation"),
        ("room_uninvexed", "*** {nick} no longer lets {target} into {room} without an "
                           "invitation"),
        ("room_full", "*** error: {room} is full"),
        ("moderated", "*** error: {room} is moderated: only its operators and voiced "
                      "members talk"),
        ("no_operators", "*** error: this server has no operators"),
        ("wrong_op_password", "*** error: wrong operator password"),
        ("op_guesses_throttled", "*** error: too many wrong operator passwords from your "
                                 "address; try again in {seconds} s"),
        ("no_such_ban", "*** error: no ban on {target}"),
        ("no_such_mute", "*** error: no mute on {target}"),
        ("nick_reserved", "*** error: nick {nick} is kept for the server and its services"),
        ("you_are_muted", "*** error: you are muted; you may still /msg an operator"),
        ("error", "*** error: {text}"),
        ("whois", "*** {nick}: {details}"),
        ("notice", "*** {text}"),
    )
    FIELDS = {"nick": r"[^\s*:]+", "new": r"\S+", "other": r"\S+", "room": r"#\S+", "by": r"\S+",
              "count": r"\d+", "limit": r"\d+", "seconds": r"\d+", "burst": r"\d+",
              "rate": r"\d+(?:\.\d+)?", "time": r"\d\d:\d\d", "noun": r"messages?"}

    def __init__(self):
        self.templates = dict(self.SHAPES)
        self._patterns = None   # compiled at the first parse: a server never needs them

    def _compiled(self):
        """The shapes as regexes, built once when first wanted, since that costs a
        quarter of the client's start-up and the server never parses a notice."""
        if self._patterns is None:
            self._patterns = [(key, re.compile(self._regex(template)))
                              for key, template in self.SHAPES]
        return self._patterns

    def _regex(self, template):
        parts, seen, regex = re.split(r"\{(\w+)\}", template), set(), []
        for odd, part in zip(itertools.cycle((0, 1)), parts):
            if not odd:
                regex.append(re.escape(part))
            elif part in seen:   # a field said twice is the same text twice
                regex.append("(?P=%s)" % part)
            else:
                seen.add(part)
                regex.append("(?P<%s>%s)" % (part, self.FIELDS.get(part, ".*")))
        return "".join(regex)

    def render(self, key, **fields):
        """The line (without its newline) of shape key."""
        return self.templates[key].format(**fields)

    def percent_format(self, key):
        """Shape key as a %-format of its fields in order: for the hot path."""
        return re.sub(r"\{\w+\}", "%s", self.templates[key].replace("%", "%%"))

    def parse(self, line):
        """(shape, fields) of a received line; (None, {}) for a line of no known shape."""
        for key, pattern in self._compiled():
            found = pattern.fullmatch(line)
            if found:
                return key, found.groupdict()
        return None, {}


WORDING = Wording()
_SAID_FORMATS = {False: WORDING.percent_format("said"), True: WORDING.percent_format("acted"),
                 "notice": WORDING.percent_format("noticed")}


def said_line(nick, text, action=False, notice=False):
    """A public line, a /me or a notice, as the line protocol shows it: "<alice> hi",
    "* alice waves", "-bot- build passed"."""
    return _SAID_FORMATS["notice" if notice else action] % (nick, text)


# --- Events ---
# What happens in the chat, as the core tells it and every dialect renders it.
# Room events go to a room's members, the same bytes for all who speak one
# dialect; the others are replies to one member.

@dataclass(frozen=True)
class Said:
    """A public line in a room (action: /me)."""
    room: str
    nick: str
    text: str
    action: bool = False
    time: float = 0.0
    seq: int = 0            # its number in the room, the same on every node (0: unknown)
    notice: bool = False    # IRC's NOTICE: a bot's words, which no program answers
    tags: str = ""          # its client tags (see client_tags): for IRC clients that read them
    bot: bool = False       # said by a program that says it is one (IRC's bot mode)


@dataclass(frozen=True)
class Signal:
    """A message made only of client tags (IRC's TAGMSG: a typing notice, a reaction):
    nothing to show, for the clients that read tags; not kept."""
    room: str
    nick: str
    tags: str
    msgid: str              # its own id, as a message's: a reaction may answer one
    time: float = 0.0
    bot: bool = False


@dataclass(frozen=True)
class Joined:
    """A member entered a room. Quiet events are for dialects that keep member lists."""
    room: str
    nick: str
    quiet: bool = False
    realname: str = ""      # for IRCv3 extended-join
    away: Optional[str] = None


@dataclass(frozen=True)
class MemberChanged:
    """A member of the room went away (away: its words) or came back (None), or took
    another real name: for the lists of those that keep them (IRCv3 away-notify and
    setname, the page), not news for the others."""
    room: str
    nick: str
    away: Optional[str]
    realname: Optional[str] = None   # the new real name, when that is what changed
    uid: int = 0            # one for all the member's rooms: a member of several hears it once


@dataclass(frozen=True)
class Invited:
    """Someone was let into the room (IRCv3 invite-notify)."""
    room: str
    nick: str               # who invited
    target: str


@dataclass(frozen=True)
class Parted:
    """A member left one room, for another (to) or for none."""
    room: str
    nick: str
    reason: str = ""
    to: Optional[str] = None
    quiet: bool = False


@dataclass(frozen=True)
class Quit:
    """A member left the chat; one event per room it was in, sharing a uid, so a member
    of several of those rooms hears it once."""
    room: str
    nick: str
    reason: str
    quiet: bool = False
    uid: int = 0


@dataclass(frozen=True)
class Renamed:
    """A member changed its nick; one event per room, sharing a uid, as for Quit."""
    room: str
    old: str
    new: str
    quiet: bool = False
    uid: int = 0


@dataclass(frozen=True)
class Kicked:
    """An operator put a member out (kick or ban); one event per room, sharing a uid."""
    room: str
    nick: str
    by: str
    reason: str
    uid: int = 0
    quiet: bool = False     # always told, whatever the room's size


@dataclass(frozen=True)
class Opped:
    """A member of the room became a (server) operator."""
    room: str
    nick: str


@dataclass(frozen=True)
class ModeChanged:
    """A room operator changed the room's modes or members' rights, as IRC writes it:
    changes "+o-k+l", args ("bob", "*", "20"): one argument per o, v, k and l."""
    room: str
    nick: str
    changes: str
    args: tuple = ()


@dataclass(frozen=True)
class TopicSet:
    room: str
    nick: str
    text: str


@dataclass(frozen=True)
class Private:
    """A private message, as its target sees it, or (sent) as its sender does."""
    sender: str
    target: str
    text: str
    action: bool = False
    sent: bool = False
    time: float = 0.0
    notice: bool = False    # IRC's NOTICE: a bot's words, which no program answers
    tags: str = ""          # its client tags; with no text, it is a Signal to one member
    msgid: str = ""         # its id (not a number: conversations are not kept)
    bot: bool = False


@dataclass(frozen=True)
class Welcome:
    server: str
    nick: str


@dataclass(frozen=True)
class RoomState:
    """A room the member has just entered (greeting: the first one): who is there, and
    its topic."""
    room: "Room"
    greeting: bool = False
    unlisted: Optional[str] = None      # the receiver's nick, while lists do not show it


@dataclass(frozen=True)
class TopicInfo:
    room: str
    text: Optional[str]
    by: str = ""                        # who set it, when known
    at: float = 0.0


@dataclass(frozen=True)
class History:
    room: "Room"
    hidden: frozenset = frozenset()     # keys of the nicks whose lines the receiver ignores


@dataclass(frozen=True)
class WhoList:
    room: "Room"
    own: bool


@dataclass(frozen=True)
class Whois:
    """What /whois tells: address only when an operator asks."""
    nick: str
    realname: str
    rooms: tuple
    idle: float
    away: Optional[str]
    operator: bool
    address: Optional[str]
    user: str = ""
    ranks: tuple = ()                   # "@", "+" or "" in each of rooms
    signon: float = 0.0                 # when it came
    bot: bool = False


@dataclass(frozen=True)
class RoomList:
    rooms: tuple      # (name, member count), busiest first
    total: int
    joined: tuple = ()  # the names of the receiver's own rooms


@dataclass(frozen=True)
class Scrollback:
    """Past lines of a room that a member asked for (not those shown on entering)."""
    room: str
    lines: tuple      # Said events, oldest first
    before: Optional[int]
    after: Optional[int]
    more: bool        # there are more past the first (or, after a number, the last) one
    request: object = None   # what the asking dialect wants to remember of its question


@dataclass(frozen=True)
class Notice:
    """Any other reply: a shape of the Wording table and its fields."""
    key: str
    fields: dict = field(default_factory=dict)


def notice(key, **fields):
    return Notice(key, fields)


# --- Core: members, rooms, the hub ---
# No sockets and no bytes: dialects call the hub's commands, and the hub tells
# its sink what happens (events for rooms, replies for members, members to let go).

NOBODY = frozenset()                 # a member's ignores until it has any: no set per member


class Member:
    """Someone in the chat: a nick, the rooms it is in, and where its events go."""

    __slots__ = ("endpoint", "multi_room", "hears_quiet", "realname", "address", "nick", "key",
                 "lookalikes", "rooms", "heralded", "announced", "room_tokens", "room_refilled",
                 "operator", "away", "mute", "ignoring", "active", "remote", "cid", "user",
                 "since", "echo", "focus", "invisible", "read_at", "watching", "bot")

    def __init__(self, endpoint, multi_room=False, hears_quiet=False, realname="", address=""):
        self.endpoint = endpoint        # the sink's handle for it: its connection
        self.multi_room = multi_room    # may be in several rooms at once (IRC)
        self.hears_quiet = hears_quiet  # wants every join, leave and rename (it keeps lists)
        self.realname = realname        # what it says it is (IRC's USER), or ""
        self.user = ""                  # IRC's user name, or "" 
        self.echo = False               # hears its own room lines (IRCv3 echo-message)
        self.address = address          # its IP: for bans, and for operators' eyes only
        self.operator = False
        self.away = None                # its away message
        self.mute = None                # the Sanction that silences it, while in force
        self.ignoring = NOBODY          # keys of the nicks it does not want to hear
        self.watching = None            # nick key -> the nick as asked, of nicks it watches
        self.active = self.since = time.monotonic()   # when it last said something; came
        self.nick = self.key = None
        self.lookalikes = ()
        self.rooms = {}                 # Room -> None, in join order
        self.focus = None               # of several rooms, the one plain lines go to
        self.invisible = False          # IRC's +i: found by a mask only by who shares a room
        self.bot = False                # a program that says it is one (IRC's bot mode)
        self.read_at = 0.0              # when its last /history read the store
        self.heralded = {}              # rooms whose members were told it joined (a dict: small)
        self.announced = False          # it chose a nick or spoke: its arrival is told
        self.room_tokens = float(ROOM_CREATE_BURST)
        self.room_refilled = time.monotonic()
        self.remote = None              # the node it is on, when that is another one
        self.cid = None                 # its name across nodes (see Directory)

    def __repr__(self):
        return repr(self.endpoint) if self.remote is None else "<%s on %s>" % (
            self.nick, self.remote)

    @property
    def room(self):
        """The room plain lines go to: a member's only room, or of several the one it
        focused on (the first one when it left that)."""
        focus = self.focus
        if focus is not None and focus in self.rooms:
            return focus
        return next(iter(self.rooms), None)


class Room:
    """A room: its members in join order, its topic and history, and what is rendered
    from them (who lists, history blocks) until they change.

    Every member hears the room; only the announced ones (they picked a nick or spoke)
    are listed and counted, so a connection that has not shown itself yet (a silent
    nc, a browser's spare socket greeted before it spoke) is in no list, and joins
    that are listed are told exactly once. Members on other nodes are listed, never
    hearers: their own node tells them."""

    __slots__ = ("name", "key", "lookalikes", "members", "listed", "operators", "topic",
                 "history", "hearing_quiet", "cache", "history_cache", "_names", "_runs",
                 "_first", "seq", "ops", "voiced", "modes", "password", "limit", "invited",
                 "created", "topic_by", "topic_at", "replayed", "masks")

    def __init__(self, name, history, kept=None):
        self.name = name
        self.key = name_key(name)
        self.lookalikes = lookalike_keys(name)
        self.members = {}               # Member -> None, in join order: who hears the room
        self.listed = {}                # the announced members, in the order they showed
        self.operators = {}             # the listed operators, so lists need no scan
        self.topic = None
        self.history = collections.deque(maxlen=history if kept is None else kept)   # Said
        self.replayed = history         # of them, how many a newcomer is shown
        self.hearing_quiet = 0          # members that want quiet events
        self.cache = {}                 # rendered from the member list
        self.history_cache = {}         # rendered from the history
        self._names = None              # sorted nicks
        self._runs = None               # see nick_runs
        self._first = None              # see first_names
        self.seq = 0                    # the number of the last line heard (0: none known)
        self.ops = {}                   # its own operators (server operators are one anyway)
        self.voiced = {}                # members that may talk while it is moderated
        self.modes = "n"                # of "imnst", see ROOM_MODES
        self.password = None            # its key, IRC's +k
        self.limit = None               # most members, IRC's +l
        self.invited = set()            # nick keys invited in, until they come
        self.created = time.time()
        self.topic_by, self.topic_at = "", 0.0   # who set the topic, when (if known)
        self.masks = {letter: {} for letter in MASK_LISTS}   # mask -> (by whom, when)

    @property
    def empty(self):
        return not self.members and not self.listed

    def add(self, member):
        self.members[member] = None
        self.hearing_quiet += member.hears_quiet

    def rank(self, member):
        """"@" for an operator here (its own, or the server's), "+" for a voiced member."""
        if member.operator or member in self.ops:
            return "@"
        return "+" if member in self.voiced else ""

    def ranks(self, member):
        """Every rank of member here, highest first: "@+" (IRCv3 multi-prefix)."""
        return ("@" if member.operator or member in self.ops else "") + (
            "+" if member in self.voiced else "")

    def regrade(self, member):
        """member's rights here changed: lists show it."""
        if self.rank(member) == "@" and member in self.listed:
            self.operators[member] = None
        else:
            self.operators.pop(member, None)
        self.changed()

    def list(self, member):
        """Show a member in the room's lists (it was announced)."""
        self.listed[member] = None
        if self.rank(member) == "@":
            self.operators[member] = None
        self.cache.clear()
        self._names = None
        if len(self.listed) <= GREETING_NAMES:
            self._first = None
        if self._runs is not None:
            self._extend_runs(self.shown(member))

    def remove(self, member):
        """Take a member out; True when it was listed (its leaving is news)."""
        if self.members.pop(member, 0) is None:
            self.hearing_quiet -= member.hears_quiet
        self.ops.pop(member, None)
        self.voiced.pop(member, None)
        if self.listed.pop(member, 0) is None:
            self.operators.pop(member, None)
            self.changed()
            return True
        return False

    def changed(self):
        """Forget what was rendered from the member list."""
        self.cache.clear()
        self._names = self._runs = self._first = None

    def shown(self, member):
        """A member's nick in lists: "@alice" for an operator, "+bob" for a voice."""
        return self.rank(member) + member.nick

    def names(self):
        """Nicks of the listed members as lists show them, sorted (case-insensitively)."""
        if self._names is None:
            self._names = sorted((self.shown(member) for member in self.listed),
                                 key=lambda name: name_key(name.lstrip("@+")))
        return self._names

    def first_names(self):
        """The first GREETING_NAMES listed members as lists show them: what a greeting
        names, the same for every newcomer while they stay."""
        if self._first is None:
            self._first = [self.shown(member)
                           for member in itertools.islice(self.listed, GREETING_NAMES)]
        return self._first

    def nick_runs(self):
        """The listed members' nicks in join order, space-separated in runs of at most
        NICK_RUN bytes: what a reply that must fit a line (IRC's NAMES) is made of. A
        join adds to the last run, so a storm of joins costs little."""
        if self._runs is None:
            self._runs = []
            for member in self.listed:
                self._extend_runs(self.shown(member))
        return self._runs

    def _extend_runs(self, nick):
        runs, size = self._runs, len(nick.encode())
        if runs and runs[-1][1] + 1 + size <= NICK_RUN:
            runs[-1][0] += " " + nick
            runs[-1][1] += 1 + size
        else:
            runs.append([nick, size])

    def remember(self, event):
        """Keep a public line; the bytes of text it adds (less those of one it pushes out)."""
        pushed_out = self.history[0] if len(self.history) == self.history.maxlen else None
        self.history.append(event)
        self.history_cache.clear()
        return HistoryBudget.cost(event) - (HistoryBudget.cost(pushed_out) if pushed_out else 0)

    def recent(self):
        """The lines a newcomer is shown: the last of those kept."""
        history = self.history
        if len(history) <= self.replayed:
            return list(history)
        return list(itertools.islice(history, len(history) - self.replayed, None))

    def lines(self, before=None, after=None, count=SCROLLBACK_PAGE):
        """Kept lines numbered after `after` (oldest first), or else before `before`
        (None: the latest), one more than count when there are: (lines, complete),
        complete when no older line kept elsewhere (a store) could belong to them."""
        history = self.history
        if after is not None:
            found = [said for said in history if said.seq > after][:count + 1]
            return found, bool(history) and history[0].seq <= after + 1
        found = [said for said in history if before is None or said.seq < before][-count - 1:]
        return found, len(found) > count or bool(history) and history[0].seq <= 1

    def position(self, when):
        """(after, before) about a time, to the millisecond (IRCv3 server-time's): lines
        said after it are numbered past `after`, lines before it below `before`. Known
        as far back as lines are kept; before that, the oldest kept line stands in."""
        millis, after, before = int(when * 1000), None, None
        for said in self.history:
            said_millis = int(said.time * 1000)
            if said_millis <= millis:
                after = said.seq
            if said_millis >= millis and before is None:
                before = said.seq
        oldest = self.history[0].seq if self.history else self.seq + 1
        return (oldest - 1 if after is None else after,
                self.seq + 1 if before is None else before)

    def forget_oldest(self):
        """Drop the oldest public line kept; the bytes it held."""
        self.history_cache.clear()
        return HistoryBudget.cost(self.history.popleft())


class HistoryBudget:
    """The memory all rooms' histories may take: past it, the rooms that spoke least
    recently lose their oldest lines first. What is rendered from a history (one block
    per dialect) is cleared when it changes, so the whole stays within a few times this."""

    LINE = 120                          # bytes a kept line costs besides its text

    def __init__(self, limit):
        self.limit = limit
        self.used = 0
        self.rooms = collections.OrderedDict()   # Room -> None, least recently spoken first

    @classmethod
    def cost(cls, event):
        return cls.LINE + len(event.text) + len(event.nick) + len(event.tags)

    def remember(self, room, event):
        if not room.history.maxlen:
            return
        self.used += room.remember(event)
        self.rooms[room] = None
        self.rooms.move_to_end(room)
        while self.used > self.limit and self.rooms:
            oldest = next(iter(self.rooms))
            self.used -= oldest.forget_oldest()
            if not oldest.history:
                del self.rooms[oldest]

    def forget(self, room):
        """A room that is gone gives its history's memory back."""
        if self.rooms.pop(room, 0) is None:
            self.used -= sum(map(self.cost, room.history))


class GuessThrottle:
    """Wrong passwords per address: a few a minute, then that address waits.

    IPv6 addresses count per /64, the block one machine usually holds. At most
    GUESSERS_TRACKED addresses are remembered, the oldest forgotten first.
    """

    def __init__(self, limit=GUESS_LIMIT, window=GUESS_WINDOW, clock=time.monotonic):
        self.limit, self.window, self.clock = limit, window, clock
        self._failures = collections.OrderedDict()   # address block -> deque of times

    @staticmethod
    def _block(ip):
        if ":" not in ip:
            return ip
        try:
            return str(ipaddress.ip_network(ip.split("%")[0] + "/64", strict=False))
        except ValueError:
            return ip

    def _recent(self, block):
        times = self._failures.get(block)
        if times:
            while times and times[0] <= self.clock() - self.window:
                times.popleft()
            if not times:
                del self._failures[block]
        return times

    def wait(self, ip):
        """Seconds before ip may guess again (0: now)."""
        times = self._recent(self._block(ip))
        if times and len(times) >= self.limit:
            return max(times[0] + self.window - self.clock(), 0.001)
        return 0

    def failed(self, ip):
        """Count a wrong guess; True when it is the one that makes ip wait."""
        block = self._block(ip)
        times = self._recent(block) or self._failures.setdefault(block, collections.deque())
        times.append(self.clock())
        self._failures.move_to_end(block)
        while len(self._failures) > GUESSERS_TRACKED:
            self._failures.popitem(last=False)
        return len(times) == self.limit


def parse_duration(text):
    """Seconds in "90s", "10m", "2h", "7d" or a bare number of seconds; ValueError else."""
    found = re.fullmatch(r"(\d{1,7})([smhd]?)", text.lower())
    if not found:
        raise ValueError("not a duration: %r" % text)
    return int(found.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[found.group(2)]


def span_text(until, now):
    """ "for good", or "for 1h 5m" until a time."""
    if until is None:
        return "for good"
    left, parts = max(int(until - now), 0), []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if left >= size or (unit == "s" and not parts):
            parts.append("%d%s" % (left // size, unit))
            left %= size
    return "for " + " ".join(parts[:2])


_IPV4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")


def address_block(text):
    """The network a ban on an address covers: an IPv4 address, an IPv6 /64, or the
    network given; IPv4-mapped IPv6 addresses and networks count as the IPv4 ones they
    map. ValueError if text is none of those."""
    network = ipaddress.ip_network(text.split("%")[0], strict=False)
    if network.version == 6 and network.prefixlen >= 96 and network.subnet_of(_IPV4_MAPPED):
        return ipaddress.ip_network((int(network.network_address) & 0xFFFFFFFF,
                                     network.prefixlen - 96))
    if network.version == 6 and network.prefixlen == 128:
        return ipaddress.ip_network("%s/64" % network.network_address, strict=False)
    return network


def ip_address(ip):
    """The address a peer's IP is, IPv4-mapped ones as IPv4; None if it is not one."""
    try:
        address = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return None
    return address.ipv4_mapped or address if address.version == 6 else address


def finite_time(value):
    """A kept time: None (for good) or a number that is a real moment."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not \
            0 <= value < 1e11:
        raise ValueError("not a time: %.40r" % (value,))
    return float(value)


class TokenBucket:
    """At most rate a second on average, burst at once."""

    __slots__ = ("rate", "burst", "tokens", "refilled")

    def __init__(self, rate, burst):
        self.rate, self.burst = rate, burst
        self.tokens, self.refilled = float(burst), time.monotonic()

    def take(self, now):
        """Take a token: False when there is none."""
        self.tokens = min(self.burst, self.tokens + (now - self.refilled) * self.rate)
        self.refilled = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@dataclass
class Sanction:
    """A banned or muted network: until a time (None: for good), why, who said so, when."""
    target: str                 # what the operator named: a nick, an address or a network
    network: object             # an ipaddress network
    until: Optional[float]
    reason: str
    by: str
    since: float = 0.0

    def covers(self, ip):
        address = ip_address(ip)
        return address is not None and address.version == self.network.version and \
            address in self.network

    def as_record(self):
        return {"target": self.target, "network": str(self.network), "until": self.until,
                "reason": self.reason, "by": self.by, "since": self.since}

    @classmethod
    def from_record(cls, record):
        """The Sanction of a kept record; KeyError, TypeError or ValueError if it is not one."""
        return cls(stored_text(record["target"])[:60], address_block(record["network"]),
                   finite_time(record["until"]), stored_text(record["reason"])[:MAX_REASON],
                   stored_text(record["by"])[:MAX_NICK], finite_time(record.get("since")) or 0.0)


class Sanctions:
    """The bans, or the mutes, in force: at most one per network, those that ran out
    forgotten as they are looked at."""

    def __init__(self, what, records=()):
        self.what = what
        self.items = []
        for record in records if isinstance(records, list) else ():
            try:
                self.items.append(Sanction.from_record(record))
            except (KeyError, TypeError, ValueError, AttributeError):
                log.warning("skipped a kept %s that cannot be read: %.100r", what, record)

    def expire(self, now):
        """Forget what ran out; True when anything was."""
        if not self.items:
            return False
        kept = [item for item in self.items if item.until is None or item.until > now]
        changed, self.items = len(kept) < len(self.items), kept
        return changed

    def covering(self, ip):
        if not self.items:
            return None
        return next((item for item in self.items if item.covers(ip)), None)

    def add(self, sanction):
        self.items = [old for old in self.items if old.network != sanction.network] + [sanction]

    def lift(self, target, network):
        """Remove those named target (case aside) or on network; the removed ones."""
        key = name_key(target)
        removed = [item for item in self.items if name_key(item.target) == key
                   or item.network == network or str(item.network) == target]
        self.items = [item for item in self.items if item not in removed]
        return removed

    def records(self):
        return [item.as_record() for item in self.items]


class Broker:
    """Where a room's lines and events go. With one node, straight to the members here,
    each line numbered in its room; RedisBroker carries them through Redis to every
    node, which gives every member one order."""

    hub = None
    linked = True               # other nodes can be reached (with none, always)

    def attach(self, hub):
        self.hub = hub

    def line(self, room, speaker, text, action, notice=False, tags=""):
        room.seq += 1
        self.hub.deliver_line(room, Said(room.name, speaker.nick, text, action,
                                         self.hub.clock(), room.seq, notice, tags, speaker.bot),
                              speaker)

    def publish(self, room, event, excluded, subject=None):
        """A room event (subject: the member it is about, or None)."""
        self.hub.publish_here(room, event, excluded)

    def signal(self, room, event, excluded):
        """A Signal (client tags alone) to a room's members."""
        self.hub.publish_here(room, event, excluded)

    def forward(self, member, event):
        """Tell a member on another node: with one node there is none."""
        raise AssertionError("no member is on another node")

    def expel(self, member, by, reason, room=None):
        """Have another node put its member out: with one node there is none."""
        raise AssertionError("no member is on another node")

    def invite(self, member, room, by):
        """Have another node let its member into room: with one node there is none."""
        raise AssertionError("no member is on another node")


class Directory:
    """Who holds which nick, and who is online on other nodes. With one node the hub's
    own tables say it all; RedisDirectory shares them through Redis."""

    hub = None
    first_guest = 1             # guest1, guest2, ...

    def attach(self, hub):
        self.hub = hub

    def claimed(self, member, old_keys):
        """member took a nick (and let go of old_keys)."""

    def changed(self, member):
        """What others see of an announced member changed (nick, rooms, away, ...)."""

    def gone(self, member):
        """member left the chat."""


class Moderation:
    """Operators' powers, a part of the Hub: kick, ban and mute, and the ledgers of
    bans and mutes. Bans and mutes are on addresses (a nick is only a way to name
    one), so neither is evaded by a new nick or a new connection; a mute also
    silences a member's nick changes, topics and leaving words, which would
    otherwise carry what it may not say. Operators are above both."""

    RECENT = 1000               # departed members whose address a ban or mute may still name

    def do_op(self, member, password):
        if not self.options.op_password:
            self.sink.send(member, notice("no_operators"))
            return
        verdict, wait = self._guess(self.op_guesses, member.address, password,
                                    self.options.op_password, "operator passwords")
        if verdict == "wait":
            self.sink.send(member, notice("op_guesses_throttled", seconds=math.ceil(wait)))
        elif verdict == "wrong":
            log.warning("%r: wrong operator password", member)
            self.sink.send(member, notice("wrong_op_password"))
        elif not member.operator:
            self.announce(member)
            member.operator = True
            log.warning("%r is an operator now", member)
            self.sink.send(member, notice("opped"))
            for room in member.rooms:
                room.operators[member] = None
                room.changed()
                self._publish_membership(room, Opped(room.name, member.nick), (member,), member)
            self.directory.changed(member)

    def do_kick(self, member, name, reason=""):
        """A server operator puts a member out of the chat; a room's operator, out of
        the room it is in."""
        room = member.room
        if not member.operator and room is not None and member in room.ops:
            self.do_kick_from(member, room.name, name, reason)
            return
        if not self._operator(member, "kick"):
            return
        target = self._online(member, name, "/kick NICK [REASON]")
        if target is not None:
            reason = tidy_text(reason)[:MAX_REASON] or "no reason given"
            log.warning("%s (operator) kicked %r: %s", member.nick, target, reason)
            self._expel(target, member.nick, reason)

    def do_ban(self, member, target, rest=""):
        """Ban a nick's address, an address or a network, for a while or for good; the
        members it covers are put out at once. The ban, or None."""
        ban = self._sanction(member, "ban", target, rest, self.bans,
                             "/ban NICK|ADDRESS|NETWORK [DURATION: 10m, 2h, 7d] [REASON]")
        if ban is None:
            return None
        self.sink.send(member, notice("ban_added", target=ban.target, network=str(ban.network),
                                      span=span_text(ban.until, ban.since), reason=ban.reason))
        if ban.covers(member.address):
            self.sink.send(member, notice("ban_covers_you"))
        for other in self.local_members():   # other nodes see the ban in the store
            if ban.covers(other.address) and not other.operator:
                self._expel(other, member.nick, "banned: " + ban.reason)
        return ban

    def do_mute(self, member, target, rest=""):
        """Silence a nick's address (the member, and whoever comes from there next) or an
        address or network in every room, for a while or for good."""
        mute = self._sanction(member, "mute", target, rest, self.mutes,
                              "/mute NICK|ADDRESS|NETWORK [DURATION: 90s, 10m, 2h, 7d]")
        if mute is None:
            return
        span = span_text(mute.until, mute.since)
        for other in self.local_members():   # everyone from there: no spare voice
            if mute.covers(other.address) and not other.operator:
                other.mute = mute
                self.sink.send(other, notice("muted_you", by=member.nick, span=span))
        self.sink.send(member, notice("muted", nick=mute.target, span=span))
        if mute.until is not None:
            self.sink.call_later(mute.until - self.clock() + 0.01, self._mute_ran_out, mute)

    def _mute_ran_out(self, mute):
        """Tell the members a mute silenced that they may talk again."""
        if mute in self.mutes.items and self.mutes.expire(self.clock()):
            self._save_state()
        if mute not in self.mutes.items:
            self._tell_unmuted([mute])

    def _tell_unmuted(self, mutes):
        """The members that mutes silenced may talk again: tell them."""
        for member in self.local_members():
            if member.mute is not None and member.mute in mutes:
                member.mute = None
                self.sink.send(member, notice("unmuted_you"))

    def _sanction(self, member, command, target, rest, ledger, usage):
        """A new ban or mute from an operator's command, entered in ledger; None (the
        operator told why) when the command is wrong."""
        if not self._operator(member, command):
            return None
        if not target:
            self.sink.send(member, notice("usage", usage=usage))
            return None
        duration, reason = None, tidy_text(rest)
        first, _, more = reason.partition(" ")
        try:
            duration, reason = parse_duration(first), more
        except ValueError:
            pass
        network = self._network_of(target)
        if network is None:
            self.sink.send(member, notice("error", text="%s is neither a nick online nor an "
                                          "address" % sanitize(target)[:40]))
            return None
        now = self.clock()
        sanction = Sanction(sanitize(target)[:60], network, now + duration if duration else None,
                            reason[:MAX_REASON] or "no reason given", member.nick, now)
        ledger.add(sanction)
        self._save_state()
        log.warning("%s (operator): %s %s (%s) %s: %s", member.nick, command, sanction.target,
                    network, span_text(sanction.until, now), sanction.reason)
        return sanction

    def _network_of(self, target):
        """The network a ban or mute on target covers: a nick online or just gone, an
        address or a network; None when it is none of those."""
        key = name_key(unicodedata.normalize("NFKC", target))
        online = self.members.get(key)
        address = online.address if online else self.recent.get(key)
        try:
            return address_block(address or target)
        except ValueError:
            return None

    def do_unban(self, member, target):
        """Lift the bans named target, or on its network (a nick, an address, a network
        as /bans lists it); the lifted bans."""
        return self._lift(member, "unban", target, self.bans, "no_such_ban", "unbanned")

    def do_unmute(self, member, target):
        self._tell_unmuted(self._lift(member, "unmute", target, self.mutes, "no_such_mute",
                                      "unmuted"))

    def _lift(self, member, command, target, ledger, missing, done):
        if not self._operator(member, command):
            return []
        if not target:
            self.sink.send(member, notice("usage", usage="/%s NICK|ADDRESS|NETWORK (see /%ss)"
                                          % (command, command[2:])))
            return []
        ledger.expire(self.clock())
        online = self.find_member(target)
        if online is not None and online.mute is not None and ledger is self.mutes:
            target = online.mute.target
        lifted = ledger.lift(target, self._network_of(target))
        shown = sanitize(target)[:60]
        if not lifted:
            self.sink.send(member, notice(missing, target=shown))
            return []
        self._save_state()
        log.warning("%s (operator): %s %s", member.nick, command, shown)
        self.sink.send(member, notice(done, target=shown))
        return lifted

    def do_bans(self, member):
        self._list_sanctions(member, "bans", self.bans, "ban_entry", "no_bans")

    def do_mutes(self, member):
        self._list_sanctions(member, "mutes", self.mutes, "mute_entry", "no_mutes")

    def _list_sanctions(self, member, command, ledger, entry, none):
        if not self._operator(member, command):
            return
        now = self.clock()
        if ledger.expire(now):
            self._save_state()
        for item in ledger.items:
            self.sink.send(member, notice(entry, target=item.target, network=str(item.network),
                                          by=item.by, span=span_text(item.until, now),
                                          reason=item.reason))
        if not ledger.items:
            self.sink.send(member, notice(none))

    def ban_for(self, ip):
        """The ban that refuses ip, or None (bans that ran out are forgotten)."""
        if self.bans.expire(self.clock()):
            self._save_state()
        return self.bans.covering(ip)

    def mute_for(self, ip):
        if self.mutes.expire(self.clock()):
            self._save_state()
        return self.mutes.covering(ip)

    def muted(self, member, told=True):
        """Whether member may not talk (told so, unless told is False)."""
        mute = member.mute
        if mute is None or member.operator:
            return False
        if mute not in self.mutes.items or (mute.until is not None
                                            and mute.until <= self.clock()):
            member.mute = None
            return False
        if told:
            self.sink.send(member, notice("you_are_muted"))
        return True

    def do_kill(self, member, name, reason=""):
        """IRC's KILL: a server operator puts a member out of the chat."""
        if self._operator(member, "kill"):
            self.do_kick(member, name, reason)

    def do_wallops(self, member, text):
        """A server operator's word to every operator on this node."""
        text = tidy_text(text)
        if not self._operator(member, "wallops") or not text:
            return
        for other in list(self.members.values()):
            if other.operator and other.remote is None:
                self.sink.send(other, notice("wallops", nick=member.nick, text=text))

    def _operator(self, member, command):
        if not member.operator:
            self.sink.send(member, notice("not_operator", name=command))
        return member.operator

    def _expel(self, target, by, reason):
        """Put a member out: its rooms are told who did it and why, then it goes (one on
        another node, by that node)."""
        if target.remote is not None:
            self.broker.expel(target, by, reason)
            return
        self._depart(target, lambda room, uid: Kicked(room.name, target.nick, by, reason, uid),
                     kicked=True)
        self.sink.close(target, "kicked by %s" % by, notice("kicked_you", by=by, reason=reason))

    def _remember_departure(self, member, kicked=False):
        """For WHOWAS, and for a ban by nick after a kick. A guest that never showed itself
        was never seen (unless kicked): a storm of such guests must not push the people
        who were out of what is remembered."""
        if member.announced:
            self.remember_nick(member)
        elif not kicked:
            return
        self.recent[member.key] = member.address
        self.recent.move_to_end(member.key)
        while len(self.recent) > self.RECENT:
            self.recent.popitem(last=False)

    def _save_state(self):
        """Keep topics, bans, mutes and room modes: a moment after the first change, so a
        burst of changes is one write (what is due is written at shutdown too)."""
        if not self.state_due:
            self.state_due = True
            self.sink.call_later(STATE_SAVE_DELAY, self.save_due_state)

    def save_due_state(self):
        if self.state_due:
            self.state_due = False
            self.store.save_state({"topics": self.topics, "bans": self.bans.records(),
                                   "mutes": self.mutes.records(), "rooms": self.room_modes})

    def adopt_state(self, state):
        """Topics, bans and mutes as another node left them (read back from the store):
        a new ban or mute is enforced on the members here, as the operator's own node
        does on its members."""
        self.topics = self._readable_topics(state.get("topics"))
        self.room_modes = self.readable_modes(state.get("rooms"))
        for room in self.rooms.values():
            room.topic = self.topics.get(room.key)
            self.restore_modes(room)
        old_bans, old_mutes = self.bans.items, self.mutes.items
        self.bans = Sanctions("ban", state.get("bans"))
        self.mutes = Sanctions("mute", state.get("mutes"))
        now = self.clock()
        self.bans.expire(now)
        self.mutes.expire(now)
        for mute in self.mutes.items:
            if mute.until is not None and mute not in old_mutes:
                self.sink.call_later(mute.until - now + 0.01, self._mute_ran_out, mute)
        for member in self.local_members():
            if member.operator:
                continue
            ban = self.bans.covering(member.address)
            if ban is not None and ban not in old_bans:
                self._expel(member, ban.by, "banned: " + ban.reason)
                continue
            mute = self.mutes.covering(member.address)
            if mute is not None and member.mute is None:
                self.sink.send(member, notice("muted_you", by=mute.by,
                                              span=span_text(mute.until, now)))
            elif mute is None and member.mute is not None:
                self.sink.send(member, notice("unmuted_you"))
            member.mute = mute


class Names:
    """A part of the Hub: who is who. Nicks and their look-alikes, and finding members
    and rooms by the names people type."""

    # Inspection

    def find_member(self, name):
        return self.members.get(name_key(unicodedata.normalize("NFKC", name)))

    def find_room(self, name):
        key = name_key(unicodedata.normalize("NFKC", name if name.startswith("#") else "#" + name))
        return self.rooms.get(key)

    # Nicks

    def _online(self, member, name, usage):
        """The member called name, or None (the asker is told why)."""
        if not name:
            self.sink.send(member, notice("usage", usage=usage))
            return None
        target = self.find_member(name)
        if target is None:
            self.sink.send(member, notice("no_such_nick", nick=sanitize(name)[:40]))
        return target

    def _nick_key(self, member, name, usage):
        """The key of a valid nick (online or not), or None (the asker is told why)."""
        if not name:
            self.sink.send(member, notice("usage", usage=usage))
            return None
        try:
            return name_key(normalize_nick(name))
        except ValueError as exc:
            self.sink.send(member, notice("invalid_nick", name=sanitize(name)[:40], reason=str(exc)))
            return None

    def _follow_rename(self, old_key, new_key):
        """Ignores follow a nick that changes."""
        for other in self.ignored_by.pop(old_key, ()):
            other.ignoring.discard(old_key)
            other.ignoring.add(new_key)
            self.ignored_by.setdefault(new_key, set()).add(other)

    def _guest_nick(self):
        while True:
            nick = "guest%d" % next(self._guests)
            if self.nick_problem(nick) is None:
                return nick

    def _register(self, member, nick):
        """member goes by nick: here at once, and across nodes unless another node's
        member took it first (then the directory calls nick_lost)."""
        old = (member.key,) + member.lookalikes if member.key else ()
        self.enter_directory(member, nick)
        self.directory.claimed(member, old)

    def enter_directory(self, member, nick):
        # news for who watches, unless member holds the nick already (a change of case)
        changed = name_key(nick) != member.key or self.members.get(member.key) is not member
        self._unregister(member, told=changed)
        member.nick, member.key = nick, name_key(nick)
        member.lookalikes = tuple(lookalike_keys(nick))   # smaller than the set
        if self.members.setdefault(member.key, member) is not member:
            return   # another node's member holds it until the directory settles it
        for key in member.lookalikes:
            self.lookalikes.setdefault(key, member)
        if changed:
            self.tell_watchers(member.key, member.nick, True)

    def local_members(self):
        """The members on this node (a list: the caller may change who is online)."""
        return [member for member in self.members.values() if member.remote is None]

    def _unregister(self, member, told=True):
        """member's nick is free (told: to who watches it)."""
        if self.members.get(member.key) is member:
            del self.members[member.key]
            if told:
                self.tell_watchers(member.key, member.nick, False)
        for key in member.lookalikes:
            if self.lookalikes.get(key) is member:
                del self.lookalikes[key]


class Rooms:
    """A part of the Hub: rooms made, entered, left and forgotten, and the news of
    who is in them."""

    def do_join(self, member, room_name, key=""):
        """Enter a room, creating it if need be (its first member runs it); a member in
        one room at a time moves."""
        self.announce(member)
        room = self._room_to_join(member, room_name)
        if room is None:
            return
        problem = None if room in member.rooms else self.admission(member, room, key)
        if problem is not None:
            self.sink.send(member, problem)
            return
        if room in member.rooms:
            member.focus = room
            if not member.multi_room:
                self.sink.send(member, notice("already_in_room", room=room.name))
            return
        if len(member.rooms) >= MAX_JOINED:
            self.sink.send(member, notice("too_many_joined", room=room.name, count=MAX_JOINED))
            return
        if not member.multi_room:
            for old in list(member.rooms):
                quiet = old not in member.heralded or self._big(old)
                self._remove(member, old, Parted(old.name, member.nick, to=room.name, quiet=quiet))
        if room.empty and room is not self.default_room:
            room.ops[member] = None
        member.focus = room
        self._enter(member, room)

    def do_part(self, member, room_name=None, reason=""):
        """Leave a room (by default the focused one): a member in one room at a time goes
        back to the default room."""
        self.announce(member)
        if not member.multi_room:
            if member.room is self.default_room:
                self.sink.send(member, notice("in_default_room", room=self.default_room.name))
            else:
                self.do_join(member, self.default_room.name)
            return
        room = self._named_room(member, room_name) if room_name else member.room
        if room is None or room not in member.rooms:
            self.sink.send(member, notice("not_in_room", room=room.name if room else "a room"))
            return
        if reason and self.muted(member, told=False):
            reason = ""
        event = Parted(room.name, member.nick, reason, quiet=room not in member.heralded
                       or self._big(room))
        self.sink.send(member, event)
        self._remove(member, room, event)

    def do_focus(self, member, room_name=""):
        """Of the rooms member is in, the one its plain lines (and room commands that
        name none) go to: how a page that shows several rooms talks in one."""
        room = self.find_room(room_name) if room_name.strip() else None
        if room is None or room not in member.rooms:
            self.sink.send(member, notice("not_in_room", room=sanitize(room_name)[:40] or "?"))
            return
        member.focus = room

    def do_rooms(self, member):
        self.announce(member)
        busiest = sorted((room for room in self.rooms.values() if self.visible(member, room)),
                         key=lambda room: (-len(room.listed), room.key))
        listed = tuple((room.name, len(room.listed)) for room in busiest[:ROOMS_LISTED])
        self.sink.send(member, RoomList(listed, len(busiest),
                                        tuple(room.name for room in member.rooms)))

    def do_history(self, member, room_name="", direction=None, seq=None, count=SCROLLBACK_PAGE,
                   request=None):
        """A page of a room's past lines for one of its members: the latest, or those
        before or after a line's number (what a page scrolling back or filling a gap
        after a reconnect asks for). From memory, else from the store."""
        if direction == "?":
            self.sink.send(member, notice("usage", usage="/history [ROOM] [before|after N] "
                                                         "[COUNT]"))
            return
        room = self.find_room(room_name) if room_name else member.room
        if room is None or room not in member.rooms and not member.operator:
            self.sink.send(member, notice("not_in_room", room=sanitize(room_name)[:40] or "a room"))
            return
        count = max(1, min(count, SCROLLBACK_MAX))
        before, after = (seq, None) if direction == "before" else (None, seq)
        found, complete = room.lines(before, after, count)

        def answer(stored):
            if self.members.get(member.key) is not member:
                return   # gone while its lines were read
            if stored is None:
                self.sink.send(member, notice("history_busy", room=room.name))
                return
            merged = {said.seq: said for said in stored}
            merged.update((said.seq, said) for said in found)
            lines = sorted(merged.values(), key=lambda said: said.seq)
            more = len(lines) > count
            lines = lines[:count] if after is not None else lines[-count:]
            self.sink.send(member, Scrollback(room.name, tuple(lines), before, after, more,
                                              request))
        if complete:
            answer(())
        elif self._may_read(member):
            self.store.lines(room.name, before, after, count + 1,
                             self.sink.answer_later(member, answer))
        else:
            self.sink.send(member, notice("history_busy", room=room.name))

    def _may_read(self, member):
        """Whether member's /history may read the store now: reads of the disk or Redis
        are spaced for each member and bounded for all, so asking cannot stall the chat."""
        now = time.monotonic()
        if now - member.read_at < STORE_READ_GAP or not self.store_reads.take(now):
            return False
        member.read_at = now
        return True

    def visible(self, member, room):
        """Whether member may see room in lists: a secret room only to its members."""
        return "s" not in room.modes or room in member.rooms or member.operator

    def do_topic(self, member, room_name=None, text=None):
        """Show a room's topic (text None), or set it."""
        self.announce(member)
        room = self._named_room(member, room_name) if room_name else member.room
        if room is None:
            return
        if text is None:
            self.sink.send(member, TopicInfo(room.name, room.topic, room.topic_by, room.topic_at))
            return
        if not self.may_change(member, room, "t") or self.muted(member):
            return
        room.topic = tidy_text(text)[:MAX_TOPIC] or None
        room.topic_by, room.topic_at = member.nick, self.clock()
        self.topics.pop(room.key, None)   # the newest last: see _forget_room
        if room.topic:
            self.topics[room.key] = room.topic
        self._save_state()
        self._publish_membership(room, TopicSet(room.name, member.nick, room.topic or ""), ())

    def _add_room(self, name):
        history = self.options.history
        room = Room(name, history, max(history, SCROLLBACK_KEPT) if history else 0)
        room.topic = self.topics.get(room.key)
        self.restore_modes(room)
        for event in self.store.history(name, self.options.history):
            self.history_budget.remember(room, event)
            room.seq = max(room.seq, event.seq)
        self.rooms[room.key] = room
        return room

    def _named_room(self, member, name):
        """The existing room called name, or None (the member is told): a secret room is
        none to who is outside it."""
        room = self.find_room(name)
        if room is None or not self.visible(member, room):
            self.sink.send(member, notice("no_such_room", room=sanitize(name)[:40]))
            return None
        return room

    def _room_to_join(self, member, name):
        """The room called name, created if need be; None (the member told why) when it
        cannot be: an invalid name, a look-alike, too many rooms, or created too fast."""
        try:
            name = normalize_room(name)
        except ValueError as exc:
            self.sink.send(member, notice("invalid_room", name=sanitize(name)[:40], reason=str(exc)))
            return None
        room = self.rooms.get(name_key(name))
        if room is not None:
            return room
        keys = lookalike_keys(name)
        other = next((room for room in self.rooms.values() if keys & room.lookalikes), None)
        if other is not None:
            self.sink.send(member, notice("room_lookalike", room=name, other=other.name))
            return None
        if len(self.rooms) >= self.options.max_rooms:
            self.sink.send(member, notice("too_many_rooms", count=len(self.rooms)))
            return None
        if self.muted(member):   # a new room's name is said in the old one
            return None
        wait = self._creation_wait(member)
        if wait:
            self.sink.send(member, notice("rooms_too_fast", seconds=math.ceil(wait)))
            return None
        log.info("%r created %s", member, name)
        return self._add_room(name)

    def _creation_wait(self, member):
        """Take a room-creation token: 0, or the seconds until the next one."""
        now = time.monotonic()
        member.room_tokens = min(ROOM_CREATE_BURST, member.room_tokens
                                 + (now - member.room_refilled) * ROOM_CREATE_RATE)
        member.room_refilled = now
        if member.room_tokens < 1:
            return (1 - member.room_tokens) / ROOM_CREATE_RATE
        member.room_tokens -= 1
        return 0

    def _enter(self, member, room, greeting=False):
        room.add(member)
        if member.announced:
            room.list(member)   # in its own list from the start
        member.rooms[room] = None
        self.sink.moved(member, room, True)
        self.sink.send(member, RoomState(room, greeting, None if member.announced else member.nick))
        if greeting:
            if self.options.rate:
                self.sink.send(member, notice("pace", burst=self.options.burst,
                                              rate="%g" % self.options.rate))
            self.sink.send(member, notice("help_hint"))
        if room.history and room.replayed:
            hidden = member.ignoring.intersection(name_key(said.nick) for said in room.recent()) \
                if member.ignoring else ()
            self.sink.send(member, History(room, frozenset(hidden)))
        if member.announced:
            self._herald(member, room)

    def _remove(self, member, room, event):
        listed = room.remove(member)
        del member.rooms[room]
        member.heralded.pop(room, None)
        self.sink.moved(member, room, False)
        if listed:
            self._publish_membership(room, event, (), member)
        if room.empty and room is not self.default_room:
            self._forget_room(room)

    def _forget_room(self, room):
        """An empty room goes; its topic is kept for its return, but only the newest
        TOPICS_KEPT topics of rooms that are gone are."""
        del self.rooms[room.key]
        self.history_budget.forget(room)
        self.store.forget(room.name)
        for kept in (self.topics, self.room_modes):
            gone = [key for key in kept if key not in self.rooms]
            for key in gone[:max(0, len(gone) - TOPICS_KEPT)]:
                del kept[key]

    @staticmethod
    def _readable_topics(topics):
        """The kept topics that are topics of rooms; the rest is skipped."""
        kept = {}
        for key, text in (topics or {}).items() if isinstance(topics, dict) else ():
            try:
                kept[name_key(normalize_room(key))] = stored_text(text)[:MAX_TOPIC]
            except (TypeError, ValueError):
                log.warning("skipped a kept topic that cannot be read: %.60r", key)
        return {key: text for key, text in kept.items() if text}

    def _herald(self, member, room):
        if member not in room.listed:
            room.list(member)
        quiet = self._big(room)
        if not quiet:
            member.heralded[room] = None
        self._publish_membership(room, Joined(room.name, member.nick, quiet, member.realname,
                                              member.away), (member,), member)

    def _big(self, room):
        return len(room.listed) > self.options.announce_limit

    def _publish_membership(self, room, event, excluded, subject=None):
        """Joins, leaves, renames, topics: through the broker, with the member they are
        about (its state goes with them to other nodes)."""
        self.broker.publish(room, event, excluded, subject)

    def publish_here(self, room, event, excluded=()):
        """A room event to this node's members: quiet ones only where one wants them,
        changes of the exception lists only to the room's operators."""
        if type(event) is ModeChanged and set(event.changes) <= set("+-" + OPERATORS_ONLY_MODES):
            excluded = tuple(excluded) + tuple(member for member in room.members
                                               if not self.may_run(member, room))
        if not getattr(event, "quiet", False) or room.hearing_quiet:
            self.sink.publish(room, event, excluded)


ROOM_MODES = {"i": "invite-only", "m": "moderated", "n": "closed to outsiders",
              "s": "secret", "t": "topic-locked"}   # with k (a key) and l (a limit)
MODE_ARGS = 4                           # changes with an argument in one /mode (IRC's MODES)
INVITES_KEPT = 1000                     # invitations a room remembers
ROOM_MASKS = 50                         # masks a room keeps in each list (IRC's MAXLIST)
MASKS_KEPT = 3000                       # ...and all rooms together, in all lists
MAX_MASK = 100                          # bytes of a ban's mask
MASK_LISTS = {"b": "bans", "e": "exceptions", "I": "invitations"}   # IRC's list modes:
# who may not come in or talk, who a ban does not cover, who needs no invitation
OPERATORS_ONLY_MODES = "eI"             # lists only a room's operators see, and hear change
MASK_LIST_NOTICES = {"b": ("room_ban_entry", "room_bans_end"),
                     "e": ("room_exception_entry", "room_exceptions_end"),
                     "I": ("room_invitation_entry", "room_invitations_end")}


def ban_mask(text):
    """A room ban's mask, nick!user@host, from what an operator typed: a nick, an
    address or network (1.2.3.4, 10.0.0.0/8; an IPv6 address stands for its /64, as for
    /ban), or a mask (* and ? as wildcards); None when it cannot be one."""
    text = "".join(sanitize(text).split())
    if not text or len(text.encode()) > MAX_MASK or text.count("!") > 1 or text.count("@") > 1:
        return None
    if "!" not in text and "@" not in text:   # a nick, or an address or network
        host = ban_host(text)
        return "*!*@" + host if host != text or is_address_block(text) else text + "!*@*"
    nick, _, rest = text.partition("!") if "!" in text else ("*", "", text)
    user, _, host = rest.rpartition("@") if "@" in rest else (rest, "", "*")
    if "/" in host and not is_address_block(host):
        return None   # a "/" is only ever a network's
    return "%s!%s@%s" % (nick or "*", user or "*", ban_host(host or "*"))


def is_address_block(text):
    """Whether text is an address or a network (as ban_host writes it or otherwise)."""
    try:
        address_block(text)
        return True
    except ValueError:
        return False


def ban_host(host):
    """The host part of a ban: an address or network as the network it covers (written
    one way), anything else as it is."""
    try:
        return str(address_block(host))
    except ValueError:
        return host


def ban_covers(mask, member, lookalikes=True):
    """Whether a room mask covers member: its nick (for a ban, a look-alike of it too,
    when the mask has no wildcards; an exception, which lets in, takes the nick
    itself) and user name, and its host as IRC shows it or its real address (a
    network covers the addresses in it)."""
    nick_user, _, host = mask.casefold().rpartition("@")
    nick, _, user = nick_user.partition("!")
    if not fnmatch.fnmatchcase((member.user or member.nick).casefold(), user):
        return False
    if "*" in nick or "?" in nick or not lookalikes:
        if not fnmatch.fnmatchcase(member.nick.casefold(), nick):
            return False
    elif not lookalike_keys(nick) & set(member.lookalikes):
        return False
    if "/" in host:
        address = ip_address(member.address)
        try:
            return address is not None and address in ipaddress.ip_network(host)
        except ValueError:   # not a network: ban_mask makes none such, but be safe
            return False
    return any(fnmatch.fnmatchcase(name, host) for name in (IRC_HOST, member.address.casefold()))


def split_modes(changes, args, letters):
    """Checked changes ("+o-k+e") and their args, cut in two: those not of letters, then
    those of letters; each part that has any, as (changes, args)."""
    parts, sign, args = ([], []), "+", list(args)
    for letter in changes:
        if letter in "+-":
            sign = letter
            continue
        takes = letter in "ovkbeI" or letter == "l" and sign == "+"
        parts[letter in letters].append((sign + letter, args.pop(0) if takes and args else None))
    return [(mode_string("".join(change for change, _ in part)),
             tuple(arg for _, arg in part if arg is not None)) for part in parts if part]


def mode_string(changes):
    """'+o+v-k' as IRC writes it: '+ov-k'."""
    out, sign = "", None
    for index in range(0, len(changes), 2):
        if changes[index] != sign:
            sign = changes[index]
            out += sign
        out += changes[index + 1]
    return out


class RoomRights:
    """A part of the Hub: what a room's own operators may do, in every dialect.

    The first member of a new room runs it. Its operators give and take operator
    status and voices, kick, invite, and set its modes with IRC's letters (/mode
    #dev +i, MODE #dev +k key): invite-only, a key, a member limit, moderated,
    topic locked, closed to outsiders, secret. Server operators may do all of it in
    every room. Modes, keys and limits are kept with the topics."""

    def may_run(self, member, room):
        return member.operator or member in room.ops

    def may_change(self, member, room, locking_mode):
        """Whether member may change what locking_mode (t: the topic, i: who comes in)
        keeps to room's operators while it is set; told why not."""
        if room not in member.rooms:
            self.sink.send(member, notice("not_in_room", room=room.name))
            return False
        if locking_mode in room.modes and not self.may_run(member, room):
            self.sink.send(member, notice("not_room_operator", room=room.name))
            return False
        return True

    def do_mode(self, member, room_name=None, changes="", args=()):
        room = self._named_room(member, room_name) if room_name else member.room
        if room is None:
            return
        if not changes:
            self.sink.send(member, notice("room_modes", room=room.name, created=int(room.created),
                                          what=self.describe_modes(room), modes=self.mode_line(
                                              room, room in member.rooms)))
            return
        letters = changes.lstrip("+")
        if letters and not args and set(letters.lstrip("-")) <= set(MASK_LISTS):
            if letters.startswith("-"):   # which mask to lift?
                self.sink.send(member, notice("usage", usage="/mode %s MASK" % letters[:2]))
            else:
                self._list_lists(member, room, letters)
            return
        if not self.may_run(member, room):
            self.sink.send(member, notice("not_room_operator", room=room.name))
            return
        changes, args = self._checked_modes(member, room, changes, list(args))
        if changes:
            self.apply_modes(room, changes, args, member.nick)
            for part, part_args in split_modes(changes, args, OPERATORS_ONLY_MODES):
                self._publish_membership(room, ModeChanged(room.name, member.nick, part,
                                                           part_args), ())
            if any(letter in changes for letter in "imnstklbeI"):
                self._keep_modes(room)

    def _list_lists(self, member, room, letters):
        """/mode +b, +e, +I (IRC: MODE #room b): the exceptions only to who runs it."""
        for letter in dict.fromkeys(letters):
            if letter in OPERATORS_ONLY_MODES and not self.may_run(member, room):
                self.sink.send(member, notice("not_room_operator", room=room.name))
            else:
                self._list_masks(member, room, letter)

    def _keep_modes(self, room):
        """Modes, key, limit and bans outlive the room's members (with the topics)."""
        self.room_modes.pop(room.key, None)   # the newest last, as topics
        if room.modes != "n" or room.password or room.limit or any(room.masks.values()):
            kept = {"modes": room.modes, "key": room.password, "limit": room.limit}
            for letter, name in MASK_LISTS.items():
                kept[name] = [[mask, by, since] for mask, (by, since) in room.masks[letter].items()]
            self.room_modes[room.key] = kept
        self._save_state()

    def _list_masks(self, member, room, letter):
        entry, end = MASK_LIST_NOTICES[letter]
        for mask, (by, since) in room.masks[letter].items():
            self.sink.send(member, notice(entry, room=room.name, mask=mask, by=by or "?",
                                          since=int(since)))
        self.sink.send(member, notice(end, room=room.name))

    def banned_from(self, member, room):
        """Whether one of room's bans covers member and none of its exceptions does
        (server operators: never)."""
        return (bool(room.masks["b"]) and not member.operator
                and self.covered(member, room, "b") and not self.covered(member, room, "e"))

    @staticmethod
    def covered(member, room, letter):
        """Whether a mask of room's list letter covers member (look-alikes: by a ban only)."""
        return any(ban_covers(mask, member, letter == "b") for mask in room.masks[letter])

    def _checked_modes(self, member, room, changes, args):
        """The changes member may make, as IRC writes them, and their arguments."""
        sign, done, taken, with_args, added = "+", "", [], 0, set()
        for letter in changes[:40]:
            if letter in "+-":
                sign = letter
                continue
            arg = None
            if letter in "ovklbeI" and (sign == "+" or letter in "ovbeI"):
                if not args or with_args >= MODE_ARGS:
                    continue
                with_args, value = with_args + 1, args.pop(0)
                arg = self._mode_argument(member, room, letter, value)
                if arg is None or letter in MASK_LISTS and not self._mask_change(
                        member, room, letter, sign, arg, added):
                    continue
            elif letter == "k":
                arg = "*"   # -k takes the key, or anything
                if args:
                    args.pop(0)
            elif letter not in ROOM_MODES and letter != "l":
                self.sink.send(member, notice("unknown_mode", mode=sanitize(letter)))
                continue
            done += sign + letter
            if arg is not None:
                taken.append(arg)
        return mode_string(done), taken

    def _mode_argument(self, member, room, letter, value):
        if letter in "ov":
            target = self.find_member(value)
            if target is None:
                self.sink.send(member, notice("no_such_nick", nick=sanitize(value)[:40]))
                return None
            if target not in room.listed:
                self.sink.send(member, notice("not_in_that_room", target=sanitize(value)[:40],
                                              room=room.name))
                return None
            return target.nick
        if letter == "k":
            return "".join(sanitize(value).split())[:23] or None
        if letter in MASK_LISTS:
            return self._mask_argument(member, letter, value)
        limit = number_word(value)
        return str(limit) if limit and limit < 100000 else None

    def _mask_argument(self, member, letter, value):
        """The mask to put in or take from a room's list letter (None: there is none,
        member told why)."""
        mask = ban_mask(value)
        if mask is None:
            self.sink.send(member, notice("usage", usage="/mode +%s NICK|ADDRESS|NETWORK|MASK"
                                          % letter))
        return mask

    def _mask_change(self, member, room, letter, sign, mask, added):
        """Whether sign+letter mask changes room's list, within the limits; added holds
        the (letter, mask) this command adds already, and gains this one."""
        listed = mask in room.masks[letter] or (letter, mask) in added
        if (sign == "-") != listed:
            return False   # no such mask to lift, or that mask is set already
        if sign == "+":
            if len(room.masks[letter]) + sum(1 for kind, _ in added if kind == letter) >= \
                    ROOM_MASKS:
                self.sink.send(member, notice("room_list_full", room=room.name, letter=letter,
                                              count=ROOM_MASKS, list=MASK_LISTS[letter]))
                return False
            if self._masks_kept() + len(added) >= MASKS_KEPT:
                self.sink.send(member, notice("masks_kept_full", room=room.name, letter=letter,
                                              count=MASKS_KEPT))
                return False
            added.add((letter, mask))
        return True

    def _masks_kept(self):
        """The masks of every room's lists (room_modes keeps them all, gone rooms' too)."""
        return sum(len(kept[name]) for kept in self.room_modes.values()
                   for name in MASK_LISTS.values())

    def apply_modes(self, room, changes, args, by=""):
        """Make changes (checked, as a ModeChanged carries them) to room."""
        args, sign = list(args), "+"
        for letter in changes:
            if letter in "+-":
                sign = letter
            elif letter in MASK_LISTS:
                mask, masks = args.pop(0) if args else None, room.masks[letter]
                if sign == "-":
                    masks.pop(mask, None)
                elif mask not in masks and len(masks) < ROOM_MASKS:
                    masks[mask] = (by, self.clock())
            elif letter in "ov":
                target = self.find_member(args.pop(0)) if args else None
                if target is not None and target in room.listed:
                    rights = room.ops if letter == "o" else room.voiced
                    if sign == "+":
                        rights[target] = None
                    else:
                        rights.pop(target, None)
                    room.regrade(target)
                    if target.remote is None:   # other nodes keep its rank with its state
                        self.directory.changed(target)
            elif letter == "k":
                key = args.pop(0) if args else None
                room.password = key if sign == "+" else None
            elif letter == "l":
                room.limit = int(args.pop(0)) if sign == "+" and args else None
            elif letter in ROOM_MODES:
                room.modes = "".join(sorted(set(room.modes) | {letter})) if sign == "+" \
                    else room.modes.replace(letter, "")
        room.cache.clear()

    @staticmethod
    def readable_modes(kept):
        """The kept modes of rooms that are right (as the data dir or Redis had them)."""
        readable = {}
        for key, record in kept.items() if isinstance(kept, dict) else ():
            try:
                modes, password, limit = record["modes"], record.get("key"), record.get("limit")
                if not isinstance(modes, str) or not set(modes) <= set(ROOM_MODES) or \
                        password is not None and not re.fullmatch(r"\S{1,23}", password) or \
                        limit is not None and (isinstance(limit, bool) or not isinstance(
                            limit, int) or not 0 < limit < 100000):
                    raise ValueError(record)
                readable[name_key(normalize_room(key))] = dict(
                    {name: RoomRights.readable_masks(record.get(name, []))
                     for name in MASK_LISTS.values()},
                    modes="".join(sorted(set(modes))), limit=limit,
                    key=sanitize(password) if password else None)
            except (TypeError, ValueError, KeyError, AttributeError):
                log.warning("skipped the kept modes of a room that cannot be read: %.60r", key)
        return readable

    def restore_modes(self, room):
        kept = self.room_modes.get(room.key)
        if kept:
            room.modes, room.password, room.limit = kept["modes"], kept["key"], kept["limit"]
            room.masks = {letter: {mask: (by, since) for mask, by, since in kept[name]}
                          for letter, name in MASK_LISTS.items()}

    @staticmethod
    def readable_masks(kept):
        """[[mask, by, since], ...] as kept, checked (ValueError when not right)."""
        if not isinstance(kept, list):
            raise ValueError(kept)
        masks = []
        for mask, by, since in kept[:ROOM_MASKS]:
            if ban_mask(mask) != mask or not isinstance(by, str) or \
                    finite_time(since) is None:
                raise ValueError(mask)
            masks.append([mask, sanitize(by)[:MAX_NICK], since])
        return masks

    @staticmethod
    def mode_line(room, insider):
        """IRC's "+ntk key": the key only to its members."""
        modes = "+" + room.modes + ("k" if room.password else "") + ("l" if room.limit else "")
        shown = ([room.password if insider else "*"] if room.password else []) + \
            ([str(room.limit)] if room.limit else [])
        return " ".join([modes] + shown)

    @staticmethod
    def describe_modes(room):
        what = [ROOM_MODES[letter] for letter in room.modes]
        what += ["with a key"] if room.password else []
        what += ["limited to %d" % room.limit] if room.limit else []
        return ", ".join(what) or "open"

    def admission(self, member, room, key=""):
        """The reply that keeps member out of room (invite-only, key, limit), or None.
        Server operators always enter; an invitation opens an invite-only room once."""
        if member.operator:
            return None
        if self.banned_from(member, room):
            return notice("banned_from_room", room=room.name)
        if "i" in room.modes and member.key not in room.invited and not (
                room.masks["I"] and self.covered(member, room, "I")):
            return notice("invite_only", room=room.name)
        if room.password and key != room.password:
            return notice("bad_room_key", room=room.name)
        if room.limit and len(room.listed) >= room.limit:
            return notice("room_full", room=room.name)
        room.invited.discard(member.key)
        return None

    def do_invite(self, member, nick, room_name=None):
        room = self._named_room(member, room_name) if room_name else member.room
        if room is None or not self.may_change(member, room, "i"):
            return
        target = self._online(member, nick, "/invite NICK [ROOM]")
        if target is None:
            return
        if target in room.listed or target in room.members:
            self.sink.send(member, notice("already_there", target=target.nick, room=room.name))
            return
        if target.remote is None:
            self.invited(target, room, member.nick)
        else:
            self.broker.invite(target, room, member.nick)   # its node lets it in
        self.sink.send(member, notice("invite_sent", target=target.nick, room=room.name))
        self.publish_here(room, Invited(room.name, member.nick, target.nick), (member,))

    def invited(self, target, room, by):
        """A member here may enter room once, invite-only or not."""
        if len(room.invited) >= INVITES_KEPT:
            room.invited.pop()
        room.invited.add(target.key)
        self.sink.send(target, notice("invited_you", nick=by, room=room.name))

    def do_kick_from(self, member, room_name, name, reason=""):
        """Put a member out of a room (one in a room at a time goes back to the default
        room; out of the default room, out of the chat)."""
        room = self._named_room(member, room_name)
        if room is None:
            return
        if not self.may_run(member, room):
            self.sink.send(member, notice("not_room_operator", room=room.name))
            return
        target = self._online(member, name, "/kick NICK [REASON]")
        if target is None:
            return
        if target not in room.listed and target not in room.members:
            self.sink.send(member, notice("not_in_that_room", target=target.nick, room=room.name))
            return
        reason = tidy_text(reason)[:MAX_REASON] or "no reason given"
        log.info("%s kicked %r from %s: %s", member.nick, target, room.name, reason)
        event = Kicked(room.name, target.nick, member.nick, reason)
        if target.remote is not None:
            self.broker.expel(target, member.nick, reason, room)   # its node puts it out
        else:
            self.kicked_out(target, room, event)

    def kicked_out(self, target, room, event):
        """A member here was kicked from room (from this node or another)."""
        if room is self.default_room and not target.multi_room:
            self._expel(target, event.by, event.reason)
            return
        self.sink.send(target, event)
        self._remove(target, room, event)
        if not target.multi_room:
            self._enter(target, self.default_room)


class Watches:
    """A part of the Hub: nicks members watch (IRC's MONITOR), to be told when one
    comes online or goes, here or on another node. A nick, not a mask: nobody can
    follow someone through a change of nick."""

    def do_watch(self, member, action, names=""):
        """+ watch names (told which are online), - stop, C clear, L list, S status."""
        watching = member.watching
        if action == "+":
            if watching is None:
                watching = member.watching = {}
            asked = dict(filter(None, (self._watch_key(member, name) for name in
                                       names.split(",")[:2 * WATCH_LIMIT] if name)))
            new = [key for key in asked if key not in watching]
            room = max(0, WATCH_LIMIT - len(watching))
            for key in new[:room]:
                watching[key] = asked[key]
                self.watchers.setdefault(key, set()).add(member)
            for run in nick_runs(asked[key] for key in new[room:]):
                self.sink.send(member, notice("watch_list_full", limit=WATCH_LIMIT, nicks=run))
            self._watch_status(member, [key for key in asked if key in watching])
        elif action == "-":
            for name in names.split(","):
                self._unwatch(member, name_key(name))
        elif action == "C":
            self.forget_watches(member)
        elif action == "L":
            for run in nick_runs((watching or {}).values()):
                self.sink.send(member, notice("watch_list", nicks=run))
            self.sink.send(member, notice("watch_list_end"))
        elif action == "S":
            self._watch_status(member, list(watching or ()))

    def _watch_key(self, member, name):
        """(key, nick) of a nick to watch, or None (told why)."""
        key = self._nick_key(member, name, "MONITOR + NICK")
        return key and (key, normalize_nick(name))

    def _watch_status(self, member, keys):
        online = [self.members[key].nick for key in keys if key in self.members]
        offline = [member.watching[key] for key in keys if key not in self.members]
        for shape, nicks in (("watched_online", online), ("watched_offline", offline)):
            for run in nick_runs(nicks):
                self.sink.send(member, notice(shape, nicks=run))

    def _unwatch(self, member, key):
        if member.watching and member.watching.pop(key, None) is not None:
            watchers = self.watchers[key]
            watchers.discard(member)
            if not watchers:
                del self.watchers[key]

    def forget_watches(self, member):
        for key in list(member.watching or ()):
            self._unwatch(member, key)

    def tell_watchers(self, key, nick, online):
        for watcher in self.watchers.get(key, ()):
            self.sink.send(watcher, notice("watched_online" if online else "watched_offline",
                                           nicks=nick))


def nick_runs(nicks, separator=","):
    """Nicks, joined in runs of at most NICK_RUN bytes, so that each fits a line (IRC's
    NAMES, MONITOR's 730-732)."""
    runs, size = [], NICK_RUN
    for nick in nicks:
        if size + 1 + len(nick.encode()) > NICK_RUN:
            runs.append([])
            size = -1
        runs[-1].append(nick)
        size += 1 + len(nick.encode())
    return [separator.join(run) for run in runs]


class Hub(Moderation, Names, Rooms, RoomRights, Watches):
    """The chat: nicks, rooms and every command, for members of every dialect.

    sink receives what happens: publish(room, event, exclude) for room events,
    send(member, event) for replies, moved(member, room, entered) when a
    member's rooms change, close(member, reason, farewell) to let one go,
    call_later(delay, function, *args), and answer_later(member, callback): callback,
    made to answer member's command when the store calls it in a later turn.
    """

    def __init__(self, options, sink, name, clock=time.time, store=None, broker=None,
                 directory=None):
        self.options = options
        self.sink = sink
        self.name = name
        self.clock = clock
        self.store = store or Store()   # what survives a restart: history, topics, bans
        self.broker = broker or Broker()            # where room lines and events go
        self.directory = directory or Directory()   # who is online on other nodes
        self.members = {}               # nick key -> Member
        self.lookalikes = {}            # skeleton -> Member
        self.rooms = {}                 # room key -> Room
        self.guesses = GuessThrottle()
        self.op_guesses = GuessThrottle()
        self.ignored_by = {}            # nick key -> members that ignore that nick
        self.watchers = {}              # nick key -> members here that watch that nick
        state = self.store.load_state()
        self.topics = self._readable_topics(state.get("topics"))   # room key -> topic
        self.room_modes = self.readable_modes(state.get("rooms"))   # room key -> its modes
        self.bans = Sanctions("ban", state.get("bans"))
        self.mutes = Sanctions("mute", state.get("mutes"))
        self.recent = collections.OrderedDict()   # nick key -> address, of departed members
        self.was = collections.deque(maxlen=self.RECENT)   # (nick, user, realname, until)
        self.history_budget = HistoryBudget(options.history_memory)
        self.store_reads = TokenBucket(STORE_READS, STORE_READS)   # see _may_read
        self.state_due = False          # a change of the kept state waits: see _save_state
        self.reserved = frozenset().union(*map(lookalike_keys, RESERVED_NICKS + (name,)))
        self._guests = itertools.count(self.directory.first_guest)
        self.lines_told = 0             # room lines told to the members here
        self._uids = itertools.count(1)
        self._message_ids = itertools.count(1)
        self._id_token = os.urandom(4).hex()   # this node's, for the ids of new_msgid
        self.broker.attach(self)
        self.directory.attach(self)
        self.default_room = self._add_room(normalize_room(options.room))

    # Arriving and leaving

    def check_password(self, ip, password):
        """("ok", 0), ("wrong", 0), or ("wait", seconds) when ip guessed wrong too often."""
        return self._guess(self.guesses, ip, password, self.options.password, "passwords")

    @staticmethod
    def _guess(throttle, ip, password, right, what):
        wait = throttle.wait(ip)
        if wait:
            return "wait", wait
        if hmac.compare_digest(password.encode(), right.encode()):
            return "ok", 0
        if throttle.failed(ip):
            log.warning("%s: %d wrong %s within %.0f s; its next attempts wait",
                        ip, throttle.limit, what, throttle.window)
        return "wrong", 0

    def nick_problem(self, nick, member=None):
        """The reply refusing nick (taken, a look-alike of a nick online, or of a name
        kept for services and the server), or None."""
        if not self.reserved.isdisjoint(lookalike_keys(nick)):
            return notice("nick_reserved", nick=nick)
        holder = self.members.get(name_key(nick))
        if holder is not None and holder is not member:
            return notice("nick_taken", nick=nick)
        for key in lookalike_keys(nick):
            holder = self.lookalikes.get(key)
            if holder is not None and holder is not member:
                return notice("nick_lookalike", nick=nick, other=holder.nick)
        return None

    def claim(self, name, member=None):
        """(nick, None) when name is a free valid nick; (None, the reply why not)."""
        try:
            nick = normalize_nick(name)
        except ValueError as exc:
            return None, notice("invalid_nick", name=sanitize(name)[:40], reason=str(exc))
        problem = self.nick_problem(nick, member)
        return (None, problem) if problem else (nick, None)

    def admit(self, endpoint, nick=None, multi_room=False, hears_quiet=False, realname="",
              address="", rooms=None):
        """Greet a newcomer under nick, or as a guest (told why when nick was refused),
        into the default room, or the rooms (name, key) it asked for (IRC: none). A
        guest's arrival is told once it picks a nick, speaks or
        asks for something, so people appear once, under their name, and a connection
        that never says anything (a browser's spare socket) never appears."""
        member = Member(endpoint, multi_room, hears_quiet, realname, address)
        member.mute, problem = self.mute_for(address), None
        if member.mute is not None:   # a chosen nick or realname would say something
            nick, member.realname = None, ""
        if nick is not None:
            nick, problem = self.claim(nick)
        self._register(member, nick or self._guest_nick())
        member.announced = bool(nick)   # entering, it is heralded at once
        self.sink.send(member, Welcome(self.name, member.nick))
        if rooms is None:
            self._enter(member, self.default_room, greeting=True)
        for name_and_key in rooms or ():
            self.do_join(member, *name_and_key)
        if member.announced and not member.rooms:   # its rooms would have told the others
            self.directory.changed(member)
        if problem:
            self.sink.send(member, problem)
        if member.mute is not None:   # its client must know before it speaks
            self.sink.send(member, notice("muted_you", by=member.mute.by,
                                          span=span_text(member.mute.until, self.clock())))
        return member

    def announce(self, member):
        """Tell member's rooms that it has arrived, under the nick it has by now."""
        if member.announced or self.members.get(member.key) is not member:
            return
        member.announced = True
        for room in member.rooms:
            self._herald(member, room)
        if not member.rooms:
            self.directory.changed(member)

    def leave(self, member, reason):
        """member leaves the chat (its connection is closing): every room is told (of a
        muted member, not its own words)."""
        self.forget_watches(member)
        if self.members.get(member.key) is not member:
            return
        if member.mute is not None and self.muted(member, told=False):
            reason = reason.partition(":")[0]
        self._depart(member, lambda room, uid: Quit(
            room.name, member.nick, reason, room not in member.heralded or self._big(room), uid))

    def _depart(self, member, event_for, kicked=False):
        """member is gone from the chat: each of its rooms gets event_for(room, uid) (one
        uid, so a member of several hears it once), and its nick and ignores are let go."""
        uid = next(self._uids)
        for room in list(member.rooms):   # nobody is told of a guest that never showed itself
            self._remove(member, room, event_for(room, uid) if member.announced else None)
        self._unregister(member)
        self.directory.gone(member)
        self._remember_departure(member, kicked)
        for key in list(member.ignoring):
            self._stop_ignoring(member, key)

    # Commands

    def do_nick(self, member, name):
        if not name:
            self.sink.send(member, notice("usage", usage="/nick NAME (you are %s)" % member.nick))
            return
        nick, problem = self.claim(name, member)
        if problem:
            self.sink.send(member, problem)
            return
        if nick != member.nick and self.muted(member):   # a new nick says something too
            return
        self.rename(member, nick, notice("renamed_self", nick=nick, old=member.nick))
        self.announce(member)

    def remember_nick(self, member):
        """What WHOWAS tells of a nick that was: who went by it, and when."""
        self.was.appendleft((member.nick, member.user, member.realname, self.clock()))

    def nick_lost(self, member):
        """Another node's member took member's nick first: member becomes a guest."""
        if self.members.get(member.key) is member:
            guest = self._guest_nick()
            self.rename(member, guest, notice("nick_collision", nick=member.nick, new=guest))

    def rename(self, member, nick, told):
        old, old_key = member.nick, member.key
        if member.announced:
            self.remember_nick(member)
        self._register(member, nick)
        self._follow_rename(old_key, member.key)
        log.info("%r was %s", member, old)
        self.sink.send(member, told)
        if old != nick:
            uid = next(self._uids)
            for room in member.rooms:
                if member not in room.listed:
                    continue
                room.changed()
                quiet = room not in member.heralded or self._big(room)
                self._publish_membership(room, Renamed(room.name, old, nick, quiet, uid),
                                         (member,), member)
        if member.announced:
            self.directory.changed(member)

    def do_say(self, member, text, action=False, room=None, as_notice=False, tags=""):
        """A public line in room (by default the member's room): not for those who ignore
        its speaker."""
        room = room or member.room
        text = tidy_text(text)
        if text and self._may_speak(member, room):
            self.broker.line(room, member, text, action, as_notice, tags)

    def do_signal(self, member, room, tags):
        """Client tags alone (a typing notice, a reaction) to a room: the same rules as a
        line, since a reaction says something too."""
        if self._may_speak(member, room):
            self.broker.signal(room, Signal(room.name, member.nick, tags, self.new_msgid(),
                                            self.clock(), member.bot),
                               self._not_told(room, member))

    def deliver_signal(self, room, event):
        """Another node's Signal, to the members here: not to who ignores its sender."""
        self.publish_here(room, event, self._not_told(room, None, event.nick))

    def _may_speak(self, member, room):
        """Whether member may say something in room now (told why not, unless muted);
        if it may, it has arrived and is active."""
        if room is None or member not in room.members and "n" in room.modes:
            self.sink.send(member, notice("error", text="you are not in %s" % (
                room.name if room else "a room")))
            return False
        if self.muted(member):
            return False
        if "m" in room.modes and not room.rank(member):
            self.sink.send(member, notice("moderated", room=room.name))
            return False
        if room.masks["b"] and not room.rank(member) and self.banned_from(member, room):
            self.sink.send(member, notice("banned_in_room", room=room.name))
            return False
        self.announce(member)
        member.active = time.monotonic()
        return True

    def new_msgid(self):
        """An id for a message that has no number in a room: unique on every node."""
        return "m%d-%s" % (next(self._message_ids), self._id_token)

    def backfill(self, room, events):
        """Older lines of a room, read late (from another node's time): put before the
        ones heard since, none twice."""
        heard = {said.seq for said in room.history}
        merged = sorted([said for said in events if said.seq not in heard] + list(room.history),
                        key=lambda said: said.seq)
        self.history_budget.forget(room)
        room.history.clear()
        for said in merged[-room.history.maxlen:] if room.history.maxlen else ():
            self.history_budget.remember(room, said)
        room.seq = max([room.seq] + [said.seq for said in merged])

    def deliver_line(self, room, event, speaker=None):
        """A room's line, numbered, to its members here: not to its speaker (when here),
        nor to who ignores it; kept in its history."""
        self.sink.publish(room, event, self._not_told(room, speaker, event.nick))
        self.lines_told += 1
        if event.seq > room.seq:
            room.seq = event.seq
        self.store.append(room.name, event)
        self.history_budget.remember(room, event)

    def _not_told(self, room, speaker, nick=None):
        """The members here not told what speaker (here, or elsewhere: None, and its nick)
        says in room: itself, unless it takes echoes, and who ignores it."""
        excluded = (speaker,) if speaker is not None and speaker in room.members and \
            not speaker.echo else ()
        ignorers = self.ignored_by.get(speaker.key if speaker is not None else name_key(nick))
        if ignorers:
            excluded += tuple(other for other in ignorers if room in other.rooms)
        return excluded

    def do_me(self, member, text):
        if not text.strip():
            self.sink.send(member, notice("usage", usage="/me ACTION"))
            return
        self.do_say(member, text.strip(), action=True)

    def do_msg(self, member, target_name, text, action=False, as_notice=False, tags=""):
        """A private message; without text, client tags alone (see Signal)."""
        typed, text = text, tidy_text(text)
        if not target_name or not text and (typed or not tags):
            self.sink.send(member, notice("usage", usage="/msg NICK TEXT"))
            return
        self.announce(member)
        target = self.find_member(target_name)
        if target is None:
            self.sink.send(member, notice("no_such_nick", nick=sanitize(target_name)[:40]))
            return
        if not target.operator and self.muted(member):
            return
        member.active = time.monotonic()
        now = self.clock()
        said = Private(member.nick, target.nick, text, action, False, now, as_notice, tags,
                       self.new_msgid(), member.bot)
        if target.remote is not None and not self.broker.linked:
            self.sink.send(member, notice("unreachable", nick=target.nick))
            return
        if target.remote is not None:   # its node knows whom it ignores
            self.broker.forward(target, said)
        elif member.key not in target.ignoring:   # the ignored are not told
            self.sink.send(target, said)
        self.sink.send(member, dataclasses.replace(said, sent=True))
        if target.away and text and not as_notice:   # no program answers a NOTICE
            self.sink.send(member, notice("is_away", nick=target.nick, text=target.away))

    def do_who(self, member, room_name=None):
        self.announce(member)
        room = self._named_room(member, room_name) if room_name else member.room
        if room is not None:
            self.sink.send(member, WhoList(room, room in member.rooms))

    def do_help(self, member):
        self.announce(member)
        self.sink.send(member, notice("help"))

    def do_quit(self, member, reason=""):
        reason = tidy_text(reason)[:MAX_REASON]
        self.sink.close(member, "quit: " + reason if reason else "quit", notice("bye"))

    def do_away(self, member, text=""):
        if text.strip() and self.muted(member):
            return
        member.away = tidy_text(text)[:MAX_REASON] or None
        self.sink.send(member, notice("away_set", text=member.away) if member.away
                       else notice("away_cleared"))
        self.tell_change(member, (member,))
        self.directory.changed(member)

    def set_bot(self, member, bot):
        """member says it is a program (or no longer): its messages are marked, and WHO
        and WHOIS say so, on every node."""
        member.bot = bot
        for room in member.rooms:
            room.cache.clear()   # WHO shows bots
        self.directory.changed(member)

    def do_setname(self, member, realname):
        """A new real name (IRCv3 setname); the muted keep theirs."""
        if self.muted(member):
            return False
        member.realname = realname
        self.tell_change(member, (member,), realname)
        self.directory.changed(member)
        return True

    def tell_change(self, member, excluded=(), realname=None):
        """member's rooms here hear that it went away or came back, or (realname) took
        another real name."""
        uid = next(self._uids)
        for room in member.rooms:
            room.cache.clear()   # WHO shows who is away, and real names
            if member in room.listed:
                self.publish_here(room, MemberChanged(room.name, member.nick, member.away,
                                                      realname, uid), excluded)

    def do_ignore(self, member, name):
        key = self._nick_key(member, name, "/ignore NICK")
        if key is None or key == member.key:
            return
        if member.ignoring is NOBODY:
            member.ignoring = set()
        member.ignoring.add(key)
        self.ignored_by.setdefault(key, set()).add(member)
        self.sink.send(member, notice("ignoring", nick=sanitize(name)[:MAX_NICK]))

    def do_unignore(self, member, name):
        key = self._nick_key(member, name, "/unignore NICK")
        if key is not None:
            self._stop_ignoring(member, key)
            self.sink.send(member, notice("unignoring", nick=sanitize(name)[:MAX_NICK]))

    def _stop_ignoring(self, member, key):
        if key in member.ignoring:
            member.ignoring.discard(key)
        ignorers = self.ignored_by.get(key)
        if ignorers is not None:
            ignorers.discard(member)
            if not ignorers:
                del self.ignored_by[key]

    def do_whois(self, member, name):
        target = self._online(member, name, "/whois NICK")
        if target is not None:
            rooms = [room for room in target.rooms if self.visible(member, room) and (
                not target.invisible or room in member.rooms or member.operator)]
            self.sink.send(member, Whois(
                target.nick, target.realname, tuple(room.name for room in rooms),
                time.monotonic() - target.active, target.away, target.operator,
                target.address if member.operator else None, target.user,
                tuple(room.rank(target) for room in rooms),
                self.clock() - (time.monotonic() - target.since), target.bot))

    def seen_by(self, member, other):
        """Whether member may find other by a mask: not an invisible one, unless they
        share a room (or member is a server operator)."""
        return not other.invisible or member.operator or other is member or \
            any(room in member.rooms for room in other.rooms)


@dataclass(frozen=True)
class MemberState:
    """What a node tells of one of its announced members, checked: see ClusterView."""
    cid: str
    node: str
    nick: str
    rooms: tuple
    operator: bool = False
    away: Optional[str] = None
    realname: str = ""
    address: str = ""
    user: str = ""
    ranks: dict = field(default_factory=dict)   # room key -> "@", "+" or "" there
    bot: bool = False


class ClusterView:
    """The members on other nodes, as their nodes tell of them: each a Member without
    a connection, listed in rooms and found by nick, never a hearer (its own node
    tells it). A broker and a directory feed this with facts already checked, and it
    keeps the hub's lists and tells the members here what happened. It knows nothing
    of how facts travel."""

    UIDS = 4096                 # other nodes' event uids remembered, as this hub's own

    def __init__(self, hub):
        self.hub = hub
        self.remote = {}        # cid -> Member on another node
        self._uids = collections.OrderedDict()   # (node, uid) -> uid here

    def local_uid(self, node, uid):
        """The uid here of another node's event uid: one member's quit, told in several
        rooms, is heard once here too."""
        if not uid:
            return 0
        key = (node, uid)
        mine = self._uids.get(key)
        if mine is None:
            mine = self._uids[key] = next(self.hub._uids)
            while len(self._uids) > self.UIDS:
                self._uids.popitem(last=False)
        return mine

    def upsert(self, state, event=None, told=False):
        """A member elsewhere is as state says. event (for the rooms here) is what
        changed it; without one, changes are told as joins, leaves and renames when
        told (after the nodes were apart)."""
        member = self.remote.get(state.cid)
        if member is None and len(self.remote) >= self.hub.options.max_clients * REMOTE_FACTOR:
            log.warning("over %d members on other nodes: %s is not listed here",
                        len(self.remote), state.nick)
            return
        known = member is not None
        if member is None:
            member = self.remote[state.cid] = Member(None, multi_room=True)
            member.remote, member.cid, member.announced = state.node, state.cid, True
        away_changed = known and member.away != state.away
        realname_changed = known and member.realname != state.realname
        if known and member.bot != state.bot:
            for room in member.rooms:
                room.cache.clear()   # WHO shows bots
        member.realname, member.address, member.away = state.realname, state.address, state.away
        member.user, member.bot = state.user, state.bot
        if member.nick != state.nick:
            self._rename(member, state.nick, told and event is None)
        if member.operator != state.operator:
            self._set_operator(member, state.operator)
        wanted = {name_key(name): name for name in state.rooms}
        for room in list(member.rooms):
            if room.key not in wanted:
                self._leave(member, room, Parted(room.name, member.nick, quiet=self.hub._big(
                    room)) if told and event is None else None)
        for key, name in wanted.items():
            room = self.hub.rooms.get(key)
            if room is None and len(self.hub.rooms) >= self.hub.options.max_rooms * 2:
                continue   # rooms elsewhere are bounded too (each node has --max-rooms)
            room = room or self.hub._add_room(name)
            if room not in member.rooms:
                member.rooms[room] = None
                room.list(member)
                if told and event is None:
                    self.hub.publish_here(room, Joined(room.name, member.nick, self.hub._big(room),
                                                       member.realname, member.away))
            self._set_rank(member, room, state.ranks.get(key, ""))
        if away_changed or realname_changed:
            self.hub.tell_change(member, (), state.realname if realname_changed else None)
        if event is not None:
            self.tell(event)

    def tell(self, event):
        """Another node's room event, to the members here."""
        room = self.hub.rooms.get(name_key(event.room))
        if room is None:
            return
        if isinstance(event, Signal):
            self.hub.deliver_signal(room, event)
            return
        if isinstance(event, ModeChanged):
            self.hub.apply_modes(room, event.changes, event.args, event.nick)
        if isinstance(event, TopicSet):
            room.topic = event.text or None
            room.topic_by, room.topic_at = event.nick, self.hub.clock()
            self.hub.topics.pop(room.key, None)
            if room.topic:
                self.hub.topics[room.key] = room.topic
        self.hub.publish_here(room, event)

    def found_again(self, key):
        """A nick that a member here held is free: the member elsewhere that won it is
        found by it here too."""
        for member in self.remote.values():
            if member.key == key and self.hub.members.get(key) is not member:
                self.hub.enter_directory(member, member.nick)

    def gone(self, cid, reason="left"):
        """A member elsewhere left the chat; rooms it was still listed in are told."""
        member = self.remote.pop(cid, None)
        if member is None:
            return
        uid = next(self.hub._uids)
        for room in list(member.rooms):
            self._leave(member, room, Quit(room.name, member.nick, reason, self.hub._big(room),
                                           uid))
        self.hub._unregister(member)
        self.hub._remember_departure(member)

    def node_lost(self, node):
        """A node stopped answering: its members are gone."""
        lost = [cid for cid, member in self.remote.items() if member.remote == node]
        for cid in lost:
            self.gone(cid, "server lost")
        return len(lost)

    def resync(self, states, told=True):
        """After the nodes were apart: the members elsewhere are exactly states."""
        known = {state.cid for state in states}
        for cid in [cid for cid in self.remote if cid not in known]:
            self.gone(cid)
        for state in states:
            self.upsert(state, told=told)

    def tell_here(self, event):
        """A reply for every member of this node (the link to the others changed)."""
        for member in self.hub.local_members():
            self.hub.sink.send(member, event)

    def private(self, member, event):
        """Another node's member said something to one here."""
        if name_key(event.sender) not in member.ignoring:
            self.hub.sink.send(member, event)

    def _rename(self, member, nick, told):
        old = member.nick
        self.hub.enter_directory(member, nick)
        if old and told:
            uid = next(self.hub._uids)
            for room in member.rooms:
                room.changed()
                self.hub.publish_here(room, Renamed(room.name, old, nick, self.hub._big(room),
                                                    uid))
        for room in member.rooms:
            room.changed()

    @staticmethod
    def _set_rank(member, room, rank):
        """A member elsewhere is an operator of room ("@"), has a voice there ("+"), or
        neither, as its node says."""
        if rank == room.rank(member) or rank == "@" and member.operator:
            return
        for rights, mark in ((room.ops, "@"), (room.voiced, "+")):
            if rank == mark:
                rights[member] = None
            else:
                rights.pop(member, None)
        room.regrade(member)

    @staticmethod
    def _set_operator(member, operator):
        member.operator = operator
        for room in member.rooms:
            if operator:
                room.operators[member] = None
            else:
                room.operators.pop(member, None)
            room.changed()

    def _leave(self, member, room, event):
        room.remove(member)
        del member.rooms[room]
        if event is not None:
            self.hub.publish_here(room, event)
        if room.empty and room is not self.hub.default_room:
            self.hub._forget_room(room)


# --- Persistence ---

class StoreError(OSError):
    """The data directory cannot be used at all (in use, not a directory, ...)."""


class Store:
    """What should survive a restart, kept nowhere: without --data-dir the chat lives in
    memory. FileStore keeps it on disk."""

    def load_state(self):
        """The state kept from before ({"topics": ..., "bans": ..., "mutes": ...}), as it
        was read: the hub checks every part of it."""
        return {}

    def save_state(self, state):
        pass

    def history(self, room, count):
        """The last count public lines (Said events) of room, from before."""
        return []

    def lines(self, room, before, after, count, reply):
        """reply(events), in the loop: count of room's lines numbered after `after` (the
        first ones), or else before `before` (the last ones; None: the latest), in any
        order; reply(None) when too many reads are under way. Kept nowhere, there are
        none."""
        reply(())

    def append(self, room, event):
        pass

    def forget(self, room):
        """room is gone (it has no members): let go of what it holds open."""

    def flush(self):
        """Write what the turn said: before the turn's output goes out."""

    @property
    def unsynced(self):
        """Whether written data waits for sync()."""
        return False

    def sync(self):
        pass

    def close(self):
        pass


# Opening a file never follows a link planted in the data directory: it fails (ELOOP)
# instead of writing where the link points. Windows has no O_NOFOLLOW (and creating
# links there needs privileges).
# O_NONBLOCK: a FIFO planted there opens at once (and is refused) instead of stalling.
PRIVATE_OPEN = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK if hasattr(os, "O_NOFOLLOW") else 0
TAIL_CHUNK = 64 * 1024                # bytes read at a time from a log's end
RECORD_LIMIT = 64 * 1024              # bytes of one record read back; a longer one is skipped
STATE_LIMIT = 8 << 20                 # bytes of state.json read back
OPEN_LOGS = 64                        # logs kept open; the least used are closed past this
TOPICS_KEPT = 200                     # topics of rooms that are gone, remembered for their return
SCROLLBACK_SCAN = 2 << 20             # bytes of a log read back, at most, to answer /history
READS_QUEUED = 4                      # /history reads of the logs under way at once, at most
# A record's number, read without parsing the record (as append writes it): scrolling
# back parses only the records it gives.
QUICK_SEQ = re.compile(rb'\{"time": [-+.0-9eE]{1,30}, "seq": (\d{1,15}),')


def open_private(path, flags):
    """A descriptor for a regular file of the data directory, created 0600, never through
    a link; OSError for anything else (a link, a FIFO, a device)."""
    fd = os.open(path, flags | PRIVATE_OPEN, 0o600)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file: %s" % path)
    except OSError:
        os.close(fd)
        raise
    return fd


def read_at(fd, size, offset):
    """size bytes of a file from offset (fewer at its end)."""
    if hasattr(os, "pread"):
        return os.pread(fd, size, offset)
    os.lseek(fd, offset, os.SEEK_SET)   # Windows: the descriptor is the loop's alone
    return os.read(fd, size)


def read_tail(fd, size, lines):
    """The last lines (at most lines of them) of the first size bytes of a file, read
    backwards a chunk at a time: a big log costs what is wanted, not its size."""
    chunks, newlines, end = [], 0, size
    floor = max(0, size - (lines + 1) * RECORD_LIMIT)   # no newlines: not the whole file
    while end > floor and newlines <= lines:
        start = max(floor, end - TAIL_CHUNK)
        chunk = read_at(fd, end - start, start)
        chunks.append(chunk)
        newlines += chunk.count(b"\n")
        end = start
    data = b"".join(reversed(chunks))
    found = data.split(b"\n")
    if end > 0:
        found = found[1:]   # the first, cut, line is older than what is wanted
    return [line for line in found if line][-lines:] if lines else []


class DiskWriter:
    """A thread for what would stall the loop: fsyncs, and writing state.json whole.

    The loop hands it work and never waits: logs are synced through descriptors of
    their own (dup), so the loop may close or rotate a log meanwhile; of several
    states saved in a row only the last is written."""

    def __init__(self, failed, healthy):
        self._failed = failed           # failed(what, exc), called from the thread...
        self._healthy = healthy         # ...and healthy() after a state is written
        self._lock = threading.Condition()
        self._fds = []
        self._held = 0                  # descriptors it holds: queued, or being synced
        self._state = None              # (path, bytes) to write next
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="chat-disk", daemon=True)
        self._thread.start()

    def sync(self, fds):
        """Sync these logs, which stay the loop's (the writer syncs copies)."""
        with self._lock:
            room = OPEN_LOGS - self._held
        duplicates = []
        for fd in list(fds)[:max(room, 0)]:   # the rest: at the next sync
            try:
                duplicates.append(os.dup(fd))
            except OSError as exc:
                self._failed("cannot sync a log", exc)
        self._hand_over(duplicates)

    def sync_and_close(self, fd):
        """Sync a log the loop is done with, then close it; at once, unsynced, when the
        writer is that far behind (so descriptors stay bounded)."""
        with self._lock:
            behind = self._held >= OPEN_LOGS
        if behind:
            os.close(fd)
        else:
            self._hand_over([fd])

    def _hand_over(self, fds):
        with self._lock:
            self._fds += fds
            self._held += len(fds)
            self._lock.notify()

    def save(self, path, data):
        with self._lock:
            self._state = (path, data)
            self._lock.notify()

    def close(self):
        """Finish what was handed over, then stop."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        self._thread.join()

    def _run(self):
        while True:
            with self._lock:
                while not (self._fds or self._state or self._closing):
                    self._lock.wait()
                fds, state, closing = self._fds, self._state, self._closing
                self._fds, self._state = [], None
            for fd in fds:
                try:
                    os.fsync(fd)
                except OSError as exc:
                    self._failed("cannot sync a log", exc)
                finally:
                    os.close(fd)
                    with self._lock:
                        self._held -= 1
            if state:
                self._write_state(*state)
            if closing and not fds and not state:
                return

    def _write_state(self, final, data):
        temporary = final + ".new"
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)   # a link planted there goes, not what it points to
            fd = open_private(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            with open(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, final)
            self._healthy()
        except OSError as exc:
            self._failed("cannot save topics, bans and mutes", exc)


class OpenLog:
    """A room's log, open for appending: its size, and how many records it holds, up to
    the number a rotation must leave behind. After a torn last record (a crash in
    mid-write) a newline is written, so the next record starts on a line of its own
    and only the torn one is skipped when read."""

    __slots__ = ("path", "fd", "size", "records")

    def __init__(self, path, keep_records):
        self.path = path
        self.fd = open_private(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
        try:
            self.size = os.fstat(self.fd).st_size
            if self.size and read_at(self.fd, 1, self.size - 1) != b"\n":
                log.warning("%s: ended a torn record at the end", self.path)
                self.size += os.write(self.fd, b"\n")
            self.records = len(read_tail(self.fd, self.size, keep_records))
        except OSError:
            os.close(self.fd)
            raise

    def append(self, data):
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
            self.size += written
        self.records += data.count(b"\n")


class FileStore(Store):
    """Rooms' public lines, and the state (topics, bans, mutes), in a directory of its own.

    Each room's lines go to a log (one JSON record per line: time, nick, kind,
    text); a turn's lines of a room are one write(), done before that turn's
    output is sent, so a crash or kill -9 loses nothing that was relayed. Logs
    are rotated past max_bytes, but never before they hold keep_records lines:
    the one older generation kept is then always enough to replay the history,
    whatever the size of the lines. Only logs' tails are ever read. The state is
    state.json, replaced whole. fsyncs and state writes run in a thread of their
    own (DiskWriter): the loop never waits for the disk beyond a write().

    The directory is 0700 and its files 0600 (chat text is private); it must be
    the server's user's, and no file in it is opened through a link. Everything
    read back is checked like input from a stranger: what is wrong is skipped,
    with a warning. A failing disk is logged and the chat goes on from memory.
    """

    STATE = "state.json"
    NAME_LIMIT = 200                # bytes of a log's name: every room name fits in 255

    def __init__(self, path, max_bytes=DEFAULT_LOG_MAX_BYTES, keep_records=DEFAULT_HISTORY,
                 call_soon=None):
        self.path = path
        self.call_soon = call_soon      # call_soon(function, *args): how reads answer the loop
        self._reader = None             # the thread that reads logs back (made when needed)
        self._reads = 0                 # reads under way
        self.max_bytes = max_bytes
        self.keep_records = keep_records
        self._lock_fd = self._open_directory(path)
        self._writer = DiskWriter(self._failed, self._healthy)
        self._pending = {}      # room name -> [record bytes] of this turn
        self._files = collections.OrderedDict()   # room name -> its OpenLog, least used first
        self._unsynced = set()  # fds written since the last sync
        self._failing = False

    @classmethod
    def _open_directory(cls, path):
        """Make or check the directory; return its lock's descriptor."""
        try:
            if os.path.lexists(path) and not os.path.isdir(path):
                raise StoreError(errno.ENOTDIR, "the data directory %s is not a directory"
                                 % path)
            os.makedirs(path, mode=0o700, exist_ok=True)
            if hasattr(os, "geteuid") and os.stat(path).st_uid != os.geteuid():
                raise StoreError(errno.EPERM, "the data directory %s belongs to another user"
                                 % path)
            os.chmod(path, 0o700)
            return cls._lock(os.path.join(path, "lock"))
        except StoreError:
            raise
        except OSError as exc:
            raise StoreError(exc.errno, "cannot use the data directory %s: %s"
                             % (path, exc.strerror or exc))

    @staticmethod
    def _lock(path):
        """Hold the directory's lock file for as long as the server runs."""
        fd = open_private(path, os.O_RDWR | os.O_CREAT)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            elif msvcrt is not None:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            os.close(fd)
            raise StoreError(errno.EBUSY, "the data directory %s is in use by another server"
                             % os.path.dirname(path))
        os.ftruncate(fd, 0)
        os.write(fd, b"%d\n" % os.getpid())
        return fd

    def _log_path(self, room):
        key = name_key(room)
        name = urllib.parse.quote(key, safe="")
        if len(name) > self.NAME_LIMIT:
            name = name[:self.NAME_LIMIT - 17] + "-" + hashlib.sha256(key.encode()).hexdigest()[:16]
        return os.path.join(self.path, "room-%s.log" % name)

    # The state

    def load_state(self):
        path = os.path.join(self.path, self.STATE)
        try:
            with open(open_private(path, os.O_RDONLY), "rb") as file:
                data = file.read(STATE_LIMIT + 1)
            if len(data) > STATE_LIMIT:
                raise ValueError("over %d bytes" % STATE_LIMIT)
            state = json.loads(data)
            if not isinstance(state, dict):
                raise ValueError("not a JSON object")
            return state
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, RecursionError) as exc:
            log.warning("cannot read %s (%s): starting without topics, bans and mutes", path,
                        str(exc)[:100])
            return {}

    def save_state(self, state):
        self._writer.save(os.path.join(self.path, self.STATE), self._fitting(state))

    @staticmethod
    def _fitting(state):
        """state as JSON that load_state will read back (STATE_LIMIT): past it, rooms'
        kept modes and lists, then topics, go, the biggest first, so that no room
        full of masks can cost the server's own bans and mutes at the next start."""
        data = json.dumps(state, indent=1, ensure_ascii=False).encode()
        excess = len(data) - STATE_LIMIT * 9 // 10   # room for the estimate's error
        if excess <= 0:
            return data
        state, dropped = dict(state), 0
        for part in ("rooms", "topics"):
            kept = dict(state.get(part) or {})
            sizes = {key: len(json.dumps({key: value}, indent=1, ensure_ascii=False).encode())
                     for key, value in kept.items()}
            for key in sorted(sizes, key=sizes.get, reverse=True):
                if excess <= 0:
                    break
                del kept[key]
                excess -= sizes[key]
                dropped += 1
            state[part] = kept
        log.warning("state.json would be over %d bytes: left out the modes or topics of %d "
                    "rooms, the biggest", STATE_LIMIT, dropped)
        return json.dumps(state, indent=1, ensure_ascii=False).encode()

    # Public lines

    def history(self, room, count):
        if not count:
            return []
        path, lines = self._log_path(room), []
        for part in (path, path + ".1"):   # the newest first
            if len(lines) >= count * 2:
                break
            try:
                fd = open_private(part, os.O_RDONLY)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("cannot read %s: %s", part, exc.strerror or exc)
                continue
            try:
                lines = read_tail(fd, os.fstat(fd).st_size, count * 2 - len(lines)) + lines
            finally:
                os.close(fd)
        events = [said for said in (self._said(room, line) for line in lines) if said]
        if len(events) < len(lines):
            skipped = len(lines) - len(events)
            log.warning("%s: skipped %d record%s that cannot be read", path, skipped,
                        "s" if skipped > 1 else "")
        return events[-count:]

    def lines(self, room, before, after, count, reply):
        """Read back from the end of the log and the one before it (as far as
        SCROLLBACK_SCAN each), in a thread of its own: a big log never stalls the loop,
        and only READS_QUEUED reads wait at once."""
        if before is not None and before <= 1:
            reply(())
            return
        if self._reads >= READS_QUEUED:
            reply(None)
            return
        if self._reader is None:
            self._reader = concurrent.futures.ThreadPoolExecutor(1, "chat-read")
        self._reads += 1

        def done(found):
            self._reads -= 1
            reply(found)
        self._reader.submit(self._read_lines, room, before, after, count).add_done_callback(
            lambda future: self.call_soon(done, future.result()))

    def _read_lines(self, room, before, after, count):
        """What lines() answers (in the reader's thread): newest first until found, each
        record parsed only when it is one of them."""
        wanted = []
        for seq, record in self._newest_first(room):
            if after is not None and seq <= after or after is None and len(wanted) >= count:
                break
            if after is not None or before is None or seq < before:
                wanted.append(record)
        found = [said for said in map(functools.partial(self._said, room), reversed(wanted))
                 if said is not None]
        return found[:count] if after is not None else found[-count:]

    def _newest_first(self, room):
        """(number, record) of a room's records, newest first; the number as read without
        parsing (a record written otherwise is parsed for it)."""
        path = self._log_path(room)
        for part in (path, path + ".1"):
            for record in reversed(self._tail_records(part)):
                quick = QUICK_SEQ.match(record)
                if quick:
                    yield int(quick.group(1)), record
                else:
                    said = self._said(room, record)
                    if said is not None:
                        yield said.seq, record

    @staticmethod
    def _tail_records(part):
        try:
            fd = open_private(part, os.O_RDONLY)
        except OSError:
            return []
        try:
            size = os.fstat(fd).st_size
            start = max(0, size - SCROLLBACK_SCAN)
            data = read_at(fd, size - start, start)
        except OSError as exc:
            log.warning("cannot read %s: %s", part, exc.strerror or exc)
            return []
        finally:
            os.close(fd)
        records = data.split(b"\n")
        return [record for record in (records[1:] if start else records) if record]

    @staticmethod
    def _said(room, line):
        """The Said event of a record, or None when it is not one (torn, edited, hostile)."""
        if len(line) > RECORD_LIMIT:
            return None
        try:
            record = json.loads(line)
            when, kind = finite_time(record["time"]), record["kind"]
            if when is None or kind not in ("said", "acted", "noticed"):
                return None
            seq = record.get("seq", 0)
            if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 1 << 53:
                seq = 0
            return Said(room, normalize_nick(stored_text(record["nick"])),
                        stored_text(record["text"])[:MAX_STORED_TEXT], kind == "acted", when,
                        seq, kind == "noticed", client_tags(record.get("tags", "")),
                        record.get("bot") is True)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            return None

    def append(self, room, event):
        record = {"time": event.time, "seq": event.seq, "nick": event.nick,
                  "kind": "noticed" if event.notice else "acted" if event.action else "said",
                  "text": event.text}
        if event.tags:
            record["tags"] = event.tags
        if event.bot:
            record["bot"] = True
        self._pending.setdefault(room, []).append(
            json.dumps(record, ensure_ascii=False).encode() + b"\n")

    def flush(self):
        pending, self._pending = self._pending, {}
        for room, records in pending.items():
            try:
                self._write(room, b"".join(records))
                self._healthy()
            except OSError as exc:
                self._failed("cannot write the log of %s" % room, exc)
            except Exception as exc:   # a bug must not stop the chat: it goes on from memory
                log.exception("writing the log of %s failed", room)
                self._failed("cannot write the log of %s" % room, exc)

    def _write(self, room, data):
        opened = self._files.get(room)
        if opened is None:
            if len(self._files) >= OPEN_LOGS:
                self._release(self._files.popitem(last=False)[1])
            opened = self._files[room] = OpenLog(self._log_path(room), self.keep_records)
        else:
            self._files.move_to_end(room)
        opened.append(data)
        self._unsynced.add(opened.fd)
        if opened.size > self.max_bytes and opened.records >= self.keep_records:
            self._rotate(room)

    def _rotate(self, room):
        """The log becomes the older generation; the next write starts a new one."""
        opened = self._files.pop(room)
        self._release(opened)
        os.replace(opened.path, opened.path + ".1")

    def _release(self, opened):
        """Close a log; what was written to it is synced by the writer all the same."""
        if opened.fd in self._unsynced:
            self._unsynced.discard(opened.fd)
            self._writer.sync_and_close(opened.fd)
        else:
            os.close(opened.fd)

    def forget(self, room):
        opened = self._files.pop(room, None)
        if opened is not None:
            self._release(opened)

    @property
    def unsynced(self):
        return bool(self._unsynced)

    def sync(self):
        unsynced, self._unsynced = self._unsynced, set()
        self._writer.sync(unsynced)

    def close(self):
        self.flush()
        for opened in self._files.values():
            self._release(opened)
        self._files.clear()
        self._writer.close()
        if self._reader is not None:
            self._reader.shutdown(wait=True)
        os.close(self._lock_fd)

    def _failed(self, what, exc):
        if not self._failing:
            log.error("%s in %s: %s; the chat goes on from memory",
                      what, self.path, exc.strerror or exc)
        self._failing = True

    def _healthy(self):
        if self._failing:
            log.warning("the data directory %s works again", self.path)
        self._failing = False


# --- Redis: nodes that share one chat ---
# Nodes share one chat through Redis (or Valkey): one pub/sub channel carries
# every event; a Lua script numbers each room's lines, keeps them in a capped
# Stream and publishes them; hashes hold nicks and members; a sorted set holds
# the nodes that are alive. The client is our own (RESP2, non-blocking, in the
# server's selector), and what Redis sends is checked like any client's input.

REDIS_PREFIX = "chat:"
REDIS_CONNECT_TIMEOUT = 5.0       # seconds to reach Redis and be let in
REDIS_REPLY_TIMEOUT = 2.0         # a reply later than this: Redis is out of reach
REDIS_BACKOFF = (0.5, 10.0)       # seconds between tries to reach it again: first, most
REDIS_QUEUE_LIMIT = 16 << 20      # bytes waiting to go to Redis; past it, the link is dropped
REDIS_REPLY_LIMIT = 64 << 20      # bytes of one reply
REDIS_NESTING = 8                 # arrays in arrays in a reply
REDIS_MIN_VERSION = (5, 0)        # Streams
NODE_TIMEOUT = 10.0               # a node silent this long is lost; it beats five times as often
OUTAGE_LINES = 10000              # lines said while apart, held to be sent when back
STREAM_KEPT = 1000                # lines of each room kept in its Stream, at least
SEQ_JUMP = 1 << 20                # a room's line numbered this far ahead is not believed
REDIS_GATHER_WAIT = 0.002         # seconds a turn may wait for its own lines back from Redis
CLUSTER_ID = re.compile(r"[\w.:\[\]~/-]{1,200}", re.ASCII)   # node and member ids

# KEYS and ARGV as RedisBroker, RedisDirectory and RedisCluster pass them.
SCRIPTS = {
    # A room's line: numbered (past its Stream's last, whatever the counter says), kept,
    # published; once per (node, id), whatever resends.
    "line": """
local last = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
if tonumber(ARGV[2]) <= last then return 0 end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
local seq = redis.call('INCR', KEYS[1])
local top = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
local above = top and tonumber(string.match(top[1], '^(%d+)'))
if above and above >= seq then
  seq = above + 1
  redis.call('SET', KEYS[1], seq)
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], seq .. '-0', 'e', ARGV[4])
redis.call('PUBLISH', ARGV[5], 'L' .. seq .. ' ' .. ARGV[4])
return seq""",
    # A member's state (ARGV[2], or '' for none) kept, and a message published.
    "event": """
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1""",
    # A nick and its look-alikes (ARGV[3..2+n]) taken by ARGV[1] unless another holds
    # one; the old ones (after) let go. 'ok', or the holder.
    "claim": """
local n = tonumber(ARGV[2])
for i = 3, 2 + n do
  local holder = redis.call('HGET', KEYS[1], ARGV[i])
  if holder and holder ~= ARGV[1] then return holder end
end
for i = 3 + n, #ARGV do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[1] then redis.call('HDEL', KEYS[1], ARGV[i]) end
end
for i = 3, 2 + n do redis.call('HSET', KEYS[1], ARGV[i], ARGV[1]) end
return 'ok'""",
    # A member gone: its state and the nicks it holds (ARGV[3..]) let go, and told.
    "gone": """
redis.call('HDEL', KEYS[1], ARGV[1])
for i = 3, #ARGV do
  if redis.call('HGET', KEYS[2], ARGV[i]) == ARGV[1] then redis.call('HDEL', KEYS[2], ARGV[i]) end
end
redis.call('PUBLISH', ARGV[2], 'G' .. cjson.encode({id = ARGV[1]}))
return 1""",
    # A node's heartbeat: it is alive (1 if it was not listed: others took it for lost);
    # nodes silent for ARGV[2] ms are lost: their members and nicks go, and it is told.
    # A node whose own last beat is that old was cut off too (or Redis was paused): it
    # judges nobody this time.
    "beat": """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local before = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or now)
local fresh = redis.call('ZADD', KEYS[1], now, ARGV[1])
if now - before > tonumber(ARGV[2]) then return fresh end
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))) do
  redis.call('ZREM', KEYS[1], node)
  local prefix = node .. '/'
  local members = redis.call('HKEYS', KEYS[2])
  for _, id in ipairs(members) do
    if string.sub(id, 1, #prefix) == prefix then redis.call('HDEL', KEYS[2], id) end
  end
  local nicks = redis.call('HGETALL', KEYS[3])
  for i = 1, #nicks, 2 do
    if string.sub(nicks[i + 1], 1, #prefix) == prefix then redis.call('HDEL', KEYS[3], nicks[i]) end
  end
  redis.call('PUBLISH', ARGV[3], 'X' .. cjson.encode({node = node}))
end
return fresh""",
}


class RedisError(Exception):
    """Redis cannot be used: the words say why."""


class ReplyError(str):
    """An error reply of Redis (its text)."""


@dataclass(frozen=True)
class RedisTarget:
    """Where Redis is and how to be let in: from a redis://, rediss:// or unix:// URL."""
    family: int
    address: object             # (host, port), or a socket's path
    tls: bool
    username: Optional[str]
    password: Optional[str]
    db: int
    shown: str                  # the URL without its password, for logs

    @classmethod
    def parse(cls, url):
        """The target of url; ValueError in plain words."""
        parts = urllib.parse.urlsplit(url.strip())
        scheme, query = parts.scheme.lower(), urllib.parse.parse_qs(parts.query)
        user = urllib.parse.unquote(parts.username) if parts.username else None
        password = urllib.parse.unquote(parts.password) if parts.password is not None else \
            query.get("password", [None])[0]
        if scheme in ("redis", "rediss"):
            try:
                port = parts.port or 6379
            except ValueError:
                raise ValueError("the port in the Redis URL is not a number from 1 to 65535")
            family, address = socket.AF_UNSPEC, (parts.hostname or "localhost", port)
            db = parts.path.strip("/") or query.get("db", ["0"])[0]
        elif scheme == "unix":
            if not hasattr(socket, "AF_UNIX"):
                raise ValueError("this platform has no unix sockets: use redis://HOST:PORT")
            if not parts.path:
                raise ValueError("unix:// needs the socket's path: unix:///path/to/redis.sock")
            family, address, db = socket.AF_UNIX, parts.path, query.get("db", ["0"])[0]
        else:
            raise ValueError("the Redis URL must start with redis://, rediss:// or unix://")
        if not db.isdigit() or len(db) > 5:
            raise ValueError("the database in the Redis URL must be a number, not %r" % db)
        secret = "%s:***@" % (user or "") if password is not None else \
            "%s@" % user if user else ""
        shown = "unix://%s%s" % (address, "?db=%s" % int(db) if int(db) else "") \
            if scheme == "unix" else "%s://%s%s/%d" % (
                scheme, secret, format_address(*address), int(db))
        return cls(family, address, scheme == "rediss", user, password, int(db), shown)


class RespReader:
    """RESP2 replies parsed from the bytes as they come, where the last read stopped
    (so a reply of many reads costs its size once), and checked: a reply too big, too
    deep or not RESP at all is a RedisError, never a crash or a bloat."""

    MORE = object()             # what is here ends before the next item does

    def __init__(self):
        self.buffer = bytearray()
        self.pos = 0                # where the next item starts in buffer
        self.stack = []             # [items, how many more] of the arrays being read
        self.size = 0               # bytes of the reply being read, so far

    def feed(self, data):
        """The replies complete with data."""
        self.buffer += data
        replies = []
        while True:
            start = self.pos
            item = self._item()
            if item is self.MORE:
                break
            self.size += self.pos - start
            if self.size > REDIS_REPLY_LIMIT:
                raise RedisError("a reply of over %d bytes" % REDIS_REPLY_LIMIT)
            if type(item) is RespArray:
                if len(self.stack) >= REDIS_NESTING:
                    raise RedisError("a reply nested beyond reason")
                self.stack.append([[], item.count])
                continue
            while self.stack:       # an item of the array being read: is it whole now?
                top = self.stack[-1]
                top[0].append(item)
                top[1] -= 1
                if top[1]:
                    break
                item = self.stack.pop()[0]
            else:
                replies.append(item)
                self.size = 0
        del self.buffer[:self.pos]
        self.pos = 0
        return replies

    def _item(self):
        """The item at pos (a RespArray for an array's start), or MORE."""
        buf, pos = self.buffer, self.pos
        end = buf.find(b"\r\n", pos)
        if end < 0:
            if len(buf) - pos > 64 * 1024:
                raise RedisError("not a Redis reply: a line of over 64 KB")
            return self.MORE
        kind, line, start = buf[pos], bytes(buf[pos + 1:end]), end + 2
        if kind in (43, 45):                            # + and -
            self.pos = start
            text = line.decode("utf-8", "replace")
            return text if kind == 43 else ReplyError(text)
        try:
            number = int(line)
        except ValueError:
            raise RedisError("not a Redis reply: %.40r" % bytes(buf[pos:end]))
        if kind == 36 and number >= 0:                  # $
            if number > REDIS_REPLY_LIMIT:
                raise RedisError("a reply of over %d bytes" % REDIS_REPLY_LIMIT)
            if len(buf) < start + number + 2:
                return self.MORE
            self.pos = start + number + 2
            return bytes(buf[start:start + number])
        if kind not in (58, 36, 42):                    # :, $ and *
            raise RedisError("not a Redis reply: %.40r" % bytes(buf[pos:end]))
        self.pos = start
        if kind == 58:
            return number
        if number < 0:
            return None
        if number > REDIS_REPLY_LIMIT // 4:
            raise RedisError("a reply longer than reason")
        return RespArray(number) if number else []


class RespArray(int):
    """The start of an array of this many items, while they are read."""

    @property
    def count(self):
        return int(self)


def resp_command(args):
    """A command as RESP2 bytes."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if not isinstance(arg, bytes):
            arg = str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


class RespConnection:
    """One connection to Redis: commands out, replies in, in order. Opened and let in
    with blocking calls (at start, or in a thread while reconnecting), then run
    without blocking in the server's loop."""

    def __init__(self, sock):
        self.sock = sock
        self.reader = RespReader()
        self.out = bytearray()
        self.waiting = collections.deque()   # (callback, when sent), one per reply due
        self.ready = collections.deque()     # replies read and not handed out (blocking use)

    @classmethod
    def open(cls, target, timeout):
        """A connection to target, let in (AUTH, SELECT); RedisError in plain words."""
        sock = None
        try:
            if target.family == socket.AF_UNSPEC:
                sock = socket.create_connection(target.address, timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                sock = socket.socket(target.family, socket.SOCK_STREAM)
                sock.settimeout(timeout)
                sock.connect(target.address)
            if target.tls:
                if ssl is None:
                    raise RedisError("this Python has no ssl module, so rediss:// is not available")
                sock = ssl.create_default_context().wrap_socket(
                    sock, server_hostname=target.address[0])
        except OSError as exc:
            if sock is not None:
                sock.close()
            raise RedisError("cannot reach Redis at %s: %s" % (target.shown, exc.strerror or exc))
        conn = cls(sock)
        try:
            if target.password is not None:
                conn.call("AUTH", *((target.username,) if target.username else ()),
                          target.password, refusal="Redis refused the password")
            elif target.username:
                raise RedisError("the Redis URL names a user without a password")
            if target.db:
                conn.call("SELECT", target.db, refusal="Redis refused database %d" % target.db)
        except BaseException:
            sock.close()
            raise
        return conn

    def call(self, *args, refusal="Redis refused %s"):
        """Blocking: a command's reply; RedisError for an error reply."""
        try:
            self.sock.sendall(resp_command(args))
        except OSError as exc:
            raise RedisError("lost Redis: %s" % (exc.strerror or exc))
        reply = self.next_reply()
        if isinstance(reply, ReplyError):
            raise RedisError("%s: %s" % (refusal.replace("%s", str(args[0])), reply))
        return reply

    def next_reply(self):
        while not self.ready:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                raise RedisError("Redis did not answer within %g s (is it Redis?)"
                                 % self.sock.gettimeout())
            except OSError as exc:
                raise RedisError("lost Redis: %s" % (exc.strerror or exc))
            if not data:
                raise RedisError("Redis closed the connection (is it Redis? is the URL's "
                                 "scheme right?)")
            self.ready.extend(self.reader.feed(data))
        return self.ready.popleft()

    def start(self):
        """From now on, the loop's: no call blocks."""
        self.sock.setblocking(False)

    def send(self, args, callback):
        self.out += resp_command(args)
        self.waiting.append((callback, time.monotonic()))

    def flush(self):
        """Send what waits, as much as the socket takes; True when all went."""
        while self.out:
            try:
                sent = self.sock.send(self.out)
            except WOULD_BLOCK:
                return False
            del self.out[:sent]
        return True

    def receive(self):
        """The replies that arrived; ConnectionError when Redis closed."""
        replies = list(self.ready)
        self.ready.clear()
        while True:
            try:
                data = self.sock.recv(RECV_SIZE)
            except WOULD_BLOCK:
                return replies
            if not data:
                raise ConnectionError("Redis closed the connection")
            replies += self.reader.feed(data)
            if len(data) < RECV_SIZE and not (ssl and isinstance(self.sock, ssl.SSLSocket)
                                              and self.sock.pending()):
                return replies

    def close(self):
        self.sock.close()


def redis_version(info):
    """(major, minor) of INFO server's reply; RedisError when it is not Redis's."""
    found = re.search(rb"(?m)^redis_version:(\d+)\.(\d+)", info if isinstance(info, bytes) else b"")
    if not found:
        raise RedisError("the server at the Redis URL does not say it is Redis")
    return int(found.group(1)), int(found.group(2))


class RedisLink:
    """A node's link to Redis: one connection for commands, one for pub/sub.

    A watchdog takes the link for down when a reply is late or too much waits
    to be sent; it comes back with jittered backoff, connecting in a thread so
    the loop never blocks. Its owner (RedisCluster) hears linked(renewed),
    unlinked(why), message(payload) and beat()."""

    def __init__(self, server, target, prefix, owner, reply_timeout, beat_interval):
        self.server, self.target, self.owner = server, target, owner
        self.prefix, self.channel = prefix, prefix + "events"
        self.reply_timeout, self.beat_interval = reply_timeout, beat_interval
        self.cmd = self.sub = None
        self.up = self.closed = False
        self.epoch = None               # changes when Redis restarted, or lost what it held
        self.reason = "not linked yet"  # why the link is down
        self.reconnects = 0
        self.rtt = 0.0                  # seconds of the last heartbeat's round trip
        self.shas = {name: hashlib.sha1(body.encode()).hexdigest()
                     for name, body in SCRIPTS.items()}
        self._backoff = REDIS_BACKOFF[0]
        self._next_beat = 0.0
        self._refused_at = -60.0

    # Connecting

    def connect(self):
        """Blocking: both connections, checked, the scripts loaded; RedisError else."""
        cmd = RespConnection.open(self.target, REDIS_CONNECT_TIMEOUT)
        sub = None
        try:
            info = cmd.call("INFO", "server")
            version = redis_version(info)
            if version < REDIS_MIN_VERSION:
                raise RedisError("Redis %d.%d is too old: chat.py needs %d.%d or later "
                                 "(Streams)" % (version + REDIS_MIN_VERSION))
            for name, body in SCRIPTS.items():
                cmd.call("SCRIPT", "LOAD", body)
            cmd.call("SET", self.prefix + "epoch", os.urandom(8).hex(), "NX")
            run = re.search(rb"(?m)^run_id:(\w+)", info)   # a new one at each restart
            epoch = (cmd.call("GET", self.prefix + "epoch"), run and run.group(1))
            sub = RespConnection.open(self.target, REDIS_CONNECT_TIMEOUT)
            sub.call("SUBSCRIBE", self.channel)
        except BaseException:
            for conn in (cmd, sub):
                if conn is not None:
                    conn.close()
            raise
        return cmd, sub, epoch

    def attach(self, cmd, sub, epoch):
        """The loop takes over connections made by connect()."""
        if self.closed:
            cmd.close()
            sub.close()
            return
        self.cmd, self.sub, self.up, self.reason = cmd, sub, True, None
        for conn in (cmd, sub):
            conn.start()
            self.server.watch(conn.sock, functools.partial(self._ready, conn))
        renewed = self.epoch is not None and epoch != self.epoch
        self.epoch = epoch
        self._backoff = REDIS_BACKOFF[0]
        self._next_beat = 0.0
        self.owner.linked(renewed)
        self.flush()

    def start_watchdog(self):
        self.server.call_later(min(0.25, self.reply_timeout / 4), self._watch)

    def lost(self, why):
        """The link is down: serve alone, and try again later."""
        if not self.up:
            return
        log.warning("lost Redis at %s: %s", self.target.shown, why)
        self.up, self.reason = False, why
        for conn in (self.cmd, self.sub):
            self.server.unwatch(conn.sock)
            conn.close()
        self.cmd = self.sub = None
        self.owner.unlinked(why)
        self._retry_later()

    def _retry_later(self):
        if self.closed:
            return
        delay = self._backoff * random.uniform(0.5, 1.0)   # nodes do not all come at once
        self._backoff = min(self._backoff * 2, REDIS_BACKOFF[1])
        self.server.call_later(delay, self._reconnect)

    def _reconnect(self):
        if not self.closed:
            threading.Thread(target=self._connect_in_thread, name="redis-connect",
                             daemon=True).start()

    def _connect_in_thread(self):
        try:
            got = self.connect()
        except (RedisError, OSError) as exc:
            self.server.call_soon(self._failed, str(exc))
            return
        self.server.call_soon(self._back, *got)

    def _failed(self, why):
        log.info("Redis at %s is still out of reach: %s", self.target.shown, why)
        self.reason = why
        self._retry_later()

    def _back(self, cmd, sub, epoch):
        self.reconnects += 1
        log.warning("Redis at %s is back", self.target.shown)
        self.attach(cmd, sub, epoch)

    def close(self):
        """Send what waits (briefly), then let go."""
        self.closed = True
        if not self.up:
            return
        self.up = False
        for conn in (self.cmd, self.sub):
            self.server.unwatch(conn.sock)
            try:
                conn.sock.settimeout(1.0)
                conn.sock.sendall(conn.out)
            except OSError:
                pass
            conn.close()

    # Commands

    def call(self, callback, *args):
        """Send a command (pipelined, at the end of the turn); callback(reply) when its
        reply comes. False, with nothing sent, while the link is down."""
        if not self.up:
            return False
        self.cmd.send(args, callback)
        return True

    def script(self, callback, name, keys, args):
        """Run one of SCRIPTS by its hash, or whole if Redis has forgotten it."""
        def answer(reply):
            if isinstance(reply, ReplyError) and reply.startswith("NOSCRIPT"):
                self.call(callback, "EVAL", SCRIPTS[name], len(keys), *keys, *args)
            elif callback is not None:
                callback(reply)
            elif isinstance(reply, ReplyError):
                self.refused(reply)
        return self.call(answer, "EVALSHA", self.shas[name], len(keys), *keys, *args)

    def publish(self, message):
        return self.call(None, "PUBLISH", self.channel, message)

    def flush(self):
        """Send what the turn queued; watch for room in the sockets when it did not fit."""
        if not self.up:
            return
        for conn in (self.cmd, self.sub):
            try:
                done = conn.flush()
            except OSError as exc:
                self.lost("cannot write to Redis: %s" % (exc.strerror or exc))
                return
            if len(conn.out) > REDIS_QUEUE_LIMIT:
                self.lost("over %d MB waits to go to Redis" % (REDIS_QUEUE_LIMIT >> 20))
                return
            self.server.watch(conn.sock, functools.partial(self._ready, conn), not done)

    def _ready(self, conn, mask):
        if not self.up or conn not in (self.cmd, self.sub):
            return
        try:
            if mask & selectors.EVENT_WRITE:
                self.flush()
            if mask & selectors.EVENT_READ and self.up:
                for reply in conn.receive():
                    self._dispatch(conn, reply)
                    if not self.up:
                        return
        except (OSError, RedisError) as exc:
            self.lost(str(exc) or type(exc).__name__)

    def _dispatch(self, conn, reply):
        callback = None
        if conn is self.sub:
            if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
                callback, reply = self.owner.message, reply[2]
            elif isinstance(reply, list) and reply[:1] == [b"pong"] and conn.waiting:
                conn.waiting.popleft()
        elif not conn.waiting:
            raise RedisError("Redis answered what was not asked")
        else:
            callback = conn.waiting.popleft()[0]
            if callback is None and isinstance(reply, ReplyError):
                self.refused(reply)
        try:
            if callback is not None:
                callback(reply)
        except (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError):
            log.warning("skipped what Redis sent that cannot be used: %.200r", reply)
        except Exception:   # a bug must not stop the chat
            log.exception("handling what Redis sent failed: %.200r", reply)

    def _watch(self):
        """Every quarter of the reply timeout: late replies, and the heartbeat."""
        if self.closed:
            return
        self.start_watchdog()
        if not self.up:
            return
        now = time.monotonic()
        for conn in (self.cmd, self.sub):
            if conn.waiting and now - conn.waiting[0][1] > self.reply_timeout:
                self.lost("Redis did not answer for %g s" % self.reply_timeout)
                return
        if now >= self._next_beat:
            self._next_beat = now + self.beat_interval
            self.sub.send(("PING",), None)
            self.owner.beat()
            self.call(functools.partial(self._timed, now), "PING")
            self.flush()

    def refused(self, reply):
        """An error from Redis that no caller handles: logged, at most once a minute."""
        now = time.monotonic()
        if now - self._refused_at > 60:
            self._refused_at = now
            log.warning("Redis refused a command: %s", reply)

    def _timed(self, sent, reply):
        self.rtt = time.monotonic() - sent


CLUSTER_EVENTS = {kind.__name__: kind for kind in (Joined, Parted, Quit, Renamed, Kicked,
                                                     Opped, TopicSet, ModeChanged, Signal)}


class ClusterCodec:
    """What nodes tell each other through Redis, as JSON behind one letter, and back.
    Everything read is checked and made as safe as a client's input: what is not
    right raises ValueError (or TypeError, KeyError), and is skipped."""

    def __init__(self, view):
        self.view = view

    @staticmethod
    def dumps(kind, record):
        return kind + json.dumps(record, ensure_ascii=False, separators=(",", ":"))

    @staticmethod
    def loads(data):
        record = json.loads(data.decode("utf-8"))
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        return record

    @staticmethod
    def ident(value):
        if not isinstance(value, str) or not CLUSTER_ID.fullmatch(value):
            raise ValueError("not a node or member id: %.40r" % (value,))
        return value

    @staticmethod
    def flag(value):
        if not isinstance(value, bool):
            raise TypeError("not true or false")
        return value

    @staticmethod
    def nick(value):
        return normalize_nick(stored_text(value))

    @staticmethod
    def room(value):
        return normalize_room(stored_text(value))

    # Room events

    @staticmethod
    def event_record(event):
        record = {item.name: getattr(event, item.name) for item in dataclasses.fields(event)}
        record["k"] = type(event).__name__
        return record

    def event(self, record, node):
        """The room event of a record from node (its uid made this node's)."""
        kind = CLUSTER_EVENTS[record["k"]]
        values = {}
        for item in dataclasses.fields(kind):
            value = record[item.name] if item.default is dataclasses.MISSING else \
                record.get(item.name, item.default)
            if item.name == "room" or (item.name == "to" and value is not None):
                value = self.room(value)
            elif item.name in ("nick", "old", "new", "by"):
                value = self.nick(value)
            elif item.name in ("quiet", "bot"):
                value = self.flag(value)
            elif item.name == "changes":
                if not isinstance(value, str) or not re.fullmatch(r"(?:[+-][ovklbimnst]+){1,8}",
                                                                  value):
                    raise ValueError("not room modes: %.40r" % (value,))
            elif item.name == "args":
                value = self.mode_args(values["changes"], value)
            elif item.name == "uid":
                if isinstance(value, bool) or not isinstance(value, int):
                    raise TypeError("not a number")
                value = self.view.local_uid(node, value)
            elif item.name in self.CHECKS:
                value = getattr(self, self.CHECKS[item.name])(value)
            elif value is not None:
                value = stored_text(value)[:MAX_TOPIC]
            values[item.name] = value
        return kind(**values)

    CHECKS = {"tags": "tags", "msgid": "msgid", "time": "when"}   # fields (of Signal)

    tags = staticmethod(client_tags)

    @staticmethod
    def msgid(value):
        if not isinstance(value, str) or not re.fullmatch(r"[\w-]{0,40}", value):
            raise ValueError("not a message id: %.40r" % (value,))
        return value

    @staticmethod
    def when(value):
        when = finite_time(value)
        if when is None:
            raise ValueError("not a time")
        return when

    @staticmethod
    def mode_args(changes, args):
        """The arguments of room mode changes, one for each o, v, k and +l, checked."""
        if not isinstance(args, list):
            raise TypeError("not a list")
        sign, taking = "+", []
        for letter in changes:
            if letter in "+-":
                sign = letter
            elif letter in "ovkbeI" or letter == "l" and sign == "+":
                taking.append(sign + letter)
        args = tuple("".join(stored_text(arg).split())[:MAX_MASK] for arg in args)
        if len(args) != len(taking) or any(
                kind == "+l" and not 0 < (number_word(arg) or 0) < 100000 or
                kind[1] in MASK_LISTS and ban_mask(arg) != arg for kind, arg in zip(taking, args)):
            raise ValueError("not the arguments of %s" % changes)
        return args

    # Members

    @staticmethod
    def state_record(member, node):
        return {"id": member.cid, "node": node, "nick": member.nick, "op": member.operator,
                "rooms": [room.name for room in member.rooms if member in room.listed],
                "ranks": [room.rank(member) for room in member.rooms if member in room.listed],
                "away": member.away, "real": member.realname, "addr": member.address,
                "user": member.user, "bot": member.bot}

    def state(self, record):
        rooms = record["rooms"]
        if not isinstance(rooms, list) or len(rooms) > MAX_JOINED:
            raise ValueError("not a list of at most %d rooms" % MAX_JOINED)
        away, address = record.get("away"), record.get("addr") or ""
        if address and ip_address(stored_text(address)) is None:
            raise ValueError("not an address: %.40r" % address)
        node, cid = self.ident(record["node"]), self.ident(record["id"])
        if not cid.startswith(node + "/"):
            raise ValueError("a member id of another node")
        ranks = record.get("ranks") or [""] * len(rooms)
        if not isinstance(ranks, list) or len(ranks) != len(rooms) or \
                not all(rank in ("", "@", "+") for rank in ranks):
            raise ValueError("not the ranks of a member in its rooms")
        return MemberState(cid, node, self.nick(record["nick"]),
                           tuple(dict.fromkeys(map(self.room, rooms))), self.flag(record["op"]),
                           None if away is None else stored_text(away)[:MAX_REASON] or None,
                           stored_text(record.get("real") or "")[:MAX_REASON], address,
                           "".join(stored_text(record.get("user") or "").split())[:10],
                           dict(zip(map(name_key, map(self.room, rooms)), ranks)),
                           self.flag(record.get("bot", False)))

    # Lines

    @staticmethod
    def line_record(node, number, room, speaker, text, action, when, notice, tags):
        return {"n": node, "i": number, "r": room.name, "k": speaker.nick, "x": text,
                "a": action, "w": when, "o": notice, "t": tags, "b": speaker.bot}

    def line(self, seq, record):
        """(node, its number for the line, the Said event)."""
        number = record["i"]
        if isinstance(number, bool) or not isinstance(number, int) or not 0 < number < 1 << 53:
            raise ValueError("not a line number")
        when = finite_time(record["w"])
        if when is None:
            raise ValueError("a line without a time")
        return self.ident(record["n"]), number, Said(
            self.room(record["r"]), self.nick(record["k"]),
            stored_text(record["x"])[:MAX_STORED_TEXT], self.flag(record["a"]), when, seq,
            self.flag(record.get("o", False)), client_tags(record.get("t", "")),
            self.flag(record.get("b", False)))

    def private(self, record):
        said = record["e"]
        return Private(self.nick(said["sender"]), self.nick(said["target"]),
                       stored_text(said["text"])[:MAX_STORED_TEXT], self.flag(said["action"]),
                       False, finite_time(said["time"]) or 0.0,
                       self.flag(said.get("notice", False)), client_tags(said.get("tags", "")),
                       self.msgid(said.get("msgid", "")), self.flag(said.get("bot", False)))


class RedisBroker(Broker):
    """Room lines and events through Redis.

    A line goes to Redis first (a script numbers it, keeps it in the room's
    Stream and publishes it) and is told here when it comes back, so every node
    tells every room's lines in the one order Redis gave them, once: a number
    at or below the room's last is a repeat. While Redis is out of reach, lines
    are told here at once and held; once back, the rooms' Streams are read for
    what the others said meanwhile, and then the held lines go out (they are not
    told here again)."""

    def __init__(self, cluster):
        self.cluster, self.link, self.codec = cluster, cluster.link, cluster.codec
        self._numbers = itertools.count(1)
        self.in_flight = {}     # number -> (room key, speaker, message): sent, not back yet
        self.held = collections.deque()   # (number, room key, message): told, to be sent
        self.resent = {}        # number -> (room key, message): held ones sent, unanswered
        self.told = set()       # numbers told here before Redis numbered them
        self.filling = {}       # room key -> [(seq, record)] that came while its Stream is read
        self.last_from = {}     # room key -> {node: number of its last line told here}
        self.lost_lines = 0

    @property
    def linked(self):
        return self.link.up

    def line(self, room, speaker, text, action, notice=False, tags=""):
        number = next(self._numbers)
        message = json.dumps(self.codec.line_record(self.cluster.node, number, room, speaker,
                                                    text, action, self.hub.clock(), notice,
                                                    tags),
                             ensure_ascii=False, separators=(",", ":"))
        if self.link.up:
            self.in_flight[number] = (room.key, speaker, message)
            self._send(number, room.key, message)
        else:
            self._hold(number, room.key, message)
            self.hub.deliver_line(room, Said(room.name, speaker.nick, text, action,
                                             self.hub.clock(), 0, notice, tags, speaker.bot),
                                  speaker)

    def publish(self, room, event, excluded, subject=None):
        self.hub.publish_here(room, event, excluded)
        self.cluster.directory.tell(self.codec.event_record(event), subject)

    def signal(self, room, event, excluded):
        """Signals go as T, which nodes of older versions skip (with a warning) instead of
        showing anything."""
        self.hub.publish_here(room, event, excluded)
        self.link.publish(self.codec.dumps("T", {"n": self.cluster.node,
                                                 "e": self.codec.event_record(event)}))

    def forward(self, member, event):
        kind = "P" if event.text else "T"   # see signal
        self.link.publish(self.codec.dumps(kind, {"to": member.cid, "e": {
            "sender": event.sender, "target": event.target, "text": event.text,
            "action": event.action, "time": event.time, "notice": event.notice,
            "tags": event.tags, "msgid": event.msgid, "bot": event.bot}}))

    def invite(self, member, room, by):
        self.link.publish(self.codec.dumps("I", {"to": member.cid, "by": by, "room": room.name}))

    def expel(self, member, by, reason, room=None):
        """Have member's node put it out of the chat (or of room)."""
        self.link.publish(self.codec.dumps("K", {"to": member.cid, "by": by, "reason": reason,
                                                 "room": room and room.name}))

    def _send(self, number, key, message):
        prefix = self.cluster.prefix
        self.link.script(functools.partial(self._numbered, number), "line",
                         (prefix + "seq:" + key, prefix + "log:" + key, prefix + "seen:" + key),
                         (self.cluster.node, number, self.cluster.stream_kept, message,
                          self.link.channel))

    def _hold(self, number, key, message):
        self.told.add(number)
        self.held.append((number, key, message))
        if len(self.held) > OUTAGE_LINES:
            self.told.discard(self.held.popleft()[0])
            self.lost_lines += 1
            if self.lost_lines == 1:
                log.warning("Redis has been out of reach for over %d lines: the oldest are "
                            "told only here", OUTAGE_LINES)

    def _numbered(self, number, reply):
        """Redis's answer to a line: its number, 0 for a line it had, or an error."""
        self.resent.pop(number, None)
        if isinstance(reply, ReplyError):
            log.warning("Redis refused a line: %s", reply)
            entry = self.in_flight.pop(number, None)
            room = entry and self.hub.rooms.get(entry[0])
            if room is not None:   # told here at least
                self._tell_held(room, entry[1], entry[2])
        elif reply == 0:
            self.told.discard(number)

    # Lines coming in

    def heard(self, seq, record, gap_ok=False):
        """A numbered line from Redis (pub/sub, or a Stream): told here once, in order."""
        node, number, event = self.codec.line(seq, record)
        key = name_key(event.room)
        waiting = self.filling.get(key)
        if waiting is not None and not gap_ok:
            waiting.append((seq, record))
            return
        room = self.hub.rooms.get(key)
        if room is None:
            return
        if room.seq and seq > room.seq + SEQ_JUMP:   # not a number Redis gave: no gap
            log.warning("%s: a line numbered %d after %d, taken as unnumbered", room.name,
                        seq, room.seq)
            seq, event = 0, self.codec.line(0, record)[2]
        own, last = node == self.cluster.node, self.last_from.setdefault(key, {})
        if own and number in self.told or number <= last.get(node, 0):
            if own:   # told already (a line's node and number say it)
                self.told.discard(number)
            last[node] = max(last.get(node, 0), number)
            room.seq = max(room.seq, seq)
            return
        if room.seq and seq > room.seq + 1 and not gap_ok and self.link.up:
            self.fill(room, since=None, first=(seq, record))   # a gap: read the Stream
            return
        last[node] = number
        entry = self.in_flight.pop(number, None) if own else None
        self.hub.deliver_line(room, event, entry[1] if entry else None)

    def fill(self, room, since=None, first=None):
        """Read room's Stream after its last line told here (or, when that is unknown,
        the lines said since a time) and tell what is missing; lines coming meanwhile
        wait for it."""
        key = room.key
        self.filling[key] = [first] if first else []
        start = "%d-0" % (room.seq + 1) if room.seq or since is None else "-"
        self.link.call(functools.partial(self._filled, key, since),
                       "XRANGE", self.cluster.prefix + "log:" + key, start, "+",
                       "COUNT", self.cluster.stream_kept)

    def _filled(self, key, since, reply):
        waiting = self.filling.pop(key, [])
        for entry in reply if isinstance(reply, list) else ():
            self._quietly(self._refill, entry, since)
        for seq, record in waiting:
            self._quietly(self.heard, seq, record, True)

    def _refill(self, entry, since):
        """One entry of a room's Stream read back: told if it was missed (and, when since
        is a time, said after it)."""
        seq, record = self.cluster.stream_entry(entry)
        said = record.get("w")
        if since is None or isinstance(said, (int, float)) and said >= since:
            self.heard(seq, record, True)

    @staticmethod
    def _quietly(function, *args):
        try:
            function(*args)
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
            log.warning("skipped a line from Redis that cannot be read: %.200r", args)

    # The link

    def relinked(self, renewed, down_since):
        """Back (or first) in reach: read what was missed, then send what was held."""
        for room in list(self.hub.rooms.values()):
            if renewed:   # numbers may have gone back: the lines since the link went down
                room.seq = 0
                self.fill(room, (down_since or 0) - self.link.reply_timeout - 1)
            elif down_since is not None:   # no line told here yet: those since it was known
                self.fill(room, None if room.seq else self.cluster.store.known.get(room.key, 0))
        held, self.held = self.held, collections.deque()
        for number, key, message in held:
            self.resent[number] = (key, message)
            self._send(number, key, message)

    def unlinked(self):
        """Out of reach: lines on their way are told here now, and held to be sent."""
        for key, waiting in list(self.filling.items()):
            del self.filling[key]
            for seq, record in waiting:
                self._quietly(self.heard, seq, record, True)
        lines = sorted([(number, key, message) for number, (key, message) in self.resent.items()]
                       + [(number, key, message)
                          for number, (key, _, message) in self.in_flight.items()])
        in_flight, self.in_flight, self.resent = self.in_flight, {}, {}
        for number, key, message in lines:
            room = self.hub.rooms.get(key)
            if number in in_flight and room is not None:
                self._quietly(self._tell_held, room, in_flight[number][1], message)
            self._hold(number, key, message)
        self.held = collections.deque(sorted(self.held))

    def _tell_held(self, room, speaker, message):
        event = self.codec.line(0, self.codec.loads(message.encode()))[2]
        self.hub.deliver_line(room, event, speaker)


class RedisDirectory(Directory):
    """Nicks and members shared through Redis.

    A nick is taken here at once (this node's tables include the members of
    every other) and claimed in Redis, which settles the rare race of two nodes
    giving one nick at the same moment: the later claim loses, and its member
    becomes a guest. Each announced member's state is kept in a hash and
    published with what it does, so other nodes list it; a node that stops
    beating is lost, and its members with it."""

    def __init__(self, cluster):
        self.cluster, self.link, self.codec = cluster, cluster.link, cluster.codec
        self.local = {}         # cid -> Member of this node
        self.first_guest = random.randrange(1, 1000) * 100   # nodes' guests seldom meet
        self.collisions = {}    # cid -> nicks it lost in a row
        self.departed = {}      # cid -> nick fields, of members gone while Redis was away
        self._numbers = itertools.count(1)

    def claimed(self, member, old_keys):
        if member.cid is None:
            member.cid = "%s/%d" % (self.cluster.node, next(self._numbers))
            self.local[member.cid] = member
        self._claim(member, old_keys)

    def _claim(self, member, old_keys=()):
        keys = self._keys(member)
        old = [key for key in self._keys(member, old_keys) if key not in keys]
        self.link.script(functools.partial(self._answer, member, member.nick), "claim",
                         (self.cluster.prefix + "nicks",),
                         (member.cid, len(keys)) + tuple(keys) + tuple(old))

    @staticmethod
    def _keys(member, keys=None):
        """The nicks hash's fields for a member's nick and look-alikes (or for keys)."""
        keys = (member.key,) + member.lookalikes if keys is None else keys
        return ["~" + key if index else "=" + key for index, key in enumerate(keys)]

    def _answer(self, member, nick, reply):
        """A claim's answer: b"ok", or who holds the nick (then member loses it, unless
        that is its own cid: a claim resent after a time apart)."""
        if reply == b"ok":
            self.collisions.pop(member.cid, None)
        if reply == b"ok" or isinstance(reply, ReplyError) or reply == member.cid.encode() or \
                member.nick != nick or self.local.get(member.cid) is not member:
            return
        self.collisions[member.cid] = self.collisions.get(member.cid, 0) + 1
        if self.collisions[member.cid] > 3:   # a Redis that lies cannot make it spin
            log.warning("%r: Redis refuses every nick; keeping %s", member, nick)
            return
        log.info("%r lost the nick %s to another node", member, nick)
        key = member.key
        self.hub.nick_lost(member)
        self.cluster.view.found_again(key)

    def changed(self, member, told=False):
        if member.announced:
            self.tell(None, member, told)

    def tell(self, event_record, member, told=False):
        """Publish a room event (or None) with the state of the member it is about;
        told: the others tell their members what changed (after a time apart)."""
        state = self.codec.state_record(member, self.cluster.node) if member else None
        message = {"n": self.cluster.node, "e": event_record, "s": state, "t": told}
        self.link.script(None, "event", (self.cluster.prefix + "members",),
                         (member.cid if member else "", json.dumps(state) if state else "",
                          self.link.channel, self.codec.dumps("E", message)))

    def gone(self, member):
        self.local.pop(member.cid, None)
        self.collisions.pop(member.cid, None)
        self._release(member.cid, self._keys(member))

    def _release(self, cid, keys):
        """A member of this node is gone: its state and nicks go from Redis, and the
        other nodes are told; while Redis is out of reach, once it is back."""
        if not self.link.script(None, "gone", (self.cluster.prefix + "members",
                                               self.cluster.prefix + "nicks"),
                                (cid, self.link.channel) + tuple(keys)):
            self.departed[cid] = keys
            while len(self.departed) > OUTAGE_LINES:
                self.departed.pop(next(iter(self.departed)))

    # From other nodes

    def heard(self, kind, record):
        view, node = self.cluster.view, record.get("n")
        if node == self.cluster.node:
            return   # told here already
        if kind == "E":
            event = record["e"] and self.codec.event(record["e"], self.codec.ident(node))
            if record["s"] is not None:
                view.upsert(self.codec.state(record["s"]), event, record.get("t") is True)
            elif event is not None:
                view.tell(event)
        elif kind == "G":
            view.gone(self.codec.ident(record["id"]))
        elif kind == "X":
            lost = view.node_lost(self.codec.ident(record["node"]))
            for last in self.cluster.broker.last_from.values():
                last.pop(record["node"], None)
            log.warning("node %s stopped answering: %d of its members gone", record["node"], lost)
        elif kind == "T" and "to" not in record:
            event = self.codec.event(record["e"], self.codec.ident(node))
            if type(event) is not Signal:
                raise ValueError("not client tags alone")
            view.tell(event)
        elif kind in "PKIT":
            member = self.local.get(record["to"])
            if member is not None and kind in "PT":
                view.private(member, self.codec.private(record))
            elif member is not None and kind == "I":
                room = self.hub.rooms.get(name_key(self.codec.room(record["room"])))
                if room is not None:
                    self.hub.invited(member, room, self.codec.nick(record["by"]))
            elif member is not None:
                by = self.codec.nick(record["by"])
                reason = stored_text(record["reason"])[:MAX_REASON]
                room = record.get("room") and self.hub.rooms.get(name_key(self.codec.room(
                    record["room"])))
                if room is None:
                    self.hub._expel(member, by, reason)
                elif member in room.members:
                    self.hub.kicked_out(member, room, Kicked(room.name, member.nick, by, reason))

    # The link

    def linked(self):
        """Back (or first) in reach: let go of the members that left meanwhile (and of
        any other this node no longer has), claim its nicks again, tell its members'
        states, and learn the others' (told as changes, after a time apart)."""
        departed, self.departed = self.departed, {}
        for cid, keys in departed.items():
            self._release(cid, keys)
        self.link.call(self._members, "HGETALL", self.cluster.prefix + "members")

    def _members(self, reply):
        states = []
        for cid, data in zip(reply[::2], reply[1::2]) if isinstance(reply, list) else ():
            try:
                state = self.codec.state(self.codec.loads(data))
            except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
                log.warning("skipped a member in Redis that cannot be read: %.100r", cid)
                continue
            if state.node != self.cluster.node:
                states.append(state)
            elif state.cid not in self.local:   # left while the link was down
                self._release(state.cid, self._keys(None, (name_key(state.nick),) + tuple(
                    lookalike_keys(state.nick))))
        for member in list(self.local.values()):
            self._claim(member)
            self.changed(member, told=True)
        self.cluster.view.resync(states, told=self.cluster.started)


class RedisStore(Store):
    """Topics, bans and mutes in Redis hashes (each node enforces what another adds),
    history in the rooms' Streams. Read with blocking calls only at start."""

    PARTS = ("topics", "bans", "mutes", "rooms")

    def __init__(self, cluster):
        self.cluster, self.link = cluster, cluster.link
        self._saved = {"topics": {}, "bans": {}, "mutes": {}, "rooms": {}}   # as Redis has it
        self._unsaved = False   # changed while Redis was out of reach
        self.known = {}         # room key -> when this node made the room (for its lines)

    @staticmethod
    def _fields(state):
        """Each part of a state as hash fields: topics by room, sanctions by network."""
        fields = {"topics": dict(state.get("topics") or {}),
                  "rooms": {key: json.dumps(record) for key, record in
                            (state.get("rooms") or {}).items()}}
        for part in ("bans", "mutes"):
            fields[part] = {str(record.get("network")): json.dumps(record)
                            for record in state.get(part) or ()}
        return fields

    @staticmethod
    def _state(fields):
        state = {"topics": fields["topics"], "rooms": {}}
        for key, data in fields.get("rooms", {}).items():
            try:
                state["rooms"][key] = json.loads(data)
            except (ValueError, RecursionError):
                log.warning("skipped the kept modes of a room that cannot be read")
        for part in ("bans", "mutes"):
            state[part] = []
            for data in fields[part].values():
                try:
                    state[part].append(json.loads(data))
                except (ValueError, RecursionError):
                    log.warning("skipped a kept %s that cannot be read", part[:-1])
        return state

    def load_state(self):
        fields = {}
        for part in self.PARTS:
            reply = self.cluster.blocking.call("HGETALL", self.cluster.prefix + part)
            fields[part] = self._decoded(reply)
        self._saved = fields
        return self._state(fields)

    @staticmethod
    def _decoded(reply):
        items = reply if isinstance(reply, list) else []
        return {key.decode("utf-8", "replace"): value.decode("utf-8", "replace")
                for key, value in zip(items[::2], items[1::2])
                if isinstance(key, bytes) and isinstance(value, bytes)}

    def save_state(self, state):
        fields = self._fields(state)
        if not self.link.up:
            self._unsaved = True
            return
        changed = False
        for part in self.PARTS:
            new, old = fields[part], self._saved[part]
            gone = [key for key in old if key not in new]
            if gone:
                self.link.call(None, "HDEL", self.cluster.prefix + part, *gone)
            for key, value in new.items():
                if old.get(key) != value:
                    self.link.call(None, "HSET", self.cluster.prefix + part, key, value)
                    changed = True
            changed = changed or bool(gone)
        self._saved = fields
        if changed:
            self.link.publish(ClusterCodec.dumps("S", {"n": self.cluster.node}))

    def reload(self):
        """Another node changed topics, bans or mutes: read them all back."""
        got = {}

        def part_read(part, reply):
            got[part] = self._decoded(reply)
            if len(got) == len(self.PARTS):
                self._saved = got
                self.cluster.hub.adopt_state(self._state(got))
        for part in self.PARTS:
            self.link.call(functools.partial(part_read, part), "HGETALL",
                           self.cluster.prefix + part)

    def linked(self):
        if self._unsaved:
            self._unsaved = False
            self.cluster.hub._save_state()
        self.reload()

    def history(self, room, count):
        """A room's last lines: read at once while the node starts, later in the
        background (a room made here that others had)."""
        self.known[name_key(room)] = self.cluster.hub.clock() if self.cluster.hub else 0
        key = self.cluster.prefix + "log:" + name_key(room)
        if not count:
            return []
        if self.cluster.blocking is not None:
            return self._said(self.cluster.blocking.call("XREVRANGE", key, "+", "-",
                                                         "COUNT", count))
        self.link.call(functools.partial(self._backfill, room), "XREVRANGE", key, "+", "-",
                       "COUNT", count)
        return []

    def lines(self, room, before, after, count, reply):
        key = self.cluster.prefix + "log:" + name_key(room)
        if after is not None:
            asked = ("XRANGE", key, "%d" % (after + 1), "+", "COUNT", count)
        else:
            asked = ("XREVRANGE", key, "+" if before is None else "%d" % (before - 1), "-",
                     "COUNT", count)
        if before is not None and before <= 1 or not self.link.call(
                lambda found: reply(self._said(found)), *asked):
            reply(())

    def _said(self, reply):
        events = []
        for entry in reversed(reply) if isinstance(reply, list) else ():
            try:
                seq, record = self.cluster.stream_entry(entry)
                events.append(self.cluster.codec.line(seq, record)[2])
            except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
                log.warning("skipped a line in Redis that cannot be read")
        return events

    def forget(self, room):
        self.known.pop(name_key(room), None)
        self.cluster.broker.last_from.pop(name_key(room), None)

    def _backfill(self, name, reply):
        room = self.cluster.hub.rooms.get(name_key(name))
        if room is not None:
            self.cluster.hub.backfill(room, self._said(reply))


class RedisCluster:
    """This node's part in a chat of several nodes: the link to Redis, and the broker,
    directory and store the hub is given. It hears the link's news, sorts what the
    other nodes say, beats for this node, and says how the link is."""

    def __init__(self, server, options):
        self.server, self.options = server, options
        self.prefix = options.redis_prefix
        self.name = options.node or "%s:%d" % (socket.gethostname(), options.port)
        self.node = "%s~%s" % (re.sub(r"[^\w.:\[\]-]", "_", self.name)[:100], os.urandom(4).hex())
        self.stream_kept = max(options.history, STREAM_KEPT)
        self.hub = self.view = None
        self.codec = ClusterCodec(None)
        self.link = RedisLink(server, RedisTarget.parse(options.redis), self.prefix, self,
                              options.redis_timeout, options.node_timeout / 5)
        cmd, sub, epoch = self.link.connect()   # RedisError: the server says why
        self.blocking = cmd     # while the node starts: calls that wait
        self._first = (cmd, sub, epoch)
        self.broker, self.directory, self.store = \
            RedisBroker(self), RedisDirectory(self), RedisStore(self)
        self.started = False
        self.down_since = None  # the time the link went down, while it is
        self._beats = 0
        self._absent = set()    # nodes with members here that did not beat, last time

    def start(self, hub):
        """The hub exists: learn the other nodes' members, then run in the loop."""
        self.hub = hub
        self.view = self.codec.view = ClusterView(hub)
        self.directory._members(self.blocking.call("HGETALL", self.prefix + "members"))
        self.blocking = None
        self.link.attach(*self._first)
        self.started = True
        self.link.start_watchdog()

    def close(self):
        if self.link.up:
            self.link.call(None, "ZREM", self.prefix + "nodes", self.node)
        self.link.close()

    def gather(self, poll):
        """Lines sent this turn come back from Redis within a round trip: waiting that
        long (reading every socket meanwhile, at most REDIS_GATHER_WAIT) tells them in
        this very turn, so a burst costs each member one send instead of several."""
        in_flight = self.broker.in_flight
        if not in_flight or not self.link.up:
            return
        newest = next(reversed(in_flight))   # lines said meanwhile go out, unawaited
        deadline = time.monotonic() + REDIS_GATHER_WAIT
        while in_flight and next(iter(in_flight)) <= newest and self.link.up:
            self.link.flush()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            poll(left)

    def healthy(self):
        """None when this node serves linked to the others; else why not."""
        return None if self.link.up else "Redis is out of reach: %s" % self.link.reason

    # The link's news

    def linked(self, renewed):
        self.beat()
        if self.started:
            log.warning("linked to the other nodes again%s", " (Redis lost what it held)"
                        if renewed else "")
            self.directory.linked()
            self.broker.relinked(renewed, self.down_since)
            self.store.linked()
            self.view.tell_here(notice("cluster_up"))
        self.down_since = None

    def unlinked(self, why):
        self.down_since = self.hub.clock()
        self._beats = 0
        self.broker.unlinked()
        self.view.tell_here(notice("cluster_down"))

    def beat(self):
        self.link.script(self._beaten, "beat", tuple(self.prefix + key for key in (
            "nodes", "members", "nicks")), (self.node, int(self.options.node_timeout * 1000),
                                             self.link.channel))
        self.link.call(self._alive, "ZRANGE", self.prefix + "nodes", 0, -1)

    def _alive(self, reply):
        """The nodes that beat: members said to be on any other node (one that never
        beat, or whose loss was missed) go once it has been absent twice in a row."""
        alive = {node.decode("utf-8", "replace") for node in reply if isinstance(node, bytes)} \
            if isinstance(reply, list) else None
        if alive is None:
            return
        absent = {member.remote for member in self.view.remote.values()} - alive
        for node in absent & self._absent:
            log.warning("members listed on %s, a node that does not beat: gone", node)
            self.view.node_lost(node)
        self._absent = absent

    def _beaten(self, reply):
        """A beat's answer: 1 when this node was not listed: taken for lost meanwhile,
        its members must be told again."""
        self._beats += 1
        if isinstance(reply, ReplyError):
            self.link.refused(reply)
        elif reply == 1 and self._beats > 1:
            log.warning("the other nodes took this one for lost: telling them its members")
            self.directory.linked()

    def message(self, payload):
        """One message of the channel, from any node (this one too)."""
        kind = payload[:1]
        if kind == b"L":
            head, _, body = payload.partition(b" ")
            seq = int(head[1:])
            if seq <= 0:
                raise ValueError("not a line's number")
            self.broker.heard(seq, self.codec.loads(body))
        elif kind in (b"E", b"G", b"X", b"P", b"K", b"I", b"T"):
            self.directory.heard(kind.decode(), self.codec.loads(payload[1:]))
        elif kind == b"S":
            if self.codec.loads(payload[1:]).get("n") != self.node:
                self.store.reload()
        else:
            raise ValueError("an unknown message")

    def stream_entry(self, entry):
        """(seq, record) of an entry of a room's Stream."""
        ident, fields = entry
        seq = int(ident.split(b"-")[0])
        data = dict(zip(fields[::2], fields[1::2]))[b"e"]
        return seq, self.codec.loads(data)


# --- Dialects ---
# A dialect is how one connection speaks: it turns the messages that flood
# control releases into calls of the hub, and events into bytes. Room events
# render the same for every receiver, so they are rendered once per dialect
# (render_shared) and the bytes shared; replies may depend on the receiver.

HELP_TEXT = (
    "commands:",
    "  /nick NAME       change your nick",
    "  /me ACTION       say what you do: /me waves -> * you waves",
    "  /msg NICK TEXT   private message to NICK",
    "  /join ROOM       go to another room, created if need be (/join #dev)",
    "  /part            back to {room}",
    "  /rooms           list the rooms",
    "  /who [ROOM]      who is in your room (or in ROOM)",
    "  /topic [ROOM] [TEXT]  show or set your room's topic (or ROOM's)",
    "  /whois NICK      who NICK is: rooms, idle time, away",
    "  /away [TEXT]     say you are away (/away alone: back)",
    "  /ignore NICK     hear nothing more from NICK (/unignore NICK)",
    "  /quit [REASON]   leave",
    "  /join ROOM KEY   enter a room that has a key",
    "  /mode [ROOM]     a room's modes; its operators (@, the first in) change them:",
    "      /mode +o NICK, -o NICK   make NICK an operator of the room, or not",
    "      /mode +v NICK, -v NICK   give NICK a voice (to talk while moderated), or take it",
    "      /mode +i, +k KEY, +l N, +m, +t, +s, -n   invite-only, key, limit, moderated,",
    "                               topic for operators, secret, open to outsiders",
    "      /mode +b MASK, +e MASK, +I MASK   ban MASK (a nick, address, network or",
    "                               nick!user@host) from the room, let it in despite the",
    "                               bans, let it in without an invitation; alone: the list",
    "  /invite NICK     let NICK into your room (invite-only rooms: operators)",
    "  /kick NICK [WHY] (room operators) put NICK out of the room",
    "  /history [ROOM] [before|after N] [COUNT]   a room's past lines, numbered",
    "  /focus ROOM      (in several rooms, as the page is) where your lines go",
    "  //text           send a line that starts with /",
    "server operators (/op PASSWORD) run every room and also have:",
    "  /kick NICK [WHY]                      put NICK out of the chat",
    "  /ban NICK|ADDRESS [10m|2h|7d] [WHY]   put out and keep out (for good by default)",
    "  /unban NICK|ADDRESS, /bans            lift a ban; list them",
    "  /mute NICK|ADDRESS [10m|2h|7d]        stop NICK (and its address) talking",
    "  /unmute NICK|ADDRESS, /mutes          lift a mute; list them",
    "  /wallops TEXT                         a word to every operator",
)


MEMBERSHIP_EVENTS = (Joined, Parted, Quit, Renamed)


def mode_arguments(rest):
    """/mode [ROOM] [CHANGES [ARGUMENTS...]] as do_mode's arguments."""
    words = rest.split()
    room = words.pop(0) if words and words[0].startswith("#") else None
    return (room, words[0] if words else "", tuple(words[1:]))


def history_arguments(rest):
    """/history [ROOM] [before|after N] [COUNT] as do_history's arguments (a direction
    of "?" when the words do not fit)."""
    words = rest.split()
    room = words.pop(0) if words and words[0].startswith("#") else ""
    direction = seq = None
    if words and words[0].lower() in ("before", "after"):
        direction = words.pop(0).lower()
        seq = number_word(words.pop(0)) if words else None
    count = number_word(words.pop(0)) if words else SCROLLBACK_PAGE
    if words or count is None or direction and seq is None:
        return (room, "?")
    return (room, direction, seq, count)


RIGHTS_SHAPES = {"+o": "gave_op", "-o": "took_op", "+v": "gave_voice", "-v": "took_voice",
                 "+b": "room_banned", "-b": "room_unbanned", "+e": "room_excepted",
                 "-e": "room_unexcepted", "+I": "room_invexed", "-I": "room_uninvexed"}


def mode_lines(event):
    """A ModeChanged in words: a line for each right given or taken, one for the modes."""
    lines, what, args, sign = [], [], list(event.args), "+"
    for letter in event.changes:
        if letter in "+-":
            sign = letter
        elif letter in "ovbeI":
            lines.append(line_bytes(RIGHTS_SHAPES[sign + letter], nick=event.nick,
                                    target=args.pop(0) if args else "?", room=event.room))
        elif letter in "kl":
            value = args.pop(0) if args and (sign == "+" or letter == "k") else None
            what.append(("a key" if letter == "k" else "limited to %s" % value) if sign == "+"
                        else ("without a key" if letter == "k" else "without a limit"))
        else:
            what.append(ROOM_MODES[letter] if sign == "+" else "no longer " + ROOM_MODES[letter])
    if what:
        lines.append(line_bytes("room_mode_set", nick=event.nick, room=event.room,
                                what=", ".join(what)))
    return b"".join(lines)

# The notices a connection is closed with, which a dialect marks as the end (IRC:
# ERROR), with the WebSocket close code of each (1000 normal, 1001 going away, 1008
# policy)
FAREWELLS = {"bye": 1000, "shutting_down": 1001, "excess_flood": 1008, "ping_timeout": 1008,
             "registration_timeout": 1008, "guesses_throttled": 1008, "wrong_password": 1008,
             "kicked_you": 1008, "banned": 1008, "speaks_tls": 1002}


def whois_details(event):
    """A Whois in words: "in #lobby, #dev; idle 3m 5s; away: lunch; operator"."""
    details = ["in " + ", ".join(event.rooms) if event.rooms else "in no room",
               "idle " + span_text(event.idle, 0)[len("for "):]]
    if event.away:
        details.append("away: " + event.away)
    if event.operator:
        details.append("operator")
    if event.address:
        details.append("from " + event.address)
    return "; ".join(details)


class LineTooLong(bytes):
    """Stands in the inbox for a line over the limit: the dialect tells its sender."""


TOO_LONG = LineTooLong()


def clock_text(when):
    """HH:MM of a time, in the server's local time."""
    return time.strftime("%H:%M", time.localtime(when))


def history_lines(room, history):
    """A room's history block in the line protocol's words: a header that says how
    much, the lines with their times, an end marker."""
    count = len(history)
    return history_block_lines(history, WORDING.render(
        "history_start", count=count, room=room.name, noun="message" if count == 1 else "messages"))


def scrollback_lines(event):
    """The lines a member asked for (/history), in the line protocol's words: their
    numbers in the header, to ask for older ones with."""
    lines = event.lines
    if not lines:
        return [WORDING.render("history_none", room=event.room)]
    return history_block_lines(lines, WORDING.render(
        "history_page", count=len(lines), noun="message" if len(lines) == 1 else "messages",
        room=event.room, first=lines[0].seq, last=lines[-1].seq))


def history_block_lines(history, header):
    """Past lines under a header, with their times, and an end marker: clearly past."""
    lines = [header]
    lines += [WORDING.render("history_entry", time=clock_text(said.time),
                             line=said_line(said.nick, said.text, said.action, said.notice))
              for said in history]
    lines.append(WORDING.render("history_end"))
    return lines


class Dialect:
    """How one connection speaks; one instance per connection.

    The transport hands it the connection's messages (handle) and asks it for
    bytes (render, and render_shared for room events); it talks back through
    the server's dialect interface: send_event, admit, refuse_password,
    disconnect.
    """

    __slots__ = ("server", "conn", "hub")

    multi_room = False      # its members may be in several rooms at once
    hears_quiet = False     # it keeps member lists: it needs joins and leaves in big rooms
    echoes = False          # its members hear their own room lines (numbered, as others do)

    def __init__(self, server, conn):
        self.server = server
        self.conn = conn
        self.hub = server.hub

    def framer(self, limit):
        """What cuts the connection's bytes into messages for it."""
        return LineFramer(limit)

    def rooms_to_enter(self):
        """The rooms a newcomer enters, as (name, key) pairs: None for the default room."""
        return None

    def start(self, spoke):
        """The connection was found to speak this dialect: by its first line (spoke), or
        by saying nothing for a moment."""

    def handle(self, message):
        raise NotImplementedError

    def send_event(self, event):
        self.server.send_event(self.conn, event)

    def history_block(self, event, render):
        """A room's history as render(lines) makes it: once per change of the history,
        shared by all who speak this dialect; made anew only for a receiver who
        ignores someone in it."""
        room = event.room
        if event.hidden:
            return render([said for said in room.recent()
                           if name_key(said.nick) not in event.hidden])
        block = room.history_cache.get(type(self))
        if block is None:
            block = room.history_cache[type(self)] = render(room.recent())
        return block

    def conn_send(self, data):
        """Send bytes the dialect made itself, in order with the rest of the turn."""
        self.server.send_bytes(self.conn, data)

    def password_accepted(self, password):
        """Whether the server's password is right; a wrong one is refused after a pause,
        and an address that guessed too often is let go at once."""
        verdict, wait = self.hub.check_password(self.conn.ip, password)
        if verdict == "wait":
            self.server.disconnect(self.conn, "password guessing throttled",
                                   notice("guesses_throttled", seconds=math.ceil(wait)))
        elif verdict == "wrong":
            log.info("%r: wrong password", self.conn)
            self.server.refuse_password(self.conn, notice("wrong_password"))
        else:
            log.info("%r: password accepted", self.conn)
        return verdict == "ok"

    _RENDERERS = {}         # event class -> how this dialect renders it for one receiver

    def render(self, event):
        """The bytes of an event for this connection: its own renderer, or the shared
        bytes of a room event."""
        renderer = self._RENDERERS.get(type(event))
        if renderer is None:
            return self.render_shared(event)
        return renderer(self, event)

    @classmethod
    def render_shared(cls, event):
        raise NotImplementedError


class LineDialect(Dialect):
    """The line protocol: the shapes of the Wording table, one per line; nc and telnet
    speak it, and so does the bundled client."""

    __slots__ = ("locked", "wanted_nick")

    def __init__(self, server, conn):
        super().__init__(server, conn)
        self.locked = False         # a password is wanted and was not given yet
        self.wanted_nick = None     # a /nick sent before the password, to be greeted with

    # Registration: the password, and the nick to greet

    def start(self, spoke):
        if self.server.options.password:
            self.locked = True
            self.send_event(notice("password_required"))
        elif not spoke:
            self.server.admit(self.conn)

    def _register(self, raw):
        """Before the greeting. True when the line is handled as usual once greeted."""
        name, argument = self._split_command(raw.decode("utf-8", "replace"))
        if self.locked:
            if name == "pass":
                self._check_password(argument)
            elif name == "quit":
                self.server.disconnect(self.conn, "quit", notice("bye"))
            elif name == "nick":
                self.wanted_nick = sanitize(argument).strip() or None
            else:
                self.send_event(notice("password_needed"))
            return False
        if name == "nick" and argument.strip():
            self.server.admit(self.conn, sanitize(argument).strip())
            return False
        return self.server.admit(self.conn, self.wanted_nick)

    def _check_password(self, password):
        if self.password_accepted(password):
            self.locked = False
            self._admit_wanted()

    def _admit_wanted(self):
        self.server.admit(self.conn, self.wanted_nick)

    # What arrives

    COMMANDS = {   # name -> (hub method, how the rest of the line becomes its arguments)
        "nick": ("do_nick", lambda rest: (rest,)),
        "me": ("do_me", lambda rest: (rest,)),
        "msg": ("do_msg", lambda rest: tuple(rest.partition(" ")[::2])),
        "who": ("do_who", lambda rest: (rest,) if rest else ()),
        "help": ("do_help", lambda rest: ()),
        "join": ("do_join", lambda rest: tuple(rest.split(None, 1)) or ("",)),
        "part": ("do_part", lambda rest: tuple(rest.split(None, 1))),
        "focus": ("do_focus", lambda rest: (rest.strip(),)),
        "history": ("do_history", history_arguments),
        "rooms": ("do_rooms", lambda rest: ()),
        "topic": ("do_topic", lambda rest: (
            tuple(rest.split(None, 1)) if rest.startswith("#") else (None, rest) if rest else ())),
        "quit": ("do_quit", lambda rest: (rest,)),
        "whois": ("do_whois", lambda rest: (rest,)),
        "away": ("do_away", lambda rest: (rest,)),
        "ignore": ("do_ignore", lambda rest: (rest,)),
        "unignore": ("do_unignore", lambda rest: (rest,)),
        "kick": ("do_kick", lambda rest: tuple(rest.partition(" ")[::2])),
        "ban": ("do_ban", lambda rest: tuple(rest.partition(" ")[::2])),
        "unban": ("do_unban", lambda rest: (rest,)),
        "bans": ("do_bans", lambda rest: ()),
        "mute": ("do_mute", lambda rest: tuple(rest.partition(" ")[::2])),
        "unmute": ("do_unmute", lambda rest: (rest,)),
        "mutes": ("do_mutes", lambda rest: ()),
        "mode": ("do_mode", mode_arguments),
        "wallops": ("do_wallops", lambda rest: (rest,)),
        "invite": ("do_invite", lambda rest: tuple(rest.split(None, 1)) or ("",)),
    }

    def handle(self, message):
        if message is TOO_LONG:
            self.send_event(notice(
                "line_too_long", limit=self.server.options.max_line))
            return
        raw = strip_transport(message)
        if self.conn.member is None and not self._register(raw):
            return
        if raw[:1] == b"/" and raw[:2] != b"//":
            self._command(raw.decode("utf-8", "replace"))
            return
        text = clean_text(raw[1:] if raw[:1] == b"/" else raw)
        if text and not text.isspace():
            self.hub.do_say(self.conn.member, text)

    @staticmethod
    def _split_command(text):
        """("nick", "alice") for "/NICK alice"; ("", text) when text is not a command."""
        if text[:1] != "/" or text[:2] == "//":
            return "", text
        name, _, argument = text[1:].partition(" ")
        return name.lower(), argument

    def _command(self, text):
        name, argument = self._split_command(text)
        if name == "pass":
            self.send_event(notice("already_in"))
            return
        if name == "op":   # the password as typed, spaces and all
            self.hub.do_op(self.conn.member, argument)
            return
        if name not in self.COMMANDS:
            self.send_event(notice("unknown_command", name=sanitize(name)[:30]))
            return
        self.run_command(self.hub, self.conn.member, name, sanitize(argument))

    @classmethod
    def run_command(cls, hub, member, name, argument):
        """Run /NAME ARGUMENT for a member (IRC runs the commands it has no word for here)."""
        method, arguments = cls.COMMANDS[name]
        getattr(hub, method)(member, *arguments(argument.strip()))

    # What goes out

    @classmethod
    def render_shared(cls, event):
        kind = type(event)
        if kind is Said:
            return (said_line(event.nick, event.text, event.action, event.notice) + "\n").encode()
        if kind in MEMBERSHIP_EVENTS and event.quiet or kind in (MemberChanged, Invited, Signal):
            return b""
        if kind is Joined:
            return line_bytes("joined", nick=event.nick)
        if kind is Parted:
            if event.to:
                return line_bytes("moved", nick=event.nick, room=event.to)
            return line_bytes("left", nick=event.nick, reason="part: " + event.reason
                              if event.reason else "part")   # never a server's words
        if kind is Quit:
            return line_bytes("left", nick=event.nick, reason=event.reason)
        if kind is Renamed:
            return line_bytes("renamed", nick=event.old, new=event.new)
        if kind is TopicSet:
            return line_bytes("topic_set", nick=event.nick, room=event.room, text=event.text)
        if kind is Opped:
            return line_bytes("now_operator", nick=event.nick)
        if kind is Kicked:
            return line_bytes("kicked", nick=event.nick, by=event.by, reason=event.reason)
        if kind is ModeChanged:
            return mode_lines(event)
        raise TypeError("no line for %r" % (event,))

    def _notice(self, event):
        if event.key == "help":
            room = self.hub.default_room.name
            return "".join("*** %s\n" % line.format(room=room) for line in HELP_TEXT).encode()
        return line_bytes(event.key, **event.fields)

    def _private(self, event):
        if not event.text:
            return b""   # client tags alone: nothing to show
        text = said_line(event.sender, event.text, True) if event.action else event.text
        if event.sent:
            return line_bytes("private_sent", nick=event.target, text=text)
        return line_bytes("private", nick=event.sender, text=text)

    def _room_state(self, event):
        """Who is there, the first ones to come first (cheap however big the room), and
        the topic."""
        room = event.room
        shown = [event.unlisted] if event.unlisted else []   # a guest counts itself too
        names = (room.first_names() + shown)[:GREETING_NAMES]
        count = len(room.listed) + len(shown)
        more = count - len(names)
        state = line_bytes("in_room", room=room.name, count=count,
                           names=", ".join(names) + (", and %d more" % more if more else ""))
        if room.topic:
            state += line_bytes("topic", room=room.name, text=room.topic)
        return state

    def _topic(self, event):
        if event.text:
            return line_bytes("topic", room=event.room, text=event.text)
        return line_bytes("no_topic", room=event.room)

    def _history(self, event):
        return self.history_block(event, lambda history: "".join(
            line + "\n" for line in history_lines(event.room, history)).encode())

    def _who(self, event):
        """The member list, built once per change of the room and shared: in a big room it
        is large, and clients that ask without reading must not each pin a copy."""
        room = event.room
        key = (LineDialect, event.own)
        reply = room.cache.get(key)
        if reply is None:
            names = room.names()
            if event.own:
                reply = line_bytes("who", count=len(names), names=", ".join(names))
            else:
                reply = line_bytes("who_room", room=room.name, count=len(names),
                                   names=", ".join(names))
            room.cache[key] = reply
        return reply

    def _room_list(self, event):
        listed = [WORDING.render("room_entry", room=room, count=count)
                  for room, count in event.rooms]
        if event.total > len(listed):
            listed.append("and %d more" % (event.total - len(listed)))
        return line_bytes("rooms", count=event.total, list=", ".join(listed))

    def _whois(self, event):
        return line_bytes("whois", nick=event.nick, details=whois_details(event))

    def _scrollback(self, event):
        return "".join(line + "\n" for line in scrollback_lines(event)).encode()

    _RENDERERS = {
        Notice: _notice,
        Private: _private,
        Whois: _whois,
        Welcome: lambda self, event: line_bytes("welcome", server=event.server, nick=event.nick),
        RoomState: _room_state,
        TopicInfo: _topic,
        History: _history,
        WhoList: _who,
        RoomList: _room_list,
        Scrollback: _scrollback,
    }


# IRC formatting (bold, colours, italics, ...) is not for every dialect: stripped with
# its parameters. CTCP framing (\x01) is taken apart by the IRC dialect.
_IRC_FORMATTING = re.compile(
    "\x03(?:\\d{1,2}(?:,\\d{1,2})?)?|\x04(?:[0-9a-fA-F]{6}(?:,[0-9a-fA-F]{6})?)?"
    "|[\x02\x0f\x11\x16\x1d\x1e\x1f]")
# What IRC clients send first, as they send it: upper case, with the parameters each
# command needs. "nick alice" from nc is a chat line, not IRC.
_IRC_FIRST_LINE = re.compile(
    rb"(?:CAP (?:LS(?: \d+)?|REQ :?[^\r\n]*|END|LIST)|NICK :?[^\s:][^\s]*|PASS :?[^\s:][^\r\n]*"
    rb"|USER [^\s]+ [^\s]+ [^\s]+ [^\r\n]*) ?\r?\n?|(?:CAP|NICK|USER|PASS) ?:?\r\n"
    rb"|CAP [A-Z]{1,20}\r\n")
IRC_HOST = "chat"                    # the host part of every nick!user@host: no addresses
IRC_LINE = 512                       # bytes in a line the server sends, CR LF included
LIST_WISHES = 20                       # names, masks and sizes one LIST may ask
WHOX_FIELDS = "tcuihsnfdlaor"          # what WHOX may ask, in the order it is answered
WHOX_CACHED = 16                       # replies a room keeps rendered, WHOX shapes included
RECEIVER = "\x00me\x00"               # a receiver's nick in shared replies: no nick has NUL
SHARED_LINE = IRC_LINE - 2 - (4 * MAX_NICK - len(RECEIVER))   # bytes of one, before that


def irc_params(text):
    """(COMMAND, [params]) of an IRC line; tags and a prefix, if any, are ignored."""
    if text.startswith("@"):
        text = text.partition(" ")[2].lstrip(" ")
    if text.startswith(":"):
        text = text.partition(" ")[2].lstrip(" ")
    params = []
    while text and len(params) < 16:
        if text.startswith(":") and params:
            params.append(text[1:])
            break
        word, _, text = text.partition(" ")
        text = text.lstrip(" ")
        if word:
            params.append(word)
    return (params[0].upper(), params[1:]) if params else ("", [])


_IRC_LABEL = re.compile(r"(?:^@|;)label=([\x21-\x3a\x3c-\x7e]{1,64})(?=[; ])")


def irc_label(text):
    """The label a client put on its command (IRCv3 labeled-response), or None. Only
    short printable ones are taken: they are sent back as they came, unescaped."""
    if not text.startswith("@"):
        return None
    found = _IRC_LABEL.search(text, 0, text.find(" ") + 1)
    return found.group(1) if found else None


def with_irc_tag(line, tag):
    """An IRC line (bytes) with one more tag, first."""
    if line.startswith(b"@"):
        return b"@" + tag + b";" + line[1:]
    return b"@" + tag + b" " + line


def has_irc_batch_tag(line):
    if not line.startswith(b"@"):
        return False
    tags = line[1:line.find(b" ")]
    return tags.startswith(b"batch=") or b";batch=" in tags


def is_utf8(data):
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def irc_text(text):
    """Text from an IRC client as every dialect may show it: no formatting, nothing a
    terminal would obey."""
    return sanitize(_IRC_FORMATTING.sub("", text))


def utf8_boundary(data, limit):
    """The longest length of UTF-8 data, at most limit, that does not cut a character."""
    cut = min(len(data), limit)
    while cut < len(data) and cut and data[cut] & 0xC0 == 0x80:
        cut -= 1
    return cut


def irc_split(head, text):
    """Lines of head + text, each at most IRC_LINE bytes with its CR LF: text is cut at
    UTF-8 character boundaries when it is longer."""
    head = head.encode()
    room = IRC_LINE - len(head) - 2
    data = text.encode()
    lines = []
    while True:
        cut = utf8_boundary(data, room)
        lines.append(head + data[:cut] + b"\r\n")
        data = data[cut:]
        if not data:
            return b"".join(lines)


def irc_source(nick):
    return "%s!%s@%s" % (nick, nick, IRC_HOST)


def irc_time(when):
    """A time as IRCv3 server-time writes it: UTC, to the millisecond."""
    millis = int(when * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(millis // 1000)) + \
        ".%03dZ" % (millis % 1000)


def parse_irc_time(text):
    """The time of a server-time string (with or without milliseconds), or None."""
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,6}))?Z", text)
    if not match:
        return None
    try:
        whole = time.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return None
    return calendar.timegm(whole) + int((match.group(2) or "0").ljust(6, "0")) / 1e6


@functools.lru_cache(maxsize=1024)
def room_token(name):
    """A short token of a room's name: msgids of different rooms never meet."""
    return hashlib.sha256(name_key(name).encode()).hexdigest()[:8]


def irc_msgid(room, seq):
    """A line's IRCv3 msgid: its number in its room (the same on every node), and the
    room's token."""
    return "%d-%s" % (seq, room_token(room))


class IrcReplies:
    """A part of IrcDialect: what goes out. Numerics, room events as IRC lines, and
    replies about a room rendered once for everyone who asks."""

    __slots__ = ()

    # What goes out

    def _names_reply(self, room, end=True):
        """353 lines of at most NICK_RUN bytes of nicks each (so well within 512), 366."""
        multi, full = "multi-prefix" in self.caps, "userhost-in-names" in self.caps
        names = self._for_me(room, ("names", multi, full), lambda: b"".join(
            self._numeric_bytes("353", "%s %s :%s" % ("@" if "s" in room.modes else "=",
                                                       room.name, run), RECEIVER)
            for run in self._name_runs(room, multi, full)))
        return names + self._numeric_bytes("366", "%s :End of /NAMES list" % room.name) \
            if end else names

    @staticmethod
    def _name_runs(room, multi, full):
        """NAMES' nicks in runs that fit a line: with every rank (multi-prefix) and as
        nick!user@host (userhost-in-names) when the client asked for them."""
        if not multi and not full:
            return [run for run, _ in room.nick_runs()]
        return nick_runs(((room.ranks(member) if multi else room.rank(member)) + member.nick + (
            "!%s@%s" % (member.user or member.nick, IRC_HOST) if full else "")
            for member in room.listed), " ")

    def _for_me(self, room, what, render):
        """A reply about a room, rendered once per change of the room for everyone (with a
        stand-in for the receiver's nick) and made this receiver's by one replace: a
        burst of WHO or NAMES in a big room costs little time and no memory per copy."""
        key = (type(self), what)
        shared = room.cache.get(key)
        if shared is None:
            shared = room.cache[key] = render()
        return shared.replace(RECEIVER.encode(), self.nick.encode())

    def _who_lines(self, room, members, mask=None, whox=None):
        """352 for each member (channel "*" when the question named none), or with WHOX
        (whox: the fields asked, and the token) 354 with those fields; then 315."""
        if whox:
            lines = [self._numeric_bytes("354", self._whox_fields(room, m, *whox), RECEIVER)
                     for m in members]
        else:
            lines = [self._numeric_bytes("352", "%s %s %s %s %s %s :0 %s" % (
                room.name if room else "*", m.user or m.nick, IRC_HOST, self.server_name,
                m.nick, self._who_flags(room, m), m.realname or m.nick), RECEIVER)
                for m in members]
        lines.append(self._numeric_bytes("315", "%s :End of /WHO list" % (
            room.name if room else sanitize(mask)[:40]), RECEIVER))
        return b"".join(lines)

    def _who_flags(self, room, m):
        """H here, G away; * a server operator; B a bot; in a room, its rank (all, with
        multi-prefix)."""
        return ("G" if m.away else "H") + ("*" if m.operator else "") + ("B" if m.bot else "") + (
            (room.ranks(m) if "multi-prefix" in self.caps else room.rank(m)) if room else "")

    def _whox_fields(self, room, m, fields, token):
        """A 354's fields, in WHOX's order whatever the order asked: no accounts yet (0),
        and an address only for a server operator."""
        me = self.conn.member
        values = {"t": token, "c": room.name if room else "*", "u": m.user or m.nick,
                  "i": m.address if me.operator and m.address else "255.255.255.255",
                  "h": IRC_HOST, "s": self.server_name, "n": m.nick,
                  "f": self._who_flags(room, m), "d": "0",
                  "l": "%d" % (time.monotonic() - m.active), "a": "0", "o": "n/a",
                  "r": ":" + (m.realname or m.nick)}
        return " ".join(values[name] for name in WHOX_FIELDS if name in fields)

    def _whois_reply(self, event):
        nick = event.nick
        lines = [("311", "%s %s %s * :%s" % (nick, event.user or nick, IRC_HOST,
                                              event.realname or nick))]
        if event.rooms:
            lines.append(("319", "%s :%s" % (nick, " ".join(
                rank + room for rank, room in itertools.zip_longest(event.ranks, event.rooms,
                                                                     fillvalue="")))))
        lines.append(("312", "%s %s :chat.py" % (nick, self.server_name)))
        if event.operator:
            lines.append(("313", "%s :is an IRC operator" % nick))
        if event.bot:
            lines.append(("335", "%s :is a bot" % nick))
        if event.away:
            lines.append(("301", "%s :%s" % (nick, event.away)))
        if event.address:
            lines.append(("338", "%s %s :actually using host" % (nick, event.address)))
        lines.append(("317", "%s %d %d :seconds idle, signon time" % (nick, event.idle,
                                                                       event.signon)))
        lines.append(("318", "%s :End of /WHOIS list" % nick))
        return b"".join(self._numeric_bytes(number, text) for number, text in lines)


    def _send(self, line):
        self.conn_send(self._line(line))

    def _numeric_bytes(self, number, text, receiver=None):
        """A numeric for this client, or (receiver RECEIVER) for anyone: then cut to leave
        room for the longest nick that will stand in for RECEIVER."""
        return self._line(":%s %s %s %s" % (self.server_name, number, receiver or self.nick, text),
                          SHARED_LINE if receiver == RECEIVER else IRC_LINE - 2)

    @staticmethod
    def _line(line, size=IRC_LINE - 2):
        """A line cut to size bytes (512 with its CR LF), at a character boundary."""
        data = line.encode()
        return data[:utf8_boundary(data, size)] + b"\r\n"

    def _numeric(self, number, text):
        self.conn_send(self._numeric_bytes(number, text))

    @classmethod
    def plain_shared(cls, event):
        """A room event as an IRC line, without tags."""
        kind = type(event)
        if kind is Said:
            text = "\x01ACTION %s\x01" % event.text if event.action else event.text
            return irc_split(":%s %s %s :" % (irc_source(event.nick), "NOTICE" if event.notice
                                                else "PRIVMSG", event.room), text)
        if kind is Joined:
            joined = cls.join_line(event.nick, event.room, event.realname)
            if event.away and "away-notify" in cls.takes:
                joined += cls._line(":%s AWAY :%s" % (irc_source(event.nick), event.away))
            return joined
        if kind is MemberChanged:
            if event.realname is not None:
                return cls._line(":%s SETNAME :%s" % (irc_source(event.nick), event.realname)
                                 ) if "setname" in cls.takes else b""
            if "away-notify" not in cls.takes:
                return b""
            return cls._line(":%s AWAY%s" % (irc_source(event.nick), " :" + event.away
                                              if event.away else ""))
        if kind is Invited:
            return cls._line(":%s INVITE %s %s" % (irc_source(event.nick), event.target,
                                                   event.room)) if "invite-notify" in cls.takes \
                else b""
        if kind is Parted:
            reason = "left for %s" % event.to if event.to else event.reason
            return cls._line(":%s PART %s :%s" % (irc_source(event.nick), event.room, reason))
        if kind is Quit:
            return cls._line(":%s QUIT :%s" % (irc_source(event.nick), event.reason))
        if kind is Renamed:
            return cls._line(":%s NICK :%s" % (irc_source(event.old), event.new))
        if kind is TopicSet:
            return cls._line(":%s TOPIC %s :%s" % (irc_source(event.nick), event.room, event.text))
        if kind is Opped:
            return cls._line(":%s MODE %s +o %s" % (irc_source(event.nick), event.room, event.nick))
        if kind is ModeChanged:
            return cls._line(":%s MODE %s %s" % (irc_source(event.nick), event.room, " ".join(
                (event.changes,) + event.args)))
        if kind is Kicked:
            return cls._line(":%s KICK %s %s :%s" % (irc_source(event.by), event.room, event.nick,
                                                     event.reason))
        if kind is Signal:
            return cls._line(":%s TAGMSG %s" % (irc_source(event.nick), event.room)
                             ) if "message-tags" in cls.takes else b""
        raise TypeError("no IRC line for %r" % (event,))

    def _welcome(self, event):
        name, nick = self.server_name, event.nick
        isupport = ("CASEMAPPING=rfc7613 CHANTYPES=# NICKLEN=%d CHANNELLEN=%d TOPICLEN=%d "
                    "PREFIX=(ov)@+ CHANMODES=beI,k,l,imnst EXCEPTS INVEX MODES=%d CHANLIMIT=#:%d "
                    "MAXTARGETS=%d KICKLEN=%d AWAYLEN=%d CHATHISTORY=%d "
                    "MSGREFTYPES=msgid,timestamp MAXLIST=b:{m},e:{m},I:{m} WHOX ELIST=MNU BOT=B "
                    "MONITOR=%d TARGMAX=JOIN:{t},PART:{t},PRIVMSG:{t},NOTICE:{t},TAGMSG:{t},"
                    "NAMES:{t},KICK:{t},WHOIS:1 "
                    "NETWORK=%s UTF8ONLY".replace("{t}", str(MAX_TARGETS))
                    .replace("{m}", str(ROOM_MASKS))
                    % (MAX_NICK, MAX_ROOM + 1, MAX_TOPIC, MODE_ARGS, MAX_JOINED, MAX_TARGETS,
                       MAX_REASON, MAX_REASON, SCROLLBACK_MAX, WATCH_LIMIT,
                       re.sub(r"[^\w.-]", "-", self.hub.name)[:30] or "chat.py"))
        lines = [
            ("001", ":Welcome to %s, %s" % (self.hub.name, irc_source(nick))),
            ("002", ":Your host is %s, running chat.py %s" % (name, __version__)),
            ("003", ":This server was started %s" % self.server.started),
            ("004", "%s chat.py-%s Bio biklmnostv bklov" % (name, __version__)),
        ] + [
            ("005", "%s :are supported by this server" % " ".join(tokens))
            for tokens in (isupport.split()[at:at + 12] for at in range(0, 36, 12)) if tokens
        ] + self._lusers_lines() + [
            ("375", ":- %s message of the day -" % name),
            ("372", ":- People here talk from IRC, nc, the chat.py client and browsers."),
            ("372", ":- Everyone meets in %s: /join %s" % (self.hub.default_room.name,
                                                         self.hub.default_room.name)),
            ("372", ":- /join #room makes or enters a room; /list shows them."),
            ("376", ":End of /MOTD command"),
        ]
        return b"".join(self._line(":%s %s %s %s" % (name, number, nick, text))
                        for number, text in lines)

    def _lusers_lines(self):
        """251-255, 265 and 266: who is here and on every node (RFC 2812, modern)."""
        hub, counts = self.hub, self.server.stats()
        everyone, here = len(hub.members), counts["members"]
        nodes = 1 + len({member.remote for member in hub.members.values() if member.remote})
        peak = self.server.counters
        peak["most_here"] = max(peak["most_here"], here)
        peak["most_everywhere"] = max(peak["most_everywhere"], everyone)
        return [
            ("251", ":There are %d users and 0 invisible on %d servers" % (everyone, nodes)),
            ("252", "%d :operator(s) online" % sum(1 for member in hub.members.values()
                                                   if member.operator)),
            ("253", "%d :unknown connection(s)" % counts["unregistered"]),
            ("254", "%d :channels formed" % len(hub.rooms)),
            ("255", ":I have %d clients and %d servers" % (here, nodes - 1)),
            ("265", "%d %d :Current local users %d, max %d" % (
                here, peak["most_here"], here, peak["most_here"])),
            ("266", "%d %d :Current global users %d, max %d" % (
                everyone, peak["most_everywhere"], everyone, peak["most_everywhere"]))]

    def _room_state(self, event):
        room = event.room
        data = self.join_line(self.nick, room.name, self.conn.member.realname)
        if room.topic:
            data += self._topic_lines(room.name, room.topic, room.topic_by, room.topic_at)
        return data + self._names_reply(room)

    def _history(self, event):
        """The room's last lines: as they were said, with their times, for a client that
        takes server-time (in a batch, if it takes batches); else as NOTICEs from the
        server between two markers, clearly not said now."""
        room = event.room
        if "server-time" in self.takes:
            return self.history_block(event, lambda history: self.past_lines(
                history, room.name, "h%s-%d" % (room_token(room.name), room.seq)))
        head = ":%s NOTICE %s :" % (self.server_name, room.name)
        return self.history_block(event, lambda history: b"".join(
            irc_split(head, line[len("*** "):]) for line in history_lines(room, history)))

    def _scrollback(self, event):
        """An answer to CHATHISTORY: the lines strictly between the numbers it asked."""
        _, target, low, high = event.request
        return self.past_lines([said for said in event.lines if low < said.seq < high],
                               target, "c%d" % next(BATCH_IDS))

    def _private(self, event):
        if event.sent and "echo-message" not in self.caps:
            return b""   # IRC clients show what they sent themselves
        if not event.text:   # client tags alone
            return self.tag_lines(self._line(":%s TAGMSG %s" % (
                irc_source(event.sender), event.target)), event.time, event.msgid,
                client=event.tags, bot=event.bot) if "message-tags" in self.takes else b""
        text = "\x01ACTION %s\x01" % event.text if event.action else event.text
        return self.tag_lines(irc_split(":%s %s %s :" % (
            irc_source(event.sender), "NOTICE" if event.notice else "PRIVMSG", event.target),
            text), event.time, event.msgid, client=event.tags, bot=event.bot)

    def _topic(self, event):
        if event.text:
            return self._topic_lines(event.room, event.text, event.by, event.at)
        return self._numeric_bytes("331", "%s :No topic is set" % event.room)

    def _topic_lines(self, room_name, text, by, at):
        """332, and 333 (who set it, when) when that is known."""
        return self._numeric_bytes("332", "%s :%s" % (room_name, text)) + (
            self._numeric_bytes("333", "%s %s %d" % (room_name, by, at)) if by else b"")

    def _who_list(self, event):
        return self._names_reply(event.room)

    def _room_list(self, event):
        return b"".join([self._numeric_bytes("322", "%s %d :" % room) for room in event.rooms]
                        + [self._numeric_bytes("323", ":End of /LIST")])

    _NUMERICS = {   # Wording shape -> (numeric, text after the receiver's nick)
        "nick_taken": ("433", "{nick} :Nickname is already in use"),
        "nick_lookalike": ("433", "{nick} :Nickname looks like {other}, who is online"),
        "invalid_nick": ("432", "{name} :Erroneous nickname: {reason}"),
        "watched_online": ("730", ":{nicks}"),
        "watched_offline": ("731", ":{nicks}"),
        "watch_list": ("732", ":{nicks}"),
        "watch_list_end": ("733", ":End of MONITOR list"),
        "watch_list_full": ("734", "{limit} {nicks} :Monitor list is full"),
        "no_such_nick": ("401", "{nick} :No such nick/channel"),
        "no_such_room": ("403", "{room} :No such channel"),
        "invalid_room": ("479", "{name} :Illegal channel name: {reason}"),
        "room_lookalike": ("479", "{room} :Channel name looks like {other}"),
        "too_many_rooms": ("405", "* :There are {count} channels, the most this server allows"),
        "too_many_joined": ("405", "{room} :You have joined too many channels"),
        "rooms_too_fast": ("263", "JOIN :You are creating channels too fast; try again in "
                                  "{seconds} s"),
        "line_too_long": ("417", ":Input line was too long"),
        "password_needed": ("464", ":Password incorrect"),
        "wrong_password": ("464", ":Password incorrect"),
        "opped": ("381", ":You are now an IRC operator"),
        "no_operators": ("491", ":No O-lines for your host"),
        "room_modes": ("324", "{room} {modes}"),
        "room_ban_entry": ("367", "{room} {mask} {by} {since}"),
        "room_bans_end": ("368", "{room} :End of channel ban list"),
        "banned_from_room": ("474", "{room} :Cannot join channel (+b)"),
        "banned_in_room": ("404", "{room} :Cannot send to channel (+b)"),
        "room_list_full": ("478", "{room} {letter} :Channel list is full"),
        "masks_kept_full": ("478", "{room} {letter} :Channel list is full"),
        "room_exception_entry": ("348", "{room} {mask} {by} {since}"),
        "room_exceptions_end": ("349", "{room} :End of channel exception list"),
        "room_invitation_entry": ("346", "{room} {mask} {by} {since}"),
        "room_invitations_end": ("347", "{room} :End of channel invite list"),
        "not_room_operator": ("482", "{room} :You're not channel operator"),
        "not_in_that_room": ("441", "{target} {room} :They aren't on that channel"),
        "not_in_room": ("442", "{room} :You're not on that channel"),
        "already_there": ("443", "{target} {room} :is already on channel"),
        "unknown_mode": ("472", "{mode} :is unknown mode char to me"),
        "invite_only": ("473", "{room} :Cannot join channel (+i)"),
        "bad_room_key": ("475", "{room} :Cannot join channel (+k)"),
        "room_full": ("471", "{room} :Cannot join channel (+l)"),
        "moderated": ("404", "{room} :Cannot send to channel"),
        "invite_sent": ("341", "{target} {room}"),
        "banned": ("465", ":You are banned from this server"),
        "not_operator": ("481", ":Permission Denied- You're not an IRC operator"),
        "wrong_op_password": ("464", ":Password incorrect"),
        "op_guesses_throttled": ("464", ":Too many wrong passwords; try again in {seconds} s"),
        "away_set": ("306", ":You have been marked as being away"),
        "away_cleared": ("305", ":You are no longer marked as being away"),
        "is_away": ("301", "{nick} :{text}"),
    }
    _SILENT = ("help_hint", "pace", "already_in_room")

    def _notice(self, event):
        key, fields = event.key, event.fields
        data = b""
        if key in self._NUMERICS:
            number, text = self._NUMERICS[key]
            if "name" in fields:   # a parameter of the numeric: one word
                fields = dict(fields, name="_".join(fields["name"].split()) or "*")
            data = self._numeric_bytes(number, text.format(**fields))
        if key in FAREWELLS:
            text = WORDING.render(key, **fields)[len("*** error: " if is_error(key) else "*** "):]
            return data + self._line("ERROR :Closing link: %s" % text)
        if key == "wallops":
            return self._line(":%s WALLOPS :%s" % (irc_source(fields["nick"]), fields["text"]))
        if key == "opped":   # 381, and the user mode that comes with it
            return data + self._line(":%s MODE %s +o" % (irc_source(self.nick), self.nick))
        if key == "renamed_self":
            return self._line(":%s NICK :%s" % (irc_source(fields.get("old", fields["nick"])),
                                                 fields["nick"]))
        if key == "nick_collision":
            data = self._line(":%s NICK :%s" % (irc_source(fields["nick"]), fields["new"]))
        if key == "room_modes":
            data += self._numeric_bytes("329", "%s %d" % (fields["room"], fields["created"]))
        if key == "invited_you":
            return self._line(":%s INVITE %s :%s" % (irc_source(fields["nick"]), self.nick,
                                                     fields["room"]))
        if data or key in self._SILENT:
            return data
        if key == "help":
            return b"".join(irc_split(":%s NOTICE %s :" % (self.server_name, self.nick),
                                      line.format(room=self.hub.default_room.name))
                            for line in HELP_TEXT)
        return irc_split(":%s NOTICE %s :" % (self.server_name, self.nick),
                         WORDING.render(key, **fields)[len("*** "):])

    _RENDERERS = {
        Notice: _notice,
        Private: _private,
        Whois: _whois_reply,
        Welcome: _welcome,
        RoomState: _room_state,
        TopicInfo: _topic,
        History: _history,
        WhoList: _who_list,
        RoomList: _room_list,
        Scrollback: _scrollback,
    }


# HTTP and WebSocket: the browser page and its connection.

# An HTTP request line of any version (HTTP/0.9's "GET /path" has none, HTTP/2's preface
# is "PRI * HTTP/2.0"); a start that has not ended within SNIFF_LIMIT bytes (a long URL)
# is HTTP too, so no part of a request ever becomes chat.


BATCH_IDS = itertools.count(1)        # names of batches (chathistory answers)
CHATHISTORY_WAYS = ("LATEST", "BEFORE", "AFTER", "AROUND", "BETWEEN")


class IrcTags:
    """A part of IrcDialect: IRCv3 tags (server-time, message-tags' msgid, batch) on
    what goes out. Room events are rendered once per kind of client and shared: a
    client that takes tags becomes a variant of the dialect whose shared lines carry
    them, so a room costs one rendering per variant in use, not one per member."""

    __slots__ = ()

    SHARED_CAPS = frozenset(("server-time", "message-tags", "batch", "away-notify",
                             "extended-join", "setname", "invite-notify"))
    takes = frozenset()         # of SHARED_CAPS, those this variant's lines are made for
    _variants = {}              # takes -> the variant of IrcDialect for them

    def retag(self):
        """Become the variant for the capabilities taken (after CAP REQ)."""
        takes = self.caps & self.SHARED_CAPS
        variant = self._variants.get(takes)
        if variant is None:
            variant = self._variants[takes] = IrcDialect if not takes else type(
                "IrcDialect", (IrcDialect,), {"__slots__": (), "takes": takes})
        self.__class__ = variant

    @classmethod
    def join_line(cls, nick, room, realname):
        """A JOIN, with the account (none: "*") and real name for extended-join."""
        if "extended-join" in cls.takes:
            return cls._line(":%s JOIN %s * :%s" % (irc_source(nick), room, realname or nick))
        return cls._line(":%s JOIN %s" % (irc_source(nick), room))

    @classmethod
    def render_shared(cls, event):
        data = cls.plain_shared(event)
        if not cls.takes or not data:
            return data
        kind = type(event)
        if kind is Said:
            return cls.tag_lines(data, event.time, irc_msgid(event.room, event.seq)
                                 if event.seq else None, client=event.tags, bot=event.bot)
        if kind is Signal:
            return cls.tag_lines(data, event.time, event.msgid, client=event.tags, bot=event.bot)
        return cls.tag_lines(data, time.time())

    @classmethod
    def tag_lines(cls, data, when, msgid=None, batch=None, client="", bot=False):
        """IRC lines (data) with the tags this variant takes: a long line's msgid, client
        tags and bot tag are on its first part only."""
        tags = cls.takes
        common = ["batch=" + batch] if batch and "batch" in tags else []
        if "server-time" in tags:
            common.append("time=" + irc_time(when))
        first = common
        if "message-tags" in tags:
            first = common + (["msgid=" + msgid] if msgid else []) + (["bot"] if bot else []) \
                + ([client] if client else [])
        if not first:
            return data
        lines = data.split(b"\r\n")[:-1]
        head = ("@%s " % ";".join(first)).encode()
        rest = ("@%s " % ";".join(common)).encode() if common else b""
        return head + lines[0] + b"\r\n" + b"".join(rest + line + b"\r\n" for line in lines[1:])

    def answered(self, pieces):
        """A turn's pieces with the answer to each labeled command labeled (IRCv3
        labeled-response): no line becomes an ACK, one line is tagged, more become a
        labeled-response batch."""
        out, answer, start = [], None, None
        for piece in pieces:
            if type(piece) is ResponseEdge:
                if piece.kind is STARTS:
                    start, answer = piece, []
                elif answer is not None:   # the rest of a LATER answer comes as its own
                    out += (self._labeled(start, b"".join(answer)) if piece.kind is ENDS
                            else answer)
                    answer = None
            elif answer is not None:
                answer.append(piece)
            else:
                out.append(piece)
        return out + (answer or [])

    def _labeled(self, start, data):
        label = b"label=" + start.label.encode()
        lines, aside = [], []
        for line in data.split(b"\r\n")[:-1]:
            # A message to oneself comes twice, delivered and echoed: the echo answers.
            if lines and line == lines[-1] and start.command in ("PRIVMSG", "NOTICE", "TAGMSG"):
                aside.append(line + b"\r\n")
            else:
                lines.append(line)
        server = self.server_name.encode()
        if not lines:
            return [with_irc_tag(b":%s ACK" % server, label) + b"\r\n"] + aside
        if len(lines) == 1:
            return [with_irc_tag(lines[0], label) + b"\r\n"] + aside
        batch = b"L%d" % next(BATCH_IDS)
        out = [with_irc_tag(b":%s BATCH +%s labeled-response" % (server, batch), label)]
        out += [line if has_irc_batch_tag(line) else with_irc_tag(line, b"batch=" + batch)
                for line in lines]
        out.append(b":%s BATCH -%s" % (server, batch))
        return [b"\r\n".join(out) + b"\r\n"] + aside

    def past_lines(self, lines, target, batch):
        """Past lines (Said events) as they were said, with their times and msgids, in a
        chathistory batch when the client takes batches."""
        opened = "batch" in self.takes
        out = [self._line(":%s BATCH +%s chathistory %s" % (self.server_name, batch, target))
               ] if opened else []
        out += [self.tag_lines(self.plain_shared(said), said.time, irc_msgid(
            said.room, said.seq) if said.seq else None, batch, said.tags, said.bot)
            for said in lines]
        if opened:
            out.append(self._line(":%s BATCH -%s" % (self.server_name, batch)))
        return b"".join(out)


class IrcChatHistory:
    """A part of IrcDialect: IRCv3 draft/chathistory, from the history every dialect
    replays (memory, the data dir or Redis). A line is found by its msgid (its number
    in the room) or a time; private messages are not kept, so a conversation has no
    history to give."""

    __slots__ = ()

    def _chathistory(self, params):
        way = params[0].upper()
        if way == "TARGETS":
            self._history_targets(params[1:])
            return
        needed = 5 if way == "BETWEEN" else 4
        limit = number_word(params[needed - 1]) if len(params) >= needed else None
        if way not in CHATHISTORY_WAYS or not limit:
            self._fail("CHATHISTORY", "INVALID_PARAMS", sanitize(way)[:20],
                       "Unknown way, or missing or wrong parameters")
            return
        target = irc_text(params[1])[:MAX_ROOM + 1]
        if not target.startswith("#"):
            self.conn_send(self.past_lines((), target, "c%d" % next(BATCH_IDS)))
            return
        room = self.hub.find_room(target)
        if room is None or room not in self.conn.member.rooms:
            self._fail("CHATHISTORY", "INVALID_TARGET", "%s %s" % (way, target),
                       "Messages could not be retrieved")
            return
        refs = [self._position(room, word, way == "LATEST") for word in params[2:needed - 1]]
        if None in refs:
            self._fail("CHATHISTORY", "INVALID_PARAMS", way, "Unknown message reference")
            return
        limit = min(limit, SCROLLBACK_MAX)
        direction, seq, low, high = self._query(way, refs, limit)
        self.hub.do_history(self.conn.member, room.name, direction, seq, limit,
                            ("chathistory", room.name, low, high))

    @staticmethod
    def _position(room, word, star):
        """(after, before) numbers of a reference: msgid=, timestamp=, or * (LATEST)."""
        if word == "*" and star:
            return (0, None)
        kind, _, value = word.partition("=")
        if kind == "msgid":
            number, _, token = value.partition("-")
            seq = number_word(number)
            return (seq, seq) if seq is not None and token == room_token(room.name) else None
        when = parse_irc_time(value) if kind == "timestamp" else None
        return None if when is None else room.position(when)

    @staticmethod
    def _query(way, refs, limit):
        """(direction, number) to ask the hub, and the numbers the lines must lie
        strictly between."""
        endless = float("inf")
        after, before = refs[0]
        if way == "LATEST":
            return None, None, after, endless
        if way == "BEFORE":
            return "before", before, 0, endless
        if way == "AFTER":
            return "after", after, 0, endless
        if way == "AROUND":
            return "after", max(0, before - limit // 2 - 1), 0, endless
        last_after, last_before = refs[1]
        if after < last_before:
            return "after", after, 0, last_before
        return "before", before, last_after, endless

    def _history_targets(self, params):
        """CHATHISTORY TARGETS: the member's rooms with lines between two times."""
        times = sorted(parse_irc_time(word.partition("=")[2]) or 0 for word in params[:2])
        limit = number_word(params[2]) if len(params) > 2 else None
        if len(params) < 3 or not times[0] or not limit:
            self._fail("CHATHISTORY", "INVALID_PARAMS", "TARGETS", "Wrong parameters")
            return
        latest = sorted(((room.history[-1].time, room.name) for room in self.conn.member.rooms
                         if room.history and times[0] <= room.history[-1].time <= times[1]),
                        reverse=True)[:limit]
        batch = "c%d" % next(BATCH_IDS)
        self.conn_send(self._line(":%s BATCH +%s draft/chathistory-targets" % (
            self.server_name, batch)) + b"".join(self.tag_lines(self._line(
                ":%s CHATHISTORY TARGETS %s timestamp=%s" % (self.server_name, name, irc_time(
                    when))), when, batch=batch) for when, name in latest)
            + self._line(":%s BATCH -%s" % (self.server_name, batch)))

    def _fail(self, command, code, context, text):
        """An IRCv3 standard reply: FAIL, with the command and a code machines read."""
        self._send(":%s FAIL %s %s %s:%s" % (self.server_name, command, code,
                                              context + " " if context else "", text))


class IrcLookups:
    """A part of IrcDialect: the questions that change nothing (WHO, LIST, LUSERS,
    WHOWAS, HELP, TIME, INFO, ISON, USERHOST)."""

    __slots__ = ()

    def _list(self, params):
        wanted = self._list_filter(params[0] if params else "")
        rooms = sorted((room for room in self.hub.rooms.values()
                        if room.listed and self.hub.visible(self.conn.member, room)
                        and wanted(room)), key=lambda room: (-len(room.listed), room.key))
        lines = [self._numeric_bytes("321", "Channel :Users  Name")]
        lines += [self._numeric_bytes("322", "%s %d :%s" % (room.name, len(room.listed),
                                                             room.topic or ""))
                  for room in rooms]
        lines.append(self._numeric_bytes("323", ":End of /LIST"))
        self.conn_send(b"".join(lines))

    @staticmethod
    def _list_filter(arguments):
        """LIST's wishes (ELIST=MNU): channel names or masks, !masks (rooms that do not
        match), >N (more members than N), <N (fewer)."""
        wanted, unwanted, more, fewer = [], [], -1, float("inf")
        for word in arguments.split(",")[:LIST_WISHES]:
            if word[:1] == ">" and number_word(word[1:]) is not None:
                more = number_word(word[1:])
            elif word[:1] == "<" and number_word(word[1:]) is not None:
                fewer = number_word(word[1:])
            elif word.strip("!"):
                (unwanted if word[0] == "!" else wanted).append(
                    re.compile(fnmatch.translate(name_key(word.lstrip("!")))).match)
        return lambda room: more < len(room.listed) < fewer and (
            not wanted or any(match(room.key) for match in wanted)) and not any(
            match(room.key) for match in unwanted)

    def _who(self, params):
        """WHO a room, a nick or a mask (o: server operators only), as 352s, or with
        WHOX fields (%fields,token) as 354s."""
        mask = params[0] if params else "*"
        flags, whox, wanted = (params[1] if len(params) > 1 else "").partition("%")
        whox = self._whox_wanted(wanted) if whox else None
        whox = whox if whox and whox[0] else None   # no field it knows: a plain WHO
        me = self.conn.member
        room = self.hub.find_room(mask) if mask.startswith("#") else None
        if room is not None and self.hub.visible(me, room):
            members = [m for m in room.listed if m.operator] if "o" in flags else room.listed
            render = functools.partial(self._who_lines, room, members, None, whox)
            what = ("who", "multi-prefix" in self.caps, "o" in flags, whox)
            if whox and ("l" in whox[0] or "i" in whox[0] and me.operator   # not for long
                         or (type(self), what) not in room.cache
                         and len(room.cache) >= WHOX_CACHED):
                self.conn_send(render().replace(RECEIVER.encode(), self.nick.encode()))
            else:
                self.conn_send(self._for_me(room, what, render))
            return
        if mask in ("0", "*") or "*" in mask or "?" in mask:   # a glob over nicks
            pattern = re.compile(fnmatch.translate(mask if mask != "0" else "*"), re.IGNORECASE)
            found = [member for member in self.hub.members.values() if member.announced
                     and pattern.match(member.nick) and self.hub.seen_by(me, member)
                     ][:WHO_MASK_LIMIT]
        else:
            found = [self.hub.find_member(mask)] if self.hub.find_member(mask) else []
        found = [member for member in found if member.operator or "o" not in flags]
        self.conn_send(self._who_lines(None, found, mask, whox).replace(
            RECEIVER.encode(), self.nick.encode()))

    @staticmethod
    def _whox_wanted(wanted):
        """(fields, token) of a WHOX request: the known fields, in WHOX's order, and its
        token (up to three digits; 0 when it has none)."""
        fields, _, token = wanted.partition(",")
        return ("".join(name for name in WHOX_FIELDS if name in fields),
                token if re.fullmatch(r"[0-9]{1,3}", token) else "0")

    def _lusers(self, params):
        self.conn_send(b"".join(self._numeric_bytes(number, text)
                                for number, text in self._lusers_lines()))

    def _whowas(self, params):
        """314 and 312 for each time the nick was used, newest first (at most count),
        or 406; then 369."""
        if not params or not params[0]:
            self._numeric("431", ":No nickname given")
            return
        nick = params[0].split(",")[0]
        count = (number_word(params[1]) or 0) if len(params) > 1 else 0
        key = name_key(unicodedata.normalize("NFKC", nick))
        found = [was for was in self.hub.was if name_key(was[0]) == key]
        lines = []
        for old, user, realname, until in found[:count or len(found)]:
            lines += [self._numeric_bytes("314", "%s %s %s * :%s" % (
                old, user or old, IRC_HOST, realname or old)), self._numeric_bytes(
                "312", "%s %s :%s" % (old, self.server_name, time.ctime(until)))]
        if not found:
            lines.append(self._numeric_bytes("406", "%s :There was no such nickname"
                                             % sanitize(nick)[:40]))
        lines.append(self._numeric_bytes("369", "%s :End of WHOWAS" % sanitize(nick)[:40]))
        self.conn_send(b"".join(lines))

    def _help(self, params):
        """704, 705s and 706 on the chat's commands, or one IRC command; 524 else."""
        subject = params[0].upper() if params else "*"
        if subject == "*":
            text = [line.format(room=self.hub.default_room.name) for line in HELP_TEXT]
        elif subject in self.COMMANDS or subject in self.CHAT_COMMANDS:
            text = ["%s is understood here: see HELP for the chat's commands" % subject]
        else:
            self._numeric("524", "%s :No help available on this topic" % sanitize(subject)[:30])
            return
        numbers = ["704"] + ["705"] * (len(text) - 1)
        self.conn_send(b"".join(self._numeric_bytes(number, "%s :%s" % (subject, line))
                                for number, line in zip(numbers, text))
                       + self._numeric_bytes("706", "%s :End of /HELP" % subject))

    def _time(self, params):
        self._numeric("391", "%s :%s" % (self.server_name, time.strftime(
            "%A %B %d %Y -- %H:%M:%S %z")))

    def _info(self, params):
        self.conn_send(b"".join(self._numeric_bytes("371", ":" + line) for line in (
            "chat.py %s: one file, Python's standard library only" % __version__,
            "People talk here from IRC, nc, the chat.py client and browsers.",
            "MIT license.", "Started %s." % self.server.started))
            + self._numeric_bytes("374", ":End of /INFO list"))

    def _ison(self, params):
        found = [self.hub.find_member(name) for name in " ".join(params).split()]
        self._numeric("303", ":" + " ".join(member.nick for member in found if member))

    def _userhost(self, params):
        found = [self.hub.find_member(name) for name in params[:5]]
        self._numeric("302", ":" + " ".join("%s%s=%s%s@%s" % (
            member.nick, "*" if member.operator else "", "-" if member.away else "+",
            member.user or member.nick, IRC_HOST) for member in found if member))


class IrcDialect(IrcTags, IrcChatHistory, IrcLookups, IrcReplies, Dialect):
    """IRC as irssi, WeeChat, HexChat, bots and bridges speak it: registration with
    CAP (no capabilities), PASS, NICK and USER; rooms are channels and a member may
    be in several; enough commands and numerics for clients to track their state.

    Every line sent fits 512 bytes. IRC formatting is stripped, CTCP ACTION is /me
    both ways, other CTCP is not relayed.
    """

    __slots__ = ("wanted_nick", "user", "realname", "password", "negotiating",
                 "greeted_as", "heard", "pinged", "caps", "line_tags")

    CAPABILITIES = ("away-notify", "batch", "cap-notify", "draft/chathistory", "echo-message",
                    "extended-join", "invite-notify", "labeled-response", "message-tags",
                    "multi-prefix", "server-time", "setname", "userhost-in-names")

    multi_room = True
    hears_quiet = True      # clients keep member lists: every JOIN, PART, QUIT and NICK

    def framer(self, limit):
        """Lines end with CR LF, LF or CR; a line is at most its tags and limit bytes."""
        return LineFramer(1 + MAX_CLIENT_TAGS + 1 + limit, cr_ends_lines=True)

    def rooms_to_enter(self):
        return ()           # IRC clients join what they choose, as on any server

    def __init__(self, server, conn):
        super().__init__(server, conn)
        self.wanted_nick = None
        self.user = self.realname = None
        self.password = None
        self.negotiating = False    # CAP LS came and CAP END did not, yet
        self.caps = frozenset()     # the IRCv3 capabilities it asked for
        self.greeted_as = "*"       # the nick of its greeting, while it is being greeted
        self.heard = time.monotonic()
        self.pinged = None          # when the server's PING went out unanswered
        self.line_tags = ""         # the client tags of the line being handled

    @property
    def nick(self):
        """The receiver's nick as numerics name it: "*" before it registers."""
        member = self.conn.member
        return member.nick if member else self.greeted_as

    @property
    def server_name(self):
        name = self.hub.name
        return name if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", name) else "chat.py"

    # Registration

    def handle(self, message):
        self.heard = time.monotonic()
        self.pinged = None
        tags = (message.find(b" ") + 1 or len(message)) if message[:1] == b"@" else 0
        if message is TOO_LONG or tags > MAX_CLIENT_TAGS + 2 or \
                len(message) - tags > self.server.options.max_line:
            self._numeric("417", ":Input line was too long")
            return
        text = message.decode("utf-8", "replace")
        self.line_tags = client_tags(text[1:text.find(" ")]) if text.startswith("@") and \
            "message-tags" in self.caps else ""
        command, params = irc_params(text)
        if not command:
            return
        label = irc_label(text) if self.labels_answers() else None
        if label is None:
            self._run(message, text, command, params)
            return
        self.server.answer_edge(self.conn, ResponseEdge(label, command, STARTS))
        try:
            self._run(message, text, command, params)
        finally:
            self.server.answer_edge(self.conn, ResponseEdge(label, command, ENDS))

    def labels_answers(self):
        """IRCv3 labeled-response, for a registered client that takes batches too (as
        InspIRCd does: an answer of several lines is a batch)."""
        return (self.conn.member is not None and "labeled-response" in self.caps
                and "batch" in self.caps)

    def _run(self, message, text, command, params):
        if "\ufffd" in text and command not in self.LENIENT and not is_utf8(message):
            self._fail(sanitize(command)[:20], "INVALID_UTF8", "",
                       "Not sent: the line is not UTF-8 (the server announces UTF8ONLY)")
            return
        name, needed = self.COMMANDS.get(command, (None, 0))
        if self.conn.member is None and command not in self.BEFORE_REGISTRATION:
            if name or command in self.CHAT_COMMANDS:
                self._numeric("451", ":You have not registered")
            return
        if command in self.CHAT_COMMANDS:
            LineDialect.run_command(self.hub, self.conn.member, command.lower(),
                                    irc_text(" ".join(params)))
        elif name is None:
            self._numeric("421", "%s :Unknown command" % sanitize(command)[:30])
        elif len(params) < needed:
            self._numeric("461", "%s :Not enough parameters" % command)
        else:
            getattr(self, name)(params)

    def _cap(self, params):
        sub = params[0].upper()
        if sub == "LS":
            self.negotiating = self.conn.member is None
            self._send(":%s CAP %s LS :%s" % (self.server_name, self.nick,
                                              " ".join(self.CAPABILITIES)))
        elif sub == "LIST":
            self._send(":%s CAP %s LIST :%s" % (self.server_name, self.nick,
                                                " ".join(sorted(self.caps))))
        elif sub == "REQ":
            self._request_caps(irc_text(params[1]) if len(params) > 1 else "")
        elif sub == "END":
            self.negotiating = False
            self._register()
        else:
            self._numeric("410", "%s :Invalid CAP command" % sanitize(sub)[:20])

    def _request_caps(self, wanted):
        """CAP REQ: all of them (a "-" takes one away), or none (NAK)."""
        names = wanted.split()
        if not names or any(name.lstrip("-") not in self.CAPABILITIES for name in names):
            self._send(":%s CAP %s NAK :%s" % (self.server_name, self.nick, wanted[:400]))
            return
        caps = set(self.caps)
        for name in names:
            (caps.discard if name.startswith("-") else caps.add)(name.lstrip("-"))
        self.caps = frozenset(caps)
        self.retag()
        self._send(":%s CAP %s ACK :%s" % (self.server_name, self.nick, " ".join(names)))
        if self.conn.member is not None:
            self.conn.member.echo = "echo-message" in caps

    def _pass(self, params):
        if self.conn.member is not None:
            self._numeric("462", ":You may not reregister")
        else:
            self.password = params[0]

    def _user(self, params):
        if self.conn.member is not None:
            self._numeric("462", ":You may not reregister")
            return
        if len(params) < 4:
            self._numeric("461", "USER :Not enough parameters")
            return
        self.user = re.sub(r"[^\w.~-]", "", irc_text(params[0]), flags=re.ASCII)[:10] or "user"
        self.realname = irc_text(params[3])[:MAX_REALNAME]
        if not self.realname.strip():
            self.user = None
            self._numeric("461", "USER :Not enough parameters (a real name, even \"-\")")
            return
        self._register()

    def _nick(self, params):
        if not params[0].strip():
            self._numeric("431", ":No nickname given")
            return
        if self.conn.member is not None:
            if irc_text(params[0]) != self.conn.member.nick:   # the same: nothing to say
                self.hub.do_nick(self.conn.member, irc_text(params[0]))
            return
        nick, problem = self.hub.claim(irc_text(params[0]))
        if problem:
            self.send_event(problem)
            return
        self.wanted_nick = nick
        self._register()

    def _register(self):
        """NICK, USER and the end of CAP: check the password, then greet."""
        if self.conn.member is not None or self.negotiating or not (self.wanted_nick and
                                                                    self.user):
            return
        problem = self.hub.nick_problem(self.wanted_nick)
        if problem:   # taken while USER or CAP END was awaited
            self.wanted_nick = None
            self.send_event(problem)
            return
        if self.server.options.password and not self.password_accepted(self.password or ""):
            return
        self.greeted_as = self.wanted_nick
        if self.server.admit(self.conn, self.wanted_nick, self.realname):
            self.conn.member.user = self.user
            self.conn.member.echo = "echo-message" in self.caps
        self.server.call_later(self.server.options.irc_ping_interval, self._keep_alive)

    def _keep_alive(self):
        """PING a client that said nothing for a while; drop one that never answers."""
        if self.conn.member is None:
            return
        options = self.server.options
        now = time.monotonic()
        if self.pinged is not None and now - self.pinged >= options.irc_ping_timeout:
            self.server.disconnect(self.conn, "ping timeout", notice("ping_timeout"))
            return
        if self.pinged is None and now - self.heard >= options.irc_ping_interval:
            self.pinged = now
            self._send("PING :%s" % self.server_name)
        wait = options.irc_ping_timeout if self.pinged else (
            self.heard + options.irc_ping_interval - now)
        self.server.call_later(max(wait, 0.01), self._keep_alive)

    # Commands

    def _monitor(self, params):
        action = params[0].upper()
        if action in ("+", "-") and len(params) < 2:
            self._numeric("461", "MONITOR :Not enough parameters")
        elif action in ("+", "-", "C", "L", "S"):
            self.hub.do_watch(self.conn.member, action, params[1] if len(params) > 1 else "")

    def _tagmsg(self, params):
        """TAGMSG carries only client tags (typing notices, reactions), to clients that
        read tags; without any, there is nothing to pass on, and no error either."""
        for target in params[0].split(",")[:MAX_TARGETS]:
            self._message(target, "", False, False, self._numeric)

    def _ping(self, params):
        self._send(":%s PONG %s :%s" % (self.server_name, self.server_name, irc_text(params[0])))

    def _pong(self, params):
        pass   # heard: that is all a PONG is for

    def _quit(self, params):
        if self.conn.member is None:
            self.server.disconnect(self.conn, "quit", notice("bye"))
        else:
            self.hub.do_quit(self.conn.member, irc_text(params[0]) if params else "")

    def _join(self, params):
        if params[0] == "0":
            for room in list(self.conn.member.rooms):
                self.hub.do_part(self.conn.member, room.name, "left all channels")
            return
        keys = params[1].split(",") if len(params) > 1 else []
        for index, name in enumerate(params[0].split(",")[:MAX_TARGETS]):
            if name:
                self.hub.do_join(self.conn.member, name, keys[index] if index < len(keys) else "")

    def _part(self, params):
        reason = irc_text(params[1]).strip()[:MAX_REASON] if len(params) > 1 else ""
        for name in params[0].split(",")[:MAX_TARGETS]:
            room = self.hub.find_room(name)
            if room is None or room not in self.conn.member.rooms:
                self._numeric("442", "%s :You're not on that channel" % sanitize(name)[:40])
            else:
                self.hub.do_part(self.conn.member, room.name, reason)

    def _privmsg(self, params, quiet=False):
        """PRIVMSG, and NOTICE (quiet: no error is ever sent back for one)."""
        def error(number, text):
            if not quiet:
                self._numeric(number, text)
        if not params:
            error("411", ":No recipient given")
            return
        text, action = params[1] if len(params) > 1 else "", False
        if text.startswith("\x01"):
            kind, _, text = text.strip("\x01").partition(" ")
            if kind.upper() != "ACTION":
                return   # other CTCP (VERSION, PING, ...) is not relayed
            action = True
        text = irc_text(text).strip()
        if not text:
            error("412", ":No text to send")
            return
        for target in params[0].split(",")[:MAX_TARGETS]:
            if not self._fits(target, text, action, quiet):
                error("417", ":Input line was too long (it would not fit one line as relayed)")
                continue
            self._message(target, text, action, quiet, error)

    def _message(self, target, text, action, quiet, error):
        """PRIVMSG, NOTICE or (no text) TAGMSG to one target, with the line's tags."""
        member, tags = self.conn.member, self.line_tags
        room = self.hub.find_room(target) if target.startswith("#") else None
        if room is not None and (room in member.rooms or "n" not in room.modes):
            if text:
                self.hub.do_say(member, text, action, room, as_notice=quiet, tags=tags)
            elif tags:
                self.hub.do_signal(member, room, tags)
        elif room is not None:
            error("404", "%s :Cannot send to channel" % room.name)
        elif self.hub.find_member(target) is not None and not target.startswith("#"):
            if text or tags:
                self.hub.do_msg(member, target, text, action, as_notice=quiet, tags=tags)
        else:
            error("401", "%s :No such nick/channel" % sanitize(target)[:40])

    def _fits(self, target, text, action, notice):
        """Whether a message from this client fits one line as others get it (with its
        source in front): IRC clients cut what they send to fit, so one that does not
        is refused, told, instead of arriving cut or in two lines."""
        head = ":%s %s %s :" % (irc_source(self.conn.member.nick),
                                "NOTICE" if notice else "PRIVMSG", target)
        body = "\x01ACTION %s\x01" % text if action else text
        return len(head.encode()) + len(body.encode()) + 2 <= IRC_LINE

    def _notice_command(self, params):
        self._privmsg(params, quiet=True)

    def _names(self, params):
        member = self.conn.member
        rooms = [self.hub.find_room(name) for name in params[0].split(",")[:MAX_TARGETS]] \
            if params else list(member.rooms)
        rooms = [room if room is not None and self.hub.visible(member, room) else None
                 for room in rooms]
        several = len(rooms) > 1   # one 366 for them all, naming them as asked
        for room in rooms:
            if room is not None:
                self.conn_send(self._names_reply(room, end=not several))
        if params and (several or not all(rooms)):
            self._numeric("366", "%s :End of /NAMES list" % sanitize(params[0])[:200])

    def _whois(self, params):
        nick = params[-1]
        self.hub.do_whois(self.conn.member, nick)
        if self.hub.find_member(nick) is None:   # 401 said so: the list still ends
            self._numeric("318", "%s :End of /WHOIS list" % sanitize(nick)[:MAX_NICK * 2])

    def _oper(self, params):
        self.hub.do_op(self.conn.member, params[1])

    def _kill(self, params):
        self.hub.do_kill(self.conn.member, params[0], irc_text(params[1]) if len(params) > 1
                         else "")

    def _setname(self, params):
        realname = irc_text(params[0]).strip()[:MAX_REALNAME]
        if not realname:
            self._fail("SETNAME", "INVALID_REALNAME", "", "A real name must not be empty")
        elif self.hub.do_setname(self.conn.member, realname) and "setname" in self.caps:
            self._send(":%s SETNAME :%s" % (irc_source(self.nick), realname))

    def _wallops(self, params):
        self.hub.do_wallops(self.conn.member, irc_text(params[0]))

    def _kick(self, params):
        """KICK #room nick[,nick...] [:reason] (or #a,#b nick1,nick2: in pairs): out of
        the room, one KICK each."""
        reason = irc_text(params[2]) if len(params) > 2 else self.nick   # as servers do
        nicks, rooms = params[1].split(",")[:MAX_TARGETS], params[0].split(",")
        if len(rooms) not in (1, len(nicks)):
            self._numeric("461", "KICK :Not as many channels as nicks")
            return
        for room, nick in zip(rooms * len(nicks) if len(rooms) == 1 else rooms, nicks):
            self.hub.do_kick_from(self.conn.member, room, nick, reason)

    def _invite(self, params):
        """INVITE nick #room; alone, the rooms one is invited to (336, 337)."""
        if len(params) >= 2:
            self.hub.do_invite(self.conn.member, params[0], params[1])
        elif params:
            self._numeric("461", "INVITE :Not enough parameters")
        else:
            key = self.conn.member.key
            self.conn_send(b"".join(self._numeric_bytes("336", room.name) for room in
                                    self.hub.rooms.values() if key in room.invited)
                           + self._numeric_bytes("337", ":End of /INVITE list"))

    def _away(self, params):
        self.hub.do_away(self.conn.member, irc_text(params[0]) if params else "")

    def _topic_command(self, params):
        if len(params) > 1:
            self.hub.do_topic(self.conn.member, params[0], irc_text(params[1]))
        else:
            self.hub.do_topic(self.conn.member, params[0])

    def _mode(self, params):
        target = params[0]
        if target.startswith("#"):
            room = self.hub.find_room(target)
            if room is None:
                self._numeric("403", "%s :No such channel" % sanitize(target)[:40])
            elif len(params) == 1:
                self.hub.do_mode(self.conn.member, room.name)
            elif params[1] in ("-b", "-e", "-I") and len(params) == 2:
                self._numeric("461", "MODE :Not enough parameters")
            else:
                self.hub.do_mode(self.conn.member, room.name, params[1], params[2:])
        elif name_key(target) == name_key(self.nick):
            self._user_mode(params[1] if len(params) > 1 else "")
        else:
            self._numeric("502", ":Can't change mode for other users")

    def _user_mode(self, changes):
        """A client's own modes: +i (invisible) and +B (a bot) it sets; +o comes with
        OPER; +w is taken (WALLOPS go to operators)."""
        member = self.conn.member
        if not changes:
            self._numeric("221", "+" + ("B" if member.bot else "") + (
                "i" if member.invisible else "") + ("o" if member.operator else ""))
            return
        sign, done, bot = "+", "", member.bot
        for letter in changes[:20]:
            if letter in "+-":
                sign = letter
            elif letter == "i" and member.invisible != (sign == "+"):
                member.invisible = sign == "+"
                done += sign + letter
            elif letter == "B":
                bot = sign == "+"
            elif letter not in "iwo":
                self._numeric("501", ":Unknown MODE flag")
        if bot != member.bot:   # once, whatever the toggles: other nodes are told
            self.hub.set_bot(member, bot)
            done += "+B" if bot else "-B"
        if done:
            self._send(":%s MODE %s %s" % (irc_source(self.nick), self.nick, mode_string(done)))

    COMMANDS = {   # IRC command -> (method, parameters it needs)
        "CAP": ("_cap", 1), "PASS": ("_pass", 1), "NICK": ("_nick", 1), "USER": ("_user", 1),
        "PING": ("_ping", 1), "PONG": ("_pong", 0), "QUIT": ("_quit", 0),
        "JOIN": ("_join", 1), "PART": ("_part", 1), "PRIVMSG": ("_privmsg", 0),
        "NOTICE": ("_notice_command", 0), "NAMES": ("_names", 0), "WHO": ("_who", 0),
        "WHOIS": ("_whois", 1), "LIST": ("_list", 0), "TOPIC": ("_topic_command", 1),
        "MODE": ("_mode", 1), "ISON": ("_ison", 1), "USERHOST": ("_userhost", 1),
        "OPER": ("_oper", 2), "KICK": ("_kick", 2), "AWAY": ("_away", 0),
        "INVITE": ("_invite", 0), "LUSERS": ("_lusers", 0), "WHOWAS": ("_whowas", 0),
        "HELP": ("_help", 0), "HELPOP": ("_help", 0), "TIME": ("_time", 0),
        "INFO": ("_info", 0), "CHATHISTORY": ("_chathistory", 1), "TAGMSG": ("_tagmsg", 1),
        "MONITOR": ("_monitor", 1),
        "KILL": ("_kill", 1), "WALLOPS": ("_wallops", 1), "SETNAME": ("_setname", 1),
    }
    BEFORE_REGISTRATION = frozenset(("CAP", "PASS", "NICK", "USER", "PING", "PONG", "QUIT"))
    LENIENT = frozenset(("USER", "PASS", "QUIT"))   # taken even when not UTF-8 (cleaned)
    # The line protocol's commands IRC has no word for, run as they are: clients send
    # a command they do not know as it is typed (HexChat; /quote MUTE bob 10m elsewhere)
    CHAT_COMMANDS = frozenset(("MUTE", "UNMUTE", "MUTES", "BAN", "UNBAN", "BANS", "IGNORE",
                               "UNIGNORE", "ROOMS"))

_HTTP_REQUEST_LINE = re.compile(
    rb"[A-Z][A-Z_-]{1,19}[ \t]+[^\x00-\x20\x7f]+[ \t]+HTTP/\d+(?:\.\d+)?[ \t]*\r?\n?"
    rb"|GET[ \t]+/[^\x00-\x20\x7f]*\r?\n?")
_HTTP_REQUEST_START = re.compile(rb"[A-Z][A-Z_-]{1,19}[ \t]+(?:/|\*|https?://)")
WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
WS_TEXT, WS_BINARY, WS_CLOSE, WS_PING, WS_PONG = 0x1, 0x2, 0x8, 0x9, 0xA
HTTP_REASONS = {101: "Switching Protocols", 200: "OK", 304: "Not Modified",
                400: "Bad Request", 403: "Forbidden", 404: "Not Found",
                405: "Method Not Allowed", 414: "URI Too Long", 421: "Misdirected Request",
                426: "Upgrade Required",
                431: "Request Header Fields Too Large", 503: "Service Unavailable",
                505: "HTTP Version Not Supported"}


def ws_frame(opcode, payload=b""):
    """One unmasked, final WebSocket frame, as a server sends it."""
    size = len(payload)
    if size < 126:
        head = bytes((0x80 | opcode, size))
    elif size < 65536:
        head = bytes((0x80 | opcode, 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 127)) + size.to_bytes(8, "big")
    return head + payload


def ws_close(code, reason=""):
    """A close frame; its reason is cut to fit (123 bytes) at a character boundary."""
    data = reason.encode()
    return ws_frame(WS_CLOSE, code.to_bytes(2, "big") + data[:utf8_boundary(data, 123)])


def ws_unmask(payload, mask):
    """XOR a client frame's payload with its mask, as one big integer: no loop per byte."""
    size = len(payload)
    if not size:
        return b""
    key = (mask * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(size, "big")


def valid_close_code(code):
    """Codes a peer may send in a close frame (RFC 6455 7.4)."""
    return code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011) or 3000 <= code < 5000


class HeadReader:
    """Gathers an HTTP request's head (request line and headers, HTTP_HEAD_LIMIT bytes at
    most); bytes after it wait for what reads the connection next."""

    __slots__ = ("data", "rest", "done", "line_ended")

    def __init__(self):
        self.data = self.rest = b""
        self.done = False
        self.line_ended = False         # the request line ended (a head too long is 431, not 414)

    @property
    def buffered(self):
        return len(self.data) + len(self.rest)

    def feed(self, data):
        if self.done:
            self.rest += data[:HTTP_HEAD_LIMIT]
            return []
        self.data += data
        end, size = self.data.find(b"\r\n\r\n"), 4
        if end < 0:
            end, size = self.data.find(b"\n\n"), 2
        first_end = self.data.find(b"\n")
        if 0 <= first_end < HTTP_HEAD_LIMIT and b" HTTP/" not in self.data[:first_end]:
            end, size = first_end, 1   # HTTP/0.9: the request line is all there is
        if end < 0:
            if len(self.data) > HTTP_HEAD_LIMIT:
                self.done, self.data = True, b""
                self.line_ended = 0 <= first_end <= HTTP_HEAD_LIMIT
                return [TOO_LONG]
            return []
        self.done, self.line_ended = True, 0 <= first_end <= HTTP_HEAD_LIMIT
        head, self.rest = self.data[:end], self.data[end + size:]
        self.data = b""
        return [TOO_LONG] if end > HTTP_HEAD_LIMIT else [head]

    def finish(self):
        return []


class WsPing(bytes):
    """A ping's payload, in the inbox like a message: pings pass flood control too."""


class WsFrame(bytes):
    """Stands in the inbox for a frame that carries no message (a fragment of one under
    way, a pong): such frames cost flood allowance as messages do, so a stream of
    empty ones cannot spin the server."""


WS_FRAME = WsFrame()
WS_FRAME_COST = 6                    # bytes a fragment costs against the message limit


class WebSocketFramer:
    """RFC 6455 frames from a browser or a bot: whole text messages out (checked as
    UTF-8 across fragments, at most limit bytes, each fragment counting its header),
    pings and fragments as flood-controlled stand-ins; a frame that breaks the
    protocol closes the connection with the code the RFC gives. Frames are read in
    place, so a read of many tiny frames costs time linear in its size."""

    __slots__ = ("dialect", "limit", "data", "pos", "parts", "size", "decoder", "done")

    def __init__(self, dialect, limit, data=b""):
        self.dialect = dialect
        self.limit = limit
        self.data = data
        self.pos = 0                    # where the next frame starts in data
        self.parts = None               # fragments of a message under way
        self.size = 0
        self.decoder = None
        self.done = False               # closed: ignore the rest

    @property
    def buffered(self):
        return len(self.data) + self.size

    def feed(self, data):
        self.data = self.data[self.pos:] + data if self.pos else self.data + data
        self.pos = 0
        messages = []
        while not self.done:
            frame = self._next_frame()
            if frame is None:
                break
            message = self._take(*frame)
            if message is not None:
                messages.append(message)
        self.data, self.pos = self.data[self.pos:], 0
        return messages

    def finish(self):
        return []

    def _next_frame(self):
        """(fin, opcode, payload) of the next whole frame, or None while it is partial."""
        data, pos = self.data, self.pos
        if len(data) - pos < 2:
            return None
        first, second = data[pos], data[pos + 1]
        fin, opcode, size = first & 0x80, first & 0x0F, second & 0x7F
        if first & 0x70:
            return self._fail(1002, "reserved bits set (no extensions were agreed)")
        if not second & 0x80:
            return self._fail(1002, "a client's frames must be masked")
        if opcode >= 8 and (not fin or size > 125):
            return self._fail(1002, "a control frame of over 125 bytes, or in fragments")
        offset = pos + 2
        if size >= 126:
            extra = 2 if size == 126 else 8
            if len(data) < offset + extra:
                return None
            size = int.from_bytes(data[offset:offset + extra], "big")
            offset += extra
        if opcode < 8 and self.size + size > self.limit:
            return self._fail(1009, "a message of over %d bytes" % self.limit)
        if len(data) < offset + 4 + size:
            return None
        mask = data[offset:offset + 4]
        payload = ws_unmask(data[offset + 4:offset + 4 + size], mask)
        self.pos = offset + 4 + size
        return fin, opcode, payload

    def _take(self, fin, opcode, payload):
        """A message when a text message is complete, or a stand-in for a ping or a
        fragment; other control frames are handled here."""
        if opcode == WS_PING:
            return WsPing(payload)
        if opcode == WS_PONG:
            return WS_FRAME
        if opcode == WS_CLOSE:
            self._closed_by_peer(payload)
        elif opcode == WS_BINARY and self.parts is None:
            self._fail(1003, "only text messages are understood")
        elif opcode == WS_TEXT and self.parts is None:
            self.parts, self.size = [], 0
            self.decoder = codecs.getincrementaldecoder("utf-8")("strict")
            return self._fragment(fin, payload)
        elif opcode == 0 and self.parts is not None:
            return self._fragment(fin, payload)
        else:
            self._fail(1002, "unexpected opcode %d" % opcode)
        return None

    def _fragment(self, fin, payload):
        try:
            self.decoder.decode(payload, final=bool(fin))
        except UnicodeDecodeError:
            self._fail(1007, "a text message that is not UTF-8")
            return None
        if payload:
            self.parts.append(payload)
        if not fin:
            self.size += len(payload) + WS_FRAME_COST
            return WS_FRAME
        message = b"".join(self.parts)
        self.parts, self.size = None, 0
        return message

    def _closed_by_peer(self, payload):
        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1000
        if len(payload) == 1 or (len(payload) >= 2 and not valid_close_code(code)):
            self._fail(1002, "an invalid close frame")
            return
        try:
            payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            self._fail(1007, "a close reason that is not UTF-8")
            return
        self.done = True
        self.dialect.close_socket("connection closed", ws_close(1000))

    def _fail(self, code, why):
        self.done = True
        self.dialect.close_socket("websocket protocol error: " + why, ws_close(code, why))
        return None


class HttpDialect(Dialect):
    """HTTP/1.1 on the chat port: GET / is the page, GET /ws becomes a WebSocket that
    speaks the line protocol in and JSON events out.

    A connection stays open after a page or a 404 for the browser's next request
    (until the registration timeout): a browser reuses a socket it has used before
    and leaves alone the spare ones it opened ahead of time, which a silence may
    have had greeted as nc. Errors close it."""

    __slots__ = ("persistent",)

    def __init__(self, server, conn):
        super().__init__(server, conn)
        self.persistent = False         # the client keeps the connection for more

    def framer(self, limit):
        return HeadReader()

    def handle(self, head):
        if head is TOO_LONG:
            if self.conn.framer.line_ended:
                self._respond(431, "the request's head is over %d bytes" % HTTP_HEAD_LIMIT)
            else:
                self._respond(414, "the request line is over %d bytes" % HTTP_HEAD_LIMIT)
            return
        request = self._parse(head)
        if request is None:
            self._respond(400, "a malformed request")
            return
        method, path, version, headers = request
        self.persistent = version == "HTTP/1.1" and "close" not in headers.get(
            "connection", "").lower()
        if version not in ("HTTP/1.0", "HTTP/1.1"):
            self._respond(505, "HTTP/1.0 and HTTP/1.1 only")
            return
        if path in ("/healthz", "/metrics") and self.server.options.health:
            self._operating(method, path)   # for load balancers: any Host, --no-web too
            return
        if not self.server.options.web:
            self._respond(404, "this chat server has no web page: connect with nc, IRC or "
                               "chat.py client")
            return
        log.info("%r: %s %s", self.conn, method, sanitize(path)[:60])
        host = headers.get("host", "")
        if not self.server.web_host_ok(host):
            log.warning("%r: refused the host name %s", self.conn, sanitize(host)[:80])
            self._respond(421, "this chat does not answer to the name %s; its operator may "
                          "allow it with --web-host" % sanitize(host)[:80])
        elif method not in ("GET", "HEAD"):
            self._respond(405, "only GET and HEAD", {"Allow": "GET, HEAD"})
        elif path == "/":
            self._page(method, headers)
        elif path == "/ws":
            self._upgrade(headers)
        else:
            self._respond(404, "nothing here: the chat is at /", keep=True)

    @staticmethod
    def _parse(head):
        """(method, path, version, {lower-case header: value}), or None when it is not
        HTTP; HTTP/0.9's version is ""."""
        lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
        parts = lines[0].rstrip("\r").split(" ")
        if len(parts) == 2:
            parts.append("")
        if len(parts) != 3 or not parts[1].startswith(("/", "*")):
            return None
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip():
                return None
            headers[name.lower()] = value.strip()
        if parts[2] == "HTTP/1.1" and "host" not in headers:
            return None
        return parts[0], parts[1].split("?", 1)[0], parts[2], headers

    def _operating(self, method, path):
        if method not in ("GET", "HEAD"):
            self._respond(405, "only GET and HEAD", {"Allow": "GET, HEAD"})
        elif path == "/healthz":
            why = self.server.health()
            self._respond(200 if why is None else 503, why or "", {
                "Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store"},
                body=b"" if method == "HEAD" else ("%s\n" % (why or "ok")).encode(), keep=True)
        elif not self.server.metrics_allowed(self.conn.ip):
            self._respond(403, "metrics are only for the addresses of --metrics-allow")
        else:
            body = self.server.metrics_text().encode()
            self._respond(200, "", {"Content-Type": "text/plain; version=0.0.4; charset=utf-8",
                                    "Cache-Control": "no-store"},
                          body=b"" if method == "HEAD" else body, length=len(body), keep=True)

    def _page(self, method, headers):
        if headers.get("if-none-match") == PAGE_ETAG:
            self._respond(304, "", {"ETag": PAGE_ETAG}, body=b"", keep=True)
            return
        host = headers.get("host", "")
        csp = PAGE_CSP
        if re.fullmatch(r"[\w.:\[\]-]+", host):   # the page's own WebSocket, by name
            csp = csp.replace("connect-src 'self'", "connect-src 'self' ws://%s wss://%s"
                              % (host, host))
        self._respond(200, "", {"Content-Type": "text/html; charset=utf-8",
                                "Content-Security-Policy": csp,
                                "Cache-Control": "no-cache", "ETag": PAGE_ETAG},
                      body=PAGE_BYTES if method == "GET" else b"", length=len(PAGE_BYTES),
                      keep=True)

    def _upgrade(self, headers):
        """The WebSocket handshake: version 13, a key, and, from a browser, this page's
        own origin: another site's page must not talk in the room as its visitor."""
        if "websocket" not in headers.get("upgrade", "").lower() or \
                "upgrade" not in headers.get("connection", "").lower():
            self._respond(426, "this address is for WebSocket connections",
                          {"Upgrade": "websocket", "Sec-WebSocket-Version": "13"})
            return
        if headers.get("sec-websocket-version") != "13":
            self._respond(426, "WebSocket version 13 only", {"Sec-WebSocket-Version": "13"})
            return
        key = headers.get("sec-websocket-key", "")
        try:
            valid_key = len(base64.b64decode(key, validate=True)) == 16
        except ValueError:
            valid_key = False
        if not valid_key:
            self._respond(400, "a missing or malformed Sec-WebSocket-Key")
            return
        origin = headers.get("origin")
        scheme = "https://" if self.conn.tls else "http://"
        if origin is not None and origin.lower() != scheme + headers.get("host", "").lower():
            log.warning("%r: WebSocket from another site refused (%s)", self.conn,
                        sanitize(origin)[:80])
            self._respond(403, "a page from another site may not connect")
            return
        accept = base64.b64encode(hashlib.sha1((key + WEBSOCKET_GUID).encode()).digest())
        self.conn_send(self._head(101, {"Upgrade": "websocket", "Connection": "Upgrade",
                                        "Sec-WebSocket-Accept": accept.decode()}))
        self.server.change_dialect(self.conn, WebSocketDialect, self.conn.framer.rest)

    @staticmethod
    def _head(status, headers):
        lines = ["HTTP/1.1 %d %s" % (status, HTTP_REASONS[status])]
        lines += ["%s: %s" % item for item in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def _respond(self, status, why, headers=None, body=None, length=None, keep=False):
        """A whole response; then the connection closes, or (keep) waits for the next
        request when the client keeps it."""
        if body is None:
            body = ("%d %s: %s\n" % (status, HTTP_REASONS[status], why)).encode()
            headers = dict(headers or {}, **{"Content-Type": "text/plain; charset=utf-8"})
        keep = keep and self.persistent
        headers = dict(headers or {})
        headers.update({"Content-Length": str(len(body) if length is None else length),
                        "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                        "Connection": "keep-alive" if keep else "close"})
        self.conn_send(self._head(status, headers) + body)
        if keep:
            self.server.call_later(0, self.server.next_request, self.conn)
        else:
            self.server.disconnect(self.conn, "http %d" % status)

    def refuse_plaintext(self):
        """Plain HTTP on the TLS port."""
        self._respond(400, "this server speaks HTTPS: use https:// in the address")

    def render(self, event):
        return b""   # no chat before the upgrade; refusals come as HTTP statuses


def json_time(when):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


class WebSocketDialect(LineDialect):
    """The browser's connection: line-protocol commands in (one per text message, so
    every command works as for nc), JSON events out, one per text message.

    A page shows several rooms at once, as an IRC client does: its member is in all
    of them, and /focus says where its plain lines go. Its own lines come back to it,
    numbered like everyone's, so it can tell what it has seen after a reconnect."""

    __slots__ = ("wanted_rooms",)

    multi_room = True
    hears_quiet = True      # the page keeps member lists
    echoes = True

    def __init__(self, server, conn):
        super().__init__(server, conn)
        self.wanted_rooms = []      # /join lines sent before /nick: the rooms to come back to

    def framer(self, limit):
        return WebSocketFramer(self, limit)

    def start(self, spoke):
        super().start(spoke=True)   # the page speaks first: /nick, then /pass if asked

    def rooms_to_enter(self):
        return tuple(self.wanted_rooms) or None

    def _register(self, raw):
        """Before the greeting, /join lines say which rooms to enter, and a nick that
        cannot be had is refused (another /nick may follow): a page asks its user for
        another one instead of joining as a guest."""
        name, argument = self._split_command(raw.decode("utf-8", "replace"))
        if name == "join":
            if argument.split() and len(self.wanted_rooms) < MAX_JOINED:
                self.wanted_rooms.append(tuple(argument.split(None, 1)))
            return False
        if name == "nick" and not self.locked and self._refused(argument):
            return False
        return super()._register(raw)

    def _admit_wanted(self):
        if self.wanted_nick and self._refused(self.wanted_nick):
            self.wanted_nick = None
        else:
            super()._admit_wanted()

    def _refused(self, nick):
        """Whether nick (when one is asked for) cannot be had: the page is told why."""
        nick = sanitize(nick).strip()
        problem = self.hub.claim(nick)[1] if nick else None
        if problem is not None:
            self.send_event(problem)
        return problem is not None

    def handle(self, message):
        kind = type(message)
        if kind is WsPing:
            self.conn_send(ws_frame(WS_PONG, message))
        elif kind is not WsFrame:
            super().handle(message)

    def close_socket(self, reason, frame):
        self.conn_send(frame)
        self.server.disconnect(self.conn, reason)

    @staticmethod
    def frame(obj):
        return ws_frame(WS_TEXT, json.dumps(obj, ensure_ascii=False,
                                            separators=(",", ":")).encode())

    @classmethod
    def render_shared(cls, event):
        return b"" if type(event) is Signal else cls.frame(cls.event_json(event))

    @staticmethod
    def event_json(event):
        kind = type(event)
        if kind is Said:
            return {"type": "noticed" if event.notice else "acted" if event.action else "said",
                    "room": event.room, "seq": event.seq,
                    "nick": event.nick, "text": event.text, "time": json_time(event.time)}
        if kind is Joined:
            return {"type": "joined", "room": event.room, "nick": event.nick,
                    "quiet": event.quiet, "away": event.away}
        if kind is MemberChanged:
            return {"type": "away", "room": event.room, "nick": event.nick, "text": event.away
                    } if event.realname is None else {"type": "realname", "room": event.room,
                                                      "nick": event.nick, "text": event.realname}
        if kind is Invited:
            return {"type": "invited", "room": event.room, "nick": event.nick,
                    "target": event.target}
        if kind is Parted:
            return {"type": "left", "room": event.room, "nick": event.nick,
                    "reason": event.reason, "to": event.to, "quiet": event.quiet}
        if kind is Quit:
            return {"type": "quit", "room": event.room, "nick": event.nick,
                    "reason": event.reason, "quiet": event.quiet}
        if kind is Renamed:
            return {"type": "renamed", "room": event.room, "old": event.old, "new": event.new,
                    "quiet": event.quiet}
        if kind is TopicSet:
            return {"type": "topic", "room": event.room, "nick": event.nick, "text": event.text}
        if kind is Opped:
            return {"type": "opped", "room": event.room, "nick": event.nick}
        if kind is ModeChanged:
            return {"type": "mode", "room": event.room, "nick": event.nick,
                    "changes": event.changes, "args": list(event.args)}
        if kind is Kicked:
            return {"type": "kicked", "room": event.room, "nick": event.nick, "by": event.by,
                    "reason": event.reason}
        raise TypeError("no JSON for %r" % (event,))

    def _notice(self, event):
        key, fields = event.key, event.fields
        if key == "help":
            room = self.hub.default_room.name
            return self.frame({"type": "help", "lines": [line.format(room=room)
                                                           for line in HELP_TEXT]})
        text = WORDING.render(key, **fields)[len("*** "):]
        data = self.frame(dict(fields, type="error" if is_error(key) else "notice", code=key,
                               text=text))
        close = FAREWELLS.get(key)
        return data + ws_close(close, text) if close else data

    def _history(self, event):
        return self.history_block(event, lambda history: self.frame({
            "type": "history", "room": event.room.name, "before": None, "after": None,
            "more": bool(history) and history[0].seq > 1,
            "lines": [self.event_json(said) for said in history]}))

    def _scrollback(self, event):
        return self.frame({"type": "history", "room": event.room, "before": event.before,
                           "after": event.after, "more": event.more,
                           "lines": [self.event_json(said) for said in event.lines]})

    def _who(self, event):
        """The member list, built once per change of the room and shared, as for nc."""
        room = event.room
        key = (WebSocketDialect, event.own)
        reply = room.cache.get(key)
        if reply is None:
            reply = room.cache[key] = self.frame({
                "type": "who", "room": room.name, "own": event.own,
                "members": sorted((member.nick for member in room.listed), key=name_key),
                "operators": [member.nick for member in room.operators],
                "voiced": [member.nick for member in room.voiced if member in room.listed]})
        return reply

    _RENDERERS = {
        Notice: _notice,
        Private: lambda self, event: self.frame({
            "type": "private", "nick": event.sender, "to": event.target, "text": event.text,
            "action": event.action, "sent": event.sent, "time": json_time(event.time)}
        ) if event.text else b"",
        Welcome: lambda self, event: self.frame({"type": "welcome", "server": event.server,
                                                 "nick": event.nick}),
        RoomState: lambda self, event: self.frame({
            "type": "room", "room": event.room.name, "topic": event.room.topic,
            "modes": event.room.modes, "seq": event.room.seq,
            "count": len(event.room.listed), "members": [
                member.nick for member in itertools.islice(event.room.listed, WEB_MEMBERS)],
            "operators": [member.nick for member in event.room.operators],
            "voiced": [member.nick for member in event.room.voiced if member in event.room.listed]}),
        Whois: lambda self, event: self.frame({
            "type": "whois", "nick": event.nick, "rooms": list(event.rooms),
            "idle": int(event.idle), "away": event.away, "operator": event.operator,
            "address": event.address, "details": whois_details(event)}),
        TopicInfo: lambda self, event: self.frame({"type": "topic_info", "room": event.room,
                                                   "text": event.text}),
        History: _history,
        WhoList: _who,
        RoomList: lambda self, event: self.frame({
            "type": "rooms", "total": event.total, "joined": list(event.joined),
            "rooms": [{"name": name, "members": count, "joined": name in event.joined}
                      for name, count in event.rooms]}),
        Scrollback: _scrollback,
    }


def line_bytes(key, **fields):
    """One line of the line protocol, encoded, newline included (WORDING.render's work
    without a call more: half the time, for every line a connection gets of its own)."""
    return (WORDING.templates[key].format_map(fields) + "\n").encode()


def dialect_for(first_line, ended=True):
    """The dialect a connection speaks, from its first line (or, not ended, the start of
    one too long to wait for): an HTTP request line means HTTP (refused when the web is
    off: a request is never chat), an IRC registration command (CAP, NICK, USER, PASS)
    IRC; anything else is the line protocol."""
    if (_HTTP_REQUEST_LINE.fullmatch(first_line) if ended
            else _HTTP_REQUEST_START.match(first_line)):
        return HttpDialect
    if ended and _IRC_FIRST_LINE.fullmatch(first_line):
        return IrcDialect
    return LineDialect


# --- Transport ---

class BufferedSocket:
    """A non-blocking socket with an output queue that never blocks its owner.

    Queued output is a deque of shared buffers (a room event is rendered once
    for all its receivers) with an offset into the first one, so a backed-up
    peer costs an append per message, never a copy of its whole queue.
    """

    __slots__ = ("sock", "outbox", "queued", "head", "retry")

    def __init__(self, sock):
        self.sock = sock
        self.outbox = ()                # a deque while output waits: most of the time none
        self.queued = 0                 # bytes in outbox, minus the sent head
        self.head = 0                   # bytes of outbox[0] already sent
        self.retry = None               # buffer to send again after a would-block

    def queue(self, data):
        if data:   # an empty buffer would never be consumed
            if not self.outbox:
                self.outbox = collections.deque()
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
        if not outbox:
            self.outbox = ()


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


def server_tls_context(cert_file, key_file=None):
    """A TLS server context and its certificate's fingerprint (key_file may be in cert_file)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    with open(cert_file, encoding="ascii", errors="replace") as pem:
        block = _PEM_CERTIFICATE.search(pem.read())
    return context, certificate_fingerprint(ssl.PEM_cert_to_DER_cert(block.group()))


@dataclass
class ServerOptions:
    """Everything a ChatServer can be told; every timer is here so tests can shorten it."""
    host: Optional[str] = None          # None: all interfaces
    port: int = DEFAULT_PORT
    family: Optional[int] = None        # socket.AF_INET / AF_INET6 to restrict, None for both
    name: Optional[str] = None          # shown in the greeting; default: the host name
    room: str = DEFAULT_ROOM            # where everyone starts
    max_rooms: int = DEFAULT_MAX_ROOMS
    max_clients: int = DEFAULT_MAX_CLIENTS
    max_line: int = DEFAULT_MAX_LINE
    announce_limit: int = DEFAULT_ANNOUNCE_LIMIT
    queue_limit: int = SEND_QUEUE_LIMIT
    queue_grace: float = SEND_QUEUE_GRACE
    greet_delay: float = GREET_DELAY
    shutdown_timeout: float = SHUTDOWN_FLUSH_TIMEOUT
    close_linger: float = CLOSE_LINGER
    tls_context: Optional["ssl.SSLContext"] = None   # set: clients must speak TLS
    password: Optional[str] = None     # set: clients must send /pass first
    register_timeout: float = REGISTER_TIMEOUT
    wrong_password_delay: float = WRONG_PASSWORD_DELAY
    rate: float = DEFAULT_RATE         # lines/s per client; 0 turns flood control off
    burst: int = DEFAULT_BURST
    flood_lag: float = FLOOD_LAG       # seconds of lines a client may be ahead of --rate
    max_per_ip: int = 0                # 0: no limit
    history: int = DEFAULT_HISTORY     # public lines replayed to newcomers, per room; 0: none
    history_memory: int = HISTORY_MEMORY   # bytes all rooms' histories may hold together
    web: bool = True                   # HTTP and WebSocket on the same port
    web_hosts: tuple = ()              # more names the page may be reached by (see web_host_ok)
    op_password: Optional[str] = None  # set: /op PASSWORD makes an operator
    data_dir: Optional[str] = None     # set: history, topics and bans survive restarts
    log_max_bytes: int = DEFAULT_LOG_MAX_BYTES
    irc_ping_interval: float = IRC_PING_INTERVAL
    irc_ping_timeout: float = IRC_PING_TIMEOUT
    redis: Optional[str] = None        # set: a node of a chat shared through this Redis URL
    redis_prefix: str = REDIS_PREFIX
    node: Optional[str] = None         # this node's name (default: host:port)
    node_timeout: float = NODE_TIMEOUT
    redis_timeout: float = REDIS_REPLY_TIMEOUT
    health: bool = True                # GET /healthz and /metrics
    reuse_port: bool = False           # other processes listen on the port too (--workers)
    metrics_allow: tuple = ("127.0.0.0/8", "::1/128")   # who may read /metrics


@dataclass(frozen=True)
class ConnectionInfo:
    """What the server can tell about one connection (see ChatServer.connections())."""
    number: int                 # in accept order, from 1
    nick: Optional[str]         # None before it is in the chat
    address: str                # ip:port of the peer
    stage: str                  # "handshake", "opening", "chat", "denied" or "closing"
    rooms: tuple                # names of the rooms it is in
    backlog: int                # bytes queued for it that its socket has not taken yet
    buffered_input: int         # bytes received from it and not handled yet
    waiting_lines: int          # complete lines that flood control holds back


@dataclass(frozen=True)
class RoomInfo:
    name: str
    members: tuple              # nicks, in join order
    topic: Optional[str]


# The stages of a connection's life, in order.
HANDSHAKE = "handshake"         # the TLS handshake is running
OPENING = "opening"             # its first line shows its dialect; then it registers
CHAT = "chat"                   # a member: receives room events, may talk
DENIED = "denied"               # sent a wrong password: unheard until closed after a pause
CLOSING = "closing"             # leaving: last output is flushed, input ignored
CLOSED = "closed"


class Connection(BufferedSocket):
    """One client of the server: its socket and buffers, the dialect it speaks, its
    place in the chat (member) and its flood allowance.

    Only the server's loop touches a connection; the server decides, the
    connection only holds state and moves bytes.
    """

    __slots__ = ("number", "peer", "ip", "tls", "stage", "framer", "dialect", "member", "inbox",
                 "inbox_bytes", "tokens", "refilled", "release_pending", "events", "reading",
                 "want_write", "peer_done", "over_since", "stuck_since", "owed", "held",
                 "__weakref__")

    def __init__(self, sock, peer, number, burst):
        super().__init__(sock)
        self.number = number
        self.peer = peer
        self.ip = peer_ip(peer)
        self.tls = False                # the socket is an SSLSocket
        self.stage = OPENING
        self.framer = None              # turns received bytes into messages
        self.dialect = None             # known from the first line
        self.member = None              # in the chat
        self.inbox = ()                 # messages waiting for flood control (a deque then)
        self.inbox_bytes = 0
        self.tokens = burst             # flood control: messages it may send right now
        self.refilled = time.monotonic()
        self.release_pending = False    # a timer will release the inbox
        self.events = 0                 # selector interest as registered
        self.reading = True             # False: input is over, or refused
        self.want_write = False         # output is waiting for the socket to drain
        self.peer_done = False          # the peer will send no more
        self.over_since = None          # since when its backlog is over the limit...
        self.stuck_since = None         # ...and since when its socket took none of it
        self.owed = 0                   # bytes of replies for it in this turn
        self.held = False               # its input waits until its replies are out

    def __repr__(self):
        who = " " + self.member.nick if self.member else ""
        return "#%d%s (%s)" % (self.number, who, format_address(self.ip, self.peer[1]))

    def info(self):
        member = self.member
        return ConnectionInfo(
            self.number, member and member.nick, format_address(self.ip, self.peer[1]),
            self.stage, tuple(room.name for room in member.rooms) if member else (),
            self.queued, self.inbox_bytes + (self.framer.buffered if self.framer else 0),
            len(self.inbox))

    def read(self, size):
        """Up to about size received bytes, b"" at end of stream; raises WOULD_BLOCK when
        there are none.

        TLS hands out one record (16 KB at most) per recv(), and what a record holds
        beyond size stays decrypted inside the SSL object, where the selector cannot
        see it: keep reading while records come, then take what is left over.
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
        while self.sock.pending():
            parts.append(self.sock.recv(self.sock.pending()))
        return b"".join(parts)

    def take_tokens(self, wanted, rate, burst):
        """How many of wanted messages the flood allowance lets through now."""
        now = time.monotonic()
        self.tokens = min(burst, self.tokens + (now - self.refilled) * rate)
        self.refilled = now
        allowed = min(wanted, int(self.tokens))
        self.tokens -= allowed
        return allowed

    def seconds_to_next_token(self, rate):
        return max(0.0, (1 - self.tokens) / rate)


class LineFramer:
    """Cuts received bytes into lines (LF; a CR before it is kept for the dialect, or,
    with cr_ends_lines, ends a line by itself).

    A line over the limit becomes TOO_LONG and is never buffered beyond it.
    """

    __slots__ = ("limit", "cr_ends_lines", "partial", "discarding")

    def __init__(self, limit, cr_ends_lines=False):
        self.limit = limit
        self.cr_ends_lines = cr_ends_lines
        self.partial = b""
        self.discarding = False         # inside an over-long line, dropping to its end

    @property
    def buffered(self):
        return len(self.partial)

    def feed(self, data):
        """The complete lines in data, after what came before."""
        if self.cr_ends_lines and b"\r" in data:
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if self.discarding:
            end = data.find(b"\n")
            if end < 0:
                return []
            self.discarding = False
            data = data[end + 1:]
        if self.partial:
            data = self.partial + data   # the partial line is at most the limit
        lines = data.split(b"\n")
        self.partial = lines.pop()
        limit = self.limit
        if lines and len(data) > limit:
            lines = [TOO_LONG if len(line) - (line[-1:] == b"\r") > limit else line
                     for line in lines]
        if len(self.partial) > limit + 1:   # room for a CR
            self.partial = b""
            self.discarding = True
            lines.append(TOO_LONG)
        return lines

    def finish(self):
        """At the end of the stream: the last line, if it had no newline."""
        last, self.partial = self.partial, b""
        return [last] if last and not self.discarding else []


class Sniffer:
    """The first bytes of a connection, kept until its first line shows which dialect
    it speaks; then the server picks the dialect and its framer takes over."""

    __slots__ = ("server", "conn", "data")

    def __init__(self, server, conn):
        self.server, self.conn, self.data = server, conn, b""

    @property
    def buffered(self):
        return len(self.data)

    def feed(self, data):
        self.data += data
        if self.data[:1] == b"\x16" and not self.conn.tls:
            self.server.refuse_tls_handshake(self.conn)
            return []
        end = re.search(b"\r\n?|\n", self.data)   # a lone CR ends a line too, for judging
        if end:
            return self._decide(self.data[:end.end()], True)
        if len(self.data) > SNIFF_LIMIT:
            return self._decide(self.data, False)
        return []

    def finish(self):
        if not self.data:
            return []
        return self._decide(self.data, True) + self.conn.framer.finish()

    def _decide(self, first_line, ended):
        return self.server.choose_dialect(self.conn, dialect_for(first_line, ended))


class RoomTurn:
    """One room's events of a turn, and their bytes once rendered for a dialect."""

    __slots__ = ("seqs", "events", "excluded", "uids", "rendered")

    def __init__(self):
        self.seqs = []          # the turn's sequence number of each event
        self.events = []
        self.excluded = []      # the connections each event is not for (its speaker, ...)
        self.uids = set()       # of events told in several rooms (Quit, Renamed)
        self.rendered = {}      # dialect class -> (bytes, offset of each event's bytes)

    def bytes_for(self, dialect):
        got = self.rendered.get(dialect)
        if got is None:
            parts = [dialect.render_shared(event) for event in self.events]
            offsets = [0]
            offsets.extend(itertools.accumulate(map(len, parts)))
            got = self.rendered[dialect] = (b"".join(parts), offsets)
        return got


# What a connection's marks in a turn say, besides the room events it is due.
DATA, SKIP, ENTER, LEAVE = range(4)

# Where what one command of a connection got starts or ends, among its pieces: its
# dialect may label that answer (IRCv3 labeled-response). An answer that comes in a later
# turn (read from the store) ends with LATER where the command ended, and is an answer
# of its own when it comes.
ResponseEdge = collections.namedtuple("ResponseEdge", "label command kind")
STARTS, ENDS, LATER = range(3)


class FlushPacer:
    """When a turn's output goes: the server's one trade of latency for CPU.

    Most of the cost of a delivery is its send(), whatever it carries. In a busy
    room, the lines of different people arrive a turn or two apart; waiting a
    little after a flush lets the next few ride one send() to each member. The
    wait is as long as the last flush took (at most FLUSH_GAP), so a line in a
    quiet chat goes at once. One sender's own lines never wait: what it sent
    together arrives together already, and a sender that waits for its lines to
    be delivered before it sends more (a bulk transfer, a bot) would only be
    slowed.
    """

    def __init__(self):
        self.held_until = 0.0      # time.monotonic() before which output may wait
        self.source = None         # the connection whose lines were handled last
        self.flushed_source = None   # ...as it was at the last flush

    def due(self, volume, now):
        """Whether a turn holding volume (bytes of text, roughly) goes at now."""
        return (volume >= SEND_CHUNK or now >= self.held_until
                or self.source is self.flushed_source)

    def flushed(self, started, ended):
        """A turn was delivered from started to ended: the next may wait as long."""
        self.flushed_source = self.source
        self.held_until = ended + min(FLUSH_GAP, ended - started)


class TurnBatcher:
    """A turn's output, held until the turn ends, then delivered.

    Room events are rendered once per (room, dialect) and the same bytes go to
    every member that speaks that dialect, one send() each. A connection with
    something of its own in the turn (a reply, its own line left out, a change
    of rooms) gets views into those bytes around it, in the order things
    happened: a turn costs memory linear in what was said, however many spoke.
    """

    def __init__(self):
        self.rooms = {}         # Room -> RoomTurn
        self.marks = {}         # Connection -> [(seq, DATA/SKIP/ENTER/LEAVE, value)]
        self.seq = 0
        self.answering = set()  # connections with a ResponseEdge among their marks
        self.open_answers = {}  # connection -> the ResponseEdge its command started
        self.deferred = set()   # connections whose command is answered in a later turn
        self.volume = 0         # bytes of chat text in the turn, roughly
        self.deliveries = 0     # connections handed a turn's output, ever (roughly: /metrics)

    def __bool__(self):
        return bool(self.rooms or self.marks)

    def publish(self, room, event, excluded=()):
        """A room event, for every member but those excluded (its speaker, and who
        ignores the speaker)."""
        self.seq += 1
        turn = self.rooms.get(room)
        if turn is None:
            turn = self.rooms[room] = RoomTurn()
        for conn in excluded:
            self._mark(conn, SKIP, (room, len(turn.events)))
        turn.seqs.append(self.seq)
        turn.events.append(event)
        turn.excluded.append(excluded)
        uid = getattr(event, "uid", 0)
        if uid:
            turn.uids.add(uid)
        self.volume += len(getattr(event, "text", None) or "") + len(
            getattr(event, "tags", None) or "") + 40

    def send(self, conn, data):
        self.seq += 1
        if data:
            self._mark(conn, DATA, data)
            self.volume += len(data)
            conn.owed += len(data)

    def moved(self, conn, room, entered):
        self.seq += 1
        self._mark(conn, ENTER if entered else LEAVE, room)

    def edge(self, conn, edge):
        """Where the answer to one of conn's commands starts or ends (a ResponseEdge):
        whatever conn gets between the two, its own data and room events alike."""
        if edge.kind is STARTS:
            self.open_answers[conn] = edge
        else:
            self.open_answers.pop(conn, None)
            if conn in self.deferred:
                self.deferred.discard(conn)
                edge = edge._replace(kind=LATER)
        self.seq += 1
        self._mark(conn, DATA, edge)
        self.answering.add(conn)

    def later(self, conn, callback):
        """callback, made to answer conn's command (if it is one) when it is called."""
        started = self.open_answers.get(conn)
        if started is None:
            return callback
        self.deferred.add(conn)

        def answer(*args):
            if self.open_answers.get(conn) is started:   # at once, within the command
                self.deferred.discard(conn)
                callback(*args)
                return
            self.edge(conn, started)
            try:
                callback(*args)
            finally:
                self.edge(conn, started._replace(kind=ENDS))
        return answer

    def has_data(self, conn):
        """Whether conn has bytes of its own in this turn, or the answer to a labeled
        command (room events it would get otherwise are no reply to it)."""
        marks = self.marks.get(conn)
        return marks is not None and any(kind is DATA for _, kind, _ in marks)

    def touch(self, conn):
        """Make sure conn is delivered to this turn, even with nothing to send."""
        self.marks.setdefault(conn, [])

    def _mark(self, conn, kind, value):
        marks = self.marks.get(conn)
        if marks is None:
            marks = self.marks[conn] = []
        marks.append((self.seq, kind, value))

    def flush(self, deliver, deliver_shared):
        """Call deliver(conn, pieces) for every connection with output of its own this
        turn, and deliver_shared(conn, data) for each that gets only a room's bytes."""
        rooms, marks, answering = self.rooms, self.marks, self.answering
        self.rooms, self.marks, self.volume, self.answering = {}, {}, 0, set()
        self.deliveries += len(marks) + sum(len(room.members) for room in rooms)
        for conn, conn_marks in marks.items():
            conn.owed = 0
            if conn.stage is not CLOSED:
                pieces = self._pieces(conn, conn_marks, rooms)
                if conn in answering:
                    pieces = conn.dialect.answered(pieces)
                deliver(conn, pieces)
        done = set(marks)
        several = len(rooms) > 1   # else no member can have news of two rooms
        for room, turn in rooms.items():
            shared = {}   # dialect class -> bytes: the hot path looks up, nothing more
            for member in room.members:
                conn = member.endpoint
                if conn in done:
                    continue
                if several and member.multi_room and any(
                        other in rooms for other in member.rooms if other is not room):
                    done.add(conn)
                    deliver(conn, self._pieces_by_room(conn, rooms, member.rooms))
                    continue
                dialect = type(conn.dialect)
                data = shared.get(dialect)
                if data is None:
                    data = shared[dialect] = turn.bytes_for(dialect)[0]
                if data:
                    deliver_shared(conn, data)

    @staticmethod
    def _pieces_by_room(conn, rooms, its_rooms, seen=()):
        """The bytes of each of its rooms that had events, one room after the other (the
        events of a turn are grouped by room), an event told in several rooms (or
        among seen uids) left out after the first."""
        dialect = type(conn.dialect)
        pieces, seen = [], set(seen)
        for room in its_rooms:
            turn = rooms.get(room)
            if turn is None:
                continue
            data, offsets = turn.bytes_for(dialect)
            if not turn.uids & seen:
                pieces.append(data)
            else:
                pieces += [memoryview(data)[offsets[index]:offsets[index + 1]]
                           for index, event in enumerate(turn.events)
                           if getattr(event, "uid", 0) not in seen]
            seen |= turn.uids
        return [piece for piece in pieces if len(piece)]

    def _pieces(self, conn, marks, rooms):
        """What conn gets this turn: its own data and views of the rooms' bytes, in order.

        Its data and the room its marks are about (the one it spoke in, entered or
        left) are cut into order without a walk, then come its other rooms; only a
        member with marks of its own and several active rooms needs the walk.
        """
        if not rooms:   # no room spoke this turn: conn's own data is all it gets
            return [value for _, kind, value in marks if kind is DATA]
        member = conn.member
        current = member.rooms if member is not None else {}
        changes = [mark for mark in marks if mark[1] is ENTER or mark[1] is LEAVE]
        marked = {mark[2] for mark in changes}
        marked.update(mark[2][0] for mark in marks if mark[1] is SKIP)
        active = [room for room in set(current) | marked if room in rooms]
        main = [room for room in active if room in marked] or active[:1]
        own_changes = [mark for mark in changes if main and mark[2] is main[0]]
        if len(active) > 1 and marks or len(main) > 1 or len(own_changes) > 1:
            return self._pieces_in_order(conn, marks, rooms, active, current, changes)
        room = main[0] if main else None
        pieces = self._pieces_in_one_room(conn, marks, room, rooms.get(room), own_changes)
        others = [other for other in current if other in rooms and other is not room]
        if others:
            pieces += self._pieces_by_room(conn, rooms, others, rooms[room].uids if room else ())
        return pieces

    @staticmethod
    def _pieces_in_one_room(conn, marks, room, turn, changes):
        """The common case, no walk needed: the room's bytes while conn was there (it
        entered or left it at most once this turn), cut around conn's own marks."""
        if turn is None:
            return [value for _, kind, value in marks if kind is DATA]
        data, offsets = turn.bytes_for(type(conn.dialect))
        seqs = turn.seqs
        first, last = 0, len(seqs)
        for seq, kind, _ in changes:
            if kind is ENTER:
                first = bisect.bisect_left(seqs, seq)
            else:
                last = bisect.bisect_left(seqs, seq)
        pieces = []

        def add_run(start, end):
            if start < end and offsets[start] < offsets[end]:
                if end - start == len(seqs):
                    pieces.append(data)
                else:
                    pieces.append(memoryview(data)[offsets[start]:offsets[end]])
        start = first
        for seq, kind, value in marks:
            if kind is DATA:
                end = min(max(bisect.bisect_left(seqs, seq), first), last)
                add_run(start, end)
                pieces.append(value)
                start = max(start, end)
            elif kind is SKIP and value[0] is room and first <= value[1] < last:
                add_run(start, value[1])
                start = value[1] + 1
        add_run(start, last)
        return pieces

    @staticmethod
    def _pieces_in_order(conn, marks, rooms, active, current, changes):
        """Walk the events of every room conn was in during the turn, in order: only
        those while it was there, not its own, and an event told in several rooms once."""
        inside = {room: room in current for room in active}
        for _, kind, room in reversed(changes):   # back to where it was when the turn began
            inside[room] = kind is LEAVE
        dialect = type(conn.dialect)
        streams = [[(seq, 1, room, index) for index, seq in enumerate(rooms[room].seqs)]
                   for room in active]
        streams.append([(seq, 0, kind, value) for seq, kind, value in marks])
        pieces, seen = [], set()
        run = None   # [room, first event, end]

        def end_run():
            if run:
                data, offsets = rooms[run[0]].bytes_for(dialect)
                if offsets[run[1]] < offsets[run[2]]:
                    pieces.append(memoryview(data)[offsets[run[1]]:offsets[run[2]]])
        for _, is_event, what, value in heapq.merge(*streams):
            if not is_event:
                if what is DATA:
                    end_run()
                    run = None
                    pieces.append(value)
                elif what is not SKIP:
                    inside[value] = what is ENTER
                continue
            turn = rooms[what]
            wanted = inside.get(what) and conn not in turn.excluded[value]
            uid = getattr(turn.events[value], "uid", 0)
            if wanted and uid:
                wanted = uid not in seen
                seen.add(uid)
            if wanted and run and run[0] is what and run[2] == value:
                run[2] += 1
            elif wanted:
                end_run()
                run = [what, value, value + 1]
        end_run()
        return pieces


class HubSink:
    """Where the hub's news goes: into the turn, rendered by each member's dialect."""

    def __init__(self, server, batcher):
        self._server, self._batcher = server, batcher

    def publish(self, room, event, excluded):
        self._batcher.publish(room, event, tuple(member.endpoint for member in excluded))

    def send(self, member, event):
        conn = member.endpoint
        self._batcher.send(conn, conn.dialect.render(event))

    def moved(self, member, room, entered):
        self._batcher.moved(member.endpoint, room, entered)

    def close(self, member, reason, farewell):
        self._server.disconnect(member.endpoint, reason, farewell)

    def call_later(self, delay, function, *args):
        self._server.call_later(delay, function, *args)

    def answer_later(self, member, callback):
        return self._batcher.later(member.endpoint, callback)


class DelayLine:
    """Timers that all wait one delay (a connection's registration deadline, its greeting
    after a silence): in order of expiry as they are made, so a deque and one timer for
    its head do the work of a timer each, for a few words a connection in a storm. A
    timer may fire up to DELAY_LINE_SLACK late, with those due meanwhile: a storm's
    greetings then come in a few turns, not in a turn each. It holds its connections
    weakly: one that came and went is not kept until its deadline (30 s of a churn of
    connections would be hundreds of megabytes)."""

    __slots__ = ("server", "delay", "callback", "entries", "armed")

    def __init__(self, server, delay, callback):
        self.server = server
        self.delay = delay              # the delay, read as each timer is made
        self.callback = callback        # callback(conn)
        self.entries = collections.deque()   # (when, weak reference to conn), soonest first
        self.armed = False

    def add(self, conn):
        self.entries.append((time.monotonic() + self.delay(), weakref.ref(conn)))
        if not self.armed:
            self.armed = True
            self.server.call_later(self.delay(), self._fire)

    def _fire(self):
        self.armed = False
        now, entries = time.monotonic(), self.entries
        while entries and entries[0][0] <= now:
            conn = entries.popleft()[1]()
            if conn is not None:
                self.server.run_timer(self.callback, conn)
        if entries:   # those due next are gathered for one turn, not one turn each
            self.armed = True
            self.server.call_later(entries[0][0] - now + DELAY_LINE_SLACK, self._fire)


class Intake:
    """A part of ChatServer: bytes in, from the accept on: refusals, TLS, the first line
    that picks a dialect, reading, and flood control."""

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
                    self.call_later(ACCEPT_PAUSE, self._start_accepting)
                    return
                log.debug("accept failed: %s", exc)
                continue
            self._accept(sock, peer)

    def _accept(self, sock, peer):
        refusal = self._refusal_for(peer)
        if refusal:
            self._refuse(sock, peer, refusal)
            return
        try:
            sock.setblocking(False)
            if self._options_inherited is None:   # the first connection tells
                self._options_inherited = stream_options_inherited(sock)
            if not self._options_inherited:
                set_stream_options(sock)
        except OSError as exc:
            log.debug("%s: setup failed: %s", format_address(*peer[:2]), exc)
            sock.close()
            return
        conn = Connection(sock, peer, next(self._numbers), self.options.burst)
        self._conns[conn] = None
        self._per_ip[conn.ip] += 1
        log.info("%r connected", conn)
        if self.hub.ban_for(conn.ip):
            self._refuse_banned(conn)
            return
        self._registration_deadlines.add(conn)
        if self.options.tls_context:
            conn.stage = HANDSHAKE
            self._update_interest(conn)
        else:
            self._open(conn)

    def _refusal_for(self, peer):
        if len(self._conns) >= self.options.max_clients:
            return "server_full"
        if self.options.max_per_ip and self._per_ip[peer_ip(peer)] >= self.options.max_per_ip:
            return "too_many_from_address"
        return None

    def _refuse_banned(self, conn):
        """A banned address gets one plain line before any dialect (over TLS, not even
        that) and is let go politely: its first bytes do not turn the close into a reset
        that would eat the line."""
        log.warning("refused %r: banned", conn)
        if self.options.tls_context:
            self._drop(conn, "banned")
        else:
            self.disconnect(conn, "banned", notice("banned"))

    def _refuse(self, sock, peer, refusal):
        log.warning("refused %s: %s", format_address(*peer[:2]), refusal.replace("_", " "))
        try:
            sock.setblocking(False)
            sock.send(line_bytes(refusal))
        except OSError:
            pass
        sock.close()

    # Opening: TLS, then the first line picks the dialect, which registers

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
            log.debug("%r: TLS %s established", conn, conn.sock.version())
            self._open(conn)
            if conn.stage is not CLOSED:
                self._handle_read(conn)   # the client may have written already
            return
        self._update_interest(conn)

    def _wrap_tls(self, conn):
        """Start TLS once the first byte shows a TLS record; else answer in plaintext, in
        the words of the dialect the client speaks."""
        try:
            first = conn.sock.recv(SNIFF_LIMIT, socket.MSG_PEEK)
        except WOULD_BLOCK:
            return False
        except OSError as exc:
            self._drop(conn, describe_error(exc))
            return False
        if not first:
            self._drop(conn, "connection closed")
            return False
        if first[:1] != b"\x16":   # not a TLS handshake record: a plaintext client
            log.info("%r: plaintext client on the TLS port", conn)
            conn.stage = OPENING
            line, ended = first.partition(b"\n")[0] + b"\n", b"\n" in first
            dialect = dialect_for(line if ended else first, ended)
            if dialect is HttpDialect:
                HttpDialect(self, conn).refuse_plaintext()
            else:
                conn.dialect = dialect(self, conn) if dialect is IrcDialect else None
                self.disconnect(conn, "no TLS", notice("speaks_tls"))
            return False
        self._selector.unregister(conn.sock)
        conn.events = 0
        conn.sock = self.options.tls_context.wrap_socket(
            conn.sock, server_side=True, do_handshake_on_connect=False)
        conn.tls = True
        self._update_interest(conn)
        return True

    def _open(self, conn):
        """Listen for the first line; a connection that stays silent speaks the line protocol
        (nc users see the greeting at once, to the eye)."""
        conn.stage = OPENING
        conn.framer = Sniffer(self, conn)
        self._update_interest(conn)
        self._silences.add(conn)

    def _silence(self, conn):
        """Greet a connection that said nothing (nc): its first line may still show
        another dialect (see choose_dialect)."""
        if conn.stage is OPENING and conn.dialect is None:
            conn.dialect = LineDialect(self, conn)
            conn.dialect.start(spoke=False)

    def _expire_registration(self, conn):
        if conn.member is not None or conn.stage in (CLOSING, CLOSED, DENIED):
            return
        log.info("%r: registration timed out (%s)", conn, conn.stage)
        if conn.dialect is None:
            self._drop(conn, "registration timed out")
        else:
            self.disconnect(conn, "registration timed out", notice("registration_timeout"))

    # Reading

    def _handle_read(self, conn):
        try:
            data = conn.read(self._read_size)
        except WOULD_BLOCK:
            return
        except OSError as exc:
            self._drop(conn, describe_error(exc))
            return
        if conn.stage is CLOSING:
            if not data:
                self._closing_peer_done(conn)
            return
        if not data:
            self._handle_eof(conn)
            return
        messages = conn.framer.feed(data)
        if messages and conn.stage is not CLOSED:
            self._take_in(conn, messages)

    def _take_in(self, conn, messages):
        if conn.inbox:
            conn.inbox.extend(messages)
        else:
            conn.inbox = collections.deque(messages)
        conn.inbox_bytes += sum(map(len, messages))
        self.messages_received += len(messages)
        self._release(conn)

    def _release(self, conn):
        """Hand the dialect the messages the flood allowance lets through now; the rest
        wait, and a timer brings them out at --rate. O(1) per message."""
        conn.release_pending = False
        self._flush_pacer.source = conn
        inbox = conn.inbox
        allowed = len(inbox)
        if self.options.rate and inbox:
            allowed = conn.take_tokens(allowed, self.options.rate, self.options.burst)
        while allowed and inbox and (conn.stage is OPENING or conn.stage is CHAT):
            if conn.queued + conn.owed > self.options.queue_limit:
                self._hold_input(conn)
                return
            message = inbox.popleft()
            conn.inbox_bytes -= len(message)
            allowed -= 1
            conn.dialect.handle(message)
        if conn.stage is not OPENING and conn.stage is not CHAT:
            return
        if self.options.rate and (len(inbox) > self._flood_lines
                                  or conn.inbox_bytes > self._flood_bytes):
            self._excess_flood(conn)
        elif inbox:
            self.counters["flood_delayed"] += 1
            conn.release_pending = True
            self.call_later(conn.seconds_to_next_token(self.options.rate), self._release, conn)
            return
        conn.inbox = ()
        if conn.peer_done:
            self.disconnect(conn, "connection closed")

    def _hold_input(self, conn):
        """Its replies are over the queue limit: what it asks next waits, unread, until
        they are out, so requests from one that does not read cannot pile up."""
        if not conn.held:
            conn.held, conn.reading = True, False
            self._update_interest(conn)
            self.call_later(0, self._resume_input, conn)

    def _resume_input(self, conn):
        if conn.held and conn.stage is not CLOSED and conn.queued <= self.options.queue_limit:
            conn.held, conn.reading = False, not conn.peer_done
            self._update_interest(conn)
            self._release(conn)

    def _excess_flood(self, conn):
        """A connection too far ahead of flood control is cut off, as IRC servers do:
        a flooder that died with megabytes in flight stops at once instead of talking
        on for an hour."""
        log.warning("%r: excess flood, %d lines waiting", conn, len(conn.inbox))
        self.counters["excess_flood"] += 1
        self.disconnect(conn, "excess flood", notice(
            "excess_flood", seconds=math.ceil(self.options.flood_lag)))

    def _handle_eof(self, conn):
        """The peer will send no more: what it sent before still counts, paced as usual."""
        conn.peer_done = True
        conn.reading = False
        self._update_interest(conn)
        if conn.stage is HANDSHAKE or conn.stage is DENIED:
            self._drop(conn, "connection closed")
            return
        messages = conn.framer.finish()
        if conn.stage is CLOSED:
            return
        if messages:
            self._take_in(conn, messages)
        elif not conn.inbox:
            self.disconnect(conn, "connection closed")
        # else: waiting lines come out at --rate, then the connection closes


class Output:
    """A part of ChatServer: bytes out, and connections let go: the delivery of a turn,
    the backlog policy, selector interest, and polite or abrupt closes."""

    # Output

    def _flush_turn(self):
        while self._batcher or self._failed:
            if self._batcher:
                self._store.flush()   # on disk before anyone is told: a crash loses nothing
                started = time.monotonic()
                self._batcher.flush(self._deliver, self._deliver_shared)
                self._flush_pacer.flushed(started, time.monotonic())
                if self._store.unsynced and not self._sync_pending:
                    self._sync_pending = True
                    self.call_later(SYNC_INTERVAL, self._sync_store)
            failed, self._failed = self._failed, []
            for conn, reason in failed:
                self._drop(conn, reason)
        if self.cluster:
            self.cluster.link.flush()

    def _deliver_shared(self, conn, data):
        """The hot path: a member's share of a turn, sent straight from the bytes every
        receiver shares; only what the socket does not take is queued (as a view)."""
        if conn.outbox:
            self._deliver(conn, (data,))
            return
        try:
            sent = conn.sock.send(data)
        except WOULD_BLOCK:
            conn.retry, sent = data, 0   # TLS must retry with this very buffer
        except OSError as exc:
            self._failed.append((conn, describe_error(exc)))
            return
        if sent < len(data):
            conn.queue(memoryview(data)[sent:] if sent else data)
            self._wait_until_writable(conn, took=bool(sent))

    def _deliver(self, conn, pieces):
        """Send conn its part of the turn, after what is queued for it already. With nothing
        queued (a reply, a greeting: most of the time), a few pieces go as one buffer, in
        one send() and no queue."""
        if (pieces and not conn.outbox and not conn.held and conn.stage is not CLOSING
                and sum(map(len, pieces)) <= SEND_CHUNK):
            self._deliver_shared(conn, pieces[0] if len(pieces) == 1 else b"".join(pieces))
            return
        for piece in pieces:
            conn.queue(piece)
        if conn.want_write:   # the socket is full: wait for it
            self._check_backlog(conn, took=False)
        else:
            self._write(conn)

    def _write(self, conn):
        before = conn.queued
        try:
            done = conn.send_pending()
        except OSError as exc:
            self._failed.append((conn, describe_error(exc)))
            return
        if done:
            conn.over_since = conn.stuck_since = None
            if conn.stage is CLOSING:
                self._half_close(conn)
            elif conn.want_write:
                conn.want_write = False
                self._update_interest(conn)
            self._resume_input(conn)
            return
        self._wait_until_writable(conn, took=conn.queued < before)

    def _wait_until_writable(self, conn, took):
        if not conn.want_write:
            conn.want_write = True
            self._update_interest(conn)
        self._check_backlog(conn, took)

    def _check_backlog(self, conn, took):
        """A client with over queue_limit bytes waiting that takes none of them for
        queue_grace seconds, or stays over the limit for SEND_QUEUE_LAG, is not keeping
        up: it goes, and at once past SEND_QUEUE_HARD times the limit, whatever its
        grace. A burst within that never costs a reader that keeps reading, and a
        backlog is mostly views of bytes shared with every other receiver."""
        if conn.queued <= self.options.queue_limit:
            conn.over_since = conn.stuck_since = None
            return
        now = time.monotonic()
        if conn.over_since is None:
            conn.over_since = now
        if took:
            conn.stuck_since = None
        elif conn.stuck_since is None:
            conn.stuck_since = now   # look again then, even if no more output comes
            self.call_later(self.options.queue_grace * 1.01, self._recheck_backlog, conn)
        if (now - conn.over_since > SEND_QUEUE_LAG or conn.stuck_since is not None
                and now - conn.stuck_since > self.options.queue_grace
                or conn.queued > SEND_QUEUE_HARD * self.options.queue_limit):
            self._failed.append((conn, "send queue exceeded"))
            self.counters["slow_readers_dropped"] += 1

    def _recheck_backlog(self, conn):
        if conn.stage is not CLOSED and conn.stuck_since is not None:
            self._check_backlog(conn, took=False)

    def _update_interest(self, conn):
        """Register what the connection waits for: the one place that calls the selector."""
        events = ((selectors.EVENT_READ if conn.reading else 0)
                  | (selectors.EVENT_WRITE if conn.want_write else 0))
        if events == conn.events or conn.stage is CLOSED:
            return
        if not events:
            self._selector.unregister(conn.sock)
        elif not conn.events:
            self._selector.register(conn.sock, events, conn)
        else:
            self._selector.modify(conn.sock, events, conn)
        conn.events = events

    # Leaving

    def disconnect(self, conn, reason, farewell=None):
        """Let a connection go politely: leave notices, last words flushed, then FIN."""
        if conn.stage is CLOSING or conn.stage is CLOSED:
            return
        log.info("%r disconnected: %s", conn, reason.split(":")[0])
        if conn.member is not None:
            self.hub.leave(conn.member, reason)
        if farewell is not None:
            self.send_event(conn, farewell)
        conn.stage = CLOSING
        conn.inbox = ()
        conn.inbox_bytes = 0
        if conn.peer_done and not conn.outbox and not self._batcher.has_data(conn):
            self._finish(conn)   # nothing to say and nothing to hear: the common hang-up
            return
        conn.reading = not conn.peer_done   # read, and discard, until the peer closes too
        self._update_interest(conn)
        self.call_later(self.options.close_linger, self._finish, conn)
        self._batcher.touch(conn)   # delivered at the end of the turn, then FIN

    def _half_close(self, conn):
        """All output is out: end the stream (TLS close_notify, then FIN), and keep reading
        until the peer closes too, so unread input does not turn our close into a reset
        that eats the last lines."""
        if conn.tls:
            try:
                conn.sock.unwrap()   # sends close_notify; the peer's is not waited for
            except (OSError, ValueError):
                pass
        if conn.peer_done:   # nothing unread can follow its EOF: close() sends the FIN
            self._finish(conn)
            return
        try:
            socket.socket.shutdown(conn.sock, socket.SHUT_WR)
        except OSError:
            self._finish(conn)
            return
        conn.want_write = False
        self._update_interest(conn)

    def _closing_peer_done(self, conn):
        """A closing peer sent EOF: close now, or once its last output (queued, or still in
        this turn) is out."""
        if conn.outbox or conn in self._batcher.marks:
            conn.peer_done = True
            conn.reading = False
            self._update_interest(conn)
        else:
            self._finish(conn)

    def _drop(self, conn, reason):
        """Close a connection at once (it failed, or cannot keep up)."""
        if conn.stage is CLOSED:
            return
        if conn.stage is not CLOSING:
            level = logging.WARNING if reason == "send queue exceeded" else logging.INFO
            log.log(level, "%r disconnected: %s", conn, reason)
            if conn.member is not None:
                self.hub.leave(conn.member, reason)
        self._finish(conn)

    def _finish(self, conn):
        if conn.stage is CLOSED:
            return
        if conn.member is not None:
            self.hub.leave(conn.member, "closed")
        conn.stage = CLOSED
        del self._conns[conn]
        self._per_ip[conn.ip] -= 1
        if not self._per_ip[conn.ip]:
            del self._per_ip[conn.ip]
        if conn.events:
            self._selector.unregister(conn.sock)
        conn.sock.close()
        conn.outbox = conn.inbox = ()

    def _shut_down_clients(self):
        """Tell everyone, flush for at most shutdown_timeout, close everything."""
        log.info("shutting down, %d connected", len(self._conns))
        self.hub.save_due_state()
        self._stop_accepting()
        for conn in list(self._conns):
            if conn.dialect is not None and conn.stage in (OPENING, CHAT):
                self.send_event(conn, notice("shutting_down"))
                conn.stage = CLOSING
                self._batcher.touch(conn)
            elif conn.stage is not CLOSING:   # mid-handshake or denied: nothing to say
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


class Operating:
    """A part of ChatServer: what a load balancer and a monitoring system ask, by HTTP
    on the chat's port (GET /healthz, GET /metrics in the Prometheus text format)."""

    DIALECTS = {"LineDialect": "line", "IrcDialect": "irc", "WebSocketDialect": "websocket",
                "HttpDialect": "http", "NoneType": "undecided"}

    def health(self):
        """None when this server serves (and, in a cluster, is linked); else why not."""
        if self._stop_requested:
            return "shutting down"
        return self.cluster.healthy() if self.cluster else None

    def metrics_allowed(self, ip):
        address = ip_address(ip)
        return address is not None and any(
            address in ipaddress.ip_network(network) for network in self.options.metrics_allow
            if ipaddress.ip_network(network).version == address.version)

    def metrics_text(self):
        dialects = collections.Counter(self.DIALECTS.get(type(conn.dialect).__name__, "other")
                                       for conn in self._conns)
        counts, hub = self.counters, self.hub
        counts.update(deliveries=self._batcher.deliveries, room_lines=hub.lines_told,
                      messages_received=self.messages_received)
        lines = []

        def metric(name, kind, text, samples):
            lines.extend(("# HELP chat_%s %s" % (name, text), "# TYPE chat_%s %s" % (name, kind)))
            lines.extend("chat_%s%s %s" % (name, labels, value) for labels, value in samples)
        metric("connections", "gauge", "Open connections, by dialect.",
               [('{dialect="%s"}' % name, dialects[name])
                for name in sorted(set(self.DIALECTS.values()))])
        metric("members", "gauge", "Members in the chat (on every node).",
               [("", len(hub.members))])
        metric("local_members", "gauge", "Members on this node.",
               [("", sum(1 for conn in self._conns if conn.member is not None))])
        metric("rooms", "gauge", "Rooms.", [("", len(hub.rooms))])
        for name, text in (("messages_received", "Lines and messages received from clients."),
                           ("room_lines", "Room lines told here (said on any node)."),
                           ("deliveries", "Sends of a turn's output to one connection."),
                           ("slow_readers_dropped", "Connections dropped for not reading."),
                           ("flood_delayed", "Times flood control held a client's lines."),
                           ("excess_flood", "Connections dropped for excess flood."),
                           ("refused_passwords", "Wrong server passwords.")):
            metric(name + "_total", "counter", text, [("", counts[name])])
        if self.cluster:
            link = self.cluster.link
            metric("redis_up", "gauge", "1 while linked to Redis.", [("", int(link.up))])
            metric("redis_rtt_seconds", "gauge", "Round trip of the last heartbeat.",
                   [("", "%.6f" % link.rtt)])
            metric("redis_reconnects_total", "counter", "Times the link to Redis came back.",
                   [("", link.reconnects)])
        return "\n".join(lines) + "\n"


class ChatServer(Intake, Output, Operating):
    """A single-threaded chat server on non-blocking sockets and one selector.

    The loop reads every ready socket, hands complete messages (as flood
    control lets them through) to each connection's dialect, and only at the
    end of the turn writes: see TurnBatcher. Usable as a context manager;
    shutdown() may be called from any thread, and so may the inspection
    methods (connections, members, rooms, stats).
    """

    def __init__(self, options=None):
        self.options = options or ServerOptions()
        self.name = self.options.name or socket.gethostname()
        machine = socket.gethostname().lower()
        self._web_names = {"localhost", machine, machine.partition(".")[0],
                           self.name.lower()} | {name.lower() for name in self.options.web_hosts}
        self.started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        self.cluster = RedisCluster(self, self.options) if self.options.redis else None
        self._store = (FileStore(self.options.data_dir, self.options.log_max_bytes,
                                 self.options.history, self.call_soon)   # first: a refusal
                       if self.options.data_dir else                     # leaks nothing
                       self.cluster.store if self.cluster else Store())
        self._selector = selectors.DefaultSelector()
        self._listeners = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._conns = {}               # every open connection, in accept order
        self._per_ip = collections.Counter()
        self._numbers = itertools.count(1)
        self._options_inherited = None  # whether accepted sockets get the listener's
        self._timers = []              # heap of (when, seq, callback, args)
        self._timer_seq = itertools.count()
        self._batcher = TurnBatcher()
        self._flush_pacer = FlushPacer()
        self._failed = []              # (connection, reason) to drop after the turn
        self._registration_deadlines = DelayLine(
            self, lambda: self.options.register_timeout, self._expire_registration)
        self._silences = DelayLine(self, lambda: self.options.greet_delay, self._silence)
        self._sync_pending = False
        self._services = {}            # socket -> handler(mask), for sockets not clients'
        self.counters = collections.Counter()   # for /metrics (the rare events)
        self.messages_received = 0
        self.hub = Hub(self.options, HubSink(self, self._batcher), self.name, store=self._store,
                       broker=self.cluster and self.cluster.broker,
                       directory=self.cluster and self.cluster.directory)
        rate = self.options.rate
        self._read_size = PACED_RECV_SIZE if rate else RECV_SIZE
        self._flood_lines = math.ceil(rate * self.options.flood_lag)
        self._flood_bytes = max(FLOOD_QUEUE_BYTES, 4 * (self.options.max_line + 2))
        self._accepting = False
        self._stop_requested = False
        self._started = False
        self._finished = threading.Event()
        self._calls = collections.deque()   # (function, result box, event) from other threads
        self._calls_lock = threading.Lock()
        self._loop_thread = None           # the thread in serve_forever(), while it runs
        try:
            if self.cluster:
                self.cluster.start(self.hub)
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

    def server_close(self):
        """Release every socket and the data directory (the loop must have stopped)."""
        for conn in list(self._conns):
            self._finish(conn)
        for sock in self._listeners + [self._wake_r, self._wake_w]:
            sock.close()
        self._listeners = []
        if self.cluster:
            self.cluster.close()
        self._selector.close()
        if self._store is not None:
            self._store.close()
            self._store = None

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
        """A ConnectionInfo for every member of the chat, in the order they were greeted."""
        return self.run_in_loop(lambda: [member.endpoint.info()
                                         for member in self.hub.local_members()])

    def rooms(self):
        """A RoomInfo for every room, the default room first."""
        return self.run_in_loop(lambda: [
            RoomInfo(room.name, tuple(member.nick for member in room.members), room.topic)
            for room in self.hub.rooms.values()])

    def stats(self):
        """Counts: connections, members, rooms, TLS handshakes under way, bytes queued."""
        def count():
            stages = collections.Counter(conn.stage for conn in self._conns)
            return {"connections": len(self._conns),
                    "members": stages[CHAT],
                    "unregistered": stages[OPENING], "rooms": len(self.hub.rooms),
                    "handshaking": stages[HANDSHAKE],
                    "backlog": sum(conn.queued for conn in self._conns)}
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

    def _bind(self):
        opts = self.options
        if not opts.host and opts.family is None and socket.has_dualstack_ipv6():
            self._listeners.append(socket.create_server(
                ("", opts.port), family=socket.AF_INET6, dualstack_ipv6=True,
                backlog=LISTEN_BACKLOG, reuse_port=opts.reuse_port))
        else:
            host = opts.host or ("::" if opts.family == socket.AF_INET6 else "0.0.0.0")
            infos = socket.getaddrinfo(host, opts.port, opts.family or socket.AF_UNSPEC,
                                       socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
            port = opts.port
            for family, _, _, _, address in dict.fromkeys(infos):
                address = (address[0], port) + tuple(address[2:])
                sock = socket.create_server(address, family=family, backlog=LISTEN_BACKLOG,
                                            reuse_port=opts.reuse_port)
                self._listeners.append(sock)
                port = sock.getsockname()[1]   # with --port 0, every listener shares the first port
        for sock in self._listeners:
            sock.setblocking(False)
            try:   # for accepted sockets to inherit, where the system copies them
                set_stream_options(sock)
            except OSError:
                pass

    # The dialects' interface

    def send_event(self, conn, event):
        """Send conn one event, rendered by its dialect (the line protocol before it has one)."""
        self._batcher.send(conn, (conn.dialect or LineDialect(self, conn)).render(event))

    def choose_dialect(self, conn, dialect_class):
        """conn speaks dialect_class, as its first line shows; the messages in what it has
        sent so far.

        A connection greeted after a silence (nc) may yet turn out to be a browser's
        spare socket or a late IRC client: its first line decides. An HTTP request is
        then closed without an answer and an IRC registration starts over as IRC, so
        neither ever reaches a room."""
        sniffed, greeted = conn.framer.data, conn.dialect
        if greeted is not None and dialect_class is not type(greeted):
            if dialect_class is not IrcDialect:
                self.disconnect(conn, "an HTTP request after the greeting")
                return []
            if conn.member is not None:
                self.hub.leave(conn.member, "connection closed")
                conn.member = None
            conn.stage = OPENING
        if greeted is None or dialect_class is not type(greeted):
            conn.dialect = dialect_class(self, conn)
            conn.dialect.start(True)
        conn.framer = conn.dialect.framer(self.options.max_line)
        return conn.framer.feed(sniffed)

    def change_dialect(self, conn, dialect_class, rest):
        """conn speaks another dialect from now on (an HTTP request became a WebSocket);
        rest is what it sent after the request."""
        conn.dialect = dialect_class(self, conn)
        conn.framer = conn.dialect.framer(self.options.max_line)
        conn.dialect.start(True)
        if rest:
            self._take_in(conn, conn.framer.feed(rest))

    def next_request(self, conn):
        """An HTTP connection that was kept open reads its next request (what it sent
        meanwhile, then more): a turn later, so requests sent at once are not handled
        by a call in a call."""
        if conn.stage is OPENING and isinstance(conn.dialect, HttpDialect):
            self.change_dialect(conn, HttpDialect, conn.framer.rest)

    def admit(self, conn, nick=None, realname=""):
        """Let conn into the chat: the hub greets it under nick, or as a guest. False when
        its address is banned: it is told so, in its own dialect (a browser is served its
        page, and is told in it), and let go."""
        if self.hub.ban_for(conn.ip):
            log.warning("refused %r: banned", conn)
            self.disconnect(conn, "banned", notice("banned"))
            return False
        dialect = conn.dialect
        conn.stage = CHAT
        conn.member = self.hub.admit(conn, nick, dialect.multi_room, dialect.hears_quiet,
                                     realname, conn.ip, dialect.rooms_to_enter())
        conn.member.echo = dialect.echoes
        return True

    def send_bytes(self, conn, data):
        """Send conn bytes a dialect made itself, in order with the rest of the turn."""
        self._batcher.send(conn, data)

    def answer_edge(self, conn, edge):
        """The answer to conn's command starts or ends here (see ResponseEdge)."""
        self._batcher.edge(conn, edge)

    def refuse_password(self, conn, answer):
        """A wrong password: the answer, and the close, only after a pause, so guessing
        is slow even for one who hangs up; its input is not read meanwhile."""
        self.counters["refused_passwords"] += 1
        conn.stage = DENIED
        conn.reading = False
        self._update_interest(conn)
        self.call_later(self.options.wrong_password_delay, self.disconnect, conn,
                        "wrong password", answer)

    def refuse_tls_handshake(self, conn):
        log.info("%r: a TLS handshake on the plaintext port", conn)
        self._drop(conn, "TLS on the plaintext port")

    def web_host_ok(self, host):
        """Whether a browser's Host header names this server: any IP address (a rebinding
        site can only use a name), localhost, this machine's name, --name and the names
        of --web-host. HTTP/1.0 may send none."""
        name = host.lower()
        if name.startswith("["):
            name, _, port = name[1:].partition("]")
            if port and not re.fullmatch(r":\d+", port):
                return False
        elif name.count(":") == 1:
            name = name.partition(":")[0]
        name = name.rstrip(".")
        if not host or name in self._web_names or name.endswith(".localhost"):
            return True
        try:
            ipaddress.ip_address(name.split("%")[0])
            return True
        except ValueError:
            return False

    def call_soon(self, function, *args):
        """Call function(*args) in the loop, soon; safe from any thread."""
        with self._calls_lock:
            self._calls.append((functools.partial(function, *args), [], threading.Event()))
        self._wake()

    def watch(self, sock, handler, writing=False):
        """Have handler(mask) called when sock (not a client's) is ready."""
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0)
        if sock in self._services:
            if self._selector.get_key(sock).events != events:
                self._selector.modify(sock, events)
        else:
            self._selector.register(sock, events)
        self._services[sock] = handler

    def unwatch(self, sock):
        if self._services.pop(sock, None) is not None:
            self._selector.unregister(sock)

    def call_later(self, delay, callback, *args):
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq),
                                      callback, args))

    # The loop

    def _run_once(self):
        flush_log()
        self._poll(self._select_timeout())
        self._gather_more()
        self._run_due_timers()
        if self._flush_due():
            self._flush_turn()

    def _flush_due(self):
        """Whether this turn's output goes now, or waits for more (see FlushPacer)."""
        return (not self._batcher or bool(self._failed)
                or self._flush_pacer.due(self._batcher.volume, time.monotonic()))

    def _gather_more(self):
        """Before writing a turn, read what arrived meanwhile.

        Senders' lines trickle in a segment at a time; each line caught now
        rides the same send() to every member instead of costing one of its
        own. Zero-wait polls only, and a bounded number: no added latency.
        """
        batcher = self._batcher
        if self.cluster:
            self.cluster.gather(self._poll)
        for _ in range(GATHER_POLLS):
            volume = batcher.volume
            if not volume or volume >= SEND_CHUNK:
                return
            self._poll(0)
            if batcher.volume == volume:
                return

    def _poll(self, timeout):
        """Handle every socket that is ready within timeout."""
        for key, mask in self._selector.select(timeout):
            if key.data is None:
                self._handle_service_socket(key.fileobj, mask)
            else:
                self._handle_events(key.data, mask)

    def _select_timeout(self):
        timeout = None
        if self._timers:
            timeout = max(0.0, self._timers[0][0] - time.monotonic())
        if self._batcher:   # output held back by _flush_due
            due = max(0.0, self._flush_pacer.held_until - time.monotonic())
            timeout = due if timeout is None else min(timeout, due)
        if WINDOWS:   # Ctrl+C does not interrupt select() there
            timeout = 0.5 if timeout is None else min(timeout, 0.5)
        return timeout

    def _handle_service_socket(self, sock, mask):
        if sock is self._wake_r:
            drain(sock)
            self._run_calls()
        elif sock in self._services:
            self._services[sock](mask)
        else:
            self._accept_from(sock)

    def _handle_events(self, conn, mask):
        if conn.stage is CLOSED:   # dropped earlier in this turn
            return
        try:
            if conn.stage is HANDSHAKE:
                self._continue_handshake(conn)
                return
            if mask & selectors.EVENT_WRITE:
                self._write(conn)
            if mask & selectors.EVENT_READ and conn.stage is not CLOSED:
                self._handle_read(conn)
        except Exception:
            log.exception("%r: unexpected error, dropping the connection", conn)
            self._drop(conn, "internal error")

    def _sync_store(self):
        self._sync_pending = False
        self._store.sync()

    def _run_due_timers(self):
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, callback, args = heapq.heappop(self._timers)
            self.run_timer(callback, *args)

    def run_timer(self, callback, *args):
        """Call a timer's callback; one that fails drops only the connection it was for."""
        try:
            callback(*args)
        except Exception:
            log.exception("timer %r failed", callback)
            culprit = args[0] if args else None
            if isinstance(culprit, Member):
                culprit = culprit.endpoint
            if isinstance(culprit, Connection):
                self._drop(culprit, "internal error")



# --- Client ---

class ChatError(Exception):
    """A failure main() reports on stderr, without a traceback, before exiting with 1."""


class RefusedError(ChatError):
    """The server was refused (TLS verification) or refused us (password): retrying is futile."""


def normalize_fingerprint(text):
    """The hex digits of a fingerprint as typed: colons, case and "SHA256:" ignored."""
    text = text.strip().lower()
    if text.startswith("sha256:"):
        text = text[7:]
    digits = text.replace(":", "")
    if not re.fullmatch(r"[0-9a-f]{64}", digits):
        raise ValueError("a SHA-256 fingerprint is 64 hex digits (colons optional)")
    return digits


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


def tls_failure(exc):
    """Plain words for a failed TLS handshake."""
    reason = getattr(exc, "reason", None) or ""
    if reason in ("WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE") \
            or isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError)):
        return "the server does not speak TLS (leave out --tls and its options)"
    return reason or describe_error(exc)


def default_nick():
    """The login name, made a valid nick; None (a guest nick) when there is none."""
    try:
        return make_valid_nick(getpass.getuser())
    except Exception:   # getuser() raises whatever the platform lookup raises
        return None


def echo_of(text, nick):
    """The line others receive when we send text, or None (commands, blank lines).

    Rendered from the same table as the server's, so our own lines look like
    everyone else's and can be matched against the history the server replays.
    """
    if text[:4].lower() == "/me ":
        key, body = "acted", sanitize(text[4:]).strip()
    elif text[:2] == "//" or text[:1] != "/":
        key, body = "said", sanitize(text[1:] if text[:2] == "//" else text)
    else:
        return None
    return WORDING.render(key, nick=nick, text=body) if body.strip() else None


class Pacer:
    """The server's flood allowance, mirrored: lines go out no faster than it reads them,
    so a piped bot is never cut off for flooding."""

    def __init__(self, rate, burst, spent=0):
        self.rate, self.burst = rate, burst
        self.tokens = max(burst - spent, 0)
        self.refilled = time.monotonic()

    def _refill(self):
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.refilled) * self.rate)
        self.refilled = now

    def take(self):
        """Spend a token: True, or False when the line must wait."""
        self._refill()
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def spend(self):
        """Spend a token for a line that goes out anyway (the client's own)."""
        self._refill()
        self.tokens -= 1

    def wait(self):
        """Seconds until the next token."""
        self._refill()
        return max(0.0, (1 - self.tokens) / self.rate)


# Rendering received lines

_NICK_COLOURS = ("31", "32", "33", "34", "35", "36", "91", "92", "93", "94", "95", "96")


def char_width(char):
    """Terminal columns of a character: 2 for wide East Asian forms, 0 for combining marks."""
    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in "WF" else 1


def _extends_cluster(char):
    """Whether char belongs to the character before it on screen (marks, joiners,
    variation selectors, skin tones, tags)."""
    return (unicodedata.category(char) in ("Mn", "Me", "Mc") or char == "\u200d"
            or "\ufe00" <= char <= "\ufe0f" or "\U0001f3fb" <= char <= "\U0001f3ff"
            or "\U000e0020" <= char <= "\U000e007f" or "\U000e0100" <= char <= "\U000e01ef")


def _is_regional_indicator(char):
    return "\U0001f1e6" <= char <= "\U0001f1ff"


def cluster_starts(text):
    """Where each character as the eye sees it starts (a flag, an emoji with a skin tone
    or joined by ZWJ, a letter with its accents): an approximation of UAX #29."""
    starts, i, end = [], 0, len(text)
    while i < end:
        starts.append(i)
        first = text[i]
        i += 1
        if _is_regional_indicator(first) and i < end and _is_regional_indicator(text[i]):
            i += 1
        while i < end and (_extends_cluster(text[i]) or text[i - 1] == "\u200d"):
            i += 1
    return starts


def text_width(text):
    """Terminal columns of text: a cluster is as wide as its first character (a flag: 2)."""
    width = 0
    for start in cluster_starts(text):
        first = text[start]
        width += 2 if _is_regional_indicator(first) else char_width(first)
    return width


def colour_wanted(stream, no_color=False):
    """Colour only on a terminal, and not with --no-color, NO_COLOR (no-color.org) or TERM=dumb."""
    return (not no_color and stream.isatty() and not os.environ.get("NO_COLOR")
            and os.environ.get("TERM") != "dumb")


def paint(code, text):
    return "\x1b[%sm%s\x1b[0m" % (code, text)


def is_error(kind):
    return kind is not None and WORDING.templates[kind].startswith("*** error: ")


class LineStyle:
    """How a protocol line is shown: timestamp, colours, bell.

    With everything off a line comes back untouched, which is what pipes get.
    """

    def __init__(self, colour=False, timestamps=False, bell=False):
        self.colour, self.timestamps, self.bell = colour, timestamps, bell

    def render(self, line, nick=None):
        """The text to print for a line (bell included when it is for us)."""
        stamp = time.strftime("[%H:%M] ") if self.timestamps else ""
        kind, fields = WORDING.parse(line)
        replayed = kind == "history_entry"
        if replayed:   # history keeps the time it was said
            if self.timestamps:
                stamp, line = "[%s] " % fields["time"], fields["line"]
            kind, fields = WORDING.parse(fields["line"])
        for_me = self._for_me(kind, fields, nick)
        text = self._paint(line, kind, fields, for_me) if self.colour else line
        if self.colour and (stamp or replayed):
            stamp = paint("2", stamp)
            text = paint("2", line) if replayed else text
        return stamp + text + ("\x07" if for_me and self.bell else "")

    def _paint(self, line, kind, fields, for_me):
        """Nicks in their colours; lines for us bold, errors red, notices dim."""
        if kind in ("said", "acted"):
            shown = WORDING.render(kind, nick=paint(self.nick_colour(fields["nick"]),
                                                    fields["nick"]), text=fields["text"])
            return paint("1", shown) if for_me else shown
        if kind == "private":
            return paint("1;35", line)
        if is_error(kind):
            return paint("31", line)
        if line.startswith(("*** ", "-> ")):
            return paint("2", line)
        return line

    def _for_me(self, kind, fields, nick):
        """A private message, or someone else's line that mentions our nick."""
        if kind == "private":
            return True
        return (kind in ("said", "acted") and fields["nick"] != nick
                and self._mentions(fields["text"], nick))

    @staticmethod
    def _mentions(text, nick):
        return bool(nick) and re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(nick), text,
                                        re.IGNORECASE) is not None

    @staticmethod
    def nick_colour(nick):
        """A stable colour per nick (crc32, not hash(): the same every run)."""
        return _NICK_COLOURS[zlib.crc32(name_key(nick).encode()) % len(_NICK_COLOURS)]


class Roster:
    """Nicks and rooms seen, for Tab completion; fed every line shown."""

    def __init__(self):
        self.nicks = set()
        self.rooms = set()

    def note(self, line):
        kind, fields = WORDING.parse(line)
        if kind == "history_entry":
            kind, fields = WORDING.parse(fields["line"])
        if kind in ("welcome", "joined", "said", "acted", "private"):
            self.nicks.add(fields["nick"])
        elif kind in ("left", "moved", "kicked"):
            self.nicks.discard(fields["nick"])
        elif kind == "renamed":
            self.nicks.discard(fields["nick"])
            self.nicks.add(fields["new"])
        elif kind in ("in_room", "who", "who_room"):
            self.nicks.update(name.lstrip("@") for name in fields["names"].split(", ")
                              if name and not name.startswith("and "))   # "@": an operator
        elif kind == "rooms":
            entries = (WORDING.parse(entry) for entry in fields["list"].split(", "))
            self.rooms.update(found["room"] for kind, found in entries if kind == "room_entry")
        if "room" in fields:
            self.rooms.add(fields["room"])


class PlainConsole:
    """Lines in, lines out: pipes, files, dumb terminals, or no raw mode.

    Output goes out as UTF-8 (whatever the console encoding) and is flushed
    after every line, so `client > log` and `client | grep` see each at once.
    Notes from the client itself go to stderr, so stdout stays protocol lines.
    With listen_only, nothing is read from stdin.
    """

    def __init__(self, style=None, stdin=None, stdout=None, stderr=None, listen_only=False):
        self.style = style or LineStyle()
        self._stdin = stdin or sys.stdin
        self._stdout = stdout or sys.stdout
        self._stderr = stderr or sys.stderr
        self._tty = self._stdout.isatty()
        self.listen_only = listen_only
        self.interactive = not listen_only and self._stdin.isatty()   # a person types
        self.nick = None

    def start(self, client):
        """Read lines in a daemon thread and post them to the client, then "eof"."""
        if not self.listen_only:
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

    def set_room(self, room):
        pass

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
    methods and draws the result. The cursor moves over whole characters as
    the eye sees them: a letter with its accents, a flag, an emoji sequence.
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
        return max((start for start in cluster_starts(self.text) if start < index), default=0)

    def _next_stop(self, index):
        return min((start for start in cluster_starts(self.text) if start > index),
                   default=len(self.text))

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
        """The finished line; the editor is empty again and the line is in the history
        (unless it holds a password: Up must not show it to whoever looks on)."""
        line = self.text
        secret = line.split(" ", 1)[0].lower() in ("/op", "/pass")
        if line.strip() and not secret and (not self.history or self.history[-1] != line):
            self.history = (self.history + [line])[-self.HISTORY_SIZE:]
        self._browsing = None
        self._replace("")
        return line

    def complete(self, commands, nicks, rooms=()):
        """Complete the word before the cursor: a command first on the line, a room after
        /join or /who, else a nick.

        Returns the candidates when they are ambiguous and share no longer prefix,
        so the console can list them.
        """
        start = self.text.rfind(" ", 0, self.cursor) + 1
        word = self.text[start:self.cursor]
        if not word:
            return []
        first = self.text.split(" ", 1)[0].lower()
        if start == 0 and word[0] == "/":
            pool = commands
        elif first in ("/join", "/who") and start == len(first) + 1:
            pool = rooms
        else:
            pool = nicks
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
    """Split typed text into keys: ("text", chars), ("report", row, column) for the
    terminal's cursor report, or a key name. Returns (keys, rest), rest being an escape
    sequence cut off by the end of the read."""
    keys = []
    start = 0
    for match in _KEY_TOKEN.finditer(text):
        token = match.group()
        if token[0] == "\x1b":
            if _PARTIAL_SEQUENCE.fullmatch(text, match.start()) and match.end() == len(text):
                return keys, text[match.start():]
            report = _CURSOR_REPORT.fullmatch(token)
            name = ("report", int(report.group(1)), int(report.group(2))) if report \
                else _ESCAPE_KEYS.get(token)
        else:
            name = _CONTROL_KEYS.get(token)
        if name:
            keys.append(name)
        elif token[0] not in "\x1b\x7f" and token >= " ":
            if keys and isinstance(keys[-1], tuple) and keys[-1][0] == "text":
                keys[-1] = ("text", keys[-1][1] + token)
            else:
                keys.append(("text", token))
        start = match.end()
    return keys, text[start:]


_KEY_TOKEN = re.compile(
    r"\x1b(?:\[[\x30-\x3f]*[\x20-\x2f]*[\x40-\x7e]?|O.?|[^\[O])?|[\x00-\x1f\x7f]|[^\x00-\x1f\x7f\x1b]+",
    re.S)
_PARTIAL_SEQUENCE = re.compile(r"\x1b(?:\[[\x30-\x3f]*[\x20-\x2f]*|O)?")
_CURSOR_REPORT = re.compile(r"\x1b\[(\d+);(\d+)R")
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
COMMAND_WORDS = tuple("/" + name for name in (*LineDialect.COMMANDS, "op"))   # for Tab


class TerminalConsole:
    """The interactive terminal: a line editor in raw mode with incoming lines printed
    above it, so what the user is typing is never clobbered.

    The line being typed is one row that scrolls sideways when it is longer than
    the terminal, so the console always knows where its row starts: a resize
    (some terminals rewrap what is on screen, some cut it) never makes it erase
    a line that is not its own. Threads: the keyboard thread reads keys and
    edits the line; the main thread shows incoming lines. Both draw, so every
    write to the screen happens under one lock. The terminal is restored by
    close(), which run() always reaches.
    """

    ESCAPE_TIMEOUT = 0.05     # seconds after a lone ESC before it counts as the Esc key
    REPORT_TIMEOUT = 0.5      # seconds to wait for the terminal to say where its cursor is
    MIN_INPUT = 10            # columns the line gets at least; a longer prompt is cut to "> "
    interactive = True

    def __init__(self, style, stdin=None, stdout=None):
        self.style = style
        self._stdin = stdin or sys.stdin
        self._stdout = stdout or sys.stdout
        self._fd = self._stdin.fileno()
        self._lock = threading.RLock()
        self.editor = LineEditor()
        self.roster = Roster()
        self.nick = self.room = None
        self._client = None
        self._scroll = 0          # index of the first character of the line on screen
        self._drawn = (0, 80)     # (cursor column, terminal width) when last drawn
        self._report_wanted = None   # (deadline, cursor column) while a resize waits for it
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

    def set_room(self, room):
        with self._lock:
            self.room = room

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

    def _redraw(self, rows_up=0):
        if not self._closed:
            up = "\x1b[%dA" % rows_up if rows_up else ""
            self._write(up + self._erase_input() + self._input_line())

    @staticmethod
    def _erase_input():
        """Escape codes that go to the start of the input row and clear to the end."""
        return "\r\x1b[J"

    def _prompt(self):
        nick = "%s> " % self.nick if self.nick else "> "
        return "%s %s" % (self.room, nick) if self.room else nick

    def _width(self):
        try:
            return max(os.get_terminal_size(self._stdout.fileno()).columns, 4)
        except (OSError, ValueError):
            return 80

    def _input_line(self):
        """The prompt and as much of the line around the cursor as fits one row (the last
        column stays free, so the terminal never wraps it), then the cursor placed."""
        width = self._width()
        prompt = self._prompt()
        room = width - 1 - text_width(prompt)
        if room < self.MIN_INPUT:
            prompt, room = "> ", max(width - 3, 1)
        text, cursor = self.editor.text, self.editor.cursor
        starts = cluster_starts(text)
        if cursor < self._scroll or self._scroll not in starts:
            self._scroll = cursor
        under = next((start for start in starts if start > cursor), len(text))
        while self._scroll < cursor and (text_width(text[self._scroll:under])
                                         + (cursor == len(text))) > room:
            self._scroll = next(start for start in starts if start > self._scroll)
        while self._scroll:   # room to spare at the end: show more of the start
            before = max(start for start in starts if start < self._scroll)
            if text_width(text[before:]) >= room:
                break
            self._scroll = before
        shown_end, used = self._scroll, 0
        for start, end in zip(starts, starts[1:] + [len(text)]):
            if start < self._scroll:
                continue
            used += text_width(text[start:end])
            if used > room:
                break
            shown_end = end
        column = text_width(prompt) + text_width(text[self._scroll:cursor])
        self._drawn = (column, width)
        self._report_wanted = None   # drawn anew: a pending resize is settled
        if self.style.colour and self.nick and prompt != "> ":
            nick = paint(LineStyle.nick_colour(self.nick), self.nick) + "> "
            prompt = paint("2", self.room) + " " + nick if self.room else nick
        return "%s%s\r%s" % (prompt, text[self._scroll:shown_end],
                             "\x1b[%dC" % column if column else "")

    # Resizing

    def _resized(self):
        """The terminal has a new width. A terminal that rewraps its screen splits the
        input row when it narrows past the cursor, and the cursor moves down with its
        part; only the terminal can say whether that happened: ask it where the cursor
        is, and erase from the row the line starts on."""
        with self._lock:
            column = self._drawn[0]
            if column < self._width():
                self._redraw()   # the cursor is on the row the line starts on, either way
                return
            self._write("\x1b[6n")
            self._report_wanted = (time.monotonic() + self.REPORT_TIMEOUT, column)

    def _after_resize(self, report):
        """The cursor report (row, column), or None when the terminal gave none."""
        with self._lock:
            wanted, self._report_wanted = self._report_wanted, None
            if wanted is None:
                return
            column, width = wanted[1], self._width()
            rewrapped = column % width
            rows_up = 0
            if report is not None and report[1] - 1 == rewrapped != min(column, width - 1):
                rows_up = column // width   # rewrapped: the line starts that far above
            self._redraw(rows_up)

    # Input, in the keyboard thread

    def _read_keys(self):
        """Read, decode and handle keys until the terminal closes; then the client leaves."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        pending = ""
        try:
            while True:
                ready, _, _ = select.select([self._fd, self._resize_r], [], [],
                                            self._read_timeout(pending))
                if self._resize_r in ready:
                    os.read(self._resize_r, 64)
                    self._resized()
                wanted = self._report_wanted
                if wanted and time.monotonic() >= wanted[0]:
                    self._after_resize(None)
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
            self._client.post("eof", wait=False)   # also after a bug here: never hang

    def _read_timeout(self, pending):
        waits = [self.ESCAPE_TIMEOUT] if pending else []
        wanted = self._report_wanted
        if wanted:
            waits.append(max(wanted[0] - time.monotonic(), 0))
        return min(waits) if waits else None

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
        """Edit and redraw under the lock; hand finished lines over outside it."""
        posts = []
        with self._lock:
            for key in keys:
                self._handle_key(key, posts)
            if any(not isinstance(key, tuple) or key[0] != "report" for key in keys):
                self._redraw()
        for kind, text in posts:
            self._client.post(kind, text, wait=False)   # a person types: never block

    def _handle_key(self, key, posts):
        editor = self.editor
        if isinstance(key, tuple):
            if key[0] == "report":
                self._after_resize(key[1:])
            else:
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
            nicks = self.roster.nicks - {self.nick}
            candidates = editor.complete(COMMAND_WORDS, nicks, self.roster.rooms)
            if candidates:
                self._print_above("  ".join(candidates) + "\r\n")
        elif key == "redraw":
            self._write("\x1b[H\x1b[2J")
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


def is_quit(text):
    return text is not None and text.split(" ", 1)[0].lower() == "/quit"


class Replay:
    """History blocks as the client shows them: only the part not shown before (after a
    reconnect), under a header that says what is shown, and none at all for the room a
    reconnect passes through on its way back to where it was."""

    def __init__(self):
        self.block = None               # (room, entries) of a block being received
        self.passing = False            # in a room only on the way back
        self.seen = collections.deque(maxlen=SEEN_LINES)   # public lines shown

    def take(self, kind, fields, line, shown, return_to):
        """Whether a received line belongs to a block (shown gets what is to be shown)."""
        if self.block is not None:
            if kind == "history_entry" and len(self.block[1]) < MAX_HISTORY_BLOCK:
                self.block[1].append((line, fields["line"]))
                return True
            self._end(shown, kind == "history_end")
            if kind == "history_end":
                return True
        if kind == "history_start":
            self.block = (fields["room"], [])
            self.passing = self.passing or return_to not in (None, fields["room"])
            return True
        return False

    def _end(self, shown, ended):
        room, entries = self.block
        self.block = None
        if self.passing:
            return
        said = [inner for _, inner in entries]
        known = self._overlap(said)
        if known == len(entries):
            return
        count = len(entries) - known
        shown.append(WORDING.render("history_start", count=count, room=room,
                                    noun="message" if count == 1 else "messages"))
        shown.extend(line for line, _ in entries[known:])
        if ended:   # a block cut short shows what came
            shown.append(WORDING.render("history_end"))
        self.seen.extend(said[known:])

    def _overlap(self, said):
        """How many lines at the start of said are the last lines already shown."""
        seen = list(self.seen)
        for count in range(min(len(said), len(seen)), 0, -1):
            if said[:count] == seen[-count:]:
                return count
        return 0


class ChatClient:
    """Connect to a server, send what the user types, show what the server sends.

    Threads: the console's daemon thread reads the keyboard (or a pipe) and
    posts each line, waking the main loop through a socketpair; the main loop
    alone owns the socket, so the connection needs no lock. A lost connection
    is reopened with backoff; lines typed meanwhile wait, and the client goes
    back to the room it was in. One that an operator closed (a kick) is not:
    coming straight back would undo the kick.
    """

    def __init__(self, host="localhost", port=DEFAULT_PORT, family=socket.AF_UNSPEC,
                 nick=None, console=None, tls_context=None, tls_pin=None, password=None,
                 ask_password=None, reconnect=True, retry_delay=RETRY_DELAY,
                 retry_max=RETRY_MAX):
        self.host, self.port, self.family = host, port, family
        self.wanted_nick = nick
        self.nick = None
        self.room = None                # the room we are in, as the server last said
        self._return_to = None          # the room to go back to after a reconnect
        self._kicked = None             # what the server said when an operator kicked us
        self.console = console or PlainConsole()
        self.tls_context = tls_context  # None: plaintext
        self.tls_pin = tls_pin          # hex SHA-256 the server certificate must have
        self.password = password
        self.ask_password = ask_password   # callable prompting the user, or None
        self.reconnect = reconnect
        self.retry_delay, self.retry_max = retry_delay, retry_max
        self._typed = collections.deque()  # ("line", text) and ("eof", None) from the console
        self._typed_space = threading.Condition()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._conn = None               # BufferedSocket once connected
        self._connecting = False
        self._framer = LineFramer(CLIENT_MAX_LINE)
        self._received = collections.deque()   # lines read but not handled yet
        self._nick_attempt = 0          # > 0 while asking for wanted_nick or a variant
        self._ready = False             # greeted and nick settled: typed lines may go out
        self._pacer = None              # the server's flood allowance, once it told it
        self._sent = 0                  # lines sent on this connection
        self._quitting = False
        self._interrupted = False
        self._replay = Replay()         # history blocks, without what was shown before
        self._muted = False             # an operator muted us: what we say is refused
        self._max_line = None           # the server's line limit, once it refused a line

    @property
    def where(self):
        return format_address(self.host, self.port)

    @property
    def wakeup_fd(self):
        """A descriptor for signal.set_wakeup_fd(): a signal then wakes the main loop."""
        return self._wake_w.fileno()

    # Called from other threads and signal handlers

    def post(self, kind, text=None, wait=True):
        """Hand a keyboard event ("line", "eof") to the main loop; with wait, block while
        many are waiting already, so a pipe cannot fill memory."""
        with self._typed_space:
            while wait and len(self._typed) >= KEYBOARD_QUEUE:
                self._typed_space.wait()
            self._typed.append((kind, text))
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
            raise ChatError("TLS with %s failed: %s" % (self.where, tls_failure(exc)))
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
        """Say our nick first (so the server greets us under it, and a TLS server tells a
        plaintext client at once), answer a password request, read up to the welcome."""
        self._framer = LineFramer(CLIENT_MAX_LINE)
        self._received.clear()
        self._ready = False
        self._nick_attempt = 0
        self._replay.block = None
        self._pacer = None
        self._sent = 1
        sock.sendall(("/nick %s\n" % self.wanted_nick if self.wanted_nick else "\n").encode())
        error = None
        while True:
            line = self._next_line(sock)
            if line is None:
                raise ChatError("%s closed the connection%s"
                                % (self.where, ": " + error if error else ""))
            kind, fields = WORDING.parse(line)
            if kind == "password_required":   # answered here, not shown
                sock.sendall(("/pass %s\n" % self._get_password()).encode())
                self._sent += 1
                continue
            if kind == "wrong_password":
                raise RefusedError("%s refused the password" % self.where)
            if kind == "guesses_throttled":
                raise RefusedError("%s refused the password: too many wrong passwords from "
                                   "this address; try again in %s s" % (self.where,
                                                                        fields["seconds"]))
            if kind == "banned":
                raise RefusedError("%s has banned this address" % self.where)
            if kind == "speaks_tls":
                raise RefusedError("%s speaks TLS: connect with --tls, --tls-ca FILE or "
                                   "--tls-fingerprint HEX (the server logs its fingerprint)"
                                   % self.where)
            self.console.show(line)
            if is_error(kind):
                error = line[len("*** error: "):]
            if kind == "welcome":   # in the chat: from now on Ctrl+C says goodbye first
                self._connecting = False
                self._set_nick(fields["nick"])
                if self.wanted_nick and name_key(self.wanted_nick) != name_key(self.nick):
                    self._nick_attempt = 1   # the reason follows: try a variant then
                else:
                    self._nick_settled()
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
        line = self._received.popleft()
        return "" if line is TOO_LONG else line

    def _split_lines(self, data):
        self._received.extend(line if line is TOO_LONG else sanitize(decode_line(line))
                              for line in self._framer.feed(data))

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
        if self._kicked:
            raise ChatError("%s: %s" % (self.where, self._kicked))
        if not self.reconnect:
            raise ChatError("connection to %s lost: the server closed it" % self.where)
        self._return_to, self.room = self.room, None
        delay = self.retry_delay
        message = "connection to %s lost" % self.where
        while True:   # jitter, so a restarted server is not stormed
            wait = min(delay * random.uniform(0.75, 1.25), self.retry_max)
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
        """Wait, but wake for Ctrl+C, or for Ctrl+D or /quit typed by a person: False if
        the user wants out."""
        deadline = time.monotonic() + seconds
        while not self._leaving():
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            if select.select([self._wake_r], [], [], left)[0]:
                drain(self._wake_r)
        return False

    def _leaving(self):
        if self._interrupted:
            return True
        if not self.console.interactive:
            return False   # a pipe's lines, its end included, wait to be delivered
        with self._typed_space:
            return any(kind == "eof" or is_quit(text) for kind, text in self._typed)

    # Serving one connection

    def _serve(self):
        """Relay lines until the user leaves (True) or the connection is lost (False)."""
        sock = self._conn.sock
        self._handle_received()
        while True:
            if self._ready:
                self._take_keyboard_events()
            writers = [sock] if self._conn.outbox else []
            readable, writable, _ = select.select([sock, self._wake_r], writers, [],
                                                  self._pacing_delay())
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

    def _pacing_delay(self):
        """How long typed lines must wait for the flood allowance; None: nothing waits."""
        if self._ready and self._pacer and self._typed and not self._quitting:
            return self._pacer.wait() or None
        return None

    def _take_keyboard_events(self):
        while self._conn.queued < SEND_CHUNK and not self._quitting:
            with self._typed_space:
                if not self._typed:
                    return
                kind, text = self._typed[0]
                paced = kind == "line" and text and not is_quit(text) and self._pacer
                if paced and not self._pacer.take():
                    return
                self._typed.popleft()
                self._typed_space.notify()
            if kind == "line":
                self._send_typed(text)
            else:
                self._quit()

    def _send_typed(self, text):
        if is_quit(text):
            self._quit(text)
        elif self._max_line and len(text.encode("utf-8", "replace")) > self._max_line:
            self.console.show(WORDING.render("line_too_long", limit=self._max_line))
        elif text:
            self._send_line(text)
            echo = echo_of(text, self.nick)
            if echo and not self._muted:   # the server refuses it: it says so instead
                self._replay.seen.append(echo)
                self.console.show_own(echo)

    def _quit(self, command="/quit"):
        """Say goodbye; the loop then waits for the server to close, so nothing sent is lost."""
        self._send_line(command)
        self._quitting = True

    def _send_line(self, text, own=False):
        """Queue a line; own: one the client sends by itself, which flood control counts."""
        self._conn.queue(text.encode("utf-8", "replace") + b"\n")
        self._sent += 1
        if own and self._pacer:
            self._pacer.spend()
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
            if line is TOO_LONG:
                self.console.notice("the server sent a line of over %d bytes; it is left out"
                                    % CLIENT_MAX_LINE)
                continue
            kind, fields = WORDING.parse(line)
            if self._replay.take(kind, fields, line, shown, self._return_to):
                continue
            shown.append(line)
            self._follow(kind, fields, line)
        if shown:
            self.console.show(*shown)

    def _follow(self, kind, fields, line):
        """Keep track of our nick, our room, the pace, and the public lines shown."""
        if kind == "renamed_self":
            if not self._nick_attempt:   # the user's own /nick: keep it across reconnects
                self.wanted_nick = fields["nick"]
            self._set_nick(fields["nick"])
            self._nick_settled()
        elif kind in ("nick_taken", "nick_lookalike") and self._nick_attempt:
            self._request_nick()
        elif kind == "invalid_nick" and self._nick_attempt:
            self._nick_settled()
        elif kind == "in_room":
            self.room = fields["room"]
            self.console.set_room(self.room)
            self._replay.passing = False
            self._go_back()
        elif kind == "pace":
            self._pacer = Pacer(float(fields["rate"]), int(fields["burst"]), self._sent)
        elif kind in ("said", "acted"):
            self._replay.seen.append(line)
        elif kind in ("muted_you", "you_are_muted", "unmuted_you"):
            self._muted = kind != "unmuted_you"
        elif kind == "line_too_long":   # from now on such lines are refused here, unsent
            self._max_line = int(fields["limit"])
        elif kind == "kicked_you":
            self._kicked = line[len("*** "):]

    def _set_nick(self, nick):
        self.nick = nick
        self.console.set_nick(nick)

    def _nick_settled(self):
        """Our nick is what it will be: typed lines may go out."""
        self._nick_attempt = 0
        self._ready = True
        self._go_back()

    def _go_back(self):
        """After a reconnect, once greeted under our nick: back to the room we were in."""
        if self._ready and self._return_to and self.room:
            room, self._return_to = self._return_to, None
            if room != self.room:
                self._replay.passing = True
                self._send_line("/join " + room, own=True)

    def _request_nick(self):
        """Ask for the next variant of the wanted nick: the last one was taken."""
        self._nick_attempt += 1
        self._send_line("/nick " + nick_variant(self.wanted_nick, self._nick_attempt), own=True)


# --- The browser page ---
# One document, nothing fetched from elsewhere: served at / by HttpDialect. Its
# script and style are allowed by their hashes, and nothing else is.

_PAGE_STYLE = """
:root{color-scheme:light dark;--bg:#fff;--side:#f3f3f5;--fg:#1d1d1f;--dim:#5b5c63;--line:#d5d5db;--accent:#1d5bc9;--on-accent:#fff;--hl:#fff0b3;--mine:#eef3fd;--err:#b3261e;--nl:47%;--focus:#1d5bc9;font:100%/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
@media (prefers-color-scheme:dark){:root{--bg:#16161a;--side:#1e1e24;--fg:#ececf0;--dim:#a6a6b0;--line:#3a3a44;--accent:#8db3ff;--on-accent:#101014;--hl:#3f3513;--mine:#1c2433;--err:#ff8f85;--nl:80%;--focus:#8db3ff}}
*{box-sizing:border-box}
html{height:100%}
/* The app fills what is visible: --app-h follows the visual viewport, so the on-screen keyboard never covers the input */
body{margin:0;height:100vh;height:100dvh;height:var(--app-h,100dvh);overflow:hidden;background:var(--bg);color:var(--fg);display:grid;grid-template-columns:16rem minmax(0,1fr) 14rem;grid-template-areas:"nav main people"}
button,input{font:inherit;color:inherit}
/* Touch targets of 44 px whatever the text size; icons keep their size too */
button{min-height:44px;min-width:44px;padding:.3rem .8rem;border:1px solid var(--line);border-radius:.5rem;background:transparent;cursor:pointer}
button[type=submit]{background:var(--accent);color:var(--on-accent);border-color:var(--accent);font-weight:600}
input{min-height:44px;min-width:0;padding:.4rem .6rem;border:1px solid var(--dim);border-radius:.5rem;background:var(--bg)}
:focus-visible{outline:3px solid var(--focus);outline-offset:1px}
svg{width:24px;height:24px;fill:none;stroke:currentColor;stroke-width:2;stroke-linecap:round;vertical-align:middle}
h1,h2,p{margin:0}
ul{list-style:none;margin:0;padding:0}
.hint{color:var(--dim);font-size:.875rem;font-weight:400}
.error{color:var(--err)}
.sr-only{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0);white-space:nowrap}
/* Rooms and people: columns on a wide screen, one drawer on a narrow one */
#drawer{display:contents}
#nav,#people{background:var(--side);overflow-y:auto;padding:.5rem;min-height:0}
#nav{grid-area:nav;border-right:1px solid var(--line)}
#people{grid-area:people;border-left:1px solid var(--line)}
#nav h2,#people h2{font-size:.8rem;letter-spacing:.04em;text-transform:uppercase;color:var(--dim);margin:1rem .25rem .3rem}
#nav h2:first-child,#people h2:first-child{margin-top:.25rem}
#nav li,#members li{display:flex;align-items:center}
.view,#members button,#others button{position:relative;flex:1;min-width:0;display:flex;align-items:center;gap:.4rem;border:0;text-align:left;padding:.3rem .5rem;overflow-wrap:anywhere}
.view[aria-current]{background:var(--mine);font-weight:700;box-shadow:inset 3px 0 var(--accent)}
.name{flex:1;min-width:0}
.unread .name{font-weight:700}
.badge{min-width:1.5rem;padding:0 .4rem;border-radius:1rem;background:var(--accent);color:var(--on-accent);font-size:.8rem;font-weight:700;text-align:center;line-height:1.5rem}
.badge.at{background:var(--err)}
.badge[hidden]{display:none}
.close{border:0;color:var(--dim);font-size:1.25rem;line-height:1;padding:0}
#join-form{margin:1rem .25rem 0}
#join-form label{display:block;font-weight:600;margin-bottom:.25rem}
.row{display:flex;gap:.4rem}.row input{flex:1}
#no-queries{margin:0 .5rem}
.op{font-weight:700}
.self{flex:1;min-height:44px;display:flex;align-items:center;gap:.4rem;padding:.3rem .5rem}
.away{opacity:.75}
/* The conversation */
main{grid-area:main;display:flex;flex-direction:column;min-width:0;min-height:0}
#bar{display:flex;align-items:center;gap:.4rem;padding:.25rem .5rem;border-bottom:1px solid var(--line)}
#menu{display:none;padding:0 .5rem;gap:.3rem}
#bell{padding:0;border:0}
#bell[aria-pressed=true] .slash{display:none}
#heading{flex:1;min-width:0;padding:.2rem}
#title{display:inline;font-size:1.125rem;overflow-wrap:anywhere}
#modes{margin-left:.4rem}
#topic{color:var(--dim);font-size:.875rem;overflow-wrap:anywhere;display:-webkit-box;-webkit-box-orient:vertical;-webkit-line-clamp:2;overflow:hidden;cursor:pointer}
#topic.full{display:block}
#topic:empty{display:none}
#state{padding:.3rem .75rem;background:var(--hl);font-size:.9rem}
#state:empty{display:none}
#log-box{flex:1;min-height:0;position:relative;display:flex}
#log{flex:1;overflow-y:auto;overflow-anchor:none;overscroll-behavior:contain;padding:.25rem 0 .5rem;overflow-wrap:anywhere}
#jump{position:absolute;bottom:.5rem;left:50%;transform:translateX(-50%);background:var(--accent);color:var(--on-accent);border:0;box-shadow:0 2px 6px #0005}
.msg{padding:.1rem .75rem}
.msg time{color:var(--dim);font-size:.8rem;margin-right:.45rem;font-variant-numeric:tabular-nums}
.who{font-weight:700;color:oklch(var(--nl) .14 var(--hue,250));cursor:pointer}
.mine{background:var(--mine)}
.mention{background:var(--hl);box-shadow:inset 4px 0 #c99a06}
.acted{font-style:italic}
.noticed,.info{color:var(--dim)}
.info{font-size:.9rem}
.noticed .who,.info .who{color:inherit}
.msg.error{color:var(--err)}
.msg a{color:var(--accent)}
.marker{display:flex;align-items:center;gap:.5rem;margin:.3rem .75rem;color:var(--err);font-size:.8rem;font-weight:700}
.marker::before,.marker::after{content:"";flex:1;border-top:2px solid var(--err)}
.top{padding:.4rem .75rem;color:var(--dim);font-size:.875rem;text-align:center}
#send{display:flex;gap:.4rem;padding:.4rem .5rem;border-top:1px solid var(--line)}
#line{flex:1}
#send-button{padding:0 .6rem}
#login{position:fixed;inset:0;z-index:5;overflow-y:auto;background:var(--bg);display:flex;padding:1rem}
#login[hidden]{display:none}
#login-form{margin:auto;display:grid;gap:.35rem;width:min(24rem,100%)}
#login-form h1{font-size:1.5rem;margin-bottom:.5rem}
#login-form label{font-weight:600;margin-top:.5rem}
#login-error:empty{display:none}
#scrim{display:none}
@media (max-width:60rem){
body{grid-template-columns:minmax(0,1fr);grid-template-areas:"main"}
#menu{display:inline-flex;align-items:center;justify-content:center}
#drawer{display:block;position:fixed;z-index:3;top:0;bottom:0;left:0;width:min(20rem,88vw);overflow-y:auto;background:var(--side);border-right:1px solid var(--line);transform:translateX(-102%);visibility:hidden;transition:transform .2s,visibility .2s}
#drawer.open{transform:none;visibility:visible}
#nav,#people{overflow:visible;border:0}
#scrim:not([hidden]){display:block;position:fixed;inset:0;z-index:2;background:#0006}
#topic{-webkit-line-clamp:1}
}
@media (prefers-reduced-motion:reduce){#drawer{transition:none}}
"""

_PAGE_SCRIPT = r"""
"use strict";
// The chat page: rooms and private conversations ("views") over one WebSocket.
// Text from the network only ever becomes text nodes; the CSP allows nothing else.
const COMMANDS = @COMMAND_WORDS@;
const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("line"), drawer = $("drawer");
const MAX_LINES = 1500;   // per view: older ones come back by scrolling up
const PAGE = 50;          // lines per scrollback request
const KEPT_PRIVATE = 200; // lines of each conversation kept for a reload
const narrow = window.matchMedia("(max-width: 60rem)");

// --- Small helpers ---

function make(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}
const fold = (name) => name.toLowerCase();
function load(store, key, fallback) {
  try { const value = JSON.parse(store.getItem(key)); return value === null ? fallback : value; }
  catch (e) { return fallback; }
}
function save(store, key, value) {
  try { store.setItem(key, JSON.stringify(value)); } catch (e) { /* storage off or full: the page works without */ }
}

// --- State ---

const views = new Map();   // key ("#room" or "@nick", folded) -> view, in sidebar order
const remembered = {
  rooms: load(localStorage, "chat-rooms", []),        // rooms to come back to, in order
  current: localStorage.getItem("chat-current"),      // the view being read
  read: load(localStorage, "chat-read", {}),          // room key -> last seq read
  quiet: load(localStorage, "chat-quiet", {}),        // view key -> true: no notifications
  keys: load(sessionStorage, "chat-keys", {}),        // room key -> its +k key, this tab only
};
let ws = null, me = null, admitted = false, focused = null, leaving = "", retry = 1000, retryTimer = 0;
let nick = "", password = null, opPassword = null, resuming = false, nickTries = 0, welcomeText = "";
let current = null, pendingSwitch = null, checkJoined = false;
let sent = [], browsing = -1, otherRooms = [], stuck = true;

function viewKey(kind, name) { return kind === "room" ? fold(name) : "@" + fold(name); }

function ensureView(kind, name) {
  const key = viewKey(kind, name);
  let view = views.get(key);
  if (!view) {
    view = {key, kind, name, lines: [], seqs: new Set(), last: 0, serverSeq: 0, known: 0,
      entered: false, unread: 0, mention: false, marker: null, topic: "", modes: "", count: 0,
      members: new Map(), ops: new Set(), voiced: new Set(), away: new Set(),
      more: false, loading: false, scroll: null, notify: !remembered.quiet[key]};
    views.set(key, view);
    makeItem(view);
    if (kind === "room") rememberRooms();
  }
  return view;
}

function dropView(view, why) {
  views.delete(view.key);
  view.item.remove();
  if (view.kind === "room") rememberRooms(); else saveQueries();
  if (pendingSwitch === view.key) pendingSwitch = null;
  if (current === view) {
    current = null;
    const next = views.values().next().value;
    if (next) switchTo(next); else showNothing();
  }
  if (why) { info(current, [why]); announce(why); }
  refreshLists();
}

function rememberRooms() {
  remembered.rooms = [...views.values()].filter((v) => v.kind === "room").map((v) => v.name);
  save(localStorage, "chat-rooms", remembered.rooms);
}

function saveQueries() {
  save(sessionStorage, "chat-queries", [...views.values()].filter((v) => v.kind === "query").map((v) => ({
    name: v.name, unread: v.unread,
    lines: v.lines.slice(-KEPT_PRIVATE).map(({kind, parts, nick, text, time, mine}) => ({kind, parts, nick, text, time, mine})),
  })));
}

function restoreQueries() {
  for (const saved of load(sessionStorage, "chat-queries", [])) {
    const view = ensureView("query", saved.name);
    for (const line of saved.lines) addLine(view, line);
    view.unread = saved.unread || 0;
    updateItem(view);
  }
}

// --- Lines: stored per view in order of seq, each shown at most once ---

function insertionIndex(lines, seq) {
  let at = lines.length;
  if (!seq) return at;
  for (let i = lines.length - 1; i >= 0; i--) {
    const other = lines[i].seq;
    if (!other) continue;
    if (other < seq) break;
    at = i;   // a later line: go before it
  }
  return at;
}

// Adds line to view unless (room, seq) is there already; returns whether it was added.
function addLine(view, line) {
  if (line.seq) {
    if (view.seqs.has(line.seq)) return false;
    view.seqs.add(line.seq);
    view.last = Math.max(view.last, line.seq);
  }
  const at = insertionIndex(view.lines, line.seq);
  view.lines.splice(at, 0, line);
  if (view === current) placeLine(line, at);
  if (at === view.lines.length - 1 && view.lines.length > MAX_LINES) {
    const old = view.lines.shift();
    view.seqs.delete(old.seq);
    if (old.el) old.el.remove();
    if (old === view.marker) view.marker = null;
    view.more = view.kind === "room";
  }
  return true;
}

function placeLine(line, at) {
  const near = atBottom(), next = current.lines[at + 1];
  log.insertBefore(lineElement(line), next ? next.el : null);
  if (next) return;
  if (near || line.mine) toBottom(); else $("jump").hidden = false;
}

function info(view, parts, kind) {
  if (view) addLine(view, {kind: kind || "info", parts, time: new Date().toISOString()});
}

function chatLine(ev) {
  const kind = ev.type === "private" ? (ev.action ? "acted" : "said") : ev.type;
  const mine = fold(ev.nick) === fold(me || "");
  return {kind, nick: ev.nick, text: ev.text, time: ev.time, seq: ev.seq || 0, mine,
    mention: !mine && mentions(ev.text), private: ev.type === "private"};
}

function mentions(text) {
  if (!me) return false;
  const name = me.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
  return new RegExp("(^|[^\\p{L}\\p{N}_-])" + name + "($|[^\\p{L}\\p{N}_-])", "iu").test(text);
}

function lineElement(line) {
  if (line.el) return line.el;
  const div = make("div", "msg " + line.kind + (line.mine ? " mine" : "") + (line.mention ? " mention" : ""));
  div.append(stamp(line.time));
  if (line.parts) {
    for (const part of line.parts) div.append(typeof part === "string" ? part : who(part.nick));
  } else if (line.kind === "acted") {
    div.append("* ", who(line.nick), " ");
    withLinks(div, line.text);
  } else {
    div.append(line.kind === "noticed" ? "-" : "", who(line.nick), line.kind === "noticed" ? "- " : ": ");
    withLinks(div, line.text);
  }
  line.el = div;
  return div;
}

function who(name) {
  const span = make("span", "who", name);
  let hash = 0;
  for (const c of fold(name)) hash = (hash * 31 + c.codePointAt(0)) >>> 0;
  span.style.setProperty("--hue", hash % 360);   // CSSOM, allowed by the CSP
  span.dataset.nick = name;
  return span;
}

function stamp(iso) {
  const when = iso ? new Date(iso) : new Date(), time = make("time");
  const today = when.toDateString() === new Date().toDateString();
  const clock = when.toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"});
  time.textContent = today ? clock : when.toLocaleDateString([], {weekday: "short", day: "numeric", month: "short"}) + " " + clock;
  time.dateTime = when.toISOString();
  time.title = when.toLocaleString();
  return time;
}

// Links: http and https only, whatever else the text says.
function withLinks(parent, text) {
  const url = /\bhttps?:\/\/[^\s<>"]+/gi;
  let last = 0, found;
  while ((found = url.exec(text))) {
    const href = found[0].replace(/[.,;:!?'")\]]+$/, "");
    parent.append(text.slice(last, found.index));
    const a = make("a", "", href);
    a.href = href; a.rel = "noopener noreferrer"; a.target = "_blank";
    parent.append(a);
    last = found.index + href.length;
    url.lastIndex = last;
  }
  parent.append(text.slice(last));
}

// --- Unread counts, the marker, the title, notifications ---

function arrived(view, line) {
  if (line.mine || line.kind === "info") return;
  const seen = view === current && !document.hidden;
  if (!seen) {
    if (!view.marker) setMarker(view, line);
    view.unread += 1;
    if (line.mention || line.private) view.mention = true;
    updateItem(view);
    updateTitle();
  } else if (line.seq) markRead(view);
  if (line.mention || line.private) {
    const where = line.private ? "from " + line.nick : line.nick + " in " + view.name;
    announce("Message " + where + ": " + line.text);   // only these: the log itself is not live
    notify(view, line, where);
  }
}

function setMarker(view, line) {
  view.marker = line;
  if (view === current && line.el) log.insertBefore(markerElement(), line.el);
}

function markerElement() {
  const old = log.querySelector(".marker");
  if (old) old.remove();
  return make("div", "marker", "New messages");
}

function markRead(view) {
  if (view.kind !== "room" || view.last <= (remembered.read[view.key] || 0)) return;
  remembered.read[view.key] = view.last;
  save(localStorage, "chat-read", remembered.read);
}

function updateTitle() {
  let total = 0;
  for (const view of views.values()) total += view.unread;
  document.title = (total ? "(" + total + ") " : "") + (current ? current.name + " - " : "") + "chat";
  const badge = $("menu-count");
  badge.textContent = total;
  badge.hidden = !total;
  badge.classList.toggle("at", [...views.values()].some((v) => v.mention));
  $("menu").setAttribute("aria-label", "Rooms and people" + (total ? ", " + total + " unread" : ""));
}

function notify(view, line, where) {
  if (!document.hidden || !view.notify || !window.Notification || Notification.permission !== "granted") return;
  try {
    const note = new Notification(where, {body: line.text, tag: view.key});
    note.onclick = () => { window.focus(); switchTo(view); note.close(); };
  } catch (e) { /* Chrome on Android shows notifications only through a service worker */ }
}

function announce(text) {
  const region = $("announce");
  region.textContent = "";
  setTimeout(() => { region.textContent = text; }, 50);   // a change, even for the same words
}

// --- The sidebar ---

function makeItem(view) {
  const li = make("li"), button = make("button", "view"), close = make("button", "close", "\u00d7");
  button.type = close.type = "button";
  // The name from the content: the visible name, then the counts in words for screen readers.
  const badge = make("span", "badge");
  badge.setAttribute("aria-hidden", "true");
  button.append(make("span", "name", view.name), badge, make("span", "sr-only"));
  button.addEventListener("click", () => { switchTo(view); chosen(); });
  close.setAttribute("aria-label", (view.kind === "room" ? "Leave " : "Close the conversation with ") + view.name);
  close.addEventListener("click", () => (view.kind === "room" ? send("/part " + view.name) : dropView(view)));
  li.append(button, close);
  view.item = li;
  $(view.kind === "room" ? "rooms" : "queries").append(li);
  updateItem(view);
  $("no-queries").hidden = !!$("queries").childElementCount;
}

function updateItem(view) {
  const button = view.item.firstChild, badge = button.children[1];
  badge.textContent = (view.mention && view.kind === "room" ? "@" : "") + (view.unread || "");
  badge.hidden = !view.unread && !view.mention;
  badge.classList.toggle("at", view.mention);
  button.classList.toggle("unread", !!view.unread);
  button.lastChild.textContent = (view.unread ? ", " + view.unread + " unread" : "") + (view.mention ? (view.kind === "room" ? ", you were mentioned" : ", new private message") : "");
  if (view === current) button.setAttribute("aria-current", "true"); else button.removeAttribute("aria-current");
}

function refreshLists() {
  $("no-queries").hidden = !!$("queries").childElementCount;
  $("others").replaceChildren(...otherRooms.filter((r) => !views.has(fold(r.name))).map((r) => {
    const li = make("li"), button = make("button", "", "Join " + r.name + " (" + r.members + ")");
    button.type = "button";
    button.addEventListener("click", () => { joinRoom(r.name); chosen(); });
    li.append(button);
    return li;
  }));
  $("others-title").hidden = !$("others").childElementCount;
  $("room-names").replaceChildren(...otherRooms.map((r) => { const o = make("option"); o.value = r.name; return o; }));
}

function renderPeople() {
  const list = $("members"), view = current, focusedNick = list.contains(document.activeElement) ? document.activeElement.dataset.nick : null;
  if (!view || view.kind !== "room") {
    $("people-title").textContent = view ? "Conversation with " + view.name : "People";
    list.replaceChildren();
    return;
  }
  const rank = (n) => (view.ops.has(fold(n)) ? 0 : view.voiced.has(fold(n)) ? 1 : 2);
  const nicks = [...view.members.values()].sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
  $("people-title").textContent = "People in " + view.name + " (" + Math.max(view.count, nicks.length) + ")";
  list.replaceChildren(...nicks.map((n) => {
    const self = fold(n) === fold(me || ""), li = make("li");
    const entry = make(self ? "span" : "button", self ? "self" : "", ["@", "+", ""][rank(n)] + n);
    entry.dataset.nick = n;
    if (rank(n) < 2) entry.classList.add("op");
    if (view.away.has(fold(n))) { entry.classList.add("away"); entry.append(make("span", "hint", " (away)")); }
    if (self) entry.append(make("span", "hint", " (you)"));
    else { entry.type = "button"; entry.addEventListener("click", () => openQuery(n)); }
    li.append(entry);
    return li;
  }));
  if (focusedNick) { const again = list.querySelector("[data-nick=\"" + CSS.escape(focusedNick) + "\"]"); if (again) again.focus(); }
}

function renderHeader() {
  const view = current;
  $("title").textContent = view ? view.name : "chat";
  $("modes").textContent = view && view.modes ? "+" + view.modes : "";
  $("topic").replaceChildren();
  withLinks($("topic"), view ? (view.kind === "room" ? view.topic : "Private conversation (the server keeps no copy)") : "");
  $("prompt").textContent = view ? "Message " + view.name : "Message";
  const bell = $("bell");
  bell.hidden = !view;
  bell.setAttribute("aria-pressed", String(!!(view && view.notify)));
  bell.setAttribute("aria-label", view ? "Notify me of " + (view.kind === "room" ? "mentions in " : "messages from ") + view.name + " while this page is hidden" : "Notifications");
  bell.title = bell.getAttribute("aria-label");
}

// --- Switching between views ---

function switchTo(view) {
  if (current && current !== view) leaveView(current);
  const previous = current;
  current = view;
  localStorage.setItem("chat-current", view.key);
  view.unread = 0;
  view.mention = false;
  markRead(view);
  if (previous) updateItem(previous);
  updateItem(view);
  renderHeader();
  renderPeople();
  renderLog();
  updateTitle();
  if (view.kind === "query") saveQueries();   // its unread count, for a reload
}

function leaveView(view) {
  view.scroll = atBottom() ? null : log.scrollTop;
  view.marker = null;
  markRead(view);
}

function showNothing() {
  current = null;
  renderHeader();
  renderPeople();
  log.replaceChildren(make("p", "top", "You are in no room. Join one from the list of rooms."));
  updateTitle();
}

function renderLog() {
  const view = current;
  log.replaceChildren(topElement(view), ...view.lines.map(lineElement));
  $("jump").hidden = true;
  if (view.marker && view.marker.el) {
    log.insertBefore(markerElement(), view.marker.el);
    log.scrollTop = view.marker.el.offsetTop - log.offsetTop - 48;
  } else if (view.scroll !== null) log.scrollTop = view.scroll;
  else toBottom();
  stuck = atBottom();
  fillUp();
}

// The top of a log: a button for older lines, or where it starts.
function topElement(view) {
  const top = make("div", "top");
  top.id = "top";
  if (view.kind === "query") top.textContent = "Your private conversation with " + view.name + ". Only this tab keeps it.";
  else if (!view.entered) top.textContent = "Joining " + view.name + "\u2026";
  else if (view.loading) top.textContent = "Loading older lines\u2026";
  else if (view.more) {
    const button = make("button", "", "Show older lines");
    button.type = "button";
    button.addEventListener("click", () => loadOlder(view));
    top.append(button);
  } else top.textContent = "The start of " + view.name + "'s history.";
  return top;
}

function updateTop(view) {
  if (view === current) $("top").replaceWith(topElement(view));
}

function step(by) {
  const order = [...views.values()];
  if (!order.length) return;
  const at = order.indexOf(current);
  switchTo(order[(at + by + order.length) % order.length]);
}

function openQuery(name) {
  switchTo(ensureView("query", name));
  saveQueries();
  chosen(true);
}

// --- Scrolling ---

function atBottom() { return log.scrollHeight - log.scrollTop - log.clientHeight < 48; }
function toBottom() { log.scrollTop = log.scrollHeight; $("jump").hidden = true; }

// A log too short to scroll gets older lines at once: scrolling is how one asks for them.
function fillUp() {
  if (current && log.scrollHeight <= log.clientHeight) loadOlder(current);
}

function loadOlder(view) {
  if (view.loading || !view.more || view.kind !== "room") return;
  const first = view.lines.find((line) => line.seq);
  view.loading = true;
  updateTop(view);
  ask(view, "before", first ? first.seq : view.serverSeq + 1);
}

log.addEventListener("scroll", () => {
  stuck = atBottom();
  if (stuck) $("jump").hidden = true;
  if (current && log.scrollTop < 120) loadOlder(current);
});
$("jump").addEventListener("click", () => { toBottom(); log.focus(); });
// The log keeps its last lines in sight when it shrinks (an on-screen keyboard, a rotation).
new ResizeObserver(() => { if (stuck) toBottom(); }).observe(log);
log.addEventListener("click", (event) => {
  const name = event.target.dataset && event.target.dataset.nick;
  if (name && fold(name) !== fold(me || "")) openQuery(name);
});

// --- History requests: one at a time, retried when the server is busy ---

const asks = [];
let asking = null, askTimer = 0;

function ask(view, how, seq) {
  asks.push({key: view.key, room: view.name, how, seq});
  nextAsk();
}

function nextAsk() {
  if (asking || !asks.length || !admitted) return;
  asking = asks.shift();
  askTimer = setTimeout(answered, 10000);   // never wait forever for an answer
  send("/history " + asking.room + " " + asking.how + " " + asking.seq + " " + (asking.how === "after" ? 200 : PAGE));
}

function answered() {
  clearTimeout(askTimer);
  const done = asking && views.get(asking.key);
  if (done && done.loading) { done.loading = false; updateTop(done); }
  asking = null;
  nextAsk();
}

function askAgainSoon() {
  clearTimeout(askTimer);
  asks.unshift(asking);
  asking = null;
  askTimer = setTimeout(nextAsk, 1000);
}

// --- Events from the server ---

const handlers = {
  welcome(ev) {
    me = nick = ev.nick;
    admitted = true;
    retry = 1000;
    nickTries = 0;
    resuming = true;
    localStorage.setItem("chat-nick", me);
    save(sessionStorage, "chat-session", {nick: me, password});
    showLogin(false);
    $("login-button").disabled = false;
    state("");
    welcomeText = "Welcome to " + ev.server + ", you are ";
    if (opPassword) send("/op " + opPassword);
    checkJoined = true;
    send("/rooms");
  },
  room(ev) {
    const view = ensureView("room", ev.room);
    if (Math.max(view.last, remembered.read[view.key] || 0) > ev.seq) forget(view);
    view.serverSeq = ev.seq;
    view.known = view.last;   // the replay that follows shows only what is newer
    view.topic = ev.topic || "";
    view.modes = ev.modes || "";
    view.count = ev.count;
    view.members = new Map(ev.members.map((n) => [fold(n), n]));
    view.ops = new Set(ev.operators.map(fold));
    view.voiced = new Set(ev.voiced.map(fold));
    view.entered = true;
    if (pendingSwitch === view.key) {   // joined from here: the server focused it too
      focused = view.key;
      pendingSwitch = null;
      switchTo(view);
      chosen();
      announce("You joined " + view.name + ".");
    }
    else if (!current) switchTo(view);
    else if (current === view) { renderHeader(); renderPeople(); updateTop(view); }
    if (welcomeText) greet(view);
    refreshLists();
  },
  history(ev) {
    const view = views.get(fold(ev.room));
    if (ev.before !== null || ev.after !== null) {
      if (view && ev.before !== null) older(view, ev);
      else if (view) newer(view, ev);
      answered();
    } else if (view) replay(view, ev);
  },
  said: live, acted: live, noticed: live,
  private(ev) {
    const view = ensureView("query", ev.sent ? ev.to : ev.nick), line = chatLine(ev);
    line.mine = ev.sent;
    line.mention = false;
    addLine(view, line);
    arrived(view, line);
    if (pendingSwitch === view.key) { pendingSwitch = null; switchTo(view); }
    saveQueries();
  },
  joined(ev) {
    const view = roomView(ev);
    if (!view || view.members.has(fold(ev.nick))) return;
    view.members.set(fold(ev.nick), ev.nick);
    view.count += 1;
    if (ev.away) view.away.add(fold(ev.nick));
    if (!ev.quiet) info(view, [{nick: ev.nick}, " joined"]);
    peopleChanged(view);
  },
  left(ev) {
    if (fold(ev.nick) === fold(me)) { const view = roomView(ev); if (view) dropView(view, "You left " + ev.room + "."); return; }
    gone(roomView(ev), ev, ev.to ? " left for " + ev.to : " left (" + ev.reason + ")");
  },
  kicked(ev) {
    if (fold(ev.nick) === fold(me)) {
      const view = roomView(ev);
      if (view) dropView(view, "You were kicked from " + ev.room + " by " + ev.by + " (" + ev.reason + ").");
      return;
    }
    gone(roomView(ev), ev, " was kicked by " + ev.by + " (" + ev.reason + ")");
  },
  quit(ev) {   // about a person, maybe once per shared room: each room's list, once
    let present = false;
    for (const view of views.values()) if (view.kind === "room" && gone(view, ev, " left the chat (" + ev.reason + ")")) present = true;
    const query = views.get("@" + fold(ev.nick));
    if (present && query) info(query, [{nick: ev.nick}, " left the chat"]);
  },
  renamed(ev) {
    const old = fold(ev.old);
    if (old === fold(me)) { me = nick = ev.new; localStorage.setItem("chat-nick", me); save(sessionStorage, "chat-session", {nick: me, password}); }
    for (const view of [...views.values()]) {
      if (view.kind === "room" && view.members.has(old)) {
        view.members.delete(old);
        view.members.set(fold(ev.new), ev.new);
        for (const set of [view.ops, view.voiced, view.away]) if (set.delete(old)) set.add(fold(ev.new));
        if (!ev.quiet) info(view, [{nick: ev.old}, " is now known as ", {nick: ev.new}]);
        peopleChanged(view);
      } else if (view.key === "@" + old) renameQuery(view, ev.new);
    }
  },
  away(ev) {
    const view = roomView(ev);
    if (!view) return;
    if (ev.text) view.away.add(fold(ev.nick)); else view.away.delete(fold(ev.nick));
    peopleChanged(view);
  },
  topic(ev) {
    const view = roomView(ev);
    if (!view) return;
    view.topic = ev.text;
    info(view, [{nick: ev.nick}, ev.text ? " set the topic: " + ev.text : " cleared the topic"]);
    if (view === current) renderHeader();
  },
  topic_info(ev) { info(roomView(ev) || current, [ev.text ? "Topic of " + ev.room + ": " + ev.text : "No topic is set in " + ev.room]); },
  mode(ev) {
    const view = roomView(ev);
    if (!view) return;
    applyModes(view, ev.changes, ev.args);
    info(view, [{nick: ev.nick}, " set " + ev.changes + " " + ev.args.join(" ")]);
    peopleChanged(view);
    if (view === current) renderHeader();
  },
  opped(ev) {
    const view = roomView(ev);
    if (!view) return;
    view.ops.add(fold(ev.nick));
    info(view, [{nick: ev.nick}, " is now a server operator"]);
    peopleChanged(view);
  },
  who(ev) {
    const view = roomView(ev);
    if (view && ev.own) {
      view.members = new Map(ev.members.map((n) => [fold(n), n]));
      view.ops = new Set(ev.operators.map(fold));
      view.voiced = new Set(ev.voiced.map(fold));
      view.count = ev.members.length;
      peopleChanged(view);
    }
    info(view || current, [ev.room + ": " + ev.members.length + " here: " + ev.members.join(", ")]);
  },
  whois(ev) { info(current, [{nick: ev.nick}, ": " + ev.details]); },
  rooms(ev) {
    otherRooms = ev.rooms;
    if (checkJoined) {   // after a (re)connect: forget rooms the server did not let us back in
      checkJoined = false;
      const joined = new Set(ev.joined.map(fold));
      for (const view of [...views.values()]) {
        if (view.kind === "room" && !joined.has(view.key)) dropView(view, "You are not in " + view.name + " any more.");
      }
      if (!current) { const first = views.values().next().value; if (first) switchTo(first); else showNothing(); }
    }
    refreshLists();
  },
  help(ev) { for (const text of ev.lines) info(current, [text]); },
  notice(ev) {
    if (ev.code === "password_required") { if (!password) askLogin("This server needs a password.", "password"); return; }
    if (ev.code === "kicked_you") leaving = ev.text + "; reload the page to come back";
    if (ev.code === "renamed_self" || ev.code === "nick_collision") { me = nick = ev.new || ev.nick; localStorage.setItem("chat-nick", me); }
    if (ev.code === "help_hint" || ev.code === "pace") return;
    info(roomView(ev) || current, [ev.text]);
  },
  error(ev) {
    const code = ev.code;
    if (code === "wrong_password" || code === "guesses_throttled") {
      password = null;
      sessionStorage.removeItem("chat-session");
      leaving = ev.text;
      askLogin(sentence(ev.text), "password");
      return;
    }
    if (!admitted && (code === "nick_taken" || code === "nick_lookalike" || code === "invalid_nick")) { nickRefused(ev); return; }
    if (code === "history_busy" && asking) { askAgainSoon(); return; }
    if (asking && (code === "not_in_room" || code === "usage")) answered();
    if (code === "banned") leaving = "This address is banned from the chat.";
    if (code === "wrong_op_password") opPassword = null;   // not again at each reconnect
    if (pendingSwitch && ev.room && fold(ev.room) === pendingSwitch) pendingSwitch = null;
    info(roomView(ev) || current, [ev.text], "error");
    if (!admitted) askLogin(sentence(ev.text));
    else announce(ev.text);
  },
};

function live(ev) {
  const view = roomView(ev);
  if (!view) return;
  const line = chatLine(ev);
  if (addLine(view, line)) arrived(view, line);
}

function roomView(ev) { return ev.room ? views.get(fold(ev.room)) : null; }
function sentence(text) { return text.charAt(0).toUpperCase() + text.slice(1); }

function greet(view) {
  info(view, [welcomeText, {nick: me}]);
  welcomeText = "";
}

// Someone out of a room's list; whether they were in it.
function gone(view, ev, how) {
  if (!view || !view.members.delete(fold(ev.nick))) return false;
  view.count = Math.max(0, view.count - 1);
  for (const set of [view.ops, view.voiced, view.away]) set.delete(fold(ev.nick));
  if (!ev.quiet) info(view, [{nick: ev.nick}, how]);
  peopleChanged(view);
  return true;
}

// People lists change in bursts (a netsplit, a big room): drawn once per frame at most.
let peopleQueued = false;
function peopleChanged(view) {
  if (view !== current || peopleQueued) return;
  peopleQueued = true;
  requestAnimationFrame(() => { peopleQueued = false; renderPeople(); });
}

function renameQuery(view, name) {
  const merged = views.get("@" + fold(name));
  info(merged || view, [{nick: view.name}, " is now known as ", {nick: name}]);
  if (merged) {   // a conversation with the new name exists: it goes on there
    const reading = current === view;
    dropView(view);
    if (reading) switchTo(merged);
    return;
  }
  views.delete(view.key);
  view.key = "@" + fold(name);
  view.name = name;
  views.set(view.key, view);
  view.item.firstChild.firstChild.textContent = name;
  updateItem(view);
  if (view === current) { renderHeader(); localStorage.setItem("chat-current", view.key); }
  saveQueries();
}

function applyModes(view, changes, args) {
  let sign = "+", next = 0;
  for (const letter of changes) {
    if (letter === "+" || letter === "-") { sign = letter; continue; }
    const takes = "ovkbeI".includes(letter) || (letter === "l" && sign === "+");
    const arg = takes ? args[next++] : undefined;
    if (letter === "o" || letter === "v") {
      const set = letter === "o" ? view.ops : view.voiced;
      if (sign === "+") set.add(fold(arg)); else set.delete(fold(arg));
    } else if (!"beI".includes(letter)) {
      view.modes = view.modes.replace(letter, "") + (sign === "+" ? letter : "");
    }
  }
  view.modes = [...view.modes].sort().join("");
}

// The server restarted without its history: what we remembered of the room is gone.
function forget(view) {
  view.lines = [];
  view.seqs.clear();
  view.last = 0;
  view.marker = null;
  delete remembered.read[view.key];
  info(view, ["The server lost the earlier lines of " + view.name + "."]);
  if (view === current) renderLog();
}

// Lines replayed on entering a room: on a reconnect, only those we have not seen,
// and the gap before them asked for.
function replay(view, ev) {
  const known = view.known, read = remembered.read[view.key];
  if (!known) view.more = ev.more;
  for (const entry of ev.lines) {
    const line = chatLine(entry);
    if (line.seq <= known || !addLine(view, line)) continue;
    const unseen = known || (read !== undefined && line.seq > read);
    if (unseen && !line.mine && !view.marker) setMarker(view, line);
    if (unseen) arrived(view, line);
  }
  if (!known && read === undefined) markRead(view);
  const first = ev.lines.length ? ev.lines[0].seq : view.serverSeq + 1;
  if (known && first > known + 1) ask(view, "after", known);
  if (view === current) {
    updateTop(view);
    if (view.marker && !known) renderLog();   // after a reload: show where you left off
    fillUp();
  }
}

function older(view, ev) {
  const fromBottom = log.scrollHeight - log.scrollTop;
  for (const entry of ev.lines) addLine(view, chatLine(entry));
  view.more = ev.more;
  view.loading = false;
  if (view === current) {
    updateTop(view);
    log.scrollTop = log.scrollHeight - fromBottom;   // what was in sight stays in sight
    fillUp();
  }
}

function newer(view, ev) {
  for (const entry of ev.lines) {
    const line = chatLine(entry);
    if (addLine(view, line)) arrived(view, line);
  }
  if (ev.more && ev.lines.length) ask(view, "after", ev.lines[ev.lines.length - 1].seq);
}

// --- The connection ---

function state(text) { $("state").textContent = text; }
function send(text) { if (ws && ws.readyState === WebSocket.OPEN) ws.send(text); }

function connect() {
  clearTimeout(retryTimer);
  admitted = false;
  focused = null;
  ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws");
  state(resuming ? "Connecting\u2026" : "");
  ws.onopen = () => {
    // The rooms to come back to, before the nick: the server puts us straight in them.
    for (const name of remembered.rooms) ws.send("/join " + name + (remembered.keys[fold(name)] ? " " + remembered.keys[fold(name)] : ""));
    ws.send("/nick " + nick);
    if (password) ws.send("/pass " + password);
  };
  ws.onmessage = (message) => {
    let ev;
    try { ev = JSON.parse(message.data); } catch (e) { return; }
    const handler = handlers[ev.type];
    if (handler) handler(ev);
  };
  ws.onclose = closed;
}

function closed() {
  const was = admitted;
  ws = null;
  admitted = false;
  asks.length = 0;
  asking = null;
  for (const view of views.values()) { view.loading = false; view.entered = false; }
  if (leaving) { state(leaving); return; }
  if (!resuming) { if ($("login").hidden) askLogin("The connection closed. Try again."); else $("login-button").disabled = false; return; }
  if (was && current) info(current, ["Connection lost. Reconnecting\u2026"]);
  const wait = Math.min(retry, 30000);
  state("Disconnected. Reconnecting in " + Math.round(wait / 1000) + " s\u2026");
  retryTimer = setTimeout(connect, wait);
  retry = Math.min(retry * 2, 30000);
}

// A nick refused before joining: on a reconnect our old connection may still hold it
// for a moment, so try again a few times; else ask the person.
function nickRefused(ev) {
  if (resuming && ev.code !== "invalid_nick" && nickTries < 4) {
    nickTries += 1;
    setTimeout(() => send("/nick " + nick), 500 * nickTries);
    return;
  }
  resuming = false;
  askLogin(sentence(ev.text) + ". Choose another nick.", "nick");
}

function showLogin(shown) {
  $("login").hidden = !shown;
  $("main").inert = drawer.inert = shown;   // the dialog is modal
}

function askLogin(why, field) {
  showLogin(true);
  $("login-button").disabled = false;
  $("login-error").textContent = why || "";
  $("nick").value = nick || localStorage.getItem("chat-nick") || "";
  $(field || "nick").focus();
}

$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  nick = $("nick").value.trim();
  password = $("password").value || null;
  opPassword = $("op-password").value || null;
  $("login-error").textContent = "";
  $("login-button").disabled = true;
  leaving = "";
  if (ws && ws.readyState === WebSocket.OPEN && !admitted) {   // the same socket waits for another try
    ws.send("/nick " + nick);
    if (password) ws.send("/pass " + password);
  } else connect();
});

// --- What the person types ---

function ensureFocus(view) {
  if (view.kind === "room" && focused !== view.key) { send("/focus " + view.name); focused = view.key; }
}

function joinRoom(text) {
  let [name, key] = text.trim().split(/\s+/);
  if (!name) return;
  if (!name.startsWith("#")) name = "#" + name;
  if (key) { remembered.keys[fold(name)] = key; save(sessionStorage, "chat-keys", remembered.keys); }
  const view = views.get(fold(name));
  if (view) { switchTo(view); return; }
  pendingSwitch = fold(name);
  send("/join " + name + (key ? " " + key : ""));
}

function submitLine(text) {
  const word = text.split(" ")[0], rest = text.slice(word.length + 1).trim();
  const command = text.startsWith("/") && !text.startsWith("//") ? fold(word.slice(1)) : "";
  const view = current;
  if (command === "join") return joinRoom(rest);
  if (command === "query") return rest ? openQuery(rest.split(" ")[0]) : undefined;
  if (command === "part" && view && view.kind === "query" && !rest) return dropView(view);
  if (command === "part" && view && !rest) return send("/part " + view.name);
  if (command === "msg") pendingSwitch = "@" + fold(rest.split(" ")[0]);
  if (command === "quit") { leaving = "You left the chat. Reload the page to come back."; sessionStorage.removeItem("chat-session"); }
  if (view && view.kind === "query" && (!command || command === "me")) {
    if (command === "me") return info(view, ["/me works in rooms only: private actions cannot be sent."], "error");
    return send("/msg " + view.name + " " + (text.startsWith("//") ? text.slice(1) : text));
  }
  if (view) ensureFocus(view);
  send(text);
}

$("send").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = input.value;
  if (!text.trim()) return;
  if (!/^\/(op|pass)\b/i.test(text) && sent[sent.length - 1] !== text) sent.push(text);
  browsing = -1;
  if (!admitted) { info(current, ["Not connected: the line was not sent."], "error"); return; }
  input.value = "";
  stuck = true;
  submitLine(text);
});

input.addEventListener("keydown", (event) => {
  if (event.altKey) return;
  if (event.key === "ArrowUp" || event.key === "ArrowDown") recall(event);
  else if (event.key === "Tab") complete(event);
  else if (event.key === "Escape" && input.value) input.value = "";
});

function recall(event) {
  if (!sent.length) return;
  event.preventDefault();
  browsing = browsing < 0 ? sent.length : browsing;
  browsing = Math.max(0, Math.min(sent.length, browsing + (event.key === "ArrowUp" ? -1 : 1)));
  input.value = browsing < sent.length ? sent[browsing] : "";
}

// Tab completes commands, room names and nicks (of the room being read, and conversations).
function complete(event) {
  const upto = input.value.slice(0, input.selectionStart), start = upto.lastIndexOf(" ") + 1;
  const word = fold(upto.slice(start));
  if (!word) return;
  event.preventDefault();
  const rooms = [...new Set([...views.values()].filter((v) => v.kind === "room").map((v) => v.name).concat(otherRooms.map((r) => r.name)))];
  const nicks = [...(current && current.kind === "room" ? current.members.values() : [])]
    .concat([...views.values()].filter((v) => v.kind === "query").map((v) => v.name))
    .filter((n) => fold(n) !== fold(me || ""));
  const pool = start === 0 && word[0] === "/" ? COMMANDS : word[0] === "#" ? rooms : [...new Set(nicks)];
  const found = pool.filter((name) => fold(name).startsWith(word));
  if (found.length === 1) {
    const ending = start === 0 && pool !== COMMANDS && pool !== rooms ? ": " : " ";
    input.value = upto.slice(0, start) + found[0] + ending + input.value.slice(upto.length);
  } else if (found.length > 1) info(current, [found.join("  ")]);
}

// --- The drawer (on a narrow screen), keys, and the rest of the page ---

function openDrawer() {
  drawer.classList.add("open");
  $("scrim").hidden = false;
  $("menu").setAttribute("aria-expanded", "true");
  $("main").inert = true;
  send("/rooms");
  const here = drawer.querySelector("[aria-current]") || drawer.querySelector("button, input");
  if (here) here.focus();
}

function closeDrawer(focusMenu) {
  if (!drawer.classList.contains("open")) return;
  drawer.classList.remove("open");
  $("scrim").hidden = true;
  $("menu").setAttribute("aria-expanded", "false");
  $("main").inert = false;
  if (focusMenu) $("menu").focus();
}

// After choosing a room or a person: the drawer closes; typing follows.
function chosen(typing) {
  if (narrow.matches) { closeDrawer(!typing); if (typing) input.focus(); } else input.focus();
}

$("menu").addEventListener("click", () => (drawer.classList.contains("open") ? closeDrawer(true) : openDrawer()));
$("scrim").addEventListener("click", () => closeDrawer(true));
// People come after the conversation in the focus order on a wide screen (a column on its
// right), and inside the drawer, after the rooms, on a narrow one.
function placePeople() {
  if (narrow.matches) drawer.append($("people")); else $("main").after($("people"));
}
narrow.addEventListener("change", () => { closeDrawer(false); placePeople(); });
placePeople();
$("join-form").addEventListener("submit", (event) => {
  event.preventDefault();
  joinRoom($("join-name").value);
  $("join-name").value = "";
  chosen();
});
$("topic").addEventListener("click", () => $("topic").classList.toggle("full"));

document.addEventListener("keydown", (event) => {
  if (event.altKey && (event.key === "ArrowUp" || event.key === "ArrowDown")) {
    event.preventDefault();
    step(event.key === "ArrowUp" ? -1 : 1);
  } else if (event.key === "Escape" && drawer.classList.contains("open")) closeDrawer(true);
});

// The bell: per view; the browser is asked for permission only on this tap.
$("bell").addEventListener("click", async () => {
  const view = current;
  if (!view) return;
  view.notify = !view.notify;
  if (view.notify) delete remembered.quiet[view.key]; else remembered.quiet[view.key] = true;
  save(localStorage, "chat-quiet", remembered.quiet);
  renderHeader();
  if (view.notify && window.Notification && Notification.permission === "default") await Notification.requestPermission();
  if (view.notify && (!window.Notification || Notification.permission === "denied")) state("This browser does not allow notifications from this page (see its site settings).");
});

document.addEventListener("visibilitychange", () => {
  if (document.hidden || !current) return;
  current.unread = 0;
  current.mention = false;
  markRead(current);
  updateItem(current);
  updateTitle();
});

// The visible height, without the on-screen keyboard: the input stays above it.
function fitViewport() {
  const seen = window.visualViewport;   // scaled back, so a pinch zoom changes nothing
  document.documentElement.style.setProperty("--app-h", Math.round(seen.height * seen.scale) + "px");
  if (seen.scale === 1) window.scrollTo(0, 0);   // Safari scrolls the page up under its keyboard
}
if (window.visualViewport) { window.visualViewport.addEventListener("resize", fitViewport); fitViewport(); }

setInterval(() => { if (!document.hidden && admitted) send("/rooms"); }, 60000);   // counts of other rooms

// --- Start: back in the same tab after a reload, or ask who you are ---

for (const name of remembered.rooms) ensureView("room", name);   // listed until the server says
restoreQueries();
if (views.has(remembered.current)) switchTo(views.get(remembered.current));
updateTitle();
const session = load(sessionStorage, "chat-session", null);
if (session) {
  nick = session.nick;
  password = session.password;
  resuming = true;
  showLogin(false);
  connect();
} else askLogin("");
""".replace("@COMMAND_WORDS@", json.dumps(COMMAND_WORDS))

_PAGE_BODY = """
<div id="drawer">
<nav id="nav" aria-label="Rooms and conversations">
<h2 id="rooms-title">Rooms</h2>
<ul id="rooms" aria-labelledby="rooms-title"></ul>
<h2 id="queries-title">Conversations</h2>
<ul id="queries" aria-labelledby="queries-title"></ul>
<p id="no-queries" class="hint">Choose a name under People to talk in private.</p>
<form id="join-form" autocomplete="off">
<label for="join-name">Join a room</label>
<div class="row">
<input id="join-name" list="room-names" placeholder="#room" autocapitalize="none" spellcheck="false" enterkeyhint="go">
<button type="submit">Join</button>
</div>
<datalist id="room-names"></datalist>
</form>
<h2 id="others-title">Other rooms</h2>
<ul id="others" aria-labelledby="others-title"></ul>
</nav>
<aside id="people" aria-labelledby="people-title">
<h2 id="people-title">People</h2>
<ul id="members" aria-labelledby="people-title"></ul>
</aside>
</div>
<div id="scrim" hidden></div>
<main id="main">
<header id="bar">
<button id="menu" type="button" aria-controls="drawer" aria-expanded="false" aria-label="Rooms and people">
<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M3 6h18M3 12h18M3 18h18"/></svg><span id="menu-count" class="badge" hidden></span>
</button>
<div id="heading">
<h1 id="title">chat</h1>
<span id="modes" class="hint"></span>
<p id="topic"></p>
</div>
<button id="bell" type="button" aria-pressed="true" aria-label="Notifications">
<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M6 16V11a6 6 0 0 1 12 0v5l2 2H4zM10 20a2 2 0 0 0 4 0"/><path class="slash" d="M3 3l18 18"/></svg>
</button>
</header>
<p id="state" role="status"></p>
<div id="log-box">
<section id="log" aria-labelledby="title" tabindex="0"></section>
<button id="jump" type="button" hidden>New messages below</button>
</div>
<form id="send" autocomplete="off">
<label for="line" id="prompt" class="sr-only">Message</label>
<input id="line" name="line" autocomplete="off" autocapitalize="sentences" enterkeyhint="send" placeholder="Message, or /help">
<button id="send-button" type="submit"><svg viewBox="0 0 24 24" aria-hidden="true"><path d="M4 12l16-8-6 16-2-7zM12 13l8-9"/></svg><span class="sr-only">Send</span></button>
</form>
</main>
<div id="announce" class="sr-only" aria-live="polite"></div>
<div id="login" role="dialog" aria-modal="true" aria-labelledby="login-title">
<form id="login-form" autocomplete="on">
<h1 id="login-title">Join the chat</h1>
<label for="nick">Your nick</label>
<input id="nick" name="nick" maxlength="20" autocomplete="nickname" autocapitalize="none" spellcheck="false" aria-describedby="nick-hint">
<p id="nick-hint" class="hint">Leave it empty to get a guest name.</p>
<label for="password">Server password <span class="hint">(if the server has one)</span></label>
<input id="password" name="password" type="password" autocomplete="current-password">
<label for="op-password">Operator password <span class="hint">(optional)</span></label>
<input id="op-password" name="op-password" type="password" autocomplete="off">
<p id="login-error" class="error" role="alert"></p>
<button id="login-button" type="submit">Join</button>
</form>
</div>
"""

PAGE_HTML = (
    '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
    '<meta name="viewport" content="width=device-width, initial-scale=1, '
    'interactive-widget=resizes-content">\n'
    '<meta name="color-scheme" content="light dark">\n<title>chat</title>\n'
    "<style>" + _PAGE_STYLE + "</style>\n</head>\n<body>" + _PAGE_BODY
    + "<script>" + _PAGE_SCRIPT + "</script>\n</body>\n</html>\n")
PAGE_BYTES = PAGE_HTML.encode()
PAGE_ETAG = '"%s"' % hashlib.sha256(PAGE_BYTES).hexdigest()[:32]


def _csp_hash(text):
    return "'sha256-%s'" % base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


PAGE_CSP = ("default-src 'none'; script-src %s; style-src %s; connect-src 'self'; "
            "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
            % (_csp_hash(_PAGE_SCRIPT), _csp_hash(_PAGE_STYLE)))


# --- Command line ---

def build_parser():
    parser = argparse.ArgumentParser(
        prog="chat.py",
        description="A chat in one file: run a server, join it with the client, nc, an IRC "
        "client or a browser.",
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
        description="Run a chat server. Clients connect with 'chat.py client', nc/telnet, an "
        "IRC client or a browser (http://HOST:PORT/), all on the one port, and start in one "
        "room; /join ROOM creates and enters others.",
        epilog="The passwords may also come from the CHAT_PASSWORD and CHAT_OP_PASSWORD "
        "environment variables (never from the command line, where ps would show them).")
    add_network_arguments(server, "address to listen on (default: all interfaces, IPv4 and IPv6)")
    server.add_argument("--name", help="server name shown in the greeting (default: host name)")
    server.add_argument("--room", type=room_name, default=DEFAULT_ROOM, metavar="ROOM",
                        help="the room everyone starts in (default %(default)s)")
    server.add_argument("--no-web", dest="web", action="store_false",
                        help="do not serve the browser page and its WebSocket (by default "
                        "http://HOST:PORT/ is a chat page, on the same port)")
    server.add_argument("--web-host", dest="web_hosts", action="append", default=[],
                        metavar="NAME", help="a name browsers may reach the page by (repeat "
                        "for several); by default any IP address, localhost, this machine's "
                        "name and --name. Other names are refused, so a site that points its "
                        "own name at this server (DNS rebinding) cannot talk in the chat")
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
                        help="public lines of each room replayed to those who enter it "
                        "(default %(default)s; 0: none, and none kept). Memory keeps up to "
                        "1000 per room for /history")
    limits.add_argument("--max-rooms", type=positive_int, default=DEFAULT_MAX_ROOMS, metavar="N",
                        help="rooms that may exist at once (default %(default)s)")
    limits.add_argument("--announce-limit", type=non_negative_int, default=DEFAULT_ANNOUNCE_LIMIT,
                        metavar="N", help="announce joins, leaves and renames only while a room "
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
    security.add_argument("--op-password-file", metavar="FILE",
                          help="file holding the password that /op (IRC: OPER) takes to make "
                          "an operator, who may kick, ban and mute (or CHAT_OP_PASSWORD)")
    storage = server.add_argument_group("storage")
    storage.add_argument("--data-dir", metavar="DIR",
                         help="keep each room's history, the topics and the bans in DIR, so a "
                         "restart (even kill -9) loses none of them (default: memory only)")
    storage.add_argument("--log-max-bytes", type=positive_int, default=DEFAULT_LOG_MAX_BYTES,
                         metavar="BYTES", help="rotate a room's log past this size, once it holds "
                         "the --history lines; one older log is kept (default %(default)s)")
    cluster = server.add_argument_group(
        "several nodes", "nodes started with the same --redis form one chat: rooms, nicks, "
        "history, bans and private messages span them all")
    cluster.add_argument("--redis", metavar="URL", default=os.environ.get("CHAT_REDIS_URL"),
                         help="redis://[USER:PASSWORD@]HOST:PORT[/DB], rediss://... (TLS) or "
                         "unix:///PATH; the environment variable CHAT_REDIS_URL keeps a "
                         "password out of ps (default: one node, no Redis)")
    cluster.add_argument("--redis-prefix", default=REDIS_PREFIX, metavar="PREFIX",
                         help="start of every Redis key, so chats can share one Redis "
                         "(default %(default)s)")
    cluster.add_argument("--node", metavar="NAME", help="this node's name in logs (default: "
                         "HOST:PORT)")
    cluster.add_argument("--node-timeout", type=positive_float, default=NODE_TIMEOUT,
                         metavar="SECONDS", help="a node silent this long is taken for lost and "
                         "its members leave (default %(default)s; at most 1.2 times it passes "
                         "before the others notice)")
    cluster.add_argument("--workers", type=positive_int, default=1, metavar="N",
                         help="N processes on this machine share the port, linked through "
                         "--redis, so N cores serve (Linux: its SO_REUSEPORT spreads "
                         "connections over them)")
    operating = server.add_argument_group("operating")
    operating.add_argument("--no-health", dest="health", action="store_false",
                           help="do not answer GET /healthz and /metrics")
    operating.add_argument("--metrics-allow", metavar="CIDR", action="append", default=[],
                           type=network_name, help="may read /metrics (repeatable; default: "
                           "this machine only)")
    verbosity = server.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="log errors only")
    server.set_defaults(run=run_server)


def add_client_parser(commands):
    client = commands.add_parser(
        "client", help="join a chat server",
        description="Join a chat server. Type lines to talk; /help lists the commands, "
        "/join ROOM changes rooms; /quit, Ctrl+D or Ctrl+C leave. In a terminal, incoming "
        "lines appear above the line you type, which you edit with Left/Right, Home/End "
        "(Ctrl+A/E), Backspace/Delete, Ctrl+U/K/W, Up/Down (input history) and Tab (completes "
        "nicks, commands and rooms). Piped input is sent line by line, no faster than the "
        "server's flood control allows, and piped output is the plain protocol lines.",
        epilog="The password may also come from the CHAT_PASSWORD environment variable; "
        "without either, the client asks for it when the server wants one.")
    add_network_arguments(client, "server to connect to (default: localhost)", default="localhost")
    client.add_argument("--nick", help="nick to use (default: your login name; "
                        "a free variant such as alice2 is picked if it is taken)")
    client.add_argument("--no-reconnect", dest="reconnect", action="store_false",
                        help="exit with status 1 when the connection is lost, instead of "
                        "reconnecting (after 1 s, doubling up to 30 s)")
    client.add_argument("--listen-only", action="store_true",
                        help="only show what is said, never read the keyboard or stdin: for "
                        "loggers started from scripts (stop it with Ctrl+C or a signal)")
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
    server = default is None
    parser.add_argument("--host", default=default, help=host_help + "; HOST:PORT and [IPv6] "
                        "work too")
    parser.add_argument("--port", type=port_number if server else client_port, default=None,
                        help="TCP port (default %d%s)" % (
                            DEFAULT_PORT, "; 0 for any free port" if server else ""))
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


def client_port(text):
    value = port_number(text)
    if not value:
        raise argparse.ArgumentTypeError("a server's port is 1 to 65535, not 0")
    return value


def room_name(text):
    try:
        return normalize_room(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError("%r is not a room name: %s" % (text, exc))


def split_host(host, port):
    """(host, port) from --host and --port: "[::1]" and "[::1]:8000" are IPv6 in brackets,
    "box:8000" carries its port; a bare IPv6 address has more than one colon."""
    found = re.fullmatch(r"\[([^\]]*)\](?::(\d+))?", host or "") or \
        re.fullmatch(r"([^:]+):(\d+)", host or "")
    if not found and re.fullmatch(r"[^:\[\]]+:[^:]*|\[[^\]]*\]:.*", host or ""):
        raise ChatError("--host %s: the part after the colon is not a port number" % host)
    if found:
        host, in_host = found.group(1), found.group(2)
        if in_host is not None:
            if not 0 < int(in_host) < 65536 or port not in (None, int(in_host)):
                raise ChatError("--host %s: a bad port, or not the one --port says"
                                % found.group())
            port = int(in_host)
    return host, DEFAULT_PORT if port is None else port


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


def network_name(text):
    """A network (an address is a network of one) for --metrics-allow."""
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not an address or a network (CIDR)" % text)


def positive_float(text):
    value = non_negative_float(text)
    if not value:
        raise argparse.ArgumentTypeError("%r is not above 0" % text)
    return value


def read_password(path, variable="CHAT_PASSWORD"):
    """The password from a file (its trailing newline stripped) or the environment
    variable, or None."""
    if path is None:
        return os.environ.get(variable) or None
    try:
        with open(path, encoding="utf-8") as file:
            password = file.read().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ChatError("cannot read the password file %s: %s"
                        % (path, getattr(exc, "strerror", None) or exc))
    if not password:
        raise ChatError("the password file %s is empty" % path)
    return password


def configure_logging(args):
    # The logging HOWTO's advice for speed: skip caller, thread and process lookups.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.setLogRecordFactory(LogLine)
    handler = LogHandler(sys.stderr)
    handler.setFormatter(logging.Formatter())
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
    host, port = split_host(args.host, args.port)
    options = ServerOptions(
        host=host, port=port, family=args.family, name=args.name, room=args.room,
        max_rooms=args.max_rooms,
        max_clients=min(args.max_clients, DEFAULT_MAX_CLIENTS) if WINDOWS else args.max_clients,
        max_line=args.max_line, announce_limit=args.announce_limit,
        password=read_password(args.password_file), register_timeout=args.register_timeout,
        op_password=read_password(args.op_password_file, "CHAT_OP_PASSWORD"),
        data_dir=args.data_dir, log_max_bytes=args.log_max_bytes,
        rate=args.rate, burst=args.burst, max_per_ip=args.max_per_ip, history=args.history,
        web=args.web, web_hosts=tuple(args.web_hosts), redis=args.redis,
        redis_prefix=args.redis_prefix, node=args.node, node_timeout=args.node_timeout,
        health=args.health, metrics_allow=tuple(args.metrics_allow) or ServerOptions.metrics_allow)
    if args.redis:
        if args.data_dir:
            raise ChatError("--data-dir and --redis do not go together: with --redis, Redis "
                            "keeps the history, topics and bans (give it persistence)")
        try:
            RedisTarget.parse(args.redis)
        except ValueError as exc:
            raise ChatError("invalid --redis: %s" % exc)
        if not CLUSTER_ID.fullmatch(args.redis_prefix.replace(" ", "_")):
            raise ChatError("invalid --redis-prefix: use letters, digits and .:-_ only")
    if args.workers > 1 and not args.redis:
        raise ChatError("--workers needs --redis: the workers share the chat through it")
    if args.tls_key and not args.tls_cert:
        raise ChatError("--tls-key needs --tls-cert")
    fingerprint = None
    if args.tls_cert:
        if ssl is None:
            raise ChatError("this Python has no ssl module, so TLS is not available")
        try:
            options.tls_context, fingerprint = server_tls_context(args.tls_cert, args.tls_key)
        except ssl.SSLError:
            raise ChatError("cannot use the TLS certificate %s: it and its key must be PEM "
                            "files (the key unencrypted) that belong together" % args.tls_cert)
        except (OSError, ValueError, AttributeError) as exc:
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


WORKER_VARIABLE = "CHAT_WORKER"       # set in the processes --workers starts
# What runs in place of "python chat.py" (see run_from_compiled_code): the compiled code
# from descriptor %d, with this file's path as the script's, so that tracebacks, --workers
# and "ps" or "pgrep -f chat.py" see chat.py as ever.
COMPILED_LOADER = ("import marshal,os,sys;f=os.fdopen(%d,'rb');c=marshal.loads(f.read());"
                   "f.close();m=sys.modules['__main__'];sys.argv[:]=sys.argv[1:];"
                   "m.__file__=sys.argv[0];exec(c,m.__dict__)")


def run_from_compiled_code():
    """Started as a script, become a process that runs this file's compiled code:
    by exec, so with the same PID and descriptors, on Linux with Python 3.10+.

    Python compiles a script at every start (only modules it imports are kept
    compiled), and the compiler's peak of about 20 MB stays in the process for
    good, scattered through its heap: a server started as "python chat.py"
    would hold 49 MB where 27 do. The code goes through an anonymous memory
    file (nothing is written to disk). Elsewhere, the server runs as started.
    """
    source = os.path.abspath(__file__)
    if not (started_as_script(source) and sys.executable and hasattr(sys, "orig_argv")):
        return
    descriptor = compiled_image(source)
    if descriptor is None:
        return
    argv = list(sys.orig_argv)
    script = len(argv) - len(sys.argv)
    argv[script:script] = ["-c", COMPILED_LOADER % descriptor]
    try:
        os.execv(sys.executable, argv)
    except OSError as exc:
        os.close(descriptor)
        log.debug("running from source: %s", exc)


def compiled_image(source):
    """A descriptor, open across exec, of an anonymous memory file that holds source's
    compiled code (marshalled); None where there can be none (not Linux), or where it
    would take the place of a closed standard stream."""
    if not hasattr(os, "memfd_create"):
        return None
    try:
        with open(source, "rb") as file:
            code = compile(file.read(), source, "exec")
        descriptor = os.memfd_create("chat.py", 0)   # no MFD_CLOEXEC: inherited
    except (OSError, ValueError, SyntaxError):
        return None
    try:
        if descriptor > 2:
            with open(descriptor, "wb", closefd=False) as file:
                file.write(marshal.dumps(code))
            os.lseek(descriptor, 0, os.SEEK_SET)
            return descriptor
    except OSError:
        pass
    os.close(descriptor)
    return None


def started_as_script(source):
    """Whether Python ran this file itself ("python chat.py"), rather than as a
    module, its compiled code, or through another program (a profiler, a debugger)."""
    frame = sys._getframe()
    while frame.f_back is not None:
        frame = frame.f_back
    return frame.f_code.co_filename == source and frame.f_globals.get("__spec__") is None


def run_workers(args):
    """--workers N: N processes of this very command share the port (SO_REUSEPORT: the
    kernel spreads connections over them) and one chat through --redis. When one
    stops, the others are stopped too."""
    if not hasattr(socket, "SO_REUSEPORT") or not sys.platform.startswith("linux"):
        raise ChatError("--workers needs Linux, whose SO_REUSEPORT spreads connections over "
                        "processes: here, run one node per port behind a load balancer")
    if not args.port:
        raise ChatError("--workers needs a --port other than 0: the workers must share one")
    workers = []
    for number in range(1, args.workers + 1):
        env = dict(os.environ, **{WORKER_VARIABLE: str(number)})
        workers.append(subprocess.Popen([sys.executable, os.path.abspath(__file__)]
                                        + sys.argv[1:], env=env))
    stop = threading.Event()
    for name in ("SIGINT", "SIGTERM"):
        signal.signal(getattr(signal, name), lambda signum, frame: stop.set())
    while not stop.is_set() and all(worker.poll() is None for worker in workers):
        stop.wait(0.2)
    for worker in workers:
        if worker.poll() is None:
            worker.terminate()
    return max(worker.wait() for worker in workers)


def run_server(args):
    run_from_compiled_code()
    configure_logging(args)
    worker = os.environ.get(WORKER_VARIABLE)
    if args.workers > 1 and not worker:
        server_options(args)   # errors before any worker starts
        return run_workers(args)
    options, fingerprint = server_options(args)
    if args.workers > 1:
        options.reuse_port = True
        options.node = "%s-w%s" % (options.node or "%s:%d" % (socket.gethostname(),
                                                              options.port), worker)
    try:
        server = ChatServer(options)
    except RedisError as exc:
        raise ChatError(str(exc))
    except StoreError as exc:
        raise ChatError(exc.strerror)
    except OSError as exc:
        where = format_address(options.host or "*", options.port)
        raise ChatError("cannot listen on %s: %s" % (where, listen_failure(exc, options.port)))
    with server:
        for host, port in server.addresses:
            print("listening on %s" % format_address(host, port), file=sys.stderr, flush=True)
        log_start_notes(args, options, fingerprint)
        install_shutdown_signals(server)
        hold_log_lines()
        collect_garbage_less_often()
        server.serve_forever()
    return 0


def collect_garbage_less_often():
    """Each connection leaves a few reference cycles (its connection, dialect and reader
    point at each other), and with Python's default (a young collection every 700 new
    objects) a storm of 5000 connections spent 25 ms collecting, 5 us a connection.
    Every GC_YOUNG_OBJECTS instead, it spent 12 ms, for at most a megabyte or two of
    garbage waiting meanwhile."""
    gc.set_threshold(GC_YOUNG_OBJECTS, *gc.get_threshold()[1:])


def listen_failure(exc, port):
    """Plain words for a socket that cannot listen."""
    if exc.errno == errno.EADDRINUSE:
        return "port %d is in use (is another server running there?)" % port
    if exc.errno == errno.EACCES:
        return "permission denied (ports below 1024 need administrator rights)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "this machine has no such address"
    if isinstance(exc, socket.gaierror):
        return "no such host (%s)" % exc.strerror
    return exc.strerror or str(exc)


def install_shutdown_signals(server):
    """Ctrl+C and SIGTERM stop the server cleanly; the wakeup fd makes select() return."""
    signal.set_wakeup_fd(server.wakeup_fd, warn_on_full_buffer=False)
    for name in ("SIGINT", "SIGTERM"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), lambda signum, frame: server.request_shutdown())


def client_from_args(args):
    """A ChatClient configured from the command line."""
    nick = default_nick()
    if args.nick is not None:
        try:
            nick = normalize_nick(args.nick)
        except ValueError as exc:
            raise ChatError("invalid --nick: %s" % exc)
    host, port = split_host(args.host, args.port)
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
    return ChatClient(host, port, args.family or socket.AF_UNSPEC, nick=nick,
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
    if not args.listen_only and TerminalConsole.usable(sys.stdin, sys.stdout):
        return TerminalConsole(style)
    return PlainConsole(style, listen_only=args.listen_only)


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
