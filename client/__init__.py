"""rmserve.client."""
