"""Plain-data codec and length-prefixed framing between the checker and the candidate process.

Only builtin data crosses the boundary: None, bool, int, float, str, bytes, complex, list, and
tagged tuple / dict / set / frozenset. Decoding builds nothing else, so a hostile candidate cannot
hand the checker an object with a forged ``__eq__``. Standard library only.
"""

import base64
import json
import numbers
import os
import struct

MAX_FRAME = 64 * 1024 * 1024
MAX_DEPTH = 200
_TAGS = ("$t", "$d", "$s", "$fs", "$b", "$c")


def encode(obj, depth=0):
    """Return a JSON-able form of ``obj``; TypeError for anything that is not plain data."""
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply to pass between processes")
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    d = depth + 1
    if isinstance(obj, list):
        return [encode(x, d) for x in obj]
    if isinstance(obj, tuple):
        return {"$t": [encode(x, d) for x in obj]}
    if isinstance(obj, dict):
        return {"$d": [[encode(k, d), encode(v, d)] for k, v in obj.items()]}
    if isinstance(obj, frozenset):
        return {"$fs": [encode(x, d) for x in obj]}
    if isinstance(obj, set):
        return {"$s": [encode(x, d) for x in obj]}
    if isinstance(obj, (bytes, bytearray)):
        return {"$b": base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, complex):
        return {"$c": [obj.real, obj.imag]}
    if isinstance(obj, numbers.Integral):  # numpy ints
        return int(obj)
    if isinstance(obj, numbers.Real):  # numpy floats
        return float(obj)
    raise TypeError("cannot pass a %s between sandbox processes (plain data only)"
                    % type(obj).__name__)


def _hook(obj):
    if len(obj) != 1:
        raise ValueError("malformed message")
    (tag, val), = obj.items()
    if tag not in _TAGS:
        raise ValueError("malformed message")
    return (tag, val)


def _build(node):
    """Turn decoded JSON (tags as (tag, value) pairs) into Python values."""
    if isinstance(node, list):
        return [_build(x) for x in node]
    if isinstance(node, tuple):
        tag, val = node
        if tag == "$b":
            return base64.b64decode(val)
        if tag == "$c":
            return complex(float(val[0]), float(val[1]))
        if not isinstance(val, list):
            raise ValueError("malformed message")
        items = [_build(x) for x in val]
        if tag == "$t":
            return tuple(items)
        if tag == "$s":
            return set(items)
        if tag == "$fs":
            return frozenset(items)
        return {k: v for k, v in items}  # "$d": list of [key, value]
    if node is None or type(node) in (bool, int, float, str):
        return node
    raise ValueError("malformed message")


def decode(text):
    return _build(json.loads(text, object_hook=_hook))


def send(fd, message):
    data = json.dumps(message).encode("utf-8")
    data = struct.pack(">I", len(data)) + data
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(fd, n):
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise EOFError("peer closed the channel")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv(fd):
    """Read one frame; returns the raw JSON text (decode values with :func:`decode`)."""
    (size,) = struct.unpack(">I", _read_exact(fd, 4))
    if size > MAX_FRAME:
        raise ValueError("message of %d bytes exceeds the %d byte limit" % (size, MAX_FRAME))
    return _read_exact(fd, size).decode("utf-8")
