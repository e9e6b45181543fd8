"""Serving a device as a vhost-user back-end program, for any device of the kit.

QEMU docs/interop/vhost-user.rst "Backend program conventions": the program
takes ``--socket-path PATH`` (listen there) or ``--fd FDNUM`` (an inherited,
already listening socket, as libvirt passes it), answers
``--print-capabilities`` with a ``VHostUserBackendCapabilities`` JSON object
(docs/interop/vhost-user.json: ``type`` plus its ``features``) and exits,
fails with a non-zero status when it cannot start, and ends cleanly on
SIGTERM.  :class:`BackendProgram` adds those options to an argparse parser
(the device adds its own), plus ``--print-descriptor`` (the
``VhostUserBackend`` descriptor libvirt looks for in
/usr/share/qemu/vhost-user/), ``--socket-mode``, ``--allow-uid``, ``--poll`` and
``--verbose``, and the statistics every back end offers (docs/stats.md):
``--stats-socket PATH`` (one JSON document per connection) and
``--metrics-address HOST:PORT`` (a Prometheus endpoint).  Errors are one
line on stderr naming what is wrong and what to do; usage errors exit with
status 2, start-up failures with 1.

:func:`serve` is the library entry point the program uses: one loop, one
server, signal handling, one log line when serving starts and stops.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pwd
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from importlib import resources
from types import FrameType
from typing import NoReturn

from pyvirtio.core.errors import CallerError
from pyvirtio.io.loop import EventLoop
from pyvirtio.transports.commandline import ExamplesHelpFormatter, Parser, failure, usage_error
from pyvirtio.transports.device import DeviceProtocol
from pyvirtio.transports.vhost_user.server import VhostUserServer

__all__ = ["BackendProgram", "Endpoint", "serve", "serve_all"]

log = logging.getLogger("pyvirtio.vhost_user")


def _mode(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode like 0600") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is not a permission mode (0..0777)")
    return value


def _uid(text: str) -> int:
    """A uid for --allow-uid: a number or a user name."""
    if text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a uid nor a user name") from None


#: What one listening socket serves: (device, socket path, inherited fd) — one of the two.
Endpoint = tuple[DeviceProtocol, str | None, int | None]


def serve(device: DeviceProtocol, socket_path: str | None = None, fd: int | None = None, *,
          poll: bool = False, socket_mode: int = 0o600,
          stop_event: threading.Event | None = None, allow_uids: Sequence[int] = ()) -> int:
    """Serve ``device`` until SIGTERM/SIGINT (main thread) or ``stop_event``; returns 0.

    Raises :class:`~pyvirtio.core.errors.CallerError` when it cannot listen.
    """
    return serve_all([(device, socket_path, fd)], poll=poll, socket_mode=socket_mode,
                     stop_event=stop_event, allow_uids=allow_uids)


def serve_all(endpoints: Sequence[Endpoint], *, poll: bool = False, socket_mode: int = 0o600,
              stop_event: threading.Event | None = None,
              on_signal: dict[signal.Signals, Callable[[], None]] | None = None,
              loop: EventLoop | None = None, stats_socket: str | None = None,
              metrics_address: str | None = None, allow_uids: Sequence[int] = ()) -> int:
    """Serve every endpoint from one event loop until SIGTERM/SIGINT or ``stop_event``.

    ``on_signal`` adds handlers run on the loop (SIGUSR1: print statistics,
    say).  ``allow_uids``: front ends of these uids are served too (besides
    our own and root's, see :class:`VhostUserServer`).  ``stats_socket``:
    answer statistics there (mode ``socket_mode``);
    ``metrics_address``: serve them to Prometheus (docs/stats.md).  Raises
    :class:`~pyvirtio.core.errors.CallerError` when a socket cannot be created
    (the ones already made are closed again).
    """
    own_loop = loop is None
    loop = loop if loop is not None else EventLoop()
    servers: list[VhostUserServer] = []
    closers: list[Callable[[], None]] = []
    try:
        for device, path, fd in endpoints:
            servers.append(VhostUserServer(device, socket_path=path, listen_fd=fd, poll=poll,
                                           socket_mode=socket_mode, loop=loop,
                                           allow_uids=allow_uids))
            where = path if path is not None else f"inherited fd {fd}"
            log.info("serving %s on %s%s", device, where, " (polling)" if poll else "")
        stats = [server.stats for server in servers]
        if stats_socket is not None:
            from pyvirtio.transports.stats_socket import StatsSocket
            closers.append(StatsSocket(stats_socket, stats, loop, mode=socket_mode).close)
            log.info("statistics on %s", stats_socket)
        if metrics_address is not None:
            from pyvirtio.transports.metrics import MetricsServer
            metrics = MetricsServer(metrics_address, stats, loop)
            closers.append(metrics.close)
            log.info("Prometheus metrics on http://%s/metrics", metrics.url_host)
    except BaseException:
        for close in closers:
            close()
        for server in servers:
            server.close()
        if own_loop:
            loop.close()
        raise
    restore: list[tuple[signal.Signals, object]] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        loop.stop()

    def forward(signum: int, frame: FrameType | None) -> None:
        assert on_signal is not None
        loop.call_soon_threadsafe(on_signal[signal.Signals(signum)])

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            restore.append((signum, signal.signal(signum, stop)))
        for signum in on_signal or {}:
            restore.append((signum, signal.signal(signum, forward)))
    if stop_event is not None:
        def _watch() -> None:
            stop_event.wait()
            loop.stop()
        threading.Thread(target=_watch, name="vhost-user-stop", daemon=True).start()
    try:
        loop.run()
    finally:
        for signum, handler in restore:
            signal.signal(signum, handler)  # type: ignore[arg-type]
        for close in closers:
            close()
        for server in servers:
            server.close()
        if own_loop:
            loop.close()
    log.info("stopped after %d connection(s)", sum(s.connections for s in servers))
    return 0


class BackendProgram:
    """The command line of a vhost-user back-end program (the conventions, for any device).

    ``device_type`` and ``capabilities`` are what ``--print-capabilities``
    prints (``"block"``, ``"rng"``, ``"input"``, ``"net"``…).  Add the
    device's own options to :attr:`parser`, then :meth:`parse_args`, build the
    device, and :meth:`serve` it.
    """

    def __init__(self, prog: str, description: str, device_type: str,
                 capabilities: Sequence[str] = (), *, epilog: str | None = None,
                 binary: str | None = None,
                 parser: argparse.ArgumentParser | None = None,
                 several_sockets: bool = False) -> None:
        self.prog = prog
        #: The console script: the descriptor's ``binary`` and ``data/50-<binary>.json``.
        self.binary = binary or prog
        self.description = description
        self.device_type = device_type
        self.capabilities = list(capabilities)
        if parser is None:
            parser = Parser(prog=prog, description=description, epilog=epilog,
                            formatter_class=ExamplesHelpFormatter)
        self.parser = parser
        self.several_sockets = several_sockets
        self.add_arguments(parser, several_sockets)

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser, several_sockets: bool = False) -> None:
        """Add the conventions' options to ``p`` (``several_sockets``: they may repeat)."""
        conv = p.add_argument_group("vhost-user back-end program conventions")
        where = conv if several_sockets else conv.add_mutually_exclusive_group()
        more = "; may repeat: one device per socket" if several_sockets else ""
        action = "append" if several_sockets else "store"
        where.add_argument("--socket-path", metavar="PATH", action=action,
                           help="listen for the front end (QEMU, DPDK, pyvirtio) on this Unix "
                                "socket; a stale socket left by a killed back end is replaced"
                                + more)
        where.add_argument("--fd", type=int, metavar="FDNUM", action=action,
                           help="serve on this inherited, already listening Unix socket" + more)
        conv.add_argument("--print-capabilities", action="store_true",
                          help="print the back-end capabilities as JSON and exit")
        conv.add_argument("--print-descriptor", action="store_true",
                          help="print the vhost-user.json descriptor of this installation "
                               "(for /etc/qemu/vhost-user/) and exit")
        conv.add_argument("--socket-mode", type=_mode, default="0600", metavar="MODE",
                          help="permissions of the socket file, octal; 0600 lets only this "
                               "user connect")
        conv.add_argument("--allow-uid", type=_uid, action="append", default=[], metavar="UID",
                          help="also serve front ends running as this uid or user name (checked "
                               "with SO_PEERCRED; default: only this back end's own user and "
                               "root); may repeat")
        conv.add_argument("--poll", action="store_true",
                          help="busy-poll the rings (spin, then sleep) instead of waiting for "
                               "kicks")
        stats = p.add_argument_group("statistics (docs/stats.md)")
        stats.add_argument("--stats-socket", metavar="PATH",
                           help="answer per-queue statistics as JSON on this Unix socket "
                                "(created like the vhost-user socket, --socket-mode); read it "
                                "with pyvirtio top / pyvirtio trace")
        stats.add_argument("--metrics-address", metavar="HOST:PORT",
                           help="serve the statistics to Prometheus at http://HOST:PORT/metrics "
                                "(PORT alone: localhost; needs pip install 'pyvirtio[metrics]')")
        conv.add_argument("-v", "--verbose", action="store_true",
                          help="log every vhost-user message (debug level)")

    # ------------------------------------------------------------ arguments
    def error(self, message: str) -> NoReturn:
        """A usage error: one line on stderr, exit status 2."""
        raise SystemExit(usage_error(self.prog, message))

    def fail(self, message: str) -> int:
        """A start-up failure: one line on stderr; returns exit status 1."""
        return failure(self.prog, message)

    def capabilities_json(self) -> dict[str, object]:
        return {"type": self.device_type, "features": list(self.capabilities)}

    def descriptor(self) -> dict[str, object]:
        """The shipped ``50-<prog>.json`` descriptor with this installation's binary path."""
        desc: dict[str, object] = {"description": self.description, "type": self.device_type,
                                   "tags": ["pyvirtio"]}
        with contextlib.suppress(FileNotFoundError, ModuleNotFoundError):
            raw = resources.files("pyvirtio.data").joinpath(f"50-{self.binary}.json").read_text()
            desc = json.loads(raw)
        binary = shutil.which(self.binary) or os.path.join(os.path.dirname(sys.executable),
                                                           self.binary)
        desc["binary"] = os.path.abspath(binary)
        return desc

    def parse_args(self, argv: Sequence[str] | None = None) -> argparse.Namespace:
        """Parse; answers ``--print-capabilities``/``--print-descriptor`` and exits."""
        args = self.parser.parse_args(argv)
        self.check_args(args)
        return args

    def check_args(self, args: argparse.Namespace) -> None:
        """Answer the print options (exit 0), insist on a socket (exit 2), set up logging."""
        if args.print_capabilities:
            print(json.dumps(self.capabilities_json(), indent=2))
            raise SystemExit(0)
        if args.print_descriptor:
            print(json.dumps(self.descriptor(), indent=2))
            raise SystemExit(0)
        if not args.socket_path and args.fd is None:
            self.error("one of --socket-path or --fd is required (see --help)")
        if getattr(args, "metrics_address", None) is not None:
            from pyvirtio.transports.metrics import metrics_available, parse_address
            try:
                parse_address(args.metrics_address)
            except CallerError as exc:
                self.error(f"--metrics-address: {exc}")
            if not metrics_available():
                raise SystemExit(self.fail("--metrics-address needs prometheus_client: "
                                           "pip install 'pyvirtio[metrics]'"))
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    # ---------------------------------------------------------------- serve
    def serve(self, device: DeviceProtocol, args: argparse.Namespace) -> int:
        """Serve ``device`` as the arguments say; returns the exit status."""
        return self.serve_all([(device, args.socket_path, args.fd)], args)

    def endpoints_of(self, args: argparse.Namespace) -> list[tuple[str | None, int | None]]:
        """The sockets to serve, in order (with ``several_sockets``: every one given)."""
        if not self.several_sockets:
            return [(args.socket_path, args.fd)]
        return ([(path, None) for path in args.socket_path or []]
                + [(None, fd) for fd in args.fd or []])

    def serve_all(self, endpoints: Sequence[Endpoint], args: argparse.Namespace,
                  on_signal: dict[signal.Signals, Callable[[], None]] | None = None) -> int:
        """Serve every endpoint from one loop as the arguments say; returns the exit status."""
        try:
            return serve_all(endpoints, poll=args.poll, socket_mode=args.socket_mode,
                             on_signal=on_signal, allow_uids=getattr(args, "allow_uid", ()),
                             stats_socket=getattr(args, "stats_socket", None),
                             metrics_address=getattr(args, "metrics_address", None))
        except CallerError as exc:
            return self.fail(str(exc))
        except KeyboardInterrupt:
            return 0
