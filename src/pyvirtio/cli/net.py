"""``pyvirtio net`` and ``pyvirtio-net``: a vhost-user-net back end (VIRTIO 1.2 §5.1).

Every ``--socket-path`` (the option repeats) is one virtio-net device, a
port of the chosen packet back end: ``--loopback`` (each port's transmitted
frames come back on its receive queue), ``--switch NAME`` (a learning switch
joining all ports of this process), or ``--tap IFNAME`` (one port bridged to
a Linux TAP interface).  One event loop serves every port.  The back-end
program conventions (``--fd``, ``--print-capabilities`` with type "net",
SIGTERM) come from :class:`~pyvirtio.transports.vhost_user.program.BackendProgram`.
Per-port counters are logged on SIGUSR1 and at exit.  Wiring only: the device
is :class:`pyvirtio.devices.net.device.NetDevice`, the ports are in
:mod:`pyvirtio.devices.net.ports`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from pyvirtio.cli.common import backend_main, register_backend
from pyvirtio.core.errors import CallerError
from pyvirtio.transports.vhost_user.program import BackendProgram, Endpoint

log = logging.getLogger("pyvirtio.net")

DESCRIPTION = "vhost-user-net back end in Python (pyvirtio): loopback, a switch, or a TAP"
EPILOG = """examples:
  pyvirtio-net --socket-path /tmp/net.sock --loopback
  pyvirtio-net --switch sw0 --socket-path /tmp/a.sock --socket-path /tmp/b.sock
  pyvirtio-net --tap tap0 --socket-path /tmp/net.sock
  qemu-system-x86_64 -m 512 -object memory-backend-memfd,id=mem,size=512M,share=on \\
      -numa node,memdev=mem -chardev socket,id=c1,path=/tmp/a.sock \\
      -netdev vhost-user,id=n0,chardev=c1 -device virtio-net-pci,netdev=n0,vectors=0 ...
"""


def _program(prog: str, parser: argparse.ArgumentParser | None = None) -> BackendProgram:
    program = BackendProgram(prog, DESCRIPTION, "net", epilog=EPILOG, binary="pyvirtio-net",
                             parser=parser, several_sockets=True)
    p = program.parser
    net = p.add_argument_group("vhost-user-net")
    kind = net.add_mutually_exclusive_group()
    kind.add_argument("--loopback", action="store_true",
                      help="transmitted frames come back on receive (the default)")
    kind.add_argument("--switch", metavar="NAME",
                      help="join every port of this process with a learning switch")
    kind.add_argument("--tap", metavar="IFNAME",
                      help="bridge the (one) port to this TAP interface; created if missing "
                           "and then gone at exit, an existing one is left as it was; "
                           "checksum and TSO offloads are offered and passed through the "
                           "TAP's virtio_net_hdr (IFF_VNET_HDR)")
    net.add_argument("--no-offloads", action="store_true",
                     help="with --tap: no virtio_net_hdr on the TAP and no offloads offered "
                          "(the switch and loopback never offer them)")
    net.add_argument("--mac", default="52:54:00:12:34:56",
                     help="MAC address of the first port; port N adds N to the last byte")
    net.add_argument("--num-queues", type=int, default=1, metavar="N",
                     help="queue pairs per port, 1..128 (VIRTIO_NET_F_MQ when > 1)")
    net.add_argument("--queue-size", type=int, default=1024, metavar="N",
                     help="largest ring size accepted, a power of two up to 32768")
    net.add_argument("--backlog", type=int, default=256, metavar="N",
                     help="frames a port keeps while its guest has no receive buffer; more "
                          "are dropped and counted")
    return program


def run(args: argparse.Namespace, program: BackendProgram) -> int:
    program.check_args(args)
    if not 1 <= args.num_queues <= 128:
        program.error(f"--num-queues {args.num_queues}: use 1..128 queue pairs")
    if args.queue_size < 1 or args.queue_size > 32768 or args.queue_size & (args.queue_size - 1):
        program.error(f"--queue-size {args.queue_size}: use a power of two from 1 to 32768")
    if args.backlog < 0:
        program.error(f"--backlog {args.backlog}: use 0 or more")
    places = program.endpoints_of(args)
    if args.no_offloads and not args.tap:
        program.error("--no-offloads applies to --tap only (switch and loopback offer none)")
    if args.tap and len(places) != 1:
        program.error("--tap serves exactly one port: give one --socket-path or --fd")

    from pyvirtio.devices.net.device import NetDevice
    from pyvirtio.devices.net.ports import Switch, TapPort
    from pyvirtio.devices.net.spec import format_mac, parse_mac

    try:
        base = parse_mac(args.mac)
    except CallerError as exc:
        program.error(f"--mac: {exc}")
    if base[0] & 1:
        program.error(f"--mac {args.mac}: a multicast address; use a unicast one "
                      f"(first byte even, e.g. 52:54:00:...)")
    devices: list[NetDevice] = []
    for i, (path, fd) in enumerate(places):
        mac = base[:5] + bytes([(base[5] + i) & 0xFF])
        devices.append(NetDevice(mac, pairs=args.num_queues, queue_size=args.queue_size,
                                 backlog=args.backlog,
                                 name=path if path is not None else f"fd {fd}"))
    tap: TapPort | None = None
    switch: Switch | None = None
    if args.tap:
        try:
            tap = TapPort(args.tap, devices[0], offloads=not args.no_offloads)
        except CallerError as exc:
            return program.fail(str(exc))
    elif args.switch:
        switch = Switch(args.switch)
        for dev in devices:
            switch.add(dev)
    else:
        for dev in devices:
            dev.uplink = dev.loopback
    kind = (f"TAP {args.tap}" if tap else f"switch {args.switch}" if switch else "loopback")
    for dev in devices:
        log.info("port %s: MAC %s, %d queue pair(s), %s", dev.name, format_mac(dev.mac),
                 dev.pairs, kind)

    def report() -> None:
        for dev in devices:
            st = dev.stats
            log.info("port %s: tx %d frames %d bytes, rx %d frames %d bytes, drops %s",
                     dev.name, st.tx_frames, st.tx_bytes, st.rx_frames, st.rx_bytes,
                     dict(st.drops) or "none")
            if dev.port_headers:
                log.info("port %s: segmentation offload packets: tx %d, rx %d",
                         dev.name, st.tx_gso, st.rx_gso)

    endpoints: list[Endpoint] = [(dev, path, fd) for dev, (path, fd) in zip(devices, places,
                                                                             strict=True)]
    try:
        return program.serve_all(endpoints, args, on_signal={signal.SIGUSR1: report})
    finally:
        report()
        if tap is not None:
            tap.close()


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    register_backend(subparsers, "net", "serve virtio-net ports as a vhost-user-net back end",
                     DESCRIPTION, EPILOG, _program, run)


def main(argv: list[str] | None = None) -> int:
    """The ``pyvirtio-net`` console script."""
    return backend_main("pyvirtio-net", _program, run, argv)


if __name__ == "__main__":
    sys.exit(main())
