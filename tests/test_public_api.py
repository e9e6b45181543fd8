"""The public names: ``pyvirtio`` (lazily) and ``pyvirtio.vhost_user`` export what users need."""

from __future__ import annotations

import subprocess
import sys

import pyvirtio
import pyvirtio.vhost_user as vu


def test_every_exported_name_resolves() -> None:
    for module in (pyvirtio, vu):
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{module.__name__}.{name}"


def test_both_roles_and_the_kit_from_the_top_package() -> None:
    assert pyvirtio.Device is vu.Device and pyvirtio.serve is vu.serve
    assert pyvirtio.VhostUserFrontend is vu.VhostUserFrontend  # front end
    assert pyvirtio.VhostUserServer is vu.VhostUserServer      # back end
    assert {"SplitDeviceQueue", "SplitDriverQueue", "GuestMemory"} <= set(pyvirtio.__all__)


def test_importing_the_core_stays_free_of_sockets() -> None:
    code = ("import sys, pyvirtio.core\n"
            "print(sorted(m for m in ('socket', 'selectors') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_unknown_names_raise_attribute_error() -> None:
    try:
        pyvirtio.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("no AttributeError")
