"""uspx: User-Specific Path Extraction for Mixture-of-Experts LLMs."""

__version__ = "0.1.0"
