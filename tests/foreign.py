"""transformers and timm for the tests, offline, and timm without torchvision.

timm's package imports torchvision at start-up (data transforms, datasets, FrozenBatchNorm2d),
but torchvision cannot be installed beside the CPU torch build (PyPI's wheels need CUDA torch;
shared/reference/stack.md). `import_timm` imports timm with every torchvision module replaced
by an inert stand-in whose names can be bound but not used: constructing or calling any of them
raises, so a model that used torchvision would fail the test instead of passing it. After the
import the stand-ins leave `sys.modules` (a later `import torchvision` fails as before)."""

import importlib.abc
import importlib.machinery
import os
import sys
import types

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing is downloaded: models are built from configs
os.environ["TRANSFORMERS_OFFLINE"] = "1"


class TorchvisionUsed(RuntimeError):
    pass


class _Inert(type):
    """A torchvision name timm binds at import; using it is an error."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert(f"{cls.__name__}.{name}", (), {})

    def __call__(cls, *args, **kwargs):
        raise TorchvisionUsed(f"torchvision stand-in {cls.__name__} was used")


class _Module(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert(f"{self.__name__}.{name}", (), {})


class _StandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _Module(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def import_timm():
    if "timm" in sys.modules:
        return sys.modules["timm"]
    finder = _StandIns()
    sys.meta_path.insert(0, finder)
    try:
        import timm
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == "torchvision" or
                     n.startswith("torchvision.")]:
            del sys.modules[name]
    return timm


def import_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


class Lazy:
    """A module imported on first use (`Lazy(import_timm)`): collecting a test file, which every
    pytest worker does for every file, then costs nothing (timm pulls in torch._dynamo: ~3 s)."""

    def __init__(self, load):
        self._load, self._module = load, None

    def __getattr__(self, name):
        if name.startswith("_") or name.startswith("pytest"):  # pytest's collection looks
            raise AttributeError(name)
        if self._module is None:
            self._module = self._load()
        return getattr(self._module, name)
