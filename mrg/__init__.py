"""mrg: MRG-LLM chest X-ray report generation with instance-level prompt customization."""

__version__ = "0.1.0"
