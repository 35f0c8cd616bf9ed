"""The ``eventq`` command line."""
