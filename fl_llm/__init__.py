"""fl_llm: federated LoRA fine-tuning of one shared transformer across e-commerce platforms."""

__version__ = "0.1.0"
