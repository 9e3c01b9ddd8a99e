"""Document masking: a packed window's logits and loss equal those of its documents run one by one, and no
attention crosses a document boundary."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from framework.models import ModelConfig, build_model
from framework.data.collators import segment_ids
from framework.models.document_mask import document_keep_mask, document_positions


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


def test_clm_objective_packed_loss_equals_documents_run_one_by_one():
    """Through CLMDocumentCollator and compute_loss: each document is run alone after a leading <eos> (the one
    that ends the previous document), and the summed losses agree to 1e-5."""
    from framework.data.collators import CLMDocumentCollator
    from framework.objectives.clm import next_token_loss

    model = _model("decoder")
    eos = 2
    window = torch.tensor([[5, 6, 7, eos, 8, 9, 10, 11, eos, 12, 13]])  # a tail, a whole document, a head
    batch = CLMDocumentCollator(eos)(window)
    assert batch["document_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1, 2, 2]]
    logits = model(window[:, :-1], document_ids=batch["document_ids"])
    packed = next_token_loss(logits, window[:, 1:]).item() * 10  # summed over the 10 predictions
    alone = 0.0
    for inputs, labels in [([5, 6, 7], [6, 7, eos]), ([eos, 8, 9, 10, 11], [8, 9, 10, 11, eos]), ([eos, 12], [12, 13])]:
        out = model(torch.tensor([inputs]))
        alone += next_token_loss(out, torch.tensor([labels])).item() * len(labels)
    assert packed == pytest.approx(alone, abs=1e-5)


def test_span_corruption_sentinels_take_their_span_document():
    from framework.data.collators import span_input_segments

    segments = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2]])
    noise = torch.tensor([[False, True, True, True, False, False, True, False]])  # spans at 1..3 and 6
    # inputs: t0, <s0> (span from 1: doc 0), t4, t5, <s1> (span at 6: doc 1), t7, <eos> (last: doc 2)
    assert span_input_segments(segments, noise).tolist() == [[0, 0, 1, 1, 1, 2, 2]]


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["clm", "mlm", "span_corruption"])
def test_training_with_document_mask_runs(compose, tmp_path, objective):
    from framework.config import to_run_config
    from framework.run import build_run

    cfg = to_run_config(compose([f"objective={objective}", "data.document_mask=true", "trainer.max_steps=2",
                                 "callbacks.throughput=false"]
                                + ([] if objective == "clm" else ["model=" + {"mlm": "bert-tiny",
                                                                              "span_corruption": "t5-tiny"}[objective]])))
    trainer, module, dm, _ = build_run(cfg, tmp_path)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert "document_ids" in batch and int(batch["document_ids"].max()) > 0  # several documents per window
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
