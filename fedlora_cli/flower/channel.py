"""The local channel between a site's ClientApp (the relay) and its resident worker (:mod:`.worker`).

A Unix domain socket in the site's state folder, ``STATE_DIR/worker.sock``: the file system decides who may connect
(the worker creates it 0600, so only the site's user can open it), and the kernel tells each side the other's user
id (``SO_PEERCRED``), so neither trusts the other's word. A relay refuses a socket that is not a socket, is owned by
another user or is open to the group or others, rather than hand a received global checkpoint to whoever made it.

One connection carries one exchange: one request and one answer, each one JSON object on one line (UTF-8, newline
ended), at most :data:`MAX_BYTES`. Nothing is unpickled; the folders themselves never cross the socket (the relay
unpacks the received global into the site's work folder and packs the update from there)::

    request  {"protocol": 1, "op": "query" | "train" | "evaluate", "node-config": {...the SuperNode's...},
              "manifest": TEXT (query) | "round": N, "digest": D (train, evaluate: the global received)}
    answer   {"ok": {...}}  or  {"error": "one line"}

Needs neither torch nor flwr.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Any, BinaryIO

from fedlora_cli.errors import FedloraError

SOCKET_NAME = "worker.sock"
PROTOCOL = 2  # 2: train and evaluate requests name the federation's folder
# A request is a few kB (a manifest with its recipe); an answer a few metrics. Anything larger is not ours.
MAX_BYTES = 1 << 20
# AF_UNIX paths are at most 108 bytes with the terminating NUL (Linux).
MAX_PATH = 107


class WorkerUnavailable(FedloraError):
    """No site worker answers at the socket (not started, or died before the request)."""


class WorkerStopped(FedloraError):
    """The site worker took the request and closed the connection without an answer (killed, crashed)."""


class WorkerLate(FedloraError):
    """The site worker gave no answer before the message expired (it may still be working)."""


def socket_path(state_dir: Path) -> Path:
    """Where the worker of the site whose client state folder is ``state_dir`` listens."""
    return Path(state_dir).absolute() / SOCKET_NAME


def check_length(path: Path) -> None:
    if len(os.fsencode(path)) > MAX_PATH:
        raise FedloraError(f"the site worker's socket {path} is longer than {MAX_PATH} bytes (the limit of a Unix "
                           "socket path): use a shorter state-dir")


def check_socket(path: Path) -> None:
    """Refuse, in one line, a socket file the relay must not talk to: not a socket, another user's, or open to
    the group or others (the worker makes it 0600)."""
    check_length(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise WorkerUnavailable(f"no site worker at {path} (start it with: fedlora flower worker --node-config "
                                "'...the SuperNode's...')") from None
    if not stat.S_ISSOCK(info.st_mode):
        raise FedloraError(f"{path} is not a socket; refusing to use it as the site worker's")
    if info.st_uid != os.getuid():
        raise FedloraError(f"the site worker's socket {path} is owned by uid {info.st_uid}, not by this user "
                           f"(uid {os.getuid()}); refused")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise FedloraError(f"the site worker's socket {path} has permissions {mode:04o}, open to other users "
                           "(it must be 0600); refused")


def peer_uid(sock: socket.socket) -> int | None:
    """The user id of the process at the other end of a connected Unix socket (None where the OS cannot say)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i")))
    return uid


def write_frame(stream: BinaryIO, value: dict[str, Any]) -> None:
    data = json.dumps(value, separators=(",", ":")).encode() + b"\n"
    if len(data) > MAX_BYTES:
        raise FedloraError(f"a message to or from the site worker would take {len(data)} bytes (at most {MAX_BYTES})")
    stream.write(data)
    stream.flush()


def read_frame(stream: BinaryIO, closed: type[FedloraError] = WorkerStopped) -> dict[str, Any]:
    """One JSON object from ``stream``; ``closed`` is raised when the other end hung up before a whole line."""
    data = stream.readline(MAX_BYTES + 1)
    if not data.endswith(b"\n"):
        if len(data) > MAX_BYTES:
            raise FedloraError(f"a message on the site worker's socket is longer than {MAX_BYTES} bytes; refused")
        raise closed("the other end closed the connection")
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, an integer of thousands of digits, deep nesting
        raise FedloraError("a message on the site worker's socket is not JSON; refused") from None
    if not isinstance(value, dict):
        raise FedloraError("a message on the site worker's socket is not a JSON object; refused")
    return value


def ask(path: Path, request: dict[str, Any], doing: str, timeout: float | None = None) -> dict[str, Any]:
    """Send ``request`` to the worker at ``path`` and return its answer's ``ok`` object; the worker's error, a
    broken connection (":class:`WorkerStopped`: the site worker at PATH stopped while ``doing``"), no answer within
    ``timeout`` seconds (:class:`WorkerLate`; None: wait as long as it takes) or a worker that is not there
    (:class:`WorkerUnavailable`) is raised as one line."""
    check_socket(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            raise WorkerUnavailable(f"no site worker answers at {path} (it stopped; restart it with: fedlora "
                                    "flower worker --node-config '...the SuperNode's...')") from None
        uid = peer_uid(sock)
        if uid is not None and uid != os.getuid():
            raise FedloraError(f"the process behind {path} runs as uid {uid}, not as this user; refused")
        sock.settimeout(timeout)
        stream = sock.makefile("rwb")
        try:
            write_frame(stream, {"protocol": PROTOCOL, **request})
            answer = read_frame(stream)
        except (WorkerStopped, ConnectionError, BrokenPipeError):
            raise WorkerStopped(f"the site worker at {path} stopped while {doing}") from None
        except TimeoutError:
            raise WorkerLate(f"the site worker at {path} gave no answer within {timeout:.1f} s while {doing} (the "
                             "message expires; a round asked again is sent the update it makes)") from None
        finally:
            stream.close()
    if "error" in answer:
        raise FedloraError(str(answer["error"]))
    ok = answer.get("ok")
    if not isinstance(ok, dict):
        raise FedloraError(f"the site worker at {path} answered without 'ok' or 'error'; refused")
    return ok
