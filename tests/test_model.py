"""Tests for sta_model.model with the tiny trunk (CPU, seconds)."""
import pytest
import torch

from sta_model.losses import combined_loss
from sta_model.model import STA, TemporalPooling, build_model

H, W = 64, 32  # tiny trunk: 8x4 maps, K=4 stripes of 2 rows


@pytest.mark.parametrize("N", [1, 4, 7])
def test_sta_train_forward_backward(N):
    torch.manual_seed(0)
    model = STA(num_classes=5, trunk="tiny", num_blocks=4, embed_dim=32).train()
    clips = torch.rand(4, N, 3, H, W)
    out = model(clips)
    assert out["logits"].shape == (4, 5)
    assert out["embedding"].shape == (4, 32) and out["features"].shape == (4, 32)
    assert out["spatial_maps"].shape == (4, N, 8, 4) and out["scores"].shape == (4, N, 4)
    assert out["reg"].dim() == 0
    torch.testing.assert_close(out["scores"].sum(1), torch.ones(4, 4))
    if N == 1:
        assert out["reg"].item() == 0.0
    else:
        assert out["reg"].item() > 0
    loss = combined_loss(out, torch.tensor([0, 0, 1, 1]))["total"]
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.trunk.body[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("N", [1, 4, 7])
def test_eval_returns_embedding_any_clip_length(N):
    torch.manual_seed(0)
    model = STA(num_classes=5, trunk="tiny", embed_dim=16).eval()
    with torch.no_grad():
        emb = model(torch.rand(3, N, 3, H, W))
    assert emb.shape == (3, 16)
    tp = TemporalPooling(num_classes=5, trunk="tiny", embed_dim=16).eval()
    with torch.no_grad():
        assert tp(torch.rand(3, N, 3, H, W)).shape == (3, 16)


def test_eval_embedding_is_per_clip():
    """Batch composition must not change a clip's embedding in eval mode."""
    torch.manual_seed(1)
    model = STA(num_classes=3, trunk="tiny", embed_dim=8).eval()
    clips = torch.rand(3, 4, 3, H, W)
    with torch.no_grad():
        torch.testing.assert_close(model(clips)[1:2], model(clips[1:2]), rtol=1e-4, atol=1e-5)


def test_sta_matches_manual_pipeline():
    torch.manual_seed(2)
    model = STA(num_classes=3, trunk="tiny", embed_dim=8, fusion=("max",)).eval()
    clips = torch.rand(2, 3, 3, H, W)
    with torch.no_grad():
        f = model.trunk(clips.flatten(0, 1)).reshape(2, 3, 64, 8, 4)
        from sta_model.attention import fuse, spatial_temporal_attention
        _, S = spatial_temporal_attention(f, 4)
        x = fuse(f, S, 4, ("max",)).mean((2, 3))
        expected = model.head.bn(model.head.fc(x))
        torch.testing.assert_close(model(clips), expected)
    assert model.head.fc.in_features == 64


def test_temporal_pooling_train_dict():
    torch.manual_seed(0)
    model = TemporalPooling(num_classes=4, trunk="tiny", embed_dim=16).train()
    out = model(torch.rand(4, 3, 3, H, W))
    assert out["spatial_maps"] is None and out["scores"] is None
    assert out["reg"].item() == 0.0 and out["logits"].shape == (4, 4)
    losses = combined_loss(out, torch.tensor([0, 0, 1, 1]))
    losses["total"].backward()
    torch.testing.assert_close(losses["total"], losses["triplet"] + losses["ce"])


def test_build_model():
    assert isinstance(build_model("sta", 3, trunk="tiny", embed_dim=8), STA)
    tp = build_model("temporal_pooling", 3, trunk="tiny", embed_dim=8, num_blocks=4, fusion=("max",))
    assert isinstance(tp, TemporalPooling)
    with pytest.raises(ValueError):
        build_model("lstm", 3)


def test_height_not_divisible_by_blocks_raises():
    model = STA(num_classes=3, trunk="tiny", num_blocks=4, embed_dim=8).eval()
    with pytest.raises(ValueError, match="divisible"):
        model(torch.rand(1, 2, 3, 48, 32))  # 6 rows at stride 8
    with pytest.raises(ValueError):
        model(torch.rand(2, 3, H, W))  # missing frame axis
    with pytest.raises(ValueError):
        STA(num_classes=3, trunk="tiny", fusion=("sum",))


def test_pretrained_trunk_through_model(tmp_path):
    sd = STA(num_classes=3, trunk="tiny").trunk.state_dict()
    p = tmp_path / "tiny.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, p)
    model = STA(num_classes=3, trunk="tiny", pretrained=str(p))
    for k, v in model.trunk.state_dict().items():
        assert torch.equal(v, sd[k])


def _conv_layouts(model: torch.nn.Module) -> list:
    """Records, per Conv2d call, whether its input and output are channels_last."""
    seen = []

    def hook(mod, args, out):
        cl = torch.channels_last
        seen.append((args[0].is_contiguous(memory_format=cl), out.is_contiguous(memory_format=cl)))

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(hook)
    return seen


# Gradients of NCHW and NHWC runs differ only by float32 summation order (oneDNN blocks its NHWC reductions
# differently, and by CPU ISA). A weight-gradient element is a sum over N*H_out*W_out products: 4 clips x
# 3 frames through ResNet-18's 7x7/2 stem on 64x32 frames is 12*32*16 = 6144 terms of magnitude ~1..30, so its
# rounding error is ~eps32 * sum|terms| ~ 1e-4 absolute. Where that sum cancels to near zero (a conv1 element
# of -0.0058), no element-wise rtol can hold, while the difference over the whole tensor stays ~1e-5 of the
# gradient's norm, the same as either layout's distance from a float64 run. So compare each gradient tensor
# in norm: 1e-4 of its norm is ~10x what rounding produces and ~1e4x below a real change of the maths
# (a transposed kernel moves the gradient by O(its norm)). The floor covers gradients that are zero in exact
# arithmetic (a bias followed by BatchNorm: ~1e-17), where only rounding noise of ~1e-8 is left.
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6


def _assert_grads_close(ref: torch.nn.Module, other: torch.nn.Module) -> None:
    """Asserts ``||g_other - g_ref|| <= GRAD_RTOL * ||g_ref|| + GRAD_ATOL * sqrt(numel)`` per parameter.

    Args:
        ref: the model whose gradients are the reference (NCHW).
        other: a model with the same parameters, after the same backward pass.
    """
    for (name, p), q in zip(ref.named_parameters(), other.parameters()):
        assert q.is_contiguous()  # parameters keep their strides (DeepSpeed needs them)
        err, scale = (q.grad - p.grad).norm().item(), p.grad.norm().item()
        bound = GRAD_RTOL * scale + GRAD_ATOL * p.numel() ** 0.5
        assert err <= bound, f"{name}: |grad diff| {err:.3g} > {bound:.3g} (|grad| {scale:.3g})"


def _backward(model: torch.nn.Module, clips: torch.Tensor, pids: torch.Tensor) -> None:
    torch.manual_seed(5)  # the Reg frame pair is drawn at random
    combined_loss(model(clips), pids)["total"].backward()


@pytest.mark.parametrize("kind, trunk", [("sta", "tiny"), ("sta", "resnet18"), ("temporal_pooling", "tiny")])
def test_channels_last_same_outputs_and_grads(kind, trunk):
    """Same model, NHWC frames: every conv runs channels_last, results equal up to summation order."""
    torch.manual_seed(0)
    ref = build_model(kind, 4, trunk=trunk, embed_dim=16).train()
    cl = build_model(kind, 4, trunk=trunk, embed_dim=16, channels_last=True).train()
    cl.load_state_dict(ref.state_dict())
    ref_layouts, cl_layouts = _conv_layouts(ref), _conv_layouts(cl)
    clips, pids = torch.rand(4, 3, 3, H, W), torch.tensor([0, 0, 1, 1])
    for model in (ref, cl):
        _backward(model, clips, pids)
    assert cl_layouts and all(i and o for i, o in cl_layouts), cl_layouts  # every conv ran NHWC
    assert not any(i for i, _ in ref_layouts)  # ... and only because of the knob
    torch.manual_seed(5)
    a = ref(clips)
    torch.manual_seed(5)
    b = cl(clips)
    for k in a:
        if a[k] is not None:
            torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=k)
    _assert_grads_close(ref, cl)
    ref.eval(), cl.eval()
    with torch.no_grad():
        torch.testing.assert_close(cl(clips), ref(clips), rtol=1e-3, atol=1e-4)


def test_grad_check_catches_changed_maths():
    """The norm tolerance above still fails when NHWC changes the maths: one conv kernel transposed."""
    torch.manual_seed(0)
    ref = build_model("sta", 4, trunk="tiny", embed_dim=16).train()
    bad = build_model("sta", 4, trunk="tiny", embed_dim=16, channels_last=True).train()
    bad.load_state_dict(ref.state_dict())
    with torch.no_grad():
        w = bad.trunk.body[3].weight  # second conv, 3x3: a layout bug that swaps kernel rows and columns
        w.copy_(w.transpose(-1, -2).contiguous())
    clips, pids = torch.rand(4, 3, 3, H, W), torch.tensor([0, 0, 1, 1])
    for model in (ref, bad):
        _backward(model, clips, pids)
    with pytest.raises(AssertionError, match="grad diff"):
        _assert_grads_close(ref, bad)
