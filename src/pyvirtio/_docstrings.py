"""Docstrings for the mypyc-compiled modules, copied from their source when they are imported.

mypyc compiles functions and classes without their docstrings: on the
compiled build a method's ``__doc__`` is None and ``help()`` shows only the
signature.  The source is the reference, so :func:`attach` reads the
docstrings from the byte code of the ``.py`` beside the extension (its
``.pyc`` when one is cached, as ``pip install`` writes them) and puts them on
the compiled objects:

* the ``__doc__`` of a module and of a class is a plain attribute;
* functions, methods, classmethods and properties of a compiled module are C
  objects whose ``__doc__`` CPython reads from the ``ml_doc`` field of their
  ``PyMethodDef`` (``doc`` of a ``PyGetSetDef`` for properties), static data
  of the extension.  The field is pointed at mypyc's signature line (so
  ``inspect.signature`` keeps working) followed by the docstring.  Each
  write first checks that the definition carries the expected name, so a
  layout this code does not know is left alone rather than corrupted.

Nothing here runs for the interpreted build (``PYVIRTIO_PURE_PYTHON=1``),
where the source's own docstrings are in place.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
import sys
import types
from collections.abc import Iterable
from types import CodeType, ModuleType

_PTR = ctypes.sizeof(ctypes.c_void_p)
# PyObject_HEAD, then PyDescr_COMMON's d_type, d_name, d_qualname: where a
# method or getset descriptor keeps its PyMethodDef / PyGetSetDef pointer.
_DESCR_DEF = object.__basicsize__ + 3 * _PTR
# PyCFunctionObject: PyObject_HEAD, then m_ml.
_CFUNC_DEF = object.__basicsize__
# PyMethodDef {ml_name, ml_meth, ml_flags, ml_doc} and
# PyGetSetDef {name, get, set, doc, closure}: the name first, the doc fourth.
_DEF_NAME = 0
_DEF_DOC = 3 * _PTR
_CO_OPTIMIZED = 0x1  # a function body (a class or module body is not optimized)
_CO_HAS_DOCSTRING = 0x4000000  # Python 3.14+

# The new doc strings must outlive the definitions that point at them.
_KEEP: list[ctypes.Array[ctypes.c_char]] = []


def source_docstrings(module_name: str, source: str) -> dict[str, str]:
    """Docstrings of ``source`` by qualified name ("" for the module itself)."""
    loader = importlib.machinery.SourceFileLoader(module_name, source)
    code = loader.get_code(module_name)
    docs: dict[str, str] = {}
    if code is not None:
        _collect(code, docs, is_function=False)
    return docs


def _collect(code: CodeType, docs: dict[str, str], *, is_function: bool) -> None:
    name = "" if code.co_name == "<module>" else code.co_qualname
    doc = _function_doc(code) if is_function else _body_doc(code)
    if doc is not None and "<" not in name:
        docs.setdefault(name, doc)  # a property's getter comes before its setter
    for const in code.co_consts:
        if isinstance(const, CodeType):
            _collect(const, docs, is_function=bool(const.co_flags & _CO_OPTIMIZED))


def _function_doc(code: CodeType) -> str | None:
    if sys.version_info >= (3, 14) and not code.co_flags & _CO_HAS_DOCSTRING:
        return None
    # Up to 3.13 the first constant of a function is its docstring or None.
    first = code.co_consts[0] if code.co_consts else None
    return first if isinstance(first, str) else None


def _body_doc(code: CodeType) -> str | None:
    """A module's or class body's docstring: the constant stored into ``__doc__``."""
    import dis

    previous = None
    for ins in dis.get_instructions(code):
        if ins.opname == "STORE_NAME" and ins.argval == "__doc__":
            if previous is not None and previous.opname == "LOAD_CONST" \
                    and isinstance(previous.argval, str):
                return previous.argval
            return None
        previous = ins
    return None


_attached: set[str] = set()


def attach_loaded(names: Iterable[str]) -> None:
    """:func:`attach` every module of ``names`` already imported, each once."""
    for name in names:
        module = sys.modules.get(name)
        if module is not None and name not in _attached:
            _attached.add(name)
            attach(module)


def attach(module: ModuleType) -> int:
    """Give the compiled objects of ``module`` their source docstrings; how many got one."""
    path = getattr(module, "__file__", None) or ""
    source = os.path.join(os.path.dirname(path), module.__name__.rpartition(".")[2] + ".py")
    if path.endswith(".py") or not os.path.isfile(source):
        return 0
    docs = source_docstrings(module.__name__, source)
    done = 0
    for qualname, doc in docs.items():
        if not qualname:
            if not module.__doc__:
                module.__doc__ = doc
                done += 1
            continue
        owner: object = module
        *outer, leaf = qualname.split(".")
        for part in outer:
            owner = getattr(owner, part, None)
        if owner is None:
            continue
        raw = vars(owner).get(leaf) if isinstance(owner, type | ModuleType) else None
        if raw is not None and _document(raw, leaf, doc):
            done += 1
    return done


def _document(obj: object, name: str, doc: str) -> bool:
    if isinstance(obj, staticmethod | classmethod):
        obj = obj.__func__
    if isinstance(obj, type):
        if obj.__doc__:
            return False
        try:
            obj.__doc__ = doc
        except (AttributeError, TypeError):
            return False
        return True
    if isinstance(obj, types.MethodDescriptorType | types.ClassMethodDescriptorType
                  | types.GetSetDescriptorType):
        return _set_def_doc(obj, _DESCR_DEF, name, doc)
    if isinstance(obj, types.BuiltinFunctionType):
        return _set_def_doc(obj, _CFUNC_DEF, name, doc)
    if getattr(obj, "__doc__", None) is None:  # Python-level objects mypyc left as they were
        try:
            obj.__doc__ = doc
        except (AttributeError, TypeError):
            return False
        return True
    return False


def _set_def_doc(obj: object, def_offset: int, name: str, doc: str) -> bool:
    if obj.__doc__:  # already documented (a later mypyc may keep docstrings)
        return False
    base = id(obj)  # CPython: the address of the object
    definition = ctypes.c_void_p.from_address(base + def_offset).value
    if not definition:
        return False
    name_ptr = ctypes.c_void_p.from_address(definition + _DEF_NAME).value
    if not name_ptr or ctypes.string_at(name_ptr) != name.encode():
        return False  # not the layout this code knows: leave it alone
    doc_field = ctypes.c_void_p.from_address(definition + _DEF_DOC)
    old = ctypes.string_at(doc_field.value) if doc_field.value else b""
    if old and not old.endswith(b"\n--\n\n"):
        return False  # a docstring of its own, not only mypyc's signature line
    text = ctypes.create_string_buffer(old + doc.encode())
    _KEEP.append(text)
    doc_field.value = ctypes.addressof(text)
    return True
