"""The scripts of datasets/ as modules, for the tests and benchmarks that drive them in-process.

datasets/ holds scripts, not a package: a package named `datasets` would shadow Hugging Face's.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

DATASETS = Path(__file__).resolve().parents[2] / "datasets"


@functools.cache
def load(name: str) -> ModuleType:
    """datasets/<name>.py, executed once per process and registered as module `name` (dataclasses need it)."""
    spec = importlib.util.spec_from_file_location(name, DATASETS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
