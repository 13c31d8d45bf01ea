"""duplex: a full-duplex speech dialogue server (Mimi codec + Moshi LM)."""

__version__ = "0.1.0"
