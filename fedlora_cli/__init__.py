"""fedlora: federated fine-tuning of Hugging Face models with LoRA-family adapters.

The package is importable without torch: heavy libraries are imported inside the functions that need them,
so that ``fedlora --help`` starts fast.
"""

__version__ = "0.1.0"
