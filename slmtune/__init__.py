"""slmtune: fine-tune small language models on modest hardware, then serve them."""

__version__ = "0.1.0"
