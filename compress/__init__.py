"""compress: turn a Llama-family model into verified edge artifacts."""

__version__ = "0.1.0"
