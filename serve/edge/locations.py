"""Where an item error is in the caller's own request.

A route scores one flat list of items built from its request (``pairs`` give two items each, ``groups`` one
per response, ``query`` and ``input`` one per text). An item error carries its flat ``index`` and the ``field``
inside the item (``rmserve.model.errors``); a *locator* turns those into the path the caller wrote, which
becomes the error's ``param`` (API.md, "Errors").

Example::

    in_pairs(3, "response")            # "pairs[1].response_b"
    in_groups([2, 4])(3, None)         # "groups[1].responses[1]"
    in_list("input", single=True)(0, "input_ids[5]")   # "input[5]"
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable

Locate = Callable[[int, "str | None"], str]


def in_items(index: int, field: str | None) -> str:
    """``/v1/score``: the items are the caller's own ``items``."""
    return f"items[{index}]" + (f".{field}" if field else "")


def in_pairs(index: int, field: str | None) -> str:
    """``/v1/preference``: items ``2k`` and ``2k + 1`` are pair ``k`` with ``response_a`` and ``response_b``."""
    pair, side = divmod(index, 2)
    if field and field.startswith("prompt"):
        return f"pairs[{pair}].{field}"
    return f"pairs[{pair}].response_{'ab'[side]}"


def in_judged_pairs(index: int, field: str | None) -> str:
    """``/v1/preference`` on a pairwise judge: item ``k`` is pair ``k`` (its prompt and both responses)."""
    return f"pairs[{index}]" + (f".{field}" if field else "")


def in_groups(sizes: list[int]) -> Locate:
    """``/v1/rerank``: each group gives one item per response, groups one after the other."""
    starts = [0, *itertools.accumulate(sizes)]

    def locate(index: int, field: str | None) -> str:
        group = bisect.bisect_right(starts, index) - 1
        if field and field.startswith("prompt"):
            return f"groups[{group}].{field}"
        return f"groups[{group}].responses[{index - starts[group]}]"

    return locate


def in_list(name: str, *, single: bool) -> Locate:
    """``/get_reward``'s ``query`` and ``/classify``'s ``input``: one text (or one token list) per item.

    ``single``: the caller sent one value, not a list of them (``"input": "text"`` or ``"input": [1, 2]``).
    Positions inside token ids follow: ``input[2][5]``.
    """

    def locate(index: int, field: str | None) -> str:
        base = name if single else f"{name}[{index}]"
        if not field or field == "text":
            return base
        if field.startswith("input_ids"):
            return base + field.removeprefix("input_ids")
        return f"{base}.{field}"

    return locate
