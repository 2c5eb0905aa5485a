"""prospect: align language models with human and AI feedback on one engine."""

__version__ = "0.1.0"
