"""Log-likelihood of a continuation given a context, for each model family the framework trains.

lm-evaluation-harness asks a model for ``log p(continuation | context)`` and whether the continuation is the greedy
(argmax) choice at every position (``framework.evaluation.harness`` turns its requests into token ids and calls
these functions). How that probability is read depends on the family:

- decoder: ``log p(continuation tokens | <eos> + context tokens)``, the <eos> standing for a document start, as in
  training; a context too long for the model keeps its end.
- encoder_decoder (span corruption): the encoder reads ``context + <extra_id_0> <eos>``, the decoder scores
  ``<extra_id_0> + continuation``, T5's span-infilling format; only the continuation tokens count.
- encoder (masked LM): pseudo-log-likelihood (Salazar et al. 2020, "Masked Language Model Scoring", eq. 2):
  each continuation token is masked in turn, with everything else visible, and its log-probability summed.

Scores are summed natural-log probabilities (nats), the harness's convention.
"""

from __future__ import annotations

import torch
from torch import nn

from framework.catalogue import family_spec

Request = tuple[list[int], list[int]]  # (context token ids, continuation token ids)
Score = tuple[float, bool]  # (summed log-probability in nats, every continuation token is the argmax)


def _check(requests: list[Request], limit: int, reserve: int) -> None:
    for _, continuation in requests:
        if not continuation:
            raise ValueError("every continuation must encode to at least one token.")
        if len(continuation) + reserve > limit:
            raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the model's "
                             f"max_seq_len={limit}; shorten the task's targets.")


def _pick(logits: torch.Tensor, targets: list[int]) -> Score:
    """Summed log-probability of ``targets`` under ``logits`` (n, V), and whether each is the argmax."""
    logprobs = logits.float().log_softmax(-1)
    ids = torch.tensor(targets, device=logits.device)
    return float(logprobs.gather(-1, ids[:, None]).sum()), bool((logprobs.argmax(-1) == ids).all())


@torch.no_grad()
def score_decoder(model: nn.Module, requests: list[Request], special: dict, batch_size: int = 16) -> list[Score]:
    """Batched: rows are ``<eos> + context + continuation``, right-padded (a causal model never sees the padding
    of its own row), longest first so a batch pads little."""
    limit = model.config.max_seq_len
    _check(requests, limit, 0)
    rows = []
    for context, continuation in requests:
        context = ([special["eos"]] + context)[-(limit + 1 - len(continuation)):]  # input = row[:-1] <= limit
        rows.append((context, continuation))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]) - len(rows[i][1]))
    device = next(model.parameters()).device
    scores: list[Score] = [(0.0, False)] * len(rows)
    for first in range(0, len(order), batch_size):
        batch = order[first:first + batch_size]
        tokens = [rows[i][0] + rows[i][1] for i in batch]
        width = max(len(t) for t in tokens)
        ids = torch.tensor([t + [special["pad"]] * (width - len(t)) for t in tokens], device=device)
        logits = model(ids[:, :-1])  # (b, width-1, V); position t predicts token t+1
        for row, i in enumerate(batch):
            context, continuation = rows[i]
            start = len(context) - 1
            scores[i] = _pick(logits[row, start:start + len(continuation)], continuation)
    return scores


@torch.no_grad()
def score_encoder_decoder(model: nn.Module, requests: list[Request], special: dict, batch_size: int = 1) -> list[Score]:
    """One request per forward pass (``batch_size`` is not used)."""
    limit = model.config.max_seq_len
    _check(requests, limit, 1)
    device = next(model.parameters()).device
    sentinel = special["sentinels"][0]
    scores = []
    for context, continuation in requests:
        encoder_ids = (context + [sentinel])[-(limit - 1):] + [special["eos"]]
        target = [sentinel] + continuation
        logits = model(torch.tensor([encoder_ids], device=device),
                       torch.tensor([[special["pad"]] + target[:-1]], device=device))  # (1, len(target), V)
        scores.append(_pick(logits[0, 1:], continuation))  # the continuation tokens, not the sentinel
    return scores


@torch.no_grad()
def score_encoder(model: nn.Module, requests: list[Request], special: dict, batch_size: int = 1) -> list[Score]:
    """One request per forward pass, a batch of its masked copies (``batch_size`` is not used)."""
    limit = model.config.max_seq_len
    _check(requests, limit, 0)
    device = next(model.parameters()).device
    scores = []
    for context, continuation in requests:
        row = (context + continuation)[-limit:]
        start = len(row) - len(continuation)
        n = len(continuation)
        ids = torch.tensor([row] * n, device=device)  # (n, T): row j masks continuation token j
        positions = torch.arange(n, device=device)
        ids[positions, start + positions] = special["mask"]
        logits = model(ids)[positions, start + positions]  # (n, V)
        scores.append(_pick(logits, continuation))
    return scores


def score_requests(model: nn.Module, family: str, requests: list[Request], special: dict,
                   batch_size: int = 16) -> list[Score]:
    """One (log-probability, is_greedy) per (context, continuation) pair, in the order given, by the scorer the
    family's registration names (``framework.models.registry``)."""
    from framework.models.registry import family as registration  # the registry imports this module

    return registration(family).score(model, requests, special, batch_size)


def rolling_requests(family: str, tokens: list[int], limit: int) -> list[Request]:
    """A whole text as disjoint windows for its total log-likelihood (perplexity tasks).

    decoder: windows of ``limit`` tokens, each conditioned on what precedes it (``score_decoder`` keeps the end of
    the context that fits, so window 1 sees <eos>, later ones the last token before them; the harness's
    ``get_rolling_token_windows`` with context_len=1). encoder and encoder_decoder: windows of ``limit - 1``
    tokens scored on their own (pseudo-log-likelihood, or the decoder's infilling of an empty prompt).
    The causal trait (``framework.catalogue.FAMILIES``) tells the two apart."""
    causal = family_spec(family).causal
    size = limit if causal else limit - 1
    return [(tokens[max(0, start - 1):start] if causal else [], tokens[start:start + size])
            for start in range(0, len(tokens), size)]
