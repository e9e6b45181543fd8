"""``pyvirtio torture``: a malicious front end against any vhost-user back end.

:mod:`~pyvirtio.torture.cases` holds the hostile cases (the ring, VIRTIO 1.2
§2.7, §5.1, §5.2; the socket, QEMU docs/interop/vhost-user.rst),
:mod:`~pyvirtio.torture.harness` the front end that places them on
canary-filled guest memory, :mod:`~pyvirtio.torture.judge` the verdicts
(REJECTED, WEDGED, CRASHED, CORRUPTED, LEAKED) and
:mod:`~pyvirtio.torture.runner` the loop over the cases.
"""
