"""Package data: the vhost-user.json back-end descriptor (QEMU docs/interop/vhost-user.json)."""
