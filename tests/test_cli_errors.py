"""Every console command answers a user's mistake with one line, never a traceback.

Each case runs an installed console script (``pyvirtio ...``, ``pyvirtio-blk``)
with a bad value and checks: exit status 2 (usage error: the value can never
work) or 1 (runtime failure: no back end there, a busy one), exactly one line
on stderr that names what is wrong, and no Python traceback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@dataclass
class Paths:
    """Things on disk the bad command lines point at."""

    tmp: Path
    image: Path           # a 1 MiB disk image
    empty_image: Path     # a 0-byte one
    read_only_image: Path
    regular_file: Path
    missing_socket: Path
    busy_socket: Path     # a back end that closes every connection at once


def _make_read_only(path: Path) -> Callable[[], None]:
    """Make ``path`` unwritable even for root; returns the undo."""
    path.chmod(0o444)
    if os.geteuid() != 0:
        return lambda: path.chmod(0o644)
    # Root ignores file modes; the immutable attribute holds for root too.
    subprocess.run(["chattr", "+i", str(path)], check=True)

    def undo() -> None:
        subprocess.run(["chattr", "-i", str(path)], check=True)

    return undo


def _busy_backend(path: Path) -> Callable[[], None]:
    """Accept and close at once, as a back end serving another front end does."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()

    def undo() -> None:
        stop.set()
        t.join(10)
        listener.close()

    return undo


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Paths]:
    tmp = tmp_path_factory.mktemp("cli-errors")
    p = Paths(tmp, tmp / "disk.img", tmp / "empty.img", tmp / "ro.img", tmp / "notes.txt",
              tmp / "nobody-listens.sock", tmp / "busy.sock")
    p.image.write_bytes(bytes(1 << 20))
    p.empty_image.touch()
    p.read_only_image.write_bytes(bytes(1 << 20))
    p.regular_file.write_text("not a socket, not a directory\n")
    undo_ro = _make_read_only(p.read_only_image)
    undo_busy = _busy_backend(p.busy_socket)
    try:
        yield p
    finally:
        undo_busy()
        undo_ro()


Case = tuple[str, Callable[[Paths], list[str]], set[int], Callable[[Paths], str]]


def _lit(text: str) -> Callable[[Paths], str]:
    return lambda _p: text


CASES: list[Case] = [
    # pyvirtio demo
    ("demo-queue-size-3", lambda p: ["pyvirtio", "demo", "--queue-size", "3"], {2},
     _lit("power of two")),
    ("demo-queue-size-not-pow2", lambda p: ["pyvirtio", "demo", "--queue-size", "100"], {2},
     _lit("power of two")),
    ("demo-seconds-0", lambda p: ["pyvirtio", "demo", "--seconds", "0"], {2},
     _lit("--seconds")),
    ("demo-bad-suppression", lambda p: ["pyvirtio", "demo", "--suppression", "sometimes"], {2},
     _lit("--suppression")),
    # pyvirtio duel: outputs are checked before a sweep far too long to wait for
    ("duel-queue-size-3", lambda p: ["pyvirtio", "duel", "--queue-size", "3"], {2},
     _lit("power of two")),
    ("duel-queue-size-not-pow2", lambda p: ["pyvirtio", "duel", "--queue-size", "96"], {2},
     _lit("power of two")),
    ("duel-out-regular-file",
     lambda p: ["pyvirtio", "duel", "--buffers", "100000000", "--out", str(p.regular_file)],
     {2}, lambda p: str(p.regular_file)),
    ("duel-out-cannot-be-created",
     lambda p: ["pyvirtio", "duel", "--buffers", "100000000",
                "--out", str(p.regular_file / "results")],
     {2}, lambda p: str(p.regular_file / "results")),
    ("duel-buffers-0", lambda p: ["pyvirtio", "duel", "--buffers", "0"], {2},
     _lit("--buffers")),
    # pyvirtio probe
    ("probe-missing-socket",
     lambda p: ["pyvirtio", "probe", "--socket-path", str(p.missing_socket)], {1},
     lambda p: f"no vhost-user socket at {p.missing_socket}: start a back end first"),
    ("probe-socket-is-a-regular-file",
     lambda p: ["pyvirtio", "probe", "--socket-path", str(p.regular_file)], {1},
     lambda p: str(p.regular_file)),
    ("probe-busy-back-end",
     lambda p: ["pyvirtio", "probe", "--socket-path", str(p.busy_socket)], {1},
     _lit("back end busy")),
    # pyvirtio bench blk
    ("bench-missing-socket",
     lambda p: ["pyvirtio", "bench", "blk", "--socket-path", str(p.missing_socket)], {1},
     lambda p: f"no vhost-user socket at {p.missing_socket}: start a back end first"),
    ("bench-socket-is-a-regular-file",
     lambda p: ["pyvirtio", "bench", "blk", "--socket-path", str(p.regular_file)], {1},
     lambda p: str(p.regular_file)),
    ("bench-busy-back-end",
     lambda p: ["pyvirtio", "bench", "blk", "--socket-path", str(p.busy_socket)], {1},
     _lit("back end busy")),
    ("bench-write-without-allow-writes",
     lambda p: ["pyvirtio", "bench", "blk", "--socket-path", str(p.busy_socket), "--rw", "write"],
     {2}, _lit("--allow-writes")),
    ("bench-randwrite-without-allow-writes",
     lambda p: ["pyvirtio", "bench", "blk", "--socket-path", str(p.busy_socket),
                "--rw", "randwrite"],
     {2}, _lit("--allow-writes")),
    ("bench-iodepth-beyond-the-queue",
     lambda p: ["pyvirtio", "bench", "blk", "--socket-path", str(p.busy_socket),
                "--queue-size", "64", "--iodepth", "33"],
     {2}, _lit("--iodepth 33")),
    ("bench-seconds-0",
     lambda p: ["pyvirtio", "bench", "blk", "--socket-path", str(p.busy_socket),
                "--seconds", "0"],
     {2}, _lit("--seconds")),
    ("bench-queue-size-3",
     lambda p: ["pyvirtio", "bench", "blk", "--socket-path", str(p.busy_socket),
                "--queue-size", "3"],
     {2}, _lit("power of two")),
    ("bench-bs-not-whole-sectors",
     lambda p: ["pyvirtio", "bench", "blk", "--socket-path", str(p.busy_socket), "--bs", "1000"],
     {2}, _lit("512")),
    # pyvirtio-blk
    ("blk-queue-size-3",
     lambda p: ["pyvirtio-blk", "--socket-path", str(p.tmp / "q3.sock"),
                "--blk-file", str(p.image), "--queue-size", "3"],
     {2}, _lit("--queue-size")),
    ("blk-serial-longer-than-20-bytes",
     lambda p: ["pyvirtio-blk", "--socket-path", str(p.tmp / "serial.sock"),
                "--blk-file", str(p.image), "--serial", "s" * 21],
     {2}, _lit("--serial")),
    ("blk-negative-batch",
     lambda p: ["pyvirtio-blk", "--socket-path", str(p.tmp / "batch.sock"),
                "--blk-file", str(p.image), "--batch", "-1"],
     {2}, _lit("--batch")),
    ("blk-empty-image",
     lambda p: ["pyvirtio-blk", "--socket-path", str(p.tmp / "empty.sock"),
                "--blk-file", str(p.empty_image)],
     {1, 2}, lambda p: str(p.empty_image)),
    ("blk-read-only-image-without-read-only",
     lambda p: ["pyvirtio-blk", "--socket-path", str(p.tmp / "ro.sock"),
                "--blk-file", str(p.read_only_image)],
     {1, 2}, _lit("--read-only")),
    ("blk-socket-in-missing-directory",
     lambda p: ["pyvirtio-blk", "--socket-path", str(p.tmp / "no" / "such" / "dir" / "b.sock"),
                "--blk-file", str(p.image)],
     {1, 2}, lambda p: str(p.tmp / "no" / "such" / "dir")),
    ("blk-socket-path-is-a-regular-file",
     lambda p: ["pyvirtio-blk", "--socket-path", str(p.regular_file),
                "--blk-file", str(p.image)],
     {1, 2}, lambda p: str(p.regular_file)),
]


@pytest.mark.parametrize(("argv", "statuses", "says"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_a_mistake_gets_one_line_and_no_traceback(
        paths: Paths, argv: Callable[[Paths], list[str]], statuses: set[int],
        says: Callable[[Paths], str]) -> None:
    cmd = argv(paths)
    before = paths.regular_file.read_bytes()
    res = subprocess.run([str(BIN / cmd[0]), *cmd[1:]], capture_output=True, text=True,
                         timeout=60, stdin=subprocess.DEVNULL)
    lines = res.stderr.splitlines()
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode in statuses, res.stderr
    assert len(lines) == 1, res.stderr
    assert says(paths) in lines[0]
    # The command's own name, not just "pyvirtio": ("pyvirtio bench blk: ...").
    program = " ".join(cmd[:3] if cmd[1:2] == ["bench"] else cmd[:2] if cmd[0] == "pyvirtio"
                       else cmd[:1])
    assert lines[0].startswith(f"{program}: "), lines[0]
    # A refused command leaves what it was pointed at alone.
    assert paths.regular_file.read_bytes() == before
