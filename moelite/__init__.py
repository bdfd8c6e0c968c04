"""moelite: run Mixture-of-Experts LLMs with routed experts offloaded under a memory budget.

    import moelite
    engine = moelite.load("path/to/hf-moe-checkpoint", device="cpu", expert_budget="25%")  # default: "auto"
    print(engine.generate("ROMEO:", max_tokens=32).text)

The public names (`load`, `Engine`, `EngineConfig`, `Generation`, `CheckpointError`) are resolved on first use
(PEP 562), so that `import moelite.cli` (and `moelite --help`) does not import torch or transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = ["CheckpointError", "Engine", "EngineConfig", "Generation", "load", "__version__"]

#: public name -> the module that defines it
_PUBLIC = {"load": "moelite.engine", "Engine": "moelite.engine", "Generation": "moelite.engine",
           "EngineConfig": "moelite.config", "CheckpointError": "moelite.core.checkpoint"}


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'moelite' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # resolved once: later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
