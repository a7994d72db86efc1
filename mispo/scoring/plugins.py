"""Load user plugins (rewards, environments) named in a recipe, and check them at load time.

A recipe names a plugin in one of three ways:

- ``module.path:attribute``   an importable module (``rewards.math:score``);
- ``path/to/file.py:attribute`` a Python file, relative to the recipe's directory or the cwd;
- ``name``                      a name registered by an installed package in an entry-point
                                group (``mispo.rewards`` for rewards, ``mispo.environments``
                                for environments).

Every error raised here is a :class:`PluginError` whose message names the recipe field, the
recipe file, the spec and the fix, so a bad recipe fails before any GPU time is spent.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

REWARD_GROUP = "mispo.rewards"
ENVIRONMENT_GROUP = "mispo.environments"
REWARD_PARAMS = ("prompt", "completion")


class PluginError(ValueError):
    """A plugin spec in a recipe could not be loaded or does not fit the plugin contract."""


def _where(field: str, source: str | None) -> str:
    return f"recipe field '{field}'" + (f" in {source}" if source else "")


def _entry_points(group: str) -> dict[str, Any]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=group)}


def _load_file(path: Path, spec: str, field: str, source: str | None):
    name = "mispo_plugin_" + str(abs(hash(str(path.resolve()))))
    if name in sys.modules:
        return sys.modules[name]
    mod_spec = importlib.util.spec_from_file_location(name, path)
    if mod_spec is None or mod_spec.loader is None:
        raise PluginError(f"{_where(field, source)}: cannot import {path} (from '{spec}'); "
                          "fix: point it at a .py file")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module
    try:
        mod_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise PluginError(f"{_where(field, source)}: importing {path} (from '{spec}') raised "
                          f"{type(exc).__name__}: {exc}; fix the error in that file") from exc
    return module


def _resolve_file(path_part: str, source: str | None) -> Path | None:
    candidates = [Path(path_part)]
    if source and not os.path.isabs(path_part):
        candidates.insert(0, Path(source).resolve().parent / path_part)
    for cand in candidates:
        if cand.is_file():
            return cand
    return None


def load_object(spec: str, *, field: str = "reward", source: str | None = None,
                group: str = REWARD_GROUP) -> Any:
    """Return the object a recipe names by ``spec`` (see module docstring), or raise PluginError."""
    where = _where(field, source)
    if not isinstance(spec, str) or not spec.strip():
        raise PluginError(f"{where}: expected a string like 'rewards.math:score' or "
                          f"'path/to/file.py:function', got {spec!r}")
    spec = spec.strip()
    if ":" not in spec:
        eps = _entry_points(group)
        if spec in eps:
            try:
                return eps[spec].load()
            except Exception as exc:
                raise PluginError(f"{where}: entry point '{spec}' of group '{group}' failed to load "
                                  f"({type(exc).__name__}: {exc}); fix or reinstall the package "
                                  "that registers it") from exc
        known = ", ".join(sorted(eps)) or "none installed"
        raise PluginError(f"{where}: '{spec}' is neither 'module:function' nor 'file.py:function' "
                          f"nor a registered '{group}' entry point (registered: {known}); fix: write "
                          f"e.g. 'rewards.math:score'")
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise PluginError(f"{where}: '{spec}' must have the form 'module:function'")
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = _resolve_file(target, source)
        if path is None:
            base = f" (looked next to {source} and in {os.getcwd()})" if source else \
                f" (looked in {os.getcwd()})"
            raise PluginError(f"{where}: file '{target}' not found{base}; fix the path in '{spec}'")
        module = _load_file(path, spec, field, source)
        origin = str(path)
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            raise PluginError(f"{where}: cannot import module '{target}' (from '{spec}'): {exc}; "
                              "fix: install the package, add it to PYTHONPATH, or use "
                              "'path/to/file.py:function'") from exc
        except Exception as exc:
            raise PluginError(f"{where}: importing module '{target}' (from '{spec}') raised "
                              f"{type(exc).__name__}: {exc}; fix the error in that module") from exc
        origin = getattr(module, "__file__", target)
    try:
        return getattr(module, attr)
    except AttributeError:
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise PluginError(f"{where}: '{origin}' has no attribute '{attr}' (from '{spec}'); "
                          f"callables there: {', '.join(public[:20]) or 'none'}") from None


def check_accepts(fn: Callable, required: Iterable[str], *, spec: str, field: str = "reward",
                  source: str | None = None) -> None:
    """Raise PluginError unless ``fn`` can be called with the ``required`` keyword arguments."""
    where = _where(field, source)
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins / C callables: cannot inspect, trust them
    params = sig.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    names = {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                  inspect.Parameter.KEYWORD_ONLY)}
    missing = [r for r in required if r not in names]
    if missing:
        raise PluginError(f"{where}: '{spec}' has signature {sig}, which does not accept "
                          f"{', '.join(missing)}; fix: define it as "
                          f"def {getattr(fn, '__name__', 'fn')}({', '.join(required)}, **row)")


def load_function(spec: str, *, field: str = "reward", source: str | None = None,
                  group: str = REWARD_GROUP,
                  required: Iterable[str] = REWARD_PARAMS) -> Callable:
    """Load a callable plugin and check it accepts ``required`` keyword arguments (or **kwargs)."""
    obj = load_object(spec, field=field, source=source, group=group)
    if not callable(obj):
        raise PluginError(f"{_where(field, source)}: '{spec}' is a {type(obj).__name__}, not a "
                          "function; fix: point it at a function")
    check_accepts(obj, tuple(required), spec=spec, field=field, source=source)
    return obj


def build_plugin(spec: str, args: Any = None, *, field: str = "reward", source: str | None = None,
                 group: str = REWARD_GROUP, required: Iterable[str] = REWARD_PARAMS) -> Callable:
    """Load ``spec``; with ``args`` (a mapping) it names a factory called as ``factory(**args)``.

    Either way the result must be callable with the ``required`` keyword arguments.
    """
    where = _where(field, source)
    if args is None:
        return load_function(spec, field=field, source=source, group=group, required=required)
    if not isinstance(args, dict):
        raise PluginError(f"{where}: 'args' must be a mapping of keyword arguments, got {args!r}")
    factory = load_object(spec, field=field, source=source, group=group)
    if not callable(factory):
        raise PluginError(f"{where}: '{spec}' is a {type(factory).__name__}; with 'args' it must be "
                          "a class or function that builds the plugin")
    try:
        inspect.signature(factory).bind(**args)
    except TypeError as exc:
        raise PluginError(f"{where}: '{spec}' does not accept args {sorted(args)}: {exc}; fix the "
                          "'args' mapping") from None
    except ValueError:
        pass
    try:
        plugin = factory(**args)
    except Exception as exc:
        raise PluginError(f"{where}: building '{spec}' with args {sorted(args)} raised "
                          f"{type(exc).__name__}: {exc}") from exc
    if not callable(plugin):
        raise PluginError(f"{where}: '{spec}'(**args) returned a {type(plugin).__name__}, not a "
                          "callable plugin")
    check_accepts(plugin, tuple(required), spec=spec, field=field, source=source)
    return plugin


def load_reward(spec: Any, *, field: str = "reward", source: str | None = None) -> Callable:
    """Load a reward from a recipe value.

    Accepted: a spec string; a mapping ``{fn: spec, args: {...}}``; or a list whose items are
    spec strings (weight 1) or mappings ``{fn: spec, weight: 1.0, name: str, args: {...}}``,
    which gives a :class:`mispo.scoring.reward_runner.CombinedReward`.
    """
    if isinstance(spec, str):
        return load_function(spec, field=field, source=source)
    if isinstance(spec, dict):
        return _component(spec, field, source)[0]
    if not isinstance(spec, (list, tuple)) or not spec:
        raise PluginError(f"{_where(field, source)}: expected a spec string, a {{fn, args}} mapping "
                          f"or a non-empty list of {{fn, weight, name, args}} entries, got {spec!r}")
    from mispo.scoring.reward_runner import CombinedReward

    parts = [_component(item, f"{field}[{i}]", source) for i, item in enumerate(spec)]
    names = [p[2] for p in parts]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PluginError(f"{_where(field, source)}: component names {dupes} repeat; fix: give each "
                          "component a distinct 'name'")
    return CombinedReward(parts)


def _component(item: Any, field: str, source: str | None) -> tuple[Callable, float, str]:
    if isinstance(item, str):
        item = {"fn": item}
    if not isinstance(item, dict) or not isinstance(item.get("fn"), str):
        raise PluginError(f"{_where(field, source)}: expected a spec string or a mapping with "
                          f"'fn' (and optional 'weight', 'name', 'args'), got {item!r}")
    unknown = set(item) - {"fn", "weight", "name", "args"}
    if unknown:
        raise PluginError(f"{_where(field, source)}: unknown keys {sorted(unknown)}; "
                          "allowed: fn, weight, name, args")
    fn = build_plugin(item["fn"], item.get("args"), field=f"{field}.fn", source=source)
    weight = item.get("weight", 1.0)
    if not isinstance(weight, (int, float)) or isinstance(weight, bool):
        raise PluginError(f"{_where(field + '.weight', source)}: expected a number, got {weight!r}")
    return fn, float(weight), str(item.get("name") or _default_name(item["fn"]))


def _default_name(spec: str) -> str:
    """'rewards.math:score' -> 'math'; 'my.py:format_reward' -> 'format_reward'."""
    target, _, attr = spec.rpartition(":")
    if attr != "score" or not target:
        return attr or spec
    return os.path.basename(target).removesuffix(".py").rpartition(".")[2]
