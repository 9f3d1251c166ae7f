"""ia3tools: inspect, check and merge PEFT IA3 adapters offline, on saved checkpoints."""

__version__ = "0.1.0"
