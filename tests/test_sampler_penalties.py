"""The sampler's batched logit edits (logit_bias, repetition / frequency / presence penalties,
min_tokens) against the per-row form they replaced, bitwise, on random batches: every kind
alone and mixed, duplicate tokens, tokens past the vocabulary, grammar rows under min_tokens."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from engine.core.sampling_params import SamplingParams
from engine.model_executor.sampler import Sampler

VOCAB = 97


def per_row(logits, reqs, vocab):
    """The per-row form (one bincount / mask / host sync per row), kept as the oracle."""
    for i, req in enumerate(reqs):
        params = req.sampling_params
        if params.logit_bias:
            ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
            logits[i].index_add_(0, ids, torch.tensor(list(params.logit_bias.values()),
                                                     dtype=logits.dtype))
        row = logits[i]
        if params.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(req.token_ids)))
            seen = seen[seen < vocab]
            vals = row[seen]
            p = params.repetition_penalty
            row[seen] = torch.where(vals > 0, vals / p, vals * p)
        if params.presence_penalty or params.frequency_penalty:
            out = torch.tensor(req.output_token_ids, dtype=torch.long)
            counts = torch.bincount(out, minlength=vocab)[:vocab].to(row.dtype)
            row = row - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)
        logits[i] = row
        if req.num_output_tokens < params.min_tokens:
            banned = [t for t in (*req.eos_token_ids, *params.stop_token_ids) if t < vocab]
            row = logits[i].index_fill(0, torch.tensor(banned, dtype=torch.long), float("-inf"))
            if req.grammar is None or torch.isfinite(row).any():
                logits[i] = row
    return logits


def random_request(rng: random.Random):
    kw = {}
    if rng.random() < 0.4:
        kw["logit_bias"] = {rng.randrange(VOCAB): rng.uniform(-5, 5) for _ in range(3)}
    if rng.random() < 0.5:
        kw["repetition_penalty"] = rng.choice([0.7, 1.3, 2.0])
    if rng.random() < 0.5:
        kw["frequency_penalty"] = rng.uniform(-2, 2)
    if rng.random() < 0.5:
        kw["presence_penalty"] = rng.uniform(-2, 2)
    if rng.random() < 0.4:
        kw["min_tokens"] = 50
        kw["stop_token_ids"] = [rng.randrange(VOCAB), VOCAB + 3]  # one past the vocabulary
    params = SamplingParams(temperature=0.0, max_tokens=100, **kw)
    prompt = [rng.randrange(VOCAB + 5) for _ in range(rng.randint(1, 30))]
    output = [rng.randrange(8) for _ in range(rng.randint(0, 20))]  # many repeats
    return SimpleNamespace(sampling_params=params, token_ids=prompt + output,
                           output_token_ids=output, num_output_tokens=len(output),
                           eos_token_ids=[rng.randrange(VOCAB)], grammar=None)


@pytest.mark.parametrize("seed", range(12))
def test_batched_edits_equal_the_per_row_form(seed):
    rng = random.Random(seed)
    reqs = [random_request(rng) for _ in range(rng.randint(1, 9))]
    logits = torch.randn(len(reqs), VOCAB, generator=torch.Generator().manual_seed(seed)) * 4
    want = per_row(logits.clone(), reqs, VOCAB)
    got = Sampler(VOCAB)._apply_penalties(logits.clone(), reqs)
    assert torch.equal(got, want)


def test_min_tokens_never_leaves_a_grammar_row_without_a_token():
    rng = random.Random(0)
    a, b = random_request(rng), random_request(rng)
    for req in (a, b):
        req.sampling_params = SamplingParams(temperature=0.0, max_tokens=100, min_tokens=10)
        req.num_output_tokens = 0
        req.eos_token_ids = [5]
    a.grammar = object()  # the grammar allows only the end: banning it would leave nothing
    logits = torch.full((2, VOCAB), float("-inf"))
    logits[:, 5] = 1.0
    got = Sampler(VOCAB)._apply_penalties(logits.clone(), [a, b])
    assert got[0, 5] == 1.0                 # grammar row: the ban is not applied
    assert torch.isinf(got[1]).all()        # plain row: banned like any other
    assert torch.equal(got, per_row(logits.clone(), [a, b], VOCAB))
