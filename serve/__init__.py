"""rmserve.serve — the Ray Serve application: a FastAPI Gateway in front of batching Scorer replicas.

Example::

    from ray import serve
    from rmserve.serve import ServerConfig, build_app

    serve.run(build_app(ServerConfig(model={"path": "demo"})), name="rmserve", route_prefix="/")
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "build_app": "app",
    "app_builder": "app",
    "ServerConfig": "config.settings",
    "load_config": "config.loading",
    "ConfigError": "config.loading",
    "Scorer": "rayserve.scorer",
    "Gateway": "rayserve.gateway",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:  # lazy, so `import rmserve.serve.config.settings` does not start importing Ray
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rmserve.serve' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
