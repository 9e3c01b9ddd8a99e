"""Document masking: a packed window's logits and loss equal those of its documents run one by one, and no
attention crosses a document boundary."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from framework.models import ModelConfig, build_model
from framework.models.document_mask import document_keep_mask, document_positions, segment_ids


def _model(family: str, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig.from_name({"decoder": "tiny", "encoder": "bert-tiny", "encoder_decoder": "t5-tiny"}[family])
    cfg = cfg.replace(vocab_size=96, dropout=0.0, **kw)
    return build_model(cfg).eval().double()


DOCS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15], [16, 17, 18, 19, 20]]  # lengths 4, 7, 5 -> T = 16


def _packed():
    ids = torch.tensor([t for d in DOCS for t in d])[None]  # (1, 16)
    starts = torch.zeros_like(ids, dtype=torch.bool)
    offset = 0
    for d in DOCS:
        starts[0, offset] = True
        offset += len(d)
    return ids, segment_ids(starts)


def test_segment_ids_and_positions():
    ids, doc = _packed()
    assert doc.tolist() == [[0] * 4 + [1] * 7 + [2] * 5]
    assert document_positions(doc).tolist() == [list(range(4)) + list(range(7)) + list(range(5))]
    starts = torch.tensor([[False, False, True, False, True, True]])  # a window that begins inside a document
    assert segment_ids(starts).tolist() == [[0, 0, 1, 1, 2, 3]]
    keep = document_keep_mask(segment_ids(starts))[0, 0]
    assert keep[1].tolist() == [True, True, False, False, False, False]
    assert keep[5].tolist() == [False] * 5 + [True]


def test_decoder_packed_loss_equals_sum_of_documents():
    model = _model("decoder")
    ids, doc = _packed()
    packed = model(ids, document_ids=doc)[0]  # (16, V)
    offset, total, parts = 0, 0.0, 0.0
    for d in DOCS:
        alone = model(torch.tensor([d]))[0]  # the document run by itself, positions from 0
        assert torch.allclose(packed[offset : offset + len(d)], alone, atol=1e-10)
        labels = torch.tensor(d[1:])  # next-token loss inside the document
        parts += F.cross_entropy(alone[:-1], labels, reduction="sum").item()
        total += F.cross_entropy(packed[offset : offset + len(d) - 1], labels, reduction="sum").item()
        offset += len(d)
    assert total == pytest.approx(parts, abs=1e-5)
    unmasked = model(ids)[0]
    assert not torch.allclose(unmasked[4:], packed[4:], atol=1e-3)  # without the mask, later documents differ


@pytest.mark.parametrize("family", ["encoder", "encoder_decoder"])
def test_encoders_are_block_diagonal(family):
    model = _model(family)
    ids, doc = _packed()
    if family == "encoder":
        packed = model(ids, document_ids=doc)[0]
        alone = [model(torch.tensor([d]))[0] for d in DOCS]
    else:
        packed = model.encode(ids, document_ids=doc)[0]
        alone = [model.encode(torch.tensor([d]))[0] for d in DOCS]
    assert torch.allclose(packed, torch.cat(alone), atol=1e-10)


def test_no_gradient_crosses_a_document_boundary():
    """Attention across a boundary is exactly zero: the loss on document 2 has no gradient w.r.t. document 1's
    embeddings."""
    model = _model("decoder")
    ids, doc = _packed()
    x = model.embed(ids).detach().requires_grad_(True)
    hook = model.embed.register_forward_hook(lambda module, args, out: x)  # feed the leaf embeddings in
    try:
        logits = model(ids, document_ids=doc)
    finally:
        hook.remove()
    logits[0, 4:11].sum().backward()  # the outputs of document 2 only
    assert x.grad[0, :4].abs().max().item() == 0.0 and x.grad[0, 11:].abs().max().item() == 0.0
    assert x.grad[0, 4:11].abs().max().item() > 0.0
