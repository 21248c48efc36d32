"""Tests for sta_model.losses against hand-computed values."""
import math

import pytest
import torch

from sta_model.losses import combined_loss, cross_entropy, triplet_loss


def _points():
    # 1-D embeddings: pid 0 at 0 and 1, pid 1 at 3 and 7.
    return torch.tensor([[0.0], [1.0], [3.0], [7.0]]), torch.tensor([0, 0, 1, 1])


def test_triplet_batch_hard_by_hand():
    x, pids = _points()
    # anchor 0: d_ap = 1, d_an = 3 -> relu(1 - 3 + .3) = 0
    # anchor 1: d_ap = 1, d_an = 2 -> 0
    # anchor 2: d_ap = 4, d_an = 2 -> 2.3
    # anchor 3: d_ap = 4, d_an = 6 -> 0
    torch.testing.assert_close(triplet_loss(x, pids, margin=0.3), torch.tensor(2.3 / 4))
    soft = sum(math.log1p(math.exp(v)) for v in (1 - 3, 1 - 2, 4 - 2, 4 - 6)) / 4
    torch.testing.assert_close(triplet_loss(x, pids, soft_margin=True), torch.tensor(soft))


def test_triplet_picks_hardest_in_2d():
    torch.manual_seed(0)
    x = torch.randn(12, 5, dtype=torch.float64)
    pids = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    total = 0.0
    for a in range(12):
        pos = [torch.dist(x[a], x[j]).item() for j in range(12) if pids[j] == pids[a] and j != a]
        neg = [torch.dist(x[a], x[j]).item() for j in range(12) if pids[j] != pids[a]]
        total += max(max(pos) - min(neg) + 0.5, 0.0)
    torch.testing.assert_close(triplet_loss(x, pids, margin=0.5).item(), total / 12, rtol=1e-9, atol=1e-9)


def test_triplet_gradient_goes_to_hardest_only():
    x, pids = _points()
    x = x.clone().requires_grad_(True)
    triplet_loss(x, pids).backward()
    # Only anchor 2 is active: L = ((x3 - x2) - (x2 - x1) + 0.3) / 4.
    torch.testing.assert_close(x.grad.squeeze(1), torch.tensor([0.0, 0.25, -0.5, 0.25]))


def test_triplet_no_negatives_and_singletons():
    x = torch.randn(3, 4, requires_grad=True)
    loss = triplet_loss(x, torch.tensor([1, 1, 1]))
    assert loss.item() == 0.0 and loss.requires_grad
    # singletons: d_ap is 0 (the anchor itself) -> relu(margin - d_an)
    y = torch.tensor([[0.0], [0.1]])
    torch.testing.assert_close(triplet_loss(y, torch.tensor([0, 1]), margin=0.3), torch.tensor(0.2), atol=1e-5, rtol=0)


def test_cross_entropy_label_smoothing_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    logp = torch.log_softmax(logits, 1)[0]
    torch.testing.assert_close(cross_entropy(logits, torch.tensor([0])), -logp[0])
    eps = 0.1
    expected = -((1 - eps) * logp[0] + eps / 3 * logp.sum())
    torch.testing.assert_close(cross_entropy(logits, torch.tensor([0]), label_smoothing=eps), expected)


def test_combined_loss_weights():
    x, pids = _points()
    out = {"features": x, "logits": torch.tensor([[2.0, 0.0]] * 4), "reg": torch.tensor(5.0)}
    d = combined_loss(out, pids, w_tri=2.0, w_ce=0.5, lambda_reg=0.1, margin=0.3)
    assert set(d) == {"triplet", "ce", "reg", "total"}
    torch.testing.assert_close(d["triplet"], torch.tensor(2.3 / 4))
    torch.testing.assert_close(d["total"], 2.0 * d["triplet"] + 0.5 * d["ce"] + 0.1 * 5.0)
    out["reg"] = None
    assert combined_loss(out, pids)["reg"].item() == 0.0


def test_losses_upcast_bfloat16():
    x, pids = _points()
    out = {"features": x.bfloat16(), "logits": torch.zeros(4, 2, dtype=torch.bfloat16), "reg": None}
    d = combined_loss(out, pids)
    assert all(v.dtype == torch.float32 for v in d.values())
    torch.testing.assert_close(d["ce"], torch.tensor(math.log(2)))


@pytest.mark.parametrize("soft", [False, True])
def test_triplet_zero_when_well_separated(soft):
    x = torch.tensor([[0.0], [0.01], [10.0], [10.01]])
    loss = triplet_loss(x, torch.tensor([0, 0, 1, 1]), soft_margin=soft)
    assert loss.item() < (1e-4 if soft else 1e-12)
