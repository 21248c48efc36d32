"""Tests for sta_model.losses against hand-computed values."""
import math

import pytest
import torch

from sta_model.losses import combined_loss, cross_entropy, gather_rows, triplet_loss


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


# --------------------------------------------------------------------------- global batch over ranks

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch_rank(rank: int, world: int, port: int, sizes: list, out_dir: str) -> None:
    """One rank: its slice of the global batch through a shared linear layer, the combined loss over
    the gathered batch, backward, and the data-parallel gradient average (what DeepSpeed does)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x, pids, layer = _global_batch_inputs()
        lo = sum(sizes[:rank])
        sl = slice(lo, lo + sizes[rank])
        feats = layer(x[sl])
        out = {"features": feats, "logits": feats[:, :4], "reg": None}
        losses = combined_loss(out, pids[sl], global_batch=True)
        losses["total"].backward()
        for p in layer.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
        torch.save({"losses": {k: v.detach() for k, v in losses.items()},
                    "grads": [p.grad for p in layer.parameters()]}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _global_batch_inputs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 8, generator=g)
    pids = torch.arange(4).repeat_interleave(4)[torch.randperm(16, generator=g)]
    layer = torch.nn.Linear(8, 6)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(6, 8, generator=g))
        layer.bias.copy_(torch.randn(6, generator=g))
    return x, pids, layer


@pytest.mark.parametrize("sizes", [[8, 8], [10, 6]])
def test_two_rank_step_equals_one_rank_step_on_the_same_global_batch(tmp_path, sizes):
    """Batch-hard mining over the gathered global batch: the triplet term, and after the gradient
    average the parameter gradients, equal one process holding the whole batch (up to float error).
    CE is a per-sample mean, so it is global once the ranks hold equal shares (the [8, 8] case)."""
    import torch.multiprocessing as mp

    mp.spawn(_global_batch_rank, args=(2, _free_port(), sizes, str(tmp_path)), nprocs=2, join=True)
    x, pids, layer = _global_batch_inputs()
    feats = layer(x)
    ref = combined_loss({"features": feats, "logits": feats[:, :4], "reg": None}, pids)
    ref["total"].backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["losses"]["triplet"], ref["triplet"].detach())
        if sizes[0] == sizes[1]:
            for g, p in zip(got["grads"], layer.parameters()):
                torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)


def test_two_rank_triplet_gradient_equals_one_rank_without_ce(tmp_path):
    """Unequal shares: the triplet gradient alone still equals the single-process one."""
    import torch.multiprocessing as mp

    sizes = [11, 5]
    mp.spawn(_triplet_only_rank, args=(2, _free_port(), sizes, str(tmp_path)), nprocs=2, join=True)
    x, pids, layer = _global_batch_inputs()
    triplet_loss(layer(x), pids).backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for g, p in zip(got["grads"], layer.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)


def _triplet_only_rank(rank: int, world: int, port: int, sizes: list, out_dir: str) -> None:
    import torch.distributed as dist

    from sta_model.losses import gather_rows

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x, pids, layer = _global_batch_inputs()
        lo = sum(sizes[:rank])
        sl = slice(lo, lo + sizes[rank])
        triplet_loss(gather_rows(layer(x[sl])), gather_rows(pids[sl])).backward()
        for p in layer.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
        torch.save({"grads": [p.grad for p in layer.parameters()]}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gather_rows_is_identity_without_a_process_group():
    x = torch.randn(3, 2)
    assert gather_rows(x) is x
