"""gptforge: from raw text to a trained, served GPT."""
__version__ = "0.1.0"
