"""Reading checkpoints and adapters strictly: safetensors headers, sharded indexes, legacy
``.bin`` files and PEFT adapter directories."""

from ia3tools.formats.adapter import Adapter, AdapterConfig, read_adapter
from ia3tools.formats.checkpoint import Checkpoint, TensorRef, open_checkpoint
from ia3tools.formats.safetensors import SafetensorsFile, TensorInfo, read_header

__all__ = [
    "Adapter",
    "AdapterConfig",
    "Checkpoint",
    "SafetensorsFile",
    "TensorInfo",
    "TensorRef",
    "open_checkpoint",
    "read_adapter",
    "read_header",
]
