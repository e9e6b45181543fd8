"""``pyvirtio probe``: ask a vhost-user-blk back end what it offers.

Connects as a front end (QEMU docs/interop/vhost-user.rst "Front-end
message types": GET_FEATURES, GET_PROTOCOL_FEATURES, GET_CONFIG,
GET_QUEUE_NUM), then prints the virtio feature bits by name (VIRTIO 1.2 §6
reserved bits, §5.2.3 block bits), the protocol features, the decoded
``struct virtio_blk_config`` (§5.2.4) and the queue count — in words or
``--json``.  Nothing is negotiated and no queue is started.
"""

from __future__ import annotations

import argparse
import json

from pyvirtio.cli.common import connect_problem, failure, socket_problem
from pyvirtio.core.spec import (
    F_ACCESS_PLATFORM,
    F_ANY_LAYOUT,
    F_IN_ORDER,
    F_NOTIFICATION_DATA,
    F_NOTIFY_ON_EMPTY,
    F_ORDER_PLATFORM,
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    F_RING_PACKED,
    F_RING_RESET,
    F_SR_IOV,
    F_VERSION_1,
)
from pyvirtio.devices.blk.spec import (
    CONFIG_SIZE_WRITE_ZEROES,
    BlkConfig,
    BlkFeature,
    feature_names,
)

TRANSPORT_BITS = {
    F_NOTIFY_ON_EMPTY: "VIRTIO_F_NOTIFY_ON_EMPTY", F_ANY_LAYOUT: "VIRTIO_F_ANY_LAYOUT",
    F_RING_INDIRECT_DESC: "VIRTIO_RING_F_INDIRECT_DESC",
    F_RING_EVENT_IDX: "VIRTIO_RING_F_EVENT_IDX",
    26: "VHOST_F_LOG_ALL", 30: "VHOST_USER_F_PROTOCOL_FEATURES", F_VERSION_1: "VIRTIO_F_VERSION_1",
    F_ACCESS_PLATFORM: "VIRTIO_F_ACCESS_PLATFORM", F_RING_PACKED: "VIRTIO_F_RING_PACKED",
    F_IN_ORDER: "VIRTIO_F_IN_ORDER", F_ORDER_PLATFORM: "VIRTIO_F_ORDER_PLATFORM",
    F_SR_IOV: "VIRTIO_F_SR_IOV", F_NOTIFICATION_DATA: "VIRTIO_F_NOTIFICATION_DATA",
    F_RING_RESET: "VIRTIO_F_RING_RESET",
}


def feature_list(features: int) -> list[str]:
    names = feature_names(features)
    known = {int(f) for f in BlkFeature}
    for bit in range(64):
        if features >> bit & 1 and bit not in known:
            names.append(TRANSPORT_BITS.get(bit, f"bit {bit}"))
    return names


def protocol_list(bits: int) -> list[str]:
    from pyvirtio.transports.vhost_user.messages import ProtocolFeature

    out = []
    for bit in range(64):
        if bits >> bit & 1:
            try:
                out.append(f"VHOST_USER_PROTOCOL_F_{ProtocolFeature(bit).name}")
            except ValueError:
                out.append(f"bit {bit}")
    return out


def probe(path: str) -> dict[str, object]:
    from pyvirtio.transports.vhost_user.frontend import VhostUserFrontend
    from pyvirtio.transports.vhost_user.messages import ProtocolFeature

    fe = VhostUserFrontend.connect(path, memory_size=2 << 20)
    try:
        fe.get_features()
        features = fe.device_features  # with bit 30, VHOST_USER_F_PROTOCOL_FEATURES
        offered = fe.backend_protocol_features
        proto = fe.protocol_features
        info: dict[str, object] = {
            "socket": path,
            "features": features,
            "feature_names": feature_list(features),
            "protocol_features": offered,
            "protocol_feature_names": protocol_list(offered),
        }
        if proto >> ProtocolFeature.MQ & 1:
            info["queue_count"] = fe.get_queue_num()
        else:
            info["queue_count"] = 1
        if proto >> ProtocolFeature.CONFIG & 1:
            cfg = BlkConfig.unpack(fe.get_config(0, CONFIG_SIZE_WRITE_ZEROES))
            info["config"] = cfg.as_dict()
    finally:
        fe.close()
    return info


def render(info: dict[str, object]) -> str:
    lines = [f"vhost-user back end at {info['socket']}",
             f"  features          {int(info['features']):#018x}"]  # type: ignore[call-overload]
    lines += [f"    {n}" for n in info["feature_names"]]  # type: ignore[attr-defined]
    lines.append(f"  protocol features {int(info['protocol_features']):#x}"  # type: ignore[call-overload]
                 " (offered)")
    lines += [f"    {n}" for n in info["protocol_feature_names"]]  # type: ignore[attr-defined]
    lines.append(f"  queues            {info['queue_count']}")
    cfg = info.get("config")
    if isinstance(cfg, dict):
        cap = cfg["capacity"]
        lines.append(f"  capacity          {cap} sectors ({cap * 512 / (1 << 20):.1f} MiB)")
        for key, value in cfg.items():
            if key != "capacity" and value:
                lines.append(f"  {key:<17} {value}")
    else:
        lines.append("  config            (back end does not offer PROTOCOL_F_CONFIG)")
    return "\n".join(lines)


PROG = "pyvirtio probe"


def run(args: argparse.Namespace) -> int:
    problem = socket_problem(args.socket_path)
    if problem is not None:
        return failure(PROG, problem)
    try:
        info = probe(args.socket_path)
    except Exception as exc:  # a CLI reports every failure in one line
        return failure(PROG, connect_problem(args.socket_path, exc))
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "probe", help="show what a vhost-user-blk back end offers",
        description="Connect to a vhost-user-blk back end as a front end and show its feature "
                    "bits by name, its protocol features, its virtio-blk config space and its "
                    "queue count. Nothing is negotiated and no queue is started.")
    p.add_argument("--socket-path", required=True, metavar="PATH",
                   help="the Unix socket the back end listens on")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)
