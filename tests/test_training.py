"""Training through rewritten attention: tiny HF models in train mode under the pass.

The other dropouts are 0 so eager is deterministic; attention dropout is 0 or 0.2. With 0.2 the
rewritten sites drop probabilities inside the kernels, from draws eager cannot make, so eager
runs with its attention dropout replaced by the kernels' own mask (``_kernel_mask_dropout``):
the same keep decisions, drawn in the same order from the same seed. Losses and every gradient
must then agree exactly as without dropout. The rewritten sites run the Triton forward and
backward kernels (the interpreter on CPU). Right padding, so no query row is masked everywhere
(such rows take the chunked backward; see test_backward).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

import sdpa_pass
from sdpa_pass.kernels.dropout import draw_seed, dropout_mask
from test_hf_models import CASES, PAD, SEQ, VOCAB

# fp32 on both sides; the losses and gradients must agree to fp32 accumulation-order noise
LOSS_TOL, GRAD_REL_TOL = 1e-5, 1e-4


def _train_model(case, attention_p):
    torch.manual_seed(0)
    model = case.make_model()
    for name in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop",
                 "hidden_dropout_prob", "attention_probs_dropout_prob"):
        if hasattr(model.config, name):
            setattr(model.config, name, attention_p if name in ("attention_dropout", "attn_pdrop") else 0.0)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = attention_p if name.endswith("attn_dropout") else 0.0
        if hasattr(m, "attention_dropout") and isinstance(m.attention_dropout, float):
            m.attention_dropout = attention_p
    return model.train()


@contextlib.contextmanager
def _kernel_mask_dropout():
    """Eager's dropout on attention probabilities (rank 4, p > 0, training) replaced by the
    kernels' mask: one seed drawn per call from the default generator, as a rewritten site
    draws it."""
    original = F.dropout

    def dropout(x, p=0.5, training=True, inplace=False):
        if not (training and p > 0 and x.dim() == 4):
            return original(x, p, training, inplace)
        B, H, L, S = x.shape
        keep = dropout_mask(draw_seed(x.device), B, H, L, S, p)
        return x * keep.to(x.device) / (1.0 - p)

    F.dropout = dropout
    try:
        yield
    finally:
        F.dropout = original


def _batch():
    input_ids = torch.randint(3, VOCAB, (2, SEQ))
    attention_mask = torch.ones(2, SEQ, dtype=torch.long)
    attention_mask[1, SEQ - PAD:] = 0
    return input_ids, attention_mask


def _loss(model, input_ids, attention_mask, output):
    out = model(input_ids, attention_mask=attention_mask)
    return getattr(out, output).float().square().mean()


@pytest.mark.parametrize("attention_p", [0.0, 0.2])
@pytest.mark.parametrize("case", [c for c in CASES if c.name.startswith(("llama", "gpt2"))],
                         ids=lambda c: c.name)
def test_loss_and_every_gradient_match_eager(case, attention_p):
    eager = _train_model(case, attention_p)
    model = copy.deepcopy(eager)
    input_ids, attention_mask = _batch()
    torch._dynamo.reset()
    report = sdpa_pass.explain(copy.deepcopy(model), input_ids, attention_mask=attention_mask)
    assert report.num_rewritten == 2, str(report)
    assert [site.dropout for site in report.sites] == [attention_p] * 2, str(report)

    compiled = torch.compile(model, backend="sdpa_pass", options={"backend": "aot_eager"})
    optim_eager = torch.optim.SGD(eager.parameters(), lr=0.5)
    optim = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(3):
        torch.manual_seed(100 + step)
        with _kernel_mask_dropout():
            loss_eager = _loss(eager, input_ids, attention_mask, case.output)
        torch.manual_seed(100 + step)
        loss = _loss(compiled, input_ids, attention_mask, case.output)
        torch.testing.assert_close(loss, loss_eager, atol=LOSS_TOL, rtol=LOSS_TOL)
        loss_eager.backward()
        loss.backward()
        if step == 0:
            for (name, p), p_eager in zip(model.named_parameters(), eager.parameters()):
                if p_eager.grad is None:
                    assert p.grad is None, name
                    continue
                err = (p.grad - p_eager.grad).norm() / p_eager.grad.norm().clamp_min(1e-12)
                assert err <= GRAD_REL_TOL, f"grad of {name}: relative error {err:.2e}"
        for opt in (optim_eager, optim):
            opt.step()
            opt.zero_grad()
    torch._dynamo.reset()


def test_training_under_inductor_with_transposed_kv():
    """The default inner backend. HF's K/V reach the op as transposed views; the backward op's
    gradients must have the strides its fake declares, which Inductor checks (a mismatch was
    an AssertionError in Inductor's stride check before the op made them contiguous)."""
    case = next(c for c in CASES if c.name.startswith("llama"))
    eager = _train_model(case, 0.0)
    model = copy.deepcopy(eager)
    input_ids, attention_mask = _batch()
    torch._dynamo.reset()
    compiled = sdpa_pass.optimize(model)
    loss_eager = _loss(eager, input_ids, attention_mask, case.output)
    loss = _loss(compiled, input_ids, attention_mask, case.output)
    torch.testing.assert_close(loss, loss_eager, atol=LOSS_TOL, rtol=LOSS_TOL)
    loss_eager.backward()
    loss.backward()
    for (name, p), p_eager in zip(model.named_parameters(), eager.parameters()):
        if p_eager.grad is not None:
            err = (p.grad - p_eager.grad).norm() / p_eager.grad.norm().clamp_min(1e-12)
            assert err <= GRAD_REL_TOL, f"grad of {name}: relative error {err:.2e}"
    torch._dynamo.reset()
