"""The SDK's version (also read by setuptools for the distribution)."""
__version__ = "0.1.0"
