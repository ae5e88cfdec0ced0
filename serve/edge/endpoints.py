"""Every scoring endpoint, in one table: the native routes (API.md) and the trainers' drop-in routes.

Each row names its paths, its request and response bodies, and its two own steps (``native.py``, ``compat.py``);
the rest of a request's way is the same for all of them (``routes.py`` reads and validates the body,
``GatewayService.run`` scores the items). A new endpoint is a new row. Several rows may share a path: the body's
fields pick the row (``/v1/rerank`` takes rmserve's ``groups`` and the Cohere/Jina ``query`` + ``documents``;
``/v1/score`` rmserve's ``items`` and SGLang's ``query`` + ``items`` + ``label_token_ids`` for a judge).

Example::

    [e.name for e in ENDPOINTS if "/v1/rerank" in e.paths]    # ['rerank_documents', 'rerank']
"""

from __future__ import annotations

from rmserve.serve.edge import compat, label_scores, native
from rmserve.serve.edge.compat_protocol import (
    ClassifyRequest,
    ClassifyResponse,
    CohereRerankRequest,
    CohereRerankResponse,
    EmbeddingsRequest,
    EmbeddingsResponse,
    GetRewardRequest,
    GetRewardResponse,
    LabelScoresRequest,
    LabelScoresResponse,
    PoolingRequest,
    PoolingResponse,
    SlimeRewardRequest,
    SlimeRewardResponse,
)
from rmserve.serve.edge.pipeline import Endpoint
from rmserve.serve.edge.protocol import (
    PreferenceRequest,
    PreferenceResponse,
    RerankRequest,
    RerankResponse,
    ScoreRequest,
    ScoreResponse,
    StepsRequest,
    StepsResponse,
)

VLLM_INVALID_STATUS = 400  # vLLM and SGLang answer a malformed body with 400 (native routes: 422)

ENDPOINTS: tuple[Endpoint, ...] = (
    # -- native ----------------------------------------------------------------------------------------
    Endpoint(
        "label_scores",
        ("/v1/score",),
        LabelScoresRequest,
        LabelScoresResponse,
        "A judge's next-token probabilities of label token ids after query + item (SGLang's /v1/score body, vLLM's "
        "generative scores)",
        call=label_scores.label_scores_call,
        respond=label_scores.label_scores_response,
        accepts=label_scores.is_label_scores,
        invalid_status=VLLM_INVALID_STATUS,
        kind="judge",
    ),
    Endpoint(
        "score",
        ("/v1/score", "/score"),
        ScoreRequest,
        ScoreResponse,
        "Rewards for items (/score: the same route without the version prefix)",
        call=native.score_call,
        respond=native.score_response,
    ),
    Endpoint(
        "preference",
        ("/v1/preference",),
        PreferenceRequest,
        PreferenceResponse,
        "Which of two responses is preferred (Bradley–Terry)",
        call=native.preference_call,
        respond=native.preference_response,
    ),
    Endpoint(
        "rerank_documents",
        ("/v1/rerank", "/rerank", "/v2/rerank"),
        CohereRerankRequest,
        CohereRerankResponse,
        "Documents ranked by reward as the response to a query (Cohere/Jina shape, as vLLM serves it)",
        call=compat.cohere_rerank_call,
        respond=compat.cohere_rerank_response,
        accepts=compat.is_cohere_rerank,
        invalid_status=VLLM_INVALID_STATUS,
    ),
    Endpoint(
        "rerank",
        ("/v1/rerank",),
        RerankRequest,
        RerankResponse,
        "Best-of-n: responses of each group ranked by reward",
        call=native.rerank_call,
        respond=native.rerank_response,
    ),
    Endpoint(
        "steps",
        ("/v1/steps",),
        StepsRequest,
        StepsResponse,
        "Step rewards of a process reward model: one per step, and their aggregate",
        call=native.steps_call,
        respond=native.steps_response,
        kind="process",
    ),
    # -- trainers' protocols (compat.py) ---------------------------------------------------------------
    Endpoint(
        "get_reward",
        ("/get_reward", "/get_reward/{model:path}"),
        GetRewardRequest,
        GetRewardResponse,
        "OpenRLHF remote reward model (/get_reward/<model>: scored by the model or ensemble the path names)",
        call=compat.get_reward_call,
        respond=compat.get_reward_response,
        when_full="wait",
    ),
    Endpoint(
        "classify",
        ("/classify",),
        ClassifyRequest,
        ClassifyResponse,
        "vLLM-style classify (verl's reward loop with a vLLM backend)",
        call=compat.inputs_call,
        respond=compat.classify_response,
        invalid_status=VLLM_INVALID_STATUS,
        when_full="wait",
    ),
    Endpoint(
        "embeddings",
        ("/v1/embeddings",),
        EmbeddingsRequest,
        EmbeddingsResponse,
        "SGLang-style reward embeddings, the reward last (verl's reward loop with an SGLang backend)",
        call=compat.inputs_call,
        respond=compat.embeddings_response,
        invalid_status=VLLM_INVALID_STATUS,
        when_full="wait",
    ),
    Endpoint(
        "pooling",
        ("/pooling",),
        PoolingRequest,
        PoolingResponse,
        "vLLM's process reward model route (STEP pooling): per step separator in each text, the head's probabilities",
        call=compat.pooling_call,
        respond=compat.pooling_response,
        invalid_status=VLLM_INVALID_STATUS,
        when_full="wait",
        kind="process",
    ),
    Endpoint(
        "slime",
        ("/slime/reward",),
        SlimeRewardRequest,
        SlimeRewardResponse,
        "slime remote reward model: one sample, the reward under 'reward' (?templated=true: the prompt is "
        "already chat-templated text)",
        call=compat.slime_call,
        respond=compat.slime_response,
        when_full="wait",
    ),
)


def endpoints_by_path() -> dict[str, list[Endpoint]]:
    """Each path and the rows that answer it, in table order (the first whose ``accepts`` takes a body answers)."""
    paths: dict[str, list[Endpoint]] = {}
    for endpoint in ENDPOINTS:
        for path in endpoint.paths:
            paths.setdefault(path, []).append(endpoint)
    return paths
