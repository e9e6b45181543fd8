"""pyvirtio.transports: how a driver and a device find each other's queues and notify."""
