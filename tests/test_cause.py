"""CAUSE's heads and trainer (``heads/cause.py``) against the spec (``successors/cause.md``): the
heads' forward passes against plain references and the published parameter counts, the quirks
(EMA aliasing, the teacher's dropout, the label leak on and off) and the clusterbook's stage."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stegoscope.heads.base import HeadJob, HeadMember, HeadRun
from stegoscope.heads.cause import CauseModel, CauseParams, CauseTrainer, MLPHead, TRHead
from stegoscope.training import SharedBatch


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("channels, expected", [(768, 729_012), (384, 217_140)])
def test_the_mlp_head_has_the_published_parameter_count(channels, expected):
    assert n_params(MLPHead(channels, 90)) == expected  # spec §2.2


@pytest.mark.parametrize("channels, queries, expected", [(768, 1600, 9_835_700), (768, 529, 9_013_172), (384, 1600, 3_591_860)])
def test_the_tr_head_has_the_published_parameter_count(channels, queries, expected):
    assert n_params(TRHead(channels, 90, 2048, queries)) == expected  # spec §2.3


def test_the_mlp_head_is_two_branches_on_independently_dropped_inputs():
    torch.manual_seed(0)
    head = MLPHead(5, 3)
    x = torch.randn(2, 5, 3, 4)
    m1, m2 = (torch.rand(2, 5, 3, 4) > 0.5).float() / 0.5, (torch.rand(2, 5, 3, 4) > 0.5).float() / 0.5
    w1, b1 = head.f1.weight[:, :, 0, 0], head.f1.bias
    wa, ba = head.f2[0].weight[:, :, 0, 0], head.f2[0].bias
    wb, bb = head.f2[2].weight[:, :, 0, 0], head.f2[2].bias
    a, b = (x * m1).permute(0, 2, 3, 1), (x * m2).permute(0, 2, 3, 1)
    expected = a @ w1.T + b1 + torch.relu(b @ wa.T + ba) @ wb.T + bb
    assert torch.allclose(head(x, (m1, m2)), expected.permute(0, 3, 1, 2), atol=1e-6)


def test_the_tr_head_is_a_decoder_layer_with_positions_on_the_queries_and_a_residual_to_the_tokens():
    """Against torch's own MultiheadAttention (sequence-first, as the original) with our weights, eval mode."""
    torch.manual_seed(0)
    c, h, w = 6, 2, 3
    head = TRHead(c, 4, 10, h * w).eval()
    nn.init.normal_(head.query_pos)
    x, queries = torch.randn(2, c, h, w), torch.randn(2, h * w, c)

    def mha(ours):
        ref = nn.MultiheadAttention(c, 1)
        ref.in_proj_weight.data, ref.in_proj_bias.data = ours.in_proj_weight.data, ours.in_proj_bias.data
        ref.out_proj.weight.data, ref.out_proj.bias.data = ours.out_proj.weight.data, ours.out_proj.bias.data
        return ref.eval()

    sa, ca = mha(head.self_attn), mha(head.cross_attn)
    t, m, pos = queries.transpose(0, 1), x.flatten(2).permute(2, 0, 1), head.query_pos[:, None]  # (N, B, C)
    t = head.norm1(t + sa(t + pos, t + pos, t)[0])
    t = head.norm2(t + ca(t + pos, m, m)[0])
    t = head.norm3(t + head.linear2(F.relu(head.linear1(t))))
    expected = head.out((m + t).permute(1, 2, 0).reshape(2, c, h, w))
    assert torch.allclose(head(x, queries), expected, atol=1e-5)
    calls = []
    head(x, queries, drop=lambda v: calls.append(v.shape) or v)
    assert len(calls) == 6  # 2 attention weights, 3 residual branches, the FFN's hidden: with the 2 external masks, spec §2.3's 8
    with pytest.raises(ValueError, match="trained on 6 tokens"):
        head(torch.randn(1, c, 3, 3), torch.randn(1, 9, c))


def test_a_tr_head_rebuilt_from_its_state_takes_its_grid_from_the_state():
    head = TRHead(4, 3, 8, 12)
    rebuilt = TRHead(4, 3, 8)
    rebuilt.load_state_dict(head.state_dict())
    assert rebuilt.query_pos.shape == (12, 4) and torch.equal(rebuilt.query_pos, head.query_pos)


class _Batches:
    """Train batches of fixed tokens and labels, as TokenBatches gives them."""

    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor):
        self.tokens, self.labels, self.device = tokens, labels, torch.device("cpu")

    def __len__(self) -> int:
        return len(self.tokens)

    def __call__(self, rows):
        rows = torch.as_tensor(np.asarray(rows))
        return self.tokens[rows], self.labels[rows]


def member_of(variant: str, **params) -> tuple[HeadMember, _Batches]:
    torch.manual_seed(0)
    settings = dict(variant=variant, steps=2, probe_steps=2, batch_size=4, clusters=6, projection_dim=8, hidden=8, window=2,
                    grad_clip=100.0) | params
    trainer = CauseTrainer(CauseParams(**settings), HeadRun(n_classes=3, dim=4), channels=5)
    trainer.clusterbook = torch.randn(6, 5)
    data = _Batches(torch.randn(8, 5, 4, 4), torch.randint(0, 3, (8, 8, 8)))
    member = HeadMember(HeadJob(trainer, log=_NoLog()), data, None, torch.device("cpu"))
    return member, data


class _NoLog:
    def due(self, step: int) -> bool:
        return False


def step(member: HeadMember, data: _Batches, number: int) -> None:
    """One step of the group loop (training.train_group) for one member."""
    batch = SharedBatch(number, np.arange(4) + 4 * (number % 2), None, data)
    for optimizer in member.optimizers:
        optimizer.zero_grad()
    with member.random.active():
        member.backward(batch)
    for optimizer in member.optimizers:
        optimizer.step()
    with member.random.active():
        member.after_update(number)


def weights(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("variant", ["mlp", "tr"])
@pytest.mark.parametrize("alias", [True, False])
def test_the_teacher_after_the_first_step_is_the_student_when_aliased_else_their_ema(variant, alias):
    member, data = member_of(variant, ema_alias=alias)
    model: CauseModel = member.head
    start = weights(model.head)
    assert all(torch.equal(t, s) for t, s in zip(weights(model.teacher_head), start))  # the teacher starts as the student
    step(member, data, 1)
    student = weights(model.head)
    assert any(not torch.equal(a, b) for a, b in zip(student, start))
    for t, s, s0 in zip(weights(model.teacher_head), student, start):
        expected = s if alias else 0.99 * s0 + 0.01 * s  # [QUIRK] §8: the aliased teacher took the student's step
        assert torch.allclose(t, expected, atol=1e-6)
    before, student_before = weights(model.teacher_head), weights(model.head)
    step(member, data, 2)  # from the second step on: the EMA either way
    for t, t0, s in zip(weights(model.teacher_head), before, weights(model.head)):
        assert torch.allclose(t, 0.99 * t0 + 0.01 * s, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(weights(model.head), student_before))


@pytest.mark.parametrize("variant", ["mlp", "tr"])
def test_without_the_leak_the_probe_steps_leave_the_head_as_it_was_with_it_the_teacher_learns_the_labels(variant):
    for leak in (False, True):
        member, data = member_of(variant, label_leak=leak)
        model: CauseModel = member.head
        for number in (1, 2):
            step(member, data, number)
        student, teacher, probe = weights(model.head), weights(model.teacher_head), model.cluster_probe.detach().clone()
        projections = weights(model.projection) + weights(model.teacher_projection)
        for number in (3, 4):  # step 3 of CAUSE: the cluster probe
            step(member, data, number)
        assert all(torch.equal(a, b) for a, b in zip(weights(model.head), student))
        assert all(torch.equal(a, b) for a, b in zip(weights(model.projection) + weights(model.teacher_projection), projections))
        assert not torch.equal(model.cluster_probe, probe)  # the probe learns either way
        moved = [not torch.equal(a, b) for a, b in zip(weights(model.teacher_head), teacher)]
        assert any(moved) == leak, f"leak={leak}: the teacher head {'did not move' if leak else 'moved'}"


def test_the_teachers_dropout_is_active_while_training_unless_turned_off():
    for active in (True, False):
        member, data = member_of("mlp", teacher_dropout=active)
        trainer, model = member.trainer, member.head
        x = data.tokens[:4]
        codes = [trainer._teacher_code(model, x, torch.Generator().manual_seed(seed)) for seed in (1, 2)]
        assert torch.equal(*codes) != active
        if not active:
            assert torch.allclose(codes[0], model.eval()(x))
