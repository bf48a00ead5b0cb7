"""SmooSeg's losses against formulas written from the spec (successors/smooseg.md §2–§3), on
fixed small inputs, and the quirks: which tensor is detached, where dropout acts, the EMA."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from stegoscope.heads.base import HeadRun, TokenBatch
from stegoscope.heads.smooseg import SmooSegParams, SmooSegTrainer
from stegoscope.ops.ema import ema_update
from stegoscope.ops.smoothness_loss import data_loss, prototype_scores, smoothness_term


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _smoothness_reference(fa, fb, pa, pb, shift, pointwise):
    """Loops over every (image, anchor, partner) of maps (B, C, h, w), straight from §3."""
    b, _, h, w = fa.shape
    positions = list(itertools.product(range(h), range(w)))
    fd = np.zeros((b, h * w, h * w))
    cd = np.zeros((b, h * w, h * w))
    for n in range(b):
        for i, (y1, x1) in enumerate(positions):
            for j, (y2, x2) in enumerate(positions):
                fd[n, i, j] = _unit(fa[n, :, y1, x1]) @ _unit(fb[n, :, y2, x2])
                cd[n, i, j] = 1 - _unit(pa[n, :, y1, x1]) @ _unit(pb[n, :, y2, x2])
    if pointwise:
        fd = fd - fd.mean(axis=2, keepdims=True) + fd.mean()
    return ((fd - shift) * cd).mean()


def test_smoothness_term_matches_the_dense_formula():
    g = torch.Generator().manual_seed(0)
    fa, fb = torch.randn(2, 5, 2, 3, generator=g), torch.randn(2, 5, 2, 3, generator=g)
    pa, pb = torch.rand(2, 4, 2, 3, generator=g), torch.rand(2, 4, 2, 3, generator=g)
    for pointwise in (True, False):
        loss, _ = smoothness_term(fa, fb, pa, pb, shift=0.3, pointwise=pointwise)
        expected = _smoothness_reference(fa.numpy(), fb.numpy(), pa.numpy(), pb.numpy(), 0.3, pointwise)
        assert abs(loss.item() - expected) < 1e-5
    # no zero clamp: a negative (F − b) · (1 − A) counts (all pairs below the shift here)
    loss, _ = smoothness_term(fa, fb, pa, pb, shift=5.0, pointwise=False)
    assert loss.item() < 0


def test_smoothness_trains_the_assignments_not_the_features():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 6, 3, 3, generator=g, requires_grad=True)
    assign = torch.rand(2, 4, 3, 3, generator=g, requires_grad=True)
    loss, _ = smoothness_term(feats, feats, assign, assign, 0.1)
    loss.backward()
    assert feats.grad is None and assign.grad is not None and assign.grad.abs().sum() > 0


def test_prototype_scores_detach_the_code_for_the_student_and_the_teacher_for_the_code():
    g = torch.Generator().manual_seed(2)
    code = torch.randn(1, 3, 2, 2, generator=g, requires_grad=True)
    student = torch.randn(4, 3, generator=g, requires_grad=True)
    teacher = torch.randn(4, 3, generator=g, requires_grad=True)
    s_student, s_teacher = prototype_scores(code, student, teacher)
    # cosines by hand at one position
    v = code[0, :, 1, 0].detach().numpy()
    assert abs(s_student[0, 2, 1, 0].item() - _unit(v) @ _unit(student[2].detach().numpy())) < 1e-6
    assert abs(s_teacher[0, 3, 1, 0].item() - _unit(v) @ _unit(teacher[3].detach().numpy())) < 1e-6
    s_student.sum().backward(retain_graph=True)
    assert code.grad is None and student.grad is not None
    s_teacher.sum().backward()
    assert code.grad is not None and teacher.grad is None


def test_data_loss_is_untempered_cross_entropy_against_the_teacher_argmax():
    s_student = torch.tensor([[0.2, -0.5, 0.9], [0.1, 0.4, -0.3]]).T.reshape(1, 3, 1, 2)
    s_teacher = torch.tensor([[0.0, 0.8, 0.1], [0.7, 0.2, 0.1]]).T.reshape(1, 3, 1, 2)  # argmax 1, then 0
    ce = lambda logits, k: -np.log(np.exp(logits[k]) / np.exp(logits).sum())  # noqa: E731
    expected = (ce(np.array([0.2, -0.5, 0.9]), 1) + ce(np.array([0.1, 0.4, -0.3]), 0)) / 2
    assert abs(data_loss(s_student, s_teacher).item() - expected) < 1e-6


def test_ema_moves_the_teacher_by_one_minus_alpha():
    teacher, student = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    ema_update(teacher, student, 0.998)
    assert torch.allclose(teacher, torch.tensor([[0.998, 0.004]]))


def _trainer(**params):
    return SmooSegTrainer(SmooSegParams(**params), HeadRun(n_classes=3, dim=4), channels=6)


def test_one_step_trains_the_projector_by_smoothness_and_the_student_by_the_data_loss():
    trainer = _trainer(dropout=0.0)
    head = trainer.make_head()
    torch.manual_seed(0)
    feats = torch.randn(3, 6, 4, 4)
    batch = TokenBatch(np.arange(3), feats, torch.zeros(3, 8, 8, dtype=torch.long), None)
    _, loss, logged = trainer.loss(head, batch, torch.Generator().manual_seed(0))
    assert abs(loss.item() - (logged["loss/intra"] + logged["loss/inter"] + logged["loss/data"]).item()) < 1e-6
    logged["loss/data"].backward(retain_graph=True)
    assert all(p.grad is None for p in head.projector.parameters()) and head.student.grad.abs().sum() > 0
    head.zero_grad()
    (logged["loss/intra"] + logged["loss/inter"]).backward()
    assert head.student.grad is None or head.student.grad.abs().sum() == 0
    assert sum(p.grad.abs().sum() for p in head.projector.parameters()) > 0
    # the teacher starts as the (unit-row) student and follows it only through after_step
    assert torch.allclose(head.teacher, head.student.detach()) and torch.allclose(head.teacher.norm(dim=1), torch.ones(3))
    with torch.no_grad():
        head.student.add_(1.0)
    before = head.teacher.clone()
    trainer.after_step(head, 1)
    assert torch.allclose(head.teacher, 0.998 * before + 0.002 * head.student.detach())
    # the cluster assignment evaluation uses is the teacher's, by cosine
    clusters = trainer.clusters(head)
    assert clusters.metric == "cosine" and torch.equal(clusters.clusters, head.teacher)


def test_three_independent_dropout_draws_per_step():
    """The signal features and the two projector branches each see their own channel-dropout draw."""
    trainer = _trainer(dropout=0.5)
    head = trainer.make_head().train()
    outputs = []
    head.projector.dropout.register_forward_hook(lambda module, args, out: outputs.append(out[:, :, 0, 0].clone()))
    torch.manual_seed(3)
    batch = TokenBatch(np.arange(2), torch.ones(2, 6, 2, 2), torch.zeros(2, 4, 4, dtype=torch.long), None)
    trainer.loss(head, batch, torch.Generator().manual_seed(0))
    assert len(outputs) == 3  # signal, linear branch, nonlinear branch
    assert len({tuple(o.flatten().tolist()) for o in outputs}) == 3  # three different masks (seeded)
    assert all(set(o.flatten().tolist()) <= {0.0, 2.0} for o in outputs)  # whole channels, survivors × 1/(1 − p)
