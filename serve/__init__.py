"""rmserve.serve."""
