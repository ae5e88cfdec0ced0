"""``ServerConfig``, how it is loaded (YAML, ``RMSERVE_*``, flags), the served models, resources."""
