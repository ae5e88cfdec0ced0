"""The ``rmserve`` console script: the server's command line, or one clear line when only the client is installed.

``pip install rmserve`` is the light SDK (no torch, transformers or Ray); the commands need the server extra.
"""

from __future__ import annotations

import sys

# What `pip install 'rmserve[serve]'` adds that the commands import first.
SERVER_PACKAGES = frozenset({"torch", "transformers", "ray", "fastapi", "starlette", "uvicorn", "yaml", "safetensors",
                             "tokenizers", "accelerate", "bitsandbytes", "prometheus_client", "tqdm"})  # fmt: skip


def main() -> int:
    try:
        from rmserve.serve.cli.main import main as server_main
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing not in SERVER_PACKAGES:
            raise
        print(
            f"rmserve: error: the rmserve command needs the server, which is not installed (missing: {missing}); "
            "install it with: pip install 'rmserve[serve]'",
            file=sys.stderr,
        )
        return 1
    return server_main()


if __name__ == "__main__":
    sys.exit(main())
