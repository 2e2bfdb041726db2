"""The REPL's plain parts: its wire protocol, the console, secret masking and the client.

The DebugActor (actors/debug.py) owns the listening sockets and builds each session's
namespace; everything here is plain code, testable without actors.

Protocol (UTF-8 text over a stream socket):

- a TCP client first sends the token on one line; the server answers a wrong or
  missing token with one line and closes; a Unix socket client sends no token
  (the socket is mode 0600);
- the server sends output as it is, then a prompt framed by two NUL bytes
  (`\\0>>> \\0`), and waits for one line; output never holds a NUL;
- the client sends lines ending in `\\n`; a line that is only `\\x03` is Ctrl-C (the
  server drops the statement being typed); closing the socket ends the session.
"""

from __future__ import annotations

import ast
import code
import contextlib
import os
import pprint
import socket
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit

import attrs

from estate.config import Settings, mask_url

__all__ = [
    "FRAME",
    "INTERRUPT",
    "MAX_LINE",
    "Masker",
    "ReplConsole",
    "SessionOutput",
    "format_table",
    "mask_value",
    "run_client",
    "run_session",
]

FRAME = "\0"
"""Frames a prompt: output `FRAME + prompt + FRAME`."""

INTERRUPT = "\x03"
"""A line holding only this drops the statement being typed (the client's Ctrl-C)."""

MAX_LINE = 64 * 1024
"""Longest line the server reads; longer input is cut."""

PS1, PS2 = ">>> ", "... "

REFUSED = "estate repl: wrong or missing token; closing\n"

SECRET_KEYS = ("password", "passwd", "secret", "token", "private_key", "api_key", "apikey")
"""Dict keys whose values are never shown."""


# -- masking --------------------------------------------------------------------------------


class Masker:
    """Replaces every occurrence of a secret value in text with `***`."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    @classmethod
    def of(cls, settings: Settings) -> Masker:
        """The secret settings and every password in a URL setting (raw and %-decoded)."""
        secrets: set[str] = set()
        for field in attrs.fields(Settings):
            value = getattr(settings, field.name)
            if not isinstance(value, str) or not value:
                continue
            if field.metadata.get("secret"):
                secrets.add(value)
                if value.startswith("0x") and len(value.lstrip("0x")) >= 8:
                    secrets.add(value[2:].lstrip("0"))  # a felt as it may be printed short
                continue
            with contextlib.suppress(ValueError):
                password = urlsplit(value).password
                if password:
                    secrets.update({password, unquote(password)})
        return cls(secrets)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def __repr__(self) -> str:
        return f"<Masker of {len(self._secrets)} secrets>"


def mask_value(value: Any) -> Any:
    """`value` (dicts, lists, strings) with secret-named keys hidden and URLs' passwords masked."""
    if isinstance(value, Mapping):
        return {
            key: (
                "***"
                if value_is_secret(key) and item not in (None, "", False)
                else mask_value(item)
            )
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(mask_value(item) for item in value)
    if isinstance(value, str):
        return mask_url(value)
    return value


def value_is_secret(key: Any) -> bool:
    return isinstance(key, str) and any(word in key.lower() for word in SECRET_KEYS)


# -- the server side --------------------------------------------------------------------------


class SessionOutput:
    """What a session prints: buffered per statement, masked, then sent at the prompt."""

    FLUSH_AT = 256 * 1024

    def __init__(self, send: Callable[[bytes], None], mask: Callable[[str], str]) -> None:
        self._send, self._mask = send, mask
        self._parts: list[str] = []
        self._size = 0

    def write(self, text: Any) -> int:
        text = text if isinstance(text, str) else str(text)
        self._parts.append(text)
        self._size += len(text)
        if self._size >= self.FLUSH_AT:
            self.send_pending()
        return len(text)

    def flush(self) -> None:
        """Output goes out at the next prompt (masked as one piece), not before."""

    def send_pending(self) -> None:
        if not self._parts:
            return
        text = self._mask("".join(self._parts)).replace(FRAME, "\\x00")
        self._parts.clear()
        self._size = 0
        self._send(text.encode("utf-8", "replace"))

    def prompt(self, prompt: str) -> None:
        self.send_pending()
        self._send(f"{FRAME}{prompt}{FRAME}".encode())


class ReplConsole(code.InteractiveConsole):
    """An interactive console whose output all goes to one session, never to sys.stdout.

    The standard console displays an expression's value with `sys.displayhook`, which
    is the process's own: this one evaluates a final expression itself and writes its
    `pprint` form to the session (and keeps it in `_`).
    """

    def __init__(self, namespace: dict[str, Any], out: SessionOutput) -> None:
        super().__init__(namespace, filename="<repl>")
        self.out = out

    def write(self, data: str) -> None:
        self.out.write(data)

    def runsource(self, source: str, filename: str = "<repl>", symbol: str = "single") -> bool:
        try:
            compiled = self.compile(source, filename, symbol)
        except (OverflowError, SyntaxError, ValueError):
            self.showsyntaxerror(filename)
            return False
        if compiled is None:
            return True  # incomplete: more lines follow
        self._run(source, filename)
        return False

    def _run(self, source: str, filename: str) -> None:
        try:
            tree = ast.parse(source, filename, "exec")
        except (OverflowError, SyntaxError, ValueError):
            self.showsyntaxerror(filename)
            return
        last = tree.body[-1] if tree.body else None
        try:
            if isinstance(last, ast.Expr):
                head = ast.Module(body=tree.body[:-1], type_ignores=[])
                exec(compile(head, filename, "exec"), self.locals)
                expression = ast.Expression(body=last.value)
                value = eval(compile(expression, filename, "eval"), self.locals)
                if value is not None:
                    self.locals["_"] = value
                    self.write(pprint.pformat(value, sort_dicts=False) + "\n")
            else:
                exec(compile(tree, filename, "exec"), self.locals)
        except SystemExit:
            raise
        except BaseException:  # noqa: BLE001  (the user's code: show it, keep the session)
            self.showtraceback()

    def showtraceback(self) -> None:
        kind, value, tb = sys.exc_info()
        # skip this module's own frame: the user sees their code only
        self.write("".join(traceback.format_exception(kind, value, tb.tb_next if tb else None)))

    def showsyntaxerror(self, filename: str | None = None, **_kwargs: Any) -> None:
        kind, value, _tb = sys.exc_info()
        self.write("".join(traceback.format_exception_only(kind, value)))


def run_session(
    rfile: IO[bytes], out: SessionOutput, namespace: dict[str, Any], banner: str
) -> None:
    """Read lines from `rfile` and run them until end of input or `exit()`."""
    console = ReplConsole(namespace, out)
    out.write(banner)
    more = False
    while True:
        out.prompt(PS2 if more else PS1)
        line = rfile.readline(MAX_LINE)
        if not line:
            return
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        if text == INTERRUPT:
            console.resetbuffer()
            out.write("KeyboardInterrupt\n")
            more = False
            continue
        try:
            more = console.push(text)
        except SystemExit:
            out.send_pending()
            return


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Left-aligned columns as wide as their widest cell."""
    cells = [list(headers), *([("-" if c is None else str(c)) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        + "\n"
        for row in cells
    )


# -- the client -------------------------------------------------------------------------------

HISTORY_FILE = Path("~/.estate_repl_history")


class _Reader:
    """Splits the server's bytes into output and prompts."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def until_prompt(self, show: Callable[[str], None]) -> str | None:
        """Show output until the next prompt and return it; None when the server closed."""
        frame = FRAME.encode()
        while True:
            start = self.buffer.find(frame)
            if start >= 0:
                if start:
                    show(self.buffer[:start].decode("utf-8", "replace"))
                    self.buffer = self.buffer[start:]
                end = self.buffer.find(frame, 1)
                if end > 0:
                    prompt = self.buffer[1:end].decode("utf-8", "replace")
                    self.buffer = self.buffer[end + 1 :]
                    return prompt
            elif self.buffer:
                show(self.buffer.decode("utf-8", "replace"))
                self.buffer = b""
            chunk = self.sock.recv(65536)
            if not chunk:
                if self.buffer:
                    show(self.buffer.replace(frame, b"").decode("utf-8", "replace"))
                    self.buffer = b""
                return None
            self.buffer += chunk


def _line_editing(stdin: IO[str]) -> Callable[[], None]:
    """Turn on readline with the history file when stdin is a terminal; returns its saver."""
    if not stdin.isatty():
        return lambda: None
    try:
        import readline
    except ImportError:  # a Python without readline: plain input()
        return lambda: None
    history = HISTORY_FILE.expanduser()
    with contextlib.suppress(OSError):
        readline.read_history_file(history)
    readline.set_history_length(1000)
    readline.parse_and_bind("tab: complete")

    def save() -> None:
        with contextlib.suppress(OSError):
            readline.write_history_file(history)
            os.chmod(history, 0o600)

    return save


def _read_line(stdin: IO[str], prompt: str, interactive: bool) -> str | None:
    """The user's next line (INTERRUPT for Ctrl-C); None at Ctrl-D or the end of input."""
    if not interactive:
        line = stdin.readline()
        return line.rstrip("\n") if line else None
    try:
        return input(prompt)
    except EOFError:
        return None
    except KeyboardInterrupt:
        return INTERRUPT


def run_client(
    sock: socket.socket,
    token: str | None = None,
    stdin: IO[str] | None = None,
    stdout: IO[str] | None = None,
) -> int:
    """Talk to a REPL server until Ctrl-D (or the end of piped input): 0, or 1 if refused."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    interactive = stdin.isatty()

    def show(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    save_history = _line_editing(stdin)
    reader = _Reader(sock)
    prompted = False
    try:
        if token is not None:
            sock.sendall(token.encode() + b"\n")
        while True:
            prompt = reader.until_prompt(show)
            if prompt is None:  # exit(), the gateway stopping, or a refused token
                if interactive and prompted:
                    show("\n(the gateway closed the session)\n")
                return 0 if prompted else 1
            prompted = True
            line = _read_line(stdin, prompt, interactive)
            if line is None:
                if interactive:
                    show("\n")
                return 0
            if line == INTERRUPT:
                show("\n")
            sock.sendall(line.replace("\n", " ").encode() + b"\n")
    finally:
        save_history()
        with contextlib.suppress(OSError):
            sock.close()
