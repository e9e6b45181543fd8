"""pyvirtio.io: file descriptors and waiting — eventfds, the event loop, polling."""
