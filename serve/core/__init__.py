"""A replica's scoring core: tokenize, one batching queue priced by the engine, one forward thread (no Ray)."""
