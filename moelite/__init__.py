"""moelite: run Mixture-of-Experts LLMs with routed experts offloaded under a memory budget.

    import moelite
    engine = moelite.load("path/to/hf-moe-checkpoint", device="cpu", expert_budget="25%")
    print(engine.generate("ROMEO:", max_tokens=32).text)
"""

from moelite.core.checkpoint import CheckpointError
from moelite.config import EngineConfig
from moelite.engine import Engine, Generation, load

__version__ = "0.1.0"
__all__ = ["CheckpointError", "Engine", "EngineConfig", "Generation", "load", "__version__"]
