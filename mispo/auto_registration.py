"""`import mispo` is enough for transformers' Auto classes to load Step3p5 checkpoints, in any import order
with transformers and vLLM, and it imports neither (the CLI stays fast).

    import mispo
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(step3p5_dir)    # mispo's Step3p5ForCausalLM

Registering needs the model classes (torch, transformers), so it waits for transformers. `install()` puts
a `sys.meta_path` finder in front that wraps the loader of each `transformers.*` module and of vLLM's
Step3p5 config module, so that code runs right after the module executes. When
`transformers.models.auto.configuration_auto` is loaded and no watched module is still mid-import
(importing our model then would meet a half-initialised transformers), it imports `mispo.models.step3p5`,
which registers itself (`register_auto_classes`); when vLLM's config module is loaded later, that class is
mapped to mispo's models too. A module that was already loaded at `install()` counts at once. The finder
removes itself when both are done; modules keep their own loaders (`__loader__`, `__spec__.loader`).
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
import warnings

AUTO_CONFIG_MODULE = "transformers.models.auto.configuration_auto"
VLLM_CONFIG_MODULE = "vllm.transformers_utils.configs.step3p5"  # defines vLLM's own Step3p5Config
STEP3P5_PACKAGE = "mispo.models.step3p5"


class _Loader(importlib.abc.Loader):
    """The module's real loader, then `finder.loaded()`; every other attribute is the real loader's."""

    def __init__(self, loader, finder: "_AfterImport"):
        self.loader, self.finder = loader, finder

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        with self.finder.lock:
            self.finder.executing += 1
        try:
            self.loader.exec_module(module)
        finally:
            with self.finder.lock:
                self.finder.executing -= 1
        self.finder.loaded()

    def __getattr__(self, name: str):
        return getattr(self.loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Registers Step3p5 with transformers (and vLLM's config class) once the modules it needs are loaded."""

    def __init__(self):
        self.lock = threading.Lock()
        self.executing = 0  # watched modules mid-import, all threads
        self.registered = False  # mispo.models.step3p5 imported: it registers itself
        self.vllm_registered = False

    def watches(self, name: str) -> bool:
        if name == VLLM_CONFIG_MODULE:
            return not self.vllm_registered
        return not self.registered and (name == "transformers" or name.startswith("transformers."))

    def find_spec(self, fullname, path, target=None):
        if not self.watches(fullname):
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None) if finder is not self else None
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Loader(spec.loader, self)
        return spec

    def loaded(self) -> None:
        """Register what can be registered now; nothing while a watched module is still executing."""
        with self.lock:
            if self.executing:
                return
            main = not self.registered and AUTO_CONFIG_MODULE in sys.modules
            vllm = VLLM_CONFIG_MODULE in sys.modules and not self.vllm_registered and (self.registered or main)
            self.registered |= main
            self.vllm_registered |= vllm
            done = self.registered and self.vllm_registered
        try:
            if main or vllm:
                step3p5 = importlib.import_module(STEP3P5_PACKAGE)  # its import registers everything loaded
                if not main and hasattr(step3p5, "register_auto_classes"):  # (absent while it is mid-import,
                    step3p5.register_auto_classes()                        # and its own call comes after)
        except Exception as exc:  # a broken registration must not break the import of transformers itself
            warnings.warn(f"mispo: Step3p5 is not registered with transformers' Auto classes: {exc!r}",
                          stacklevel=2)
        if done and self in sys.meta_path:
            sys.meta_path.remove(self)


_finder: _AfterImport | None = None


def install() -> None:
    """Watch transformers' and vLLM's imports (see the module docstring); called by `import mispo`. Idempotent."""
    global _finder
    if _finder is None:
        _finder = _AfterImport()
        sys.meta_path.insert(0, _finder)
        _finder.loaded()
