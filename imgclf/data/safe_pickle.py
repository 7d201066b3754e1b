"""Unpickle CIFAR-10's python batches safely: no code runs, and memory stays bounded.

A pickle can run arbitrary code on load, or make the reader allocate far more memory than the
file holds (a pickle of under 100 bytes can ask NumPy for a 460 MB array, a 9-byte one can grow
the unpickler's memo by 512 MB). :func:`load_pickle` reads a batch in two passes over its bytes:

1. :func:`check_opcodes` walks the opcodes with ``pickletools.genops``, which parses but
   builds nothing: only the opcodes that dicts, lists, strings, numbers and NumPy arrays need
   are allowed, every length-prefixed argument must be present in full (the C unpickler
   allocates the declared length before reading it), memo indices must be dense as every
   pickler writes them, and the count of opcodes (each builds at most one small object) is
   bounded by the file's size.
2. :class:`SafeUnpickler` admits only NumPy's array reconstruction, ``numpy.dtype`` and
   ``_codecs.encode``, and each resolves to a guarded stand-in: integer dtypes only, byte
   strings only from latin1, and an array only when its declared shape times its item size
   equals the bytes actually present, checked before the array exists. The arrays' bytes, and
   separately the encoded strings', may not add up to more than the file's own size.

Anything else is refused with an error naming the file and what was refused. The official
files were written by Python 2, so their keys load as ``b'data'`` with ``encoding='bytes'``
and as ``'data'`` with ``encoding='latin1'``; both spellings are accepted.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
from typing import Any

import numpy as np

from ..core.errors import PipelineError

NOT_GENUINE = "CIFAR-10 batches hold only NumPy arrays, lists and dicts, so this file is not a genuine CIFAR-10 batch and was not loaded"

# The opcodes a batch needs, in any protocol a pickler writes for dicts, lists, tuples, str,
# bytes, numbers and NumPy arrays (protocol 0 to 5, in-band). Not here: sets (an empty one is
# 1 byte that builds 216), INST/OBJ/NEWOBJ (instantiate a class), PERSID and EXT (hooks this
# reader has none of), out-of-band buffers, bytearrays.
_ALLOWED_OPCODES = frozenset("""
    PROTO FRAME STOP MARK POP POP_MARK DUP
    INT BININT BININT1 BININT2 LONG LONG1 LONG4 NONE NEWTRUE NEWFALSE FLOAT BINFLOAT
    STRING BINSTRING SHORT_BINSTRING BINBYTES SHORT_BINBYTES BINBYTES8
    UNICODE BINUNICODE SHORT_BINUNICODE BINUNICODE8
    EMPTY_LIST APPEND APPENDS LIST EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 EMPTY_DICT DICT SETITEM SETITEMS
    PUT BINPUT LONG_BINPUT MEMOIZE GET BINGET LONG_BINGET GLOBAL STACK_GLOBAL REDUCE BUILD
""".split())
_PUT_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})
# The C unpickler keeps its memo as an array as long as the largest index (8 bytes a slot):
# indices must come in order (each at most the count of entries so far, as every pickler
# writes them) and there may be at most this many. A CIFAR-10 batch has ~10,000.
MAX_MEMO = 1 << 20
# Each opcode builds at most one object of at most ~100 bytes besides the data it carries, so
# bounding their count by the file's size bounds what the objects cost: a CIFAR-10 batch
# (31 MB, ~30,000 opcodes) may have 131,000, a tiny file 10,000.
OPCODES_BASE, BYTES_PER_OPCODE = 10_000, 256
# The dtypes a batch's arrays may have: uint8 images, integer labels.
_DTYPES = frozenset({"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8"})


class UnsafePickleError(PipelineError):
    pass


def check_opcodes(data: bytes, source: str) -> None:
    """Walk the pickle's opcodes without building anything (see the module docstring)."""
    max_ops = OPCODES_BASE + len(data) // BYTES_PER_OPCODE
    puts = 0
    try:
        for ops, (op, arg, pos) in enumerate(pickletools.genops(data), 1):
            if op.name not in _ALLOWED_OPCODES:
                raise UnsafePickleError(f"{source}: refusing the pickle opcode {op.name} at byte {pos}; {NOT_GENUINE}")
            if op.name in _PUT_OPCODES:
                if arg is not None and arg > puts:
                    raise UnsafePickleError(
                        f"{source}: refusing memo index {arg:,} at byte {pos}, with {puts:,} entries so far "
                        f"(a pickler writes them in order; a sparse index makes the unpickler allocate "
                        f"for every slot before it); {NOT_GENUINE}"
                    )
                puts += 1
                if puts > MAX_MEMO:
                    raise UnsafePickleError(f"{source}: refusing more than {MAX_MEMO:,} memo entries; {NOT_GENUINE}")
            if ops > max_ops:
                raise UnsafePickleError(
                    f"{source}: refusing a pickle of more than {max_ops:,} opcodes in {len(data):,} bytes; {NOT_GENUINE}"
                )
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated: an argument longer than the data left, no STOP; bad opcode
        raise PipelineError(f"{source}: not a readable CIFAR-10 pickle ({type(e).__name__}: {e})") from None


class _Global:
    """A global a batch pickle may name. Calls go to ``func``, or are refused when it is None
    (``numpy.ndarray(shape)`` allocates); setting its state (``BUILD``) is always refused."""

    def __init__(self, unpickler: SafeUnpickler, name: str, func: Any = None):
        self.unpickler, self.name, self.func = unpickler, name, func

    def __call__(self, *args: Any) -> Any:
        if self.func is None:
            raise self.unpickler.refuse(f"a call of {self.name}")
        return self.func(*args)

    def __setstate__(self, state: Any) -> None:
        raise self.unpickler.refuse(f"setting the state of {self.name}")

    def __repr__(self) -> str:
        return self.name


class _Dtype:
    """What ``numpy.dtype(...)`` gives in a batch pickle: an allowed integer dtype, whose
    state (``BUILD``) may only set its byte order."""

    def __init__(self, unpickler: SafeUnpickler, dtype: np.dtype):
        self.unpickler, self.dtype = unpickler, dtype

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3 and state[2:5] == (None, None, None)):
            raise self.unpickler.refuse(f"dtype state {str(state)[:80]}")
        order = state[1].decode("latin1") if isinstance(state[1], bytes) else state[1]
        if order not in ("<", ">", "|", "="):
            raise self.unpickler.refuse(f"byte order {order!r}")
        if order in "<>":
            self.dtype = self.dtype.newbyteorder(order)


class _Array:
    """What ``_reconstruct(ndarray, (0,), 'b')`` gives: a placeholder that ``BUILD`` fills,
    after checking the state, with an array over the pickle's own bytes."""

    def __init__(self, unpickler: SafeUnpickler):
        self.unpickler = unpickler
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        u = self.unpickler
        if self.array is not None:
            raise u.refuse("an array filled twice")
        if isinstance(state, tuple) and len(state) == 4:  # old NumPy: no version
            state = (1, *state)
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise u.refuse(f"array state {str(state)[:80]}")
        _, shape, dtype, fortran, raw = state
        if not isinstance(dtype, _Dtype):
            raise u.refuse(f"an array of dtype {str(dtype)[:40]}")
        if not (isinstance(shape, tuple) and len(shape) <= 2
                and all(type(n) is int and n >= 0 for n in shape)):
            raise u.refuse(f"array shape {str(shape)[:80]}")
        if not isinstance(raw, (bytes, str)) or type(fortran) not in (bool, int):
            raise u.refuse(f"array data of type {type(raw).__name__}")
        nbytes = math.prod(shape) * dtype.dtype.itemsize
        if len(raw) != nbytes:  # checked before any array exists: NumPy would allocate first
            raise u.refuse(f"an array of shape {shape} and {nbytes:,} bytes whose data holds {len(raw):,}")
        u.spend("array", nbytes)
        if isinstance(raw, str):  # a Python 2 str, loaded with encoding='latin1'
            raw = raw.encode("latin1")
        self.array = np.frombuffer(raw, dtype.dtype).reshape(shape, order="F" if fortran else "C")


class SafeUnpickler(pickle.Unpickler):
    """Resolves the few globals a batch names to guarded stand-ins; refuses every other one.

    ``budget`` is the bytes that arrays, and separately ``_codecs.encode``, may produce in all:
    an honest pickle holds each array's data once, so the file's own size will do (a memo
    reference used many times would otherwise copy the same bytes each time).
    """

    def __init__(self, file, *, source: str, encoding: str = "latin1", budget: int):
        super().__init__(file, encoding=encoding)
        self.source = source
        self.budget = {"array": budget, "encode": budget}
        self.ndarray = _Global(self, "numpy.ndarray")
        # Python 2 pickles name numpy.core.multiarray; NumPy 2 moved it to numpy._core.
        self.globals: dict[tuple[str, str], _Global] = {
            ("numpy.core.multiarray", "_reconstruct"): _Global(self, "_reconstruct", self._reconstruct),
            ("numpy._core.multiarray", "_reconstruct"): _Global(self, "_reconstruct", self._reconstruct),
            ("numpy", "ndarray"): self.ndarray,
            ("numpy", "dtype"): _Global(self, "numpy.dtype", self._dtype),
            ("_codecs", "encode"): _Global(self, "_codecs.encode", self._encode),
        }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.globals[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self.source}: refusing to load global '{module}.{name}' from the pickle; {NOT_GENUINE}"
            ) from None

    def refuse(self, what: str) -> UnsafePickleError:
        return UnsafePickleError(f"{self.source}: refusing {what}; {NOT_GENUINE}")

    def spend(self, what: str, nbytes: int) -> None:
        self.budget[what] -= nbytes
        if self.budget[what] < 0:
            raise self.refuse(f"{what} data larger than the file itself")

    def _reconstruct(self, cls: Any, shape: Any, typecode: Any) -> _Array:
        # NumPy pickles every array as _reconstruct(ndarray, (0,), b'b') and then fills it.
        if not (cls is self.ndarray and shape == (0,) and typecode in ("b", b"b")):
            raise self.refuse(f"_reconstruct{(cls, shape, typecode)!r:.80}")
        return _Array(self)

    def _dtype(self, spec: Any, align: Any = False, copy: Any = True) -> _Dtype:
        name = spec.decode("latin1") if isinstance(spec, bytes) else spec
        if not (isinstance(name, str) and name in _DTYPES):
            raise self.refuse(f"numpy.dtype({spec!r:.40}) (a batch holds uint8 images and integer labels)")
        return _Dtype(self, np.dtype(name))

    def _encode(self, text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
        # Python 3 writes bytes in protocol 2 as _codecs.encode(text, 'latin1'): one byte a character.
        if encoding != "latin1" or errors != "strict":
            raise self.refuse(f"_codecs.encode(..., {encoding!r:.40}) (only 'latin1' writes bytes)")
        if not isinstance(text, str):
            raise self.refuse(f"_codecs.encode of a {type(text).__name__}")
        self.spend("encode", len(text))
        return text.encode("latin1")


def load_pickle(data: bytes, *, source: str, encoding: str = "latin1") -> dict[str, Any]:
    """Unpickle one batch safely (see the module docstring); keys come back as ``str``."""
    check_opcodes(data, source)
    unpickler = SafeUnpickler(io.BytesIO(data), source=source, encoding=encoding, budget=len(data))
    try:
        obj = unpickler.load()
    except UnsafePickleError:
        raise
    except Exception as e:  # malformed pickle data
        raise PipelineError(f"{source}: not a readable CIFAR-10 pickle ({type(e).__name__}: {e})") from None
    finally:
        # Empty the memo and the stand-ins now: they and the unpickler refer to each other, so
        # the memo (holding the batch's data as a str) would live until a garbage collection.
        unpickler.memo.clear()
        unpickler.globals.clear()
    if not isinstance(obj, dict):
        raise PipelineError(f"{source}: expected a dict, got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if isinstance(v, _Array):
            if v.array is None:
                raise unpickler.refuse("an array without its data")
            v = v.array
        out[k.decode("latin1") if isinstance(k, bytes) else k] = v
    return out
