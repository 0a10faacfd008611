"""avatar: the user-facing surface (pipelines, CLI, video and audio I/O)."""

__version__ = "0.1.0"
