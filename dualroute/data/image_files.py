"""Readers and writers for the MNIST (IDX) and CIFAR-10 (python and binary versions) file formats.

Readers return float32 images_NCHW in [0, 1] and int64 labels_N; writers exist so that tests and users
can build small fixture files in exactly the published formats. Nothing is downloaded, and nothing is
unpickled: CIFAR-10's python batches are pickles, read by walking their opcodes (see read_cifar10).
"""

from __future__ import annotations

import gzip
import io
import math
import pickle  # only to write fixture batches; reading never unpickles
import pickletools
import re
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

ImageSplit = Literal["train", "test"]

_IDX_UBYTE = 0x08
_MNIST_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_CIFAR_PIXELS = 3 * 32 * 32  # one image: 3 channel planes of 32x32 bytes


class LabeledImages(NamedTuple):
    images_NCHW: torch.Tensor  # float32 in [0, 1]
    labels_N: torch.Tensor  # int64


def _uint8_to_images(pixels_NCHW: np.ndarray, scale: float = 255.0) -> torch.Tensor:
    return torch.from_numpy(pixels_NCHW.astype(np.float32) / np.float32(scale))


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


# ---- MNIST: IDX files -------------------------------------------------------------------------------

def _read_bytes(path: Path) -> bytes:
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        return gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as e:  # BadGzipFile is an OSError
        raise ValueError(f"{path} is not a valid gzip file: {e}") from e


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file of `ndim` dimensions (magic 0x0000080<ndim>, big-endian sizes)."""
    path = Path(path)
    raw = _read_bytes(path)
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(f"{path} is truncated: {len(raw)} bytes, shorter than the {header_len}-byte "
                         f"IDX header")
    magic = int.from_bytes(raw[:4], "big")
    expected = (_IDX_UBYTE << 8) | ndim
    if magic != expected:
        raise ValueError(f"{path} has bad IDX magic 0x{magic:08x}, expected 0x{expected:08x} "
                         f"(unsigned bytes, {ndim} dims)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    n_expected, n_data = int(np.prod(shape)), len(raw) - header_len
    if n_data != n_expected:
        problem = "truncated" if n_data < n_expected else "longer than its header says"
        raise ValueError(f"{path} is {problem}: header shape {shape} needs {n_expected} data bytes, "
                         f"found {n_data}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape)


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write a uint8 array as an IDX file; a path ending in .gz is gzip-compressed."""
    array = np.asarray(array)
    if array.dtype != np.uint8 or not 1 <= array.ndim <= 255:
        raise ValueError(f"IDX writer takes a uint8 array, got dtype {array.dtype} ndim {array.ndim}")
    header = ((_IDX_UBYTE << 8) | array.ndim).to_bytes(4, "big")
    header += np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array).tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload, mtime=0) if path.suffix == ".gz" else payload)
    return path


def _find_mnist_file(folder: Path, stem: str) -> Path:
    # torchvision keeps the same files under MNIST/raw, so a torchvision root works too.
    candidates = [d / name for d in (folder, folder / "MNIST" / "raw") for name in (stem, stem + ".gz")]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"MNIST file {stem} not found; looked for: "
                            + ", ".join(str(p) for p in candidates))


def read_mnist(folder: str | Path, split: ImageSplit = "train") -> LabeledImages:
    """Read MNIST-format IDX files (plain or .gz) from `folder`: images_N1HW float32 in [0, 1]."""
    _check_split(split)
    image_stem, label_stem = _MNIST_STEMS[split]
    image_path = _find_mnist_file(Path(folder), image_stem)
    label_path = _find_mnist_file(Path(folder), label_stem)
    pixels_NHW, labels_N = read_idx(image_path, ndim=3), read_idx(label_path, ndim=1)
    if len(pixels_NHW) != len(labels_N):
        raise ValueError(f"MNIST count mismatch: {image_path} has {len(pixels_NHW)} images but "
                         f"{label_path} has {len(labels_N)} labels")
    return LabeledImages(_uint8_to_images(pixels_NHW[:, None]), torch.from_numpy(labels_N.astype(np.int64)))


def write_mnist_idx(folder: str | Path, pixels_NHW: np.ndarray, labels_N: np.ndarray,
                    split: ImageSplit = "train", compress: bool = False) -> tuple[Path, Path]:
    """Write uint8 images and labels under the standard MNIST file names; returns both paths."""
    _check_split(split)
    labels_N = np.asarray(labels_N)
    if np.asarray(pixels_NHW).ndim != 3 or labels_N.ndim != 1:
        raise ValueError(f"need pixels_NHW (3-D) and labels_N (1-D), got shapes "
                         f"{np.shape(pixels_NHW)} and {labels_N.shape}")
    if labels_N.size and (labels_N.min() < 0 or labels_N.max() > 255):
        raise ValueError(f"MNIST labels must fit a byte, got range [{labels_N.min()}, {labels_N.max()}]")
    suffix = ".gz" if compress else ""
    image_stem, label_stem = _MNIST_STEMS[split]
    return (write_idx(Path(folder) / (image_stem + suffix), pixels_NHW),
            write_idx(Path(folder) / (label_stem + suffix), labels_N.astype(np.uint8)))


# ---- CIFAR-10: python batches (pickles, read without unpickling) and binary batches -----------------
#
# The python version's batches are pickles written by Python 2 (protocol 2). Nothing here unpickles
# them: pickletools.genops (the standard library's disassembler, which only decodes opcodes) walks
# the file, and _BatchPickleReader interprets the few opcodes that plain data and numpy arrays need.
# The numpy globals a pickle names are never imported or called: they only say how to read the
# arguments that follow (shape, dtype string, raw bytes, memory order), and the array is made here
# with np.frombuffer. Any other global, any other opcode and any dtype but plain numbers is refused.

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


class _Refused(ValueError):
    """The file asks for something a CIFAR-10 batch never needs (a global, an opcode, a dtype)."""


class _Global(NamedTuple):
    module: str
    name: str
    kind: str  # a value of _PICKLE_GLOBALS


class _DtypeSpec:
    """What REDUCE(numpy.dtype, (typestr, align, copy)) and its BUILD describe; no dtype is built yet."""

    def __init__(self, typestr: str) -> None:
        if not _NUMERIC_DTYPE.fullmatch(typestr):
            raise _Refused(f"refusing dtype {typestr!r}: only plain numeric arrays are read")
        self.typestr, self.byteorder = typestr, "|"

    def set_state(self, state: Any) -> None:
        # numpy's dtype state: (version, byteorder, subarray, names, fields, elsize, alignment, flags[, meta])
        if not isinstance(state, tuple) or len(state) < 5:
            raise ValueError(f"dtype state must be a tuple of at least 5 items, got {_describe(state)}")
        byteorder = _text(state[1], "dtype byte order")
        if byteorder not in ("|", "<", ">", "="):
            raise ValueError(f"bad dtype byte order {byteorder!r}")
        if any(part is not None for part in state[2:5]):
            raise _Refused("refusing a structured or sub-array dtype: only plain numeric arrays are read")
        self.byteorder = byteorder

    def to_numpy(self) -> np.dtype:
        try:
            dtype = np.dtype(("" if self.byteorder in "|=" else self.byteorder) + self.typestr)
        except TypeError as e:
            raise ValueError(f"bad dtype {self.typestr!r}: {e}") from None
        if dtype.kind not in "biufc":
            raise _Refused(f"refusing dtype {dtype}: only plain numeric arrays are read")
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
        raise _Refused(f"refusing array data given as {_describe(raw)}: only raw bytes are read")
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
                raise _Refused(f"refusing opcode {op.name} at byte {pos}: CIFAR-10 batches never use it")
            try:
                handler(self, arg)
            except _Refused as e:  # "refusing X: why" -> "refusing X (OPCODE at byte N): why"
                what, colon, why = str(e).partition(": ")
                raise _Refused(f"{what} ({op.name} at byte {pos}){colon}{why}") from None
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
            raise _Refused(f"refusing to load {module}.{name}: a CIFAR-10 batch holds only numpy arrays "
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
                raise _Refused(f"refusing {qualname} of anything but numpy.ndarray")
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
                raise _Refused("refusing _codecs.encode other than (text, 'latin1')")
            self._push(args[0].encode("latin-1"))
        elif func.kind == "bytes" and not args:  # bytes(): empty bytes at protocols 0-2
            self._push(b"")
        else:  # numpy.ndarray itself, or bytes(something)
            raise _Refused(f"refusing to call {qualname}")

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
            raise _Refused(f"refusing to BUILD {_describe(target)}: only arrays and dtypes take a state")

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
    """The value a CIFAR-10 python batch pickles, got without unpickling (see the section comment).

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


def _get(batch: dict, key: str) -> Any:
    # The published batches were pickled by Python 2, so their keys are bytes.
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise ValueError(f"missing key {key!r}")


def _load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = read_batch_pickle(path.read_bytes())
    except _Refused as e:
        raise ValueError(f"{path}: {e}") from None
    except ValueError as e:  # genops' own errors too: unknown opcode, truncated data, no STOP
        raise ValueError(f"{path} is not a CIFAR-10 pickle batch: {e}") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path} holds a {type(batch).__name__}, expected a dict with data and labels")
    try:
        data, labels = _get(batch, "data"), _get(batch, "labels")
    except ValueError as e:
        raise ValueError(f"{path}: {e}; found keys {sorted(map(str, batch))}") from None
    data, labels_N = _as_array(data), _as_array(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR_PIXELS:
        raise ValueError(f"{path}: data must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    if labels_N.shape != (len(data),) or not np.issubdtype(labels_N.dtype, np.integer):
        raise ValueError(f"{path}: need {len(data)} integer labels to match data, got labels of "
                         f"shape {labels_N.shape} dtype {labels_N.dtype}")
    return data, labels_N


def _as_array(value: Any) -> np.ndarray:
    try:
        return np.asarray(value)
    except (ValueError, TypeError, OverflowError, RecursionError):  # ragged or oddly nested lists
        return np.empty((), dtype=object)


def _load_cifar_bin_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = path.read_bytes()
    record = 1 + _CIFAR_PIXELS
    if not raw or len(raw) % record:
        raise ValueError(f"{path} is not a CIFAR-10 binary batch: its {len(raw)} bytes are not a whole, "
                         f"nonzero number of {record}-byte records (1 label byte + 3072 pixel bytes); "
                         f"truncated?")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, record)
    labels_N = records[:, 0]
    bad = np.flatnonzero(labels_N > 9)
    if len(bad):
        raise ValueError(f"{path}: record {bad[0]} has label {labels_N[bad[0]]}, not a CIFAR-10 class "
                         f"(0-9); CIFAR-100's binary records have two label bytes and are not read")
    return records[:, 1:], labels_N


_CIFAR_LAYOUTS = {  # layout: (subfolder of the published archive, file suffix, loader)
    "binary": ("cifar-10-batches-bin", ".bin", _load_cifar_bin_batch),
    "python": ("cifar-10-batches-py", "", _load_cifar_batch),
}


def find_cifar10_batches(folder: str | Path, split: ImageSplit = "train") -> tuple[str, list[Path]]:
    """Which CIFAR-10 layout `folder` holds and the batch files of `split`: ("python" | "binary", paths).

    Looks in `folder` itself and in the archives' subfolders cifar-10-batches-py (data_batch_1 ...
    data_batch_5, test_batch) and cifar-10-batches-bin (the same names with .bin). Where more than
    one holds batches, the first with every file of `split` wins, the binary version first.
    """
    _check_split(split)
    folder = Path(folder)
    found: list[tuple[str, list[Path]]] = []
    for layout, (subfolder, suffix, _) in _CIFAR_LAYOUTS.items():
        names = [name + suffix for names in _CIFAR_FILES.values() for name in names]
        for base in (folder / subfolder, folder):
            if any((base / name).is_file() for name in names):
                found.append((layout, [base / (name + suffix) for name in _CIFAR_FILES[split]]))
    for layout, paths in found:
        if all(p.is_file() for p in paths):
            return layout, paths
    if found:
        layout, paths = found[0]
        raise FileNotFoundError(f"CIFAR-10 {split} batches missing ({layout} version): "
                                + ", ".join(str(p) for p in paths if not p.is_file()))
    raise FileNotFoundError(
        f"no CIFAR-10 batches in {folder}: looked for the python version (data_batch_1 ... data_batch_5, "
        f"test_batch) in {folder} and {folder / 'cifar-10-batches-py'}, and the binary version (the "
        f"same names with .bin) in {folder} and {folder / 'cifar-10-batches-bin'}")


def read_cifar10(folder: str | Path, split: ImageSplit = "train") -> LabeledImages:
    """Read CIFAR-10 batches from `folder`: the python version or the binary version, whichever is there.

    The folder may be the extracted cifar-10-batches-py or cifar-10-batches-bin, or hold one of them
    (see find_cifar10_batches). The binary version's records are read as bytes. The python version's
    batches are pickles, but nothing is unpickled: their opcodes are walked with pickletools.genops and
    only plain data and numeric numpy arrays are accepted (arrays are made with np.frombuffer; no
    global the file names is imported or called). Anything else (another global such as os.system,
    another opcode, an object dtype) is refused with a ValueError naming the file, so a crafted file
    cannot run code.
    """
    layout, paths = find_cifar10_batches(folder, split)
    load = _CIFAR_LAYOUTS[layout][2]
    batches = [load(p) for p in paths]
    pixels_NCHW = np.concatenate([data for data, _ in batches]).reshape(-1, 3, 32, 32)
    labels_N = np.concatenate([labels for _, labels in batches]).astype(np.int64)
    return LabeledImages(_uint8_to_images(pixels_NCHW), torch.from_numpy(labels_N))


def _check_cifar_arrays(pixels_NCHW: np.ndarray, labels_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pixels_NCHW, labels_N = np.asarray(pixels_NCHW), np.asarray(labels_N)
    if pixels_NCHW.dtype != np.uint8 or pixels_NCHW.shape[1:] != (3, 32, 32):
        raise ValueError(f"need uint8 pixels of shape (N, 3, 32, 32), got {pixels_NCHW.dtype} "
                         f"{pixels_NCHW.shape}")
    if len(labels_N) != len(pixels_NCHW):
        raise ValueError(f"got {len(pixels_NCHW)} images but {len(labels_N)} labels")
    return pixels_NCHW, labels_N


def write_cifar10_batch(path: str | Path, pixels_NCHW: np.ndarray, labels_N: np.ndarray,
                        protocol: int = 2) -> Path:
    """Write one python-version batch as published (a pickle: bytes keys, uint8 (N, 3072) rows).

    The published files are Python 2 pickles of protocol 2; `protocol` picks another for tests.
    """
    pixels_NCHW, labels_N = _check_cifar_arrays(pixels_NCHW, labels_N)
    batch = {b"batch_label": b"dualroute fixture", b"data": pixels_NCHW.reshape(len(pixels_NCHW), -1),
             b"labels": [int(v) for v in labels_N]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    return path


def write_cifar10_bin_batch(path: str | Path, pixels_NCHW: np.ndarray, labels_N: np.ndarray) -> Path:
    """Write one binary-version batch: per image, 1 label byte then 3072 channel-major pixel bytes."""
    pixels_NCHW, labels_N = _check_cifar_arrays(pixels_NCHW, labels_N)
    if labels_N.size and (labels_N.min() < 0 or labels_N.max() > 9):
        raise ValueError(f"CIFAR-10 labels are 0-9, got range [{labels_N.min()}, {labels_N.max()}]")
    records = np.empty((len(pixels_NCHW), 1 + _CIFAR_PIXELS), dtype=np.uint8)
    records[:, 0] = labels_N
    records[:, 1:] = pixels_NCHW.reshape(len(pixels_NCHW), -1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(records.tobytes())
    return path
