"""mesh: one GGUF model split by layers across stage processes (pipeline parallelism)."""

__version__ = "0.1.0"
