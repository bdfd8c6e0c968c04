"""Architecture registry: `adapter_for(model_type)`; adding an architecture is one file plus one line here."""

from moelite.core.checkpoint import CheckpointError
from moelite.core.arch.base import ArchAdapter, Routing
from moelite.core.arch.deepseek import DeepseekV2Adapter, DeepseekV3Adapter
from moelite.core.arch.mixtral import MixtralAdapter
from moelite.core.arch.olmoe import OlmoeAdapter
from moelite.core.arch.qwen_moe import Qwen2MoeAdapter, Qwen3MoeAdapter

ADAPTERS: dict[str, type[ArchAdapter]] = {
    t: cls
    for cls in (MixtralAdapter, Qwen2MoeAdapter, Qwen3MoeAdapter, OlmoeAdapter, DeepseekV2Adapter, DeepseekV3Adapter)
    for t in cls.model_types
}
SUPPORTED = tuple(sorted(ADAPTERS))


def adapter_for(model_type: str) -> ArchAdapter:
    try:
        return ADAPTERS[model_type]()
    except KeyError:
        raise CheckpointError(
            f"config.json: model_type {model_type!r} is not supported; supported architectures: {', '.join(SUPPORTED)}"
        ) from None


__all__ = ["ADAPTERS", "SUPPORTED", "ArchAdapter", "Routing", "adapter_for"]
