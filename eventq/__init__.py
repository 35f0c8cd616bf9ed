"""eventq: a GPU job queue and orchestrator built as an event-sourced actor system."""

__version__ = "0.1.0"
