"""The ``rmserve`` command line."""
