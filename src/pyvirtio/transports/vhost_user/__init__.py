"""vhost-user (QEMU docs/interop/vhost-user.rst) in both roles: back end and front end."""
