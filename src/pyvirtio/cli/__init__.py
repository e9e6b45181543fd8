"""pyvirtio.cli: argument parsing and wiring only; the logic lives in the layers below."""
