"""SGLang's ``POST /v1/score`` body (vLLM's generative scores take the same fields) as a drop-in for judges: per item,
the next-token probability of each of ``label_token_ids`` at the end of ``query + item`` (``item + query`` with
``item_first``), under the whole vocabulary or, with ``apply_softmax``, softmax over just those labels; no decoding.

It shares ``/v1/score`` with rmserve's ``{items: [...]}`` body: ``accepts`` tells them apart by their fields. Each
item becomes a ``LabelsItem`` (the text or the ids joined, scored as already formatted: no chat template, the
tokenizer's BOS as it adds one), read by the judge's whole ``lm_head`` at its last token (``runner``), so the labels
are the request's own and a cached answer is keyed by them too (``LabelIds``). Served by judges (``verdict_tokens``
set: ``kind="judge"``); any other model answers 400 naming ``model``. Errors name the caller's field:
``label_token_ids[2]``, ``items[1]``, ``query[4]`` (a token id out of the vocabulary, by where it came from).

Example::

    call = label_scores_call(LabelScoresRequest(query="2+2=4? ", items=["Yes"], label_token_ids=[9, 7]), context)
"""

from __future__ import annotations

from rmserve.model.items import LabelsItem
from rmserve.serve.edge.compat_protocol import ClassifyUsage, LabelScoresRequest, LabelScoresResponse
from rmserve.serve.edge.locations import Locate
from rmserve.serve.edge.pipeline import Call, Context
from rmserve.serve.edge.protocol import ScoredItems


def is_label_scores(body: object) -> bool:
    """SGLang's body is told from rmserve's own ``/v1/score`` body (``items`` of objects) by its fields."""
    return isinstance(body, dict) and ("label_token_ids" in body or "query" in body)


def label_scores_call(request: LabelScoresRequest, _context: Context) -> Call:
    labels = tuple(request.label_token_ids)
    items = [LabelsItem(input=x, label_token_ids=labels, apply_softmax=request.apply_softmax) for x in request.joined()]
    return Call(items, in_label_scores(request), request.model)


def label_scores_response(_request: LabelScoresRequest, scored: ScoredItems, _call: Call) -> LabelScoresResponse:
    tokens = scored.input_tokens
    return LabelScoresResponse(
        scores=[list(probs) for probs in scored.rewards],  # type: ignore[call-overload]
        model=scored.model,
        usage=ClassifyUsage(prompt_tokens=tokens, total_tokens=tokens),
    )


def in_label_scores(request: LabelScoresRequest) -> Locate:
    """An item error in the caller's terms: a label id is the request's own (``label_token_ids[k]``); a token id at
    position ``p`` of the joined ids is the query's or the item's (``query[p]``, ``items[i][p']``); else the item."""
    single = isinstance(request.items, str)
    query_ids = len(request.query) if isinstance(request.query, list) else 0

    def locate(index: int, field: str | None) -> str:
        item = "items" if single else f"items[{index}]"
        if field and field.startswith("label_token_ids"):
            return field
        if field and field.startswith("input_ids["):
            position = int(field[len("input_ids[") : -1])
            item_ids = len(request.items[index]) if not single else 0
            in_query = position >= item_ids if request.item_first else position < query_ids
            if in_query:
                return f"query[{position - item_ids if request.item_first else position}]"
            return f"{item}[{position if request.item_first else position - query_ids}]"
        return item

    return locate
