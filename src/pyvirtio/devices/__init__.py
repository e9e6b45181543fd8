"""pyvirtio.devices: device models (back ends) and drivers (front ends) for blk and net."""
