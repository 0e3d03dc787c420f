"""Phone voice agent server package."""

__version__ = "0.1.0"
