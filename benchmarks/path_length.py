"""How many distinct rmserve functions one ``POST /v1/score`` of one item enters, from the route to the reward head.

The in-process runtime's app (``rmserve serve --runtime inprocess``) serves the request through an ASGI transport in
this process; a profile hook on every thread (the event loop, the tokenizer thread, the forward thread) records each
rmserve function entered while the request is in flight. Functions of ``benchmarks/`` and the app's start-up are not
counted. The list it prints is the path of one request, in the order first entered. Comprehensions and generator
expressions are listed but counted apart from functions: they are expressions inside a function, not hops of the
path (Python 3.11 runs each as a code object of its own; Python 3.12 inlines list, dict and set comprehensions into
their function, PEP 709).

    python -m rmserve.benchmarks.path_length            # the demo model, fp32
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COUNTED = tuple(str(ROOT / part) for part in ("serve", "model"))
ITEM = {"prompt": "Tell me about owls.", "response": "Gladly! Owls have a long history."}


class FunctionTrail:
    """Distinct rmserve functions entered while ``armed``, in first-entered order."""

    def __init__(self) -> None:
        self.armed = False
        self.entered: dict[tuple[str, str], None] = {}

    def __call__(self, frame, event, _arg):  # sys.setprofile / threading.setprofile hook
        if self.armed and event == "call":
            code = frame.f_code
            if code.co_filename.startswith(COUNTED):
                where = str(Path(code.co_filename).relative_to(ROOT))
                self.entered.setdefault((where, code.co_qualname), None)


def function_path(model: str = "demo", dtype: str = "fp32") -> list[tuple[str, str]]:
    """The (file, function) pairs one single-item ``/v1/score`` request enters, after a warm-up request."""
    import httpx

    from rmserve.serve.config.loading import load_config
    from rmserve.serve.inprocess.server import build_inprocess_app

    trail = FunctionTrail()
    threading.setprofile(trail)  # threads the app starts (tokenizer, forward) carry the hook
    sys.setprofile(trail)
    try:
        app = build_inprocess_app(load_config(overrides={"model": {"path": model, "dtype": dtype}}))

        async def send(item: dict) -> None:
            transport = httpx.ASGITransport(app=app.http)
            async with httpx.AsyncClient(transport=transport, base_url="http://rmserve") as client:
                response = await client.post("/v1/score", json={"items": [item]})
                response.raise_for_status()

        async def measure() -> None:
            await send({"text": "warm-up: the first request fills lazy caches"})
            trail.armed = True
            await send(ITEM)
            trail.armed = False

        asyncio.run(measure())
        app.close()
    finally:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]
    return list(trail.entered)


COMPREHENSIONS = ("<listcomp>", "<genexpr>", "<dictcomp>", "<setcomp>")


def is_comprehension(qualname: str) -> bool:
    return qualname.rsplit(".", 1)[-1] in COMPREHENSIONS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--dtype", default="fp32")
    args = parser.parse_args(argv)
    path = function_path(args.model, args.dtype)
    for k, (where, name) in enumerate(path, 1):
        print(f"{k:3d}  {where}:{name}")
    functions = sum(not is_comprehension(name) for _, name in path)
    print(
        f"{functions} distinct rmserve functions for one /v1/score item (in-process runtime); "
        f"{len(path)} code objects with the {len(path) - functions} comprehensions and generator expressions"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
