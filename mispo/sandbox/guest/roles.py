"""Guest roles, run by boot.py after the process is locked down. Standard library only.

- ``program``: run program.py as ``__main__`` (stdin/stdout cases; the host compares output).
- ``serve``:   exec solution.py, then answer calls to its entry point over the RPC pipes.
- ``check``:   exec the (trusted) prelude and test code with ``candidate`` bound to a proxy that
               calls the serve process; write a verdict carrying the host's nonce to result_fd
               only after every check ran. Untrusted code never runs in this process.

Messages are lists: ["ready"] | ["error", text] | ["call", args, kwargs] | ["ok", value] |
["exc", type_name, text].
"""

import builtins
import json
import linecache
import os
import sys
import traceback

import wire

_PASSTHROUGH = {n for n in dir(builtins) if isinstance(getattr(builtins, n), type)
                and issubclass(getattr(builtins, n), Exception)} - {
    "StopIteration", "StopAsyncIteration"}


def _compile(source, filename):
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    return compile(source, filename, "exec")


def run_program(cfg):
    source = cfg["files"]["program.py"]
    sys.argv = ["program.py"]
    ns = {"__name__": "__main__", "__file__": "program.py", "__builtins__": builtins}
    exec(_compile(source, "program.py"), ns)


def _short(exc):
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()[-2000:]


def serve(cfg):
    rfd, wfd = cfg["rpc_in"], cfg["rpc_out"]
    ns = {"__name__": "candidate", "__file__": "solution.py", "__builtins__": builtins}
    try:
        exec(_compile(cfg["files"]["solution.py"], "solution.py"), ns)
        fn = ns[cfg["entry_point"]]
        if not callable(fn):
            raise TypeError("%s is a %s, not a function" % (cfg["entry_point"], type(fn).__name__))
    except KeyError:
        wire.send(wfd, ["error", "the program does not define %s" % cfg["entry_point"]])
        return
    except BaseException as exc:  # SystemExit too: exiting early is a failure, not a pass
        wire.send(wfd, ["error", "loading the program raised " + _short(exc)])
        return
    wire.send(wfd, ["ready"])
    while True:
        try:
            msg = wire.decode(wire.recv(rfd))
        except EOFError:
            return
        try:
            out = ["ok", wire.encode(fn(*msg[1], **msg[2]))]
        except BaseException as exc:
            out = ["exc", type(exc).__name__, str(exc)[:2000]]
        wire.send(wfd, out)


class CandidateError(RuntimeError):
    """The candidate failed in a way that is not a plain Python exception of a builtin type."""


class Candidate:
    """Callable proxy for the candidate's entry point in the other process."""

    def __init__(self, name, out_fd, in_fd):
        self.__name__ = name
        self._out, self._in = out_fd, in_fd

    def _recv(self):
        try:
            return wire.decode(wire.recv(self._in))
        except EOFError:
            raise CandidateError("the candidate process exited (early exit, crash, or a limit "
                                 "such as memory was hit)") from None
        except (ValueError, TypeError) as exc:
            raise CandidateError("the candidate sent a malformed reply: %s" % exc) from None

    def wait_ready(self):
        msg = self._recv()
        if msg[0] != "ready":
            raise CandidateError(str(msg[1]) if len(msg) > 1 else "the candidate did not start")

    def __call__(self, *args, **kwargs):
        wire.send(self._out, ["call", wire.encode(list(args)), wire.encode(kwargs)])
        msg = self._recv()
        if msg[0] == "ok" and len(msg) == 2:
            return msg[1]
        if msg[0] == "exc" and len(msg) == 3:
            name, text = str(msg[1]), str(msg[2])
            if name in _PASSTHROUGH:
                raise getattr(builtins, name)(text)
            raise CandidateError("the candidate raised %s: %s" % (name, text))
        raise CandidateError("the candidate sent an unexpected reply")


def _describe(exc, test_lines):
    """One line saying what failed, pointing at the test line where it failed."""
    where = ""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.filename == "test.py" and 0 < frame.lineno <= len(test_lines):
            where = " at test line %d: %s" % (frame.lineno, test_lines[frame.lineno - 1].strip())
            break
    kind = type(exc).__name__
    text = str(exc)
    return ("%s%s%s" % (kind, ": " + text if text else "", where))[:2000]


def check(cfg):
    nonce = sys.stdin.readline().strip()
    verdict = {"nonce": nonce, "passed": False, "error": None}
    test_src = cfg["files"]["test.py"]
    try:
        proxy = Candidate(cfg["entry_point"], cfg["rpc_out"], cfg["rpc_in"])
        proxy.wait_ready()
        ns = {"__name__": "__check__", "__builtins__": builtins}
        if "prelude.py" in cfg["files"]:
            exec(_compile(cfg["files"]["prelude.py"], "prelude.py"), ns)
        ns[cfg["entry_point"]] = proxy
        ns["candidate"] = proxy
        exec(_compile(test_src, "test.py"), ns)
        if callable(ns.get("check")):
            ns["check"](proxy)
        verdict["passed"] = True
    except BaseException as exc:
        verdict["error"] = _describe(exc, test_src.splitlines())
    data = json.dumps(verdict).encode()
    os.write(cfg["result_fd"], data)


def run(cfg):
    {"program": run_program, "serve": serve, "check": check}[cfg["role"]](cfg)
