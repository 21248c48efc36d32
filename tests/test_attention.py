"""Tests for sta_model.attention against float64 loop computations of the paper's equations."""
import pytest
import torch

from sta_model.attention import fuse, inter_frame_regularization, spatial_temporal_attention


def _loop_reference(f, K):
    """Paper steps 1-4 and 6 with explicit loops, float64."""
    B, N, C, H, W = f.shape
    g = torch.zeros(B, N, H, W, dtype=torch.float64)
    S = torch.zeros(B, N, K, dtype=torch.float64)
    X1 = torch.zeros(B, C, H, W, dtype=torch.float64)
    X2 = torch.zeros(B, C, H, W, dtype=torch.float64)
    hk = H // K
    for b in range(B):
        for n in range(N):
            total = sum(float(f[b, n, c, h, w]) ** 2 for c in range(C) for h in range(H) for w in range(W))
            for h in range(H):
                for w in range(W):
                    g[b, n, h, w] = sum(float(f[b, n, c, h, w]) ** 2 for c in range(C)) / total
        s = torch.zeros(N, K, dtype=torch.float64)
        for n in range(N):
            for k in range(K):
                s[n, k] = g[b, n, k * hk:(k + 1) * hk].sum()
        for k in range(K):
            col = sum(float(s[n, k]) for n in range(N))
            best = max(range(N), key=lambda n: float(s[n, k]))
            for n in range(N):
                S[b, n, k] = s[n, k] / col
            X1[b, :, k * hk:(k + 1) * hk] = f[b, best, :, k * hk:(k + 1) * hk]
            for n in range(N):
                X2[b, :, k * hk:(k + 1) * hk] += S[b, n, k] * f[b, n, :, k * hk:(k + 1) * hk]
    return g, S, X1, X2


def test_matches_loop_reference():
    torch.manual_seed(0)
    f = torch.randn(2, 3, 4, 8, 3, dtype=torch.float64)
    g, S = spatial_temporal_attention(f, 4)
    rg, rS, X1, X2 = _loop_reference(f, 4)
    torch.testing.assert_close(g, rg, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(S, rS, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g.sum((2, 3)), torch.ones(2, 3, dtype=torch.float64))
    torch.testing.assert_close(S.sum(1), torch.ones(2, 4, dtype=torch.float64))
    out = fuse(f, S, 4)
    assert out.shape == (2, 8, 8, 3)
    torch.testing.assert_close(out[:, :4], X1)
    torch.testing.assert_close(out[:, 4:], X2, rtol=1e-10, atol=1e-12)


def test_float32_and_half_inputs():
    torch.manual_seed(1)
    f = torch.randn(2, 4, 8, 8, 4)
    g, S = spatial_temporal_attention(f, 4)
    rg, rS = spatial_temporal_attention(f.double(), 4)
    assert g.dtype == torch.float32
    torch.testing.assert_close(S.double(), rS, rtol=1e-5, atol=1e-6)
    gb, Sb = spatial_temporal_attention(f.bfloat16(), 4)
    assert Sb.dtype == torch.float32 and torch.isfinite(Sb).all()
    assert fuse(f.bfloat16(), Sb, 4).dtype == torch.bfloat16


def test_occluded_stripe_gets_near_zero_score():
    torch.manual_seed(2)
    f = torch.rand(1, 4, 16, 8, 4) + 0.1
    f[0, 2, :, 2:4] = 1e-4  # frame 2, stripe 1 (rows 2-3) nearly black
    _, S = spatial_temporal_attention(f, 4)
    assert S[0, 2, 1] < 1e-5
    assert S[0, [0, 1, 3], 1].min() > 0.2
    fused = fuse(f, S, 4, modes=("max",))
    assert not torch.equal(fused[0, :, 2:4], f[0, 2, :, 2:4])


def test_all_zero_features_are_finite():
    f = torch.zeros(2, 3, 4, 8, 4, requires_grad=True)
    g, S = spatial_temporal_attention(f, 4)
    assert torch.equal(g, torch.zeros_like(g))
    torch.testing.assert_close(S, torch.full_like(S, 1 / 3))
    out = fuse(f, S, 4)
    reg = inter_frame_regularization(g)
    (out.sum() + reg).backward()
    assert torch.isfinite(f.grad).all()


def test_fuse_picks_argmax_frame_per_stripe():
    torch.manual_seed(3)
    B, N, C, H, W, K = 2, 5, 3, 8, 2, 4
    f = torch.randn(B, N, C, H, W)
    S = torch.rand(B, N, K)
    S = S / S.sum(1, keepdim=True)
    out = fuse(f, S, K, modes=("max",))
    assert out.shape == (B, C, H, W)
    for b in range(B):
        for k in range(K):
            n = int(S[b, :, k].argmax())
            assert torch.equal(out[b, :, 2 * k:2 * k + 2], f[b, n, :, 2 * k:2 * k + 2])
    avg = fuse(f, S, K, modes=("avg",))
    both = fuse(f, S, K, modes=("avg", "max"))
    assert torch.equal(both[:, :C], avg) and torch.equal(both[:, C:], out)


def test_fuse_tie_takes_first_frame():
    f = torch.arange(2 * 4 * 2 * 2, dtype=torch.float32).reshape(1, 2, 4, 2, 2)
    S = torch.full((1, 2, 2), 0.5)
    out = fuse(f, S, 2, modes=("max",))
    assert torch.equal(out[0], f[0, 0])


def test_single_frame():
    f = torch.randn(3, 1, 4, 8, 2)
    g, S = spatial_temporal_attention(f, 2)
    torch.testing.assert_close(S, torch.ones(3, 1, 2))
    out = fuse(f, S, 2)
    torch.testing.assert_close(out, torch.cat([f[:, 0], f[:, 0]], 1))


def test_reg_symmetric_and_zero_for_one_frame():
    torch.manual_seed(4)
    g = torch.rand(3, 2, 4, 2)
    a = inter_frame_regularization(g, generator=torch.Generator().manual_seed(0))
    b = inter_frame_regularization(g.flip(1), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
    expected = torch.linalg.vector_norm((g[:, 0] - g[:, 1]).flatten(1), dim=1).mean()
    torch.testing.assert_close(a, expected)
    one = torch.rand(3, 1, 4, 2, requires_grad=True)
    r = inter_frame_regularization(one)
    assert r.item() == 0.0 and r.requires_grad
    r.backward()
    assert torch.equal(one.grad, torch.zeros_like(one))


def test_reg_draws_distinct_frames():
    g = torch.arange(6, dtype=torch.float64).reshape(1, 6, 1, 1).expand(200, 6, 1, 1).contiguous()
    gen = torch.Generator().manual_seed(0)
    # Every value |i - j| >= 1 when i != j, so the mean is >= 1 only if no pair repeats a frame.
    per_clip = [inter_frame_regularization(g[i:i + 1], generator=gen).item() for i in range(200)]
    assert min(per_clip) >= 1.0
    assert len(set(per_clip)) > 3  # different pairs are drawn


def test_reg_identical_frames_have_finite_grad():
    g = torch.rand(2, 1, 4, 2).expand(2, 3, 4, 2).clone().requires_grad_(True)
    inter_frame_regularization(g).backward()
    assert torch.isfinite(g.grad).all()


def test_gradcheck_fuse_and_reg():
    torch.manual_seed(5)
    f = torch.randn(2, 3, 2, 4, 2, dtype=torch.float64, requires_grad=True)
    S = torch.rand(2, 3, 2, dtype=torch.float64)
    S = (S / S.sum(1, keepdim=True)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f, S: fuse(f, S, 2, modes=("avg",)), (f, S))
    # Max part: argmax of S is fixed (S is not perturbed), gradient flows to the chosen frames.
    assert torch.autograd.gradcheck(lambda f: fuse(f, S.detach(), 2, modes=("max",)), (f,))
    assert torch.autograd.gradcheck(lambda f: spatial_temporal_attention(f, 2)[1], (f,))
    g = torch.rand(2, 3, 4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda g: inter_frame_regularization(g, generator=torch.Generator().manual_seed(7)), (g,))


@pytest.mark.parametrize("shape, K", [((2, 3, 4, 6, 2), 4), ((2, 3, 4, 8), 4), ((2, 3, 4, 8, 2), 0)])
def test_bad_shapes_raise(shape, K):
    with pytest.raises(ValueError):
        spatial_temporal_attention(torch.rand(*shape), K)


def test_fuse_bad_arguments():
    f = torch.rand(2, 3, 4, 8, 2)
    with pytest.raises(ValueError):
        fuse(f, torch.rand(2, 3, 2), 4)
    with pytest.raises(ValueError):
        fuse(f, torch.rand(2, 3, 4), 4, modes=("mean",))
    with pytest.raises(ValueError):
        fuse(f, torch.rand(2, 3, 4), 4, modes=())
    with pytest.raises(ValueError):
        inter_frame_regularization(torch.rand(2, 3, 4))


def test_attention_map_l2_is_the_normalised_channel_norm():
    """energy: g ∝ Σ_c f²; l2 (AGRL.pytorch's reading): g ∝ sqrt(Σ_c f²). Both sum to 1 per frame."""
    torch.manual_seed(0)
    f = torch.rand(2, 3, 5, 8, 4, dtype=torch.float64)
    g_e, S_e = spatial_temporal_attention(f, 4)
    g_l, S_l = spatial_temporal_attention(f, 4, attention_map="l2")
    energy = f.pow(2).sum(2)
    torch.testing.assert_close(g_e, energy / energy.sum((2, 3), keepdim=True))
    norm = energy.sqrt()
    torch.testing.assert_close(g_l, norm / norm.sum((2, 3), keepdim=True))
    torch.testing.assert_close(g_l.sum((2, 3)), torch.ones(2, 3, dtype=torch.float64))
    torch.testing.assert_close(S_l.sum(1), torch.ones(2, 4, dtype=torch.float64))
    assert not torch.allclose(S_e, S_l)
    # l2 is flatter: a bright position takes a smaller share of its frame's map
    assert g_l.amax((2, 3)).mean() < g_e.amax((2, 3)).mean()


def test_attention_map_l2_has_finite_gradients_at_dead_positions():
    f = torch.zeros(1, 2, 3, 4, 2, requires_grad=True)
    with torch.no_grad():
        f[0, 0, :, 0, 0] = 1.0  # one live position; every other one has zero energy
    g, S = spatial_temporal_attention(f, 2, attention_map="l2")
    (g.sum() + S.pow(2).sum()).backward()
    assert torch.isfinite(f.grad).all()


def test_attention_map_unknown_raises():
    with pytest.raises(ValueError, match="attention_map"):
        spatial_temporal_attention(torch.rand(1, 2, 3, 4, 2), 2, attention_map="softmax")
