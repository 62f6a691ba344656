"""A reader for pickled data that executes nothing: CIFAR-10's python batches, never unpickled.

The python version's batches are pickles written by Python 2 (protocol 2). Nothing here unpickles
them: pickletools.genops (the standard library's disassembler, which only decodes opcodes) walks
the file, and _BatchPickleReader interprets the few opcodes that plain data and numpy arrays need.
The numpy globals a pickle names are never imported or called: they only say how to read the
arguments that follow (shape, dtype string, raw bytes, memory order), and the array is made here
with np.frombuffer. Any other global, any other opcode and any dtype but plain numbers is refused.
"""

from __future__ import annotations

import io
import math
import pickletools
import re
from typing import Any, NamedTuple

import numpy as np

_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): "reconstruct",  # numpy 1.x, and Python 2's cPickle
    ("numpy._core.multiarray", "_reconstruct"): "reconstruct",  # numpy 2.x
    ("numpy.core.numeric", "_frombuffer"): "frombuffer",  # protocol 5, numpy 1.x
    ("numpy._core.numeric", "_frombuffer"): "frombuffer",  # protocol 5, numpy 2.x
    ("numpy.core.multiarray", "scalar"): "scalar",  # a numpy number, such as a label from an array
    ("numpy._core.multiarray", "scalar"): "scalar",
    ("numpy", "ndarray"): "ndarray",
    ("numpy", "dtype"): "dtype",
    ("_codecs", "encode"): "encode",  # Python 3 bytes at protocols 0-2: encode(text, 'latin1')
    ("__builtin__", "bytes"): "bytes",  # ... and empty bytes: bytes()
    ("builtins", "bytes"): "bytes",
}
_NUMERIC_DTYPE = re.compile(r"[biufc][0-9]{1,2}")  # bool, ints, unsigned, floats, complex


class Refused(ValueError):
    """The file asks for something a CIFAR-10 batch never needs (a global, an opcode, a dtype)."""


class _Global(NamedTuple):
    module: str
    name: str
    kind: str  # a value of _PICKLE_GLOBALS


class _DtypeSpec:
    """What REDUCE(numpy.dtype, (typestr, align, copy)) and its BUILD describe; no dtype is built yet."""

    def __init__(self, typestr: str) -> None:
        if not _NUMERIC_DTYPE.fullmatch(typestr):
            raise Refused(f"refusing dtype {typestr!r}: only plain numeric arrays are read")
        self.typestr, self.byteorder = typestr, "|"

    def set_state(self, state: Any) -> None:
        # numpy's dtype state: (version, byteorder, subarray, names, fields, elsize, alignment, flags[, meta])
        if not isinstance(state, tuple) or len(state) < 5:
            raise ValueError(f"dtype state must be a tuple of at least 5 items, got {_describe(state)}")
        byteorder = _text(state[1], "dtype byte order")
        if byteorder not in ("|", "<", ">", "="):
            raise ValueError(f"bad dtype byte order {byteorder!r}")
        if any(part is not None for part in state[2:5]):
            raise Refused("refusing a structured or sub-array dtype: only plain numeric arrays are read")
        self.byteorder = byteorder

    def to_numpy(self) -> np.dtype:
        try:
            dtype = np.dtype(("" if self.byteorder in "|=" else self.byteorder) + self.typestr)
        except TypeError as e:
            raise ValueError(f"bad dtype {self.typestr!r}: {e}") from None
        if dtype.kind not in "biufc":
            raise Refused(f"refusing dtype {dtype}: only plain numeric arrays are read")
        return dtype


class _ArraySpec:
    """REDUCE(_reconstruct, (ndarray, (0,), b'b')) makes this; its BUILD state gives the contents.

    BUILD then puts the array in this placeholder's place on the stack and in the memo.
    """

    def __init__(self) -> None:
        self.memo_keys: list[int] = []

    def to_array(self, state: Any) -> np.ndarray:
        # ndarray state: ([version,] shape, dtype, is_fortran, raw bytes)
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]
        if not isinstance(state, tuple) or len(state) != 4:
            raise ValueError(f"array state must be (version, shape, dtype, fortran, data), got "
                             f"{_describe(state)}")
        shape, dtype, fortran, raw = state
        if not isinstance(fortran, (bool, int)):
            raise ValueError(f"array fortran flag must be a bool, got {_describe(fortran)}")
        return _make_array(raw, dtype, shape, "F" if fortran else "C")


def _describe(value: Any) -> str:
    return f"a {type(value).__name__}" if not isinstance(value, (int, str, bytes)) else repr(value)[:60]


def _text(value: Any, what: str) -> str:
    if isinstance(value, bytes):  # Python 2 str
        return value.decode("latin-1")
    if not isinstance(value, str):
        raise ValueError(f"{what} must be text, got {_describe(value)}")
    return value


def _make_array(raw: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    if not isinstance(raw, (bytes, bytearray)):
        raise Refused(f"refusing array data given as {_describe(raw)}: only raw bytes are read")
    if not isinstance(dtype, _DtypeSpec):
        raise ValueError(f"array dtype must come from numpy.dtype, got {_describe(dtype)}")
    if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"array shape must be a tuple of sizes, got {_describe(shape)}")
    if order not in ("C", "F"):
        raise ValueError(f"array order must be 'C' or 'F', got {order!r}")
    np_dtype = dtype.to_numpy()
    n_bytes = math.prod(shape) * np_dtype.itemsize
    if len(raw) != n_bytes:
        raise ValueError(f"array of shape {shape} and dtype {np_dtype} needs {n_bytes} bytes of data, "
                         f"found {len(raw)}")
    return np.frombuffer(raw, dtype=np_dtype).reshape(shape, order=order)


class _BatchPickleReader:
    """Interprets the opcodes of one pickle of plain data and numpy arrays; executes nothing.

    Values are Python's own: None, bool, int, str, bytes (Python 2 str included, as
    pickle.load(..., encoding='bytes') gives them), tuple, list, dict, and numpy arrays.
    """

    def __init__(self) -> None:
        self.stack: list[Any] = []
        self.marks: list[int] = []  # stack heights at each open MARK
        self.memo: dict[int, Any] = {}

    def read(self, raw: bytes) -> Any:
        for op, arg, pos in pickletools.genops(io.BytesIO(raw)):
            handler = self._HANDLERS.get(op.name)
            if handler is None:
                raise Refused(f"refusing opcode {op.name} at byte {pos}: CIFAR-10 batches never use it")
            try:
                handler(self, arg)
            except Refused as e:  # "refusing X: why" -> "refusing X (OPCODE at byte N): why"
                what, colon, why = str(e).partition(": ")
                raise Refused(f"{what} ({op.name} at byte {pos}){colon}{why}") from None
            except (ValueError, TypeError, KeyError) as e:  # TypeError: an unhashable dict key
                raise ValueError(f"{op.name} at byte {pos}: {e}") from None
        # genops raises for a stream without STOP, so STOP was the last opcode.
        return self.result

    # -- stack ------------------------------------------------------------------------------------
    def _push(self, value: Any) -> None:
        self.stack.append(value)

    def _pop(self) -> Any:
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise ValueError("stack underflow")
        return self.stack.pop()

    def _top(self) -> Any:
        value = self._pop()
        self.stack.append(value)
        return value

    def _pop_mark(self) -> list[Any]:
        if not self.marks:
            raise ValueError("no MARK before it")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def _top_of(self, kind: type) -> Any:
        container = self._top()
        if type(container) is not kind:
            raise ValueError(f"expected a {kind.__name__} on the stack, found {_describe(container)}")
        return container

    # -- opcodes ----------------------------------------------------------------------------------
    def _proto(self, arg: int) -> None:
        if not 0 <= arg <= 5:
            raise ValueError(f"unsupported pickle protocol {arg}")

    def _frame(self, arg: int) -> None:
        pass  # protocol 4+ framing only groups bytes

    def _stop(self, arg: None) -> None:
        if self.marks or len(self.stack) != 1:
            raise ValueError(f"ends with {len(self.stack)} values on the stack and {len(self.marks)} "
                             f"open MARKs, expected one value")
        self.result = self.stack.pop()

    def _mark(self, arg: None) -> None:
        self.marks.append(len(self.stack))

    def _value(self, arg: Any) -> None:  # ints, text, bytes as decoded by genops
        self._push(arg)

    def _latin1_bytes(self, arg: str) -> None:  # Python 2 str: genops decodes it as latin-1 text
        self._push(arg.encode("latin-1"))

    def _bytearray(self, arg: bytearray) -> None:
        self._push(bytearray(arg))

    def _constant(value: Any):  # noqa: N805 - builds a handler
        return lambda self, arg: self._push(value)

    def _empty(kind: type):  # noqa: N805 - builds a handler
        return lambda self, arg: self._push(kind())

    def _tuple_n(n: int):  # noqa: N805 - builds a handler
        def handler(self, arg: None) -> None:
            items = [self._pop() for _ in range(n)][::-1]
            self._push(tuple(items))
        return handler

    def _tuple(self, arg: None) -> None:
        self._push(tuple(self._pop_mark()))

    def _list(self, arg: None) -> None:
        self._push(self._pop_mark())

    def _dict(self, arg: None) -> None:
        self._push(self._pairs({}, self._pop_mark()))

    def _append(self, arg: None) -> None:
        value = self._pop()
        self._top_of(list).append(value)

    def _appends(self, arg: None) -> None:
        items = self._pop_mark()
        self._top_of(list).extend(items)

    def _setitem(self, arg: None) -> None:
        value = self._pop()
        key = self._pop()
        self._pairs(self._top_of(dict), [key, value])

    def _setitems(self, arg: None) -> None:
        items = self._pop_mark()
        self._pairs(self._top_of(dict), items)

    @staticmethod
    def _pairs(target: dict, items: list[Any]) -> dict:
        if len(items) % 2:
            raise ValueError(f"odd number of items ({len(items)}) for a dict")
        for key, value in zip(items[::2], items[1::2]):
            target[key] = value
        return target

    def _put(self, arg: int) -> None:
        self.memo[arg] = value = self._top()
        if isinstance(value, _ArraySpec):
            value.memo_keys.append(arg)

    def _memoize(self, arg: None) -> None:
        self._put(len(self.memo))

    def _get(self, arg: int) -> None:
        if arg not in self.memo:
            raise ValueError(f"memo entry {arg} was never stored")
        self._push(self.memo[arg])

    def _global(self, arg: str) -> None:
        module, _, name = arg.partition(" ")
        self._push(self._lookup(module, name))

    def _stack_global(self, arg: None) -> None:
        name, module = self._pop(), self._pop()
        if not isinstance(module, str) or not isinstance(name, str):
            raise ValueError(f"STACK_GLOBAL needs two strings, got {_describe(module)} and {_describe(name)}")
        self._push(self._lookup(module, name))

    @staticmethod
    def _lookup(module: str, name: str) -> _Global:
        kind = _PICKLE_GLOBALS.get((module, name))
        if kind is None:
            raise Refused(f"refusing to load {module}.{name}: a CIFAR-10 batch holds only numpy arrays "
                           f"and plain data, and nothing it names is ever called")
        return _Global(module, name, kind)

    def _reduce(self, arg: None) -> None:
        args, func = self._pop(), self._pop()
        if not isinstance(func, _Global):
            raise ValueError(f"REDUCE needs a global to apply, got {_describe(func)}")
        if not isinstance(args, tuple):
            raise ValueError(f"arguments must be a tuple, got {_describe(args)}")
        qualname = f"{func.module}.{func.name}"
        # None of these is called: each names how to read its arguments.
        if func.kind == "reconstruct":  # (ndarray, (0,), b'b'): an empty array that BUILD fills
            if len(args) != 3 or not (isinstance(args[0], _Global) and args[0].kind == "ndarray"):
                raise Refused(f"refusing {qualname} of anything but numpy.ndarray")
            self._push(_ArraySpec())
        elif func.kind == "frombuffer":  # (buffer, dtype, shape, order)
            if len(args) != 4:
                raise ValueError(f"{qualname} takes (buffer, dtype, shape, order), got {len(args)} items")
            self._push(_make_array(args[0], args[1], args[2], _text(args[3], "array order")))
        elif func.kind == "scalar":  # (dtype, raw bytes)
            if len(args) != 2:
                raise ValueError(f"{qualname} takes (dtype, data), got {len(args)} items")
            self._push(_make_array(args[1], args[0], (), "C")[()])
        elif func.kind == "dtype":  # (typestr, align, copy)
            if not 1 <= len(args) <= 3:
                raise ValueError(f"numpy.dtype takes (typestr, align, copy), got {len(args)} items")
            self._push(_DtypeSpec(_text(args[0], "dtype")))
        elif func.kind == "encode":  # (text, 'latin1'): how Python 3 writes bytes at protocols 0-2
            if len(args) != 2 or not isinstance(args[0], str) or args[1] not in ("latin1", "latin-1"):
                raise Refused("refusing _codecs.encode other than (text, 'latin1')")
            self._push(args[0].encode("latin-1"))
        elif func.kind == "bytes" and not args:  # bytes(): empty bytes at protocols 0-2
            self._push(b"")
        else:  # numpy.ndarray itself, or bytes(something)
            raise Refused(f"refusing to call {qualname}")

    def _build(self, arg: None) -> None:
        state = self._pop()
        target = self._top()
        if isinstance(target, _DtypeSpec):
            target.set_state(state)
        elif isinstance(target, _ArraySpec):
            self.stack[-1] = array = target.to_array(state)
            for key in target.memo_keys:
                if self.memo.get(key) is target:
                    self.memo[key] = array
        else:
            raise Refused(f"refusing to BUILD {_describe(target)}: only arrays and dtypes take a state")

    _HANDLERS: dict[str, Any] = {
        "PROTO": _proto, "FRAME": _frame, "STOP": _stop, "MARK": _mark,
        "NONE": _constant(None), "NEWTRUE": _constant(True), "NEWFALSE": _constant(False),
        "INT": _value, "BININT": _value, "BININT1": _value, "BININT2": _value, "LONG": _value,
        "LONG1": _value,
        "STRING": _latin1_bytes, "BINSTRING": _latin1_bytes, "SHORT_BINSTRING": _latin1_bytes,
        "UNICODE": _value, "BINUNICODE": _value, "SHORT_BINUNICODE": _value, "BINUNICODE8": _value,
        "BINBYTES": _value, "SHORT_BINBYTES": _value, "BINBYTES8": _value, "BYTEARRAY8": _bytearray,
        "EMPTY_TUPLE": _constant(()), "TUPLE1": _tuple_n(1), "TUPLE2": _tuple_n(2), "TUPLE3": _tuple_n(3),
        "TUPLE": _tuple, "EMPTY_LIST": _empty(list), "LIST": _list, "APPEND": _append, "APPENDS": _appends,
        "EMPTY_DICT": _empty(dict), "DICT": _dict, "SETITEM": _setitem, "SETITEMS": _setitems,
        "PUT": _put, "BINPUT": _put, "LONG_BINPUT": _put, "MEMOIZE": _memoize,
        "GET": _get, "BINGET": _get, "LONG_BINGET": _get,
        "GLOBAL": _global, "STACK_GLOBAL": _stack_global, "REDUCE": _reduce, "BUILD": _build,
    }
    del _constant, _empty, _tuple_n


def read_batch_pickle(raw: bytes) -> Any:
    """The value a CIFAR-10 python batch pickles, got without unpickling (see the module docstring).

    Raises ValueError for malformed data and for anything outside plain data and numeric numpy
    arrays; a refusal's message starts with "refusing" and names the global, opcode or dtype.
    """
    value = _BatchPickleReader().read(raw)
    unfinished = {_ArraySpec: "an array never given its contents (no BUILD)", _DtypeSpec: "a bare dtype",
                  _Global: "a bare global"}
    for item in value.values() if isinstance(value, dict) else [value]:
        if type(item) in unfinished:
            raise ValueError(f"holds {unfinished[type(item)]}")
    return value
