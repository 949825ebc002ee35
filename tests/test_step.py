"""The training step in one process: mixed precision, GradScaler skips, agreed updates."""

from __future__ import annotations

import torch

from pipeline.config import load_config
from pipeline.engine.dist import DistInfo
from pipeline.train.build import build_components

TINY = ["model.generator=resnet_6blocks", "model.ngf=4", "model.ndf=4", "train.pool_size=2"]


def batch(seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, size, size, generator=g) * 2 - 1, torch.rand(1, 3, size, size, generator=g) * 2 - 1


def params(parts) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": p.detach().clone() for n, net in parts.nets.items() for k, p in net.named_parameters()}


def components(*overrides: str):
    cfg = load_config([], [*TINY, *overrides])
    return build_components(cfg, DistInfo(), torch.device("cpu"))


def test_fp16_gradscaler_skips_an_inf_gradient_and_leaves_no_nan():
    parts = components("train.precision=fp16")
    step = parts.step
    # The scale starts at 2^16 and halves on every overflow: warm up until a step goes through.
    for i in range(40):
        skips = step.scaler_skips
        assert step(*batch(i)).applied
        if step.scaler_skips == skips:
            break
    assert step.scaler_skips == skips, "the GradScaler never settled"
    before = params(parts)
    weight = parts.gens.G_ab.model[1].weight
    handle = weight.register_hook(lambda grad: grad * float("inf"))
    result = step(*batch(2))
    handle.remove()
    after = params(parts)
    assert step.scaler_skips == skips + 1
    # The generators' update was skipped; the discriminators' (finite gradients) was applied.
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("G_"))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("D_"))
    assert all(torch.isfinite(v).all() for v in after.values())
    assert all(torch.isfinite(v) for v in result.losses.values())
    skips = step.scaler_skips
    for i in range(3, 6):
        step(*batch(i))
    assert all(torch.isfinite(v).all() for v in params(parts).values())
    assert not torch.equal(params(parts)["G_ab.model.1.weight"], after["G_ab.model.1.weight"])
    # The skip halved the scale, so these steps cannot overflow (growth waits 2,000 steps): no new skip.
    assert step.scaler_skips == skips


def test_bf16_autocast_tracks_fp32_and_learns_the_same_direction():
    fp32, bf16 = components(), components("train.precision=bf16")
    before = params(bf16)
    assert all(torch.equal(before[k], v) for k, v in params(fp32).items())  # Same seed, same start.
    want, got = fp32.step(*batch(0)), bf16.step(*batch(0))
    assert got.applied
    # bf16 keeps 8 significant bits (rounding 2^-9 ~ 2e-3 per op); through ~20 layers of G and D that is
    # ~2e-3 x sqrt(20) ~ 1e-2 relative in a loss (1.5e-2 measured at worst, G_ab/gan): a 5e-2 band.
    for key, value in want.losses.items():
        assert abs(got.losses[key].item() - value.item()) <= 5e-2 * abs(value.item()), key
    after_fp32, after = params(fp32), params(bf16)
    assert all(after[k].dtype == torch.float32 for k in after)  # parameters stay fp32 under autocast
    # Every conv weight of all four networks moved, in the direction fp32's step moved it (cosine of the two
    # updates 0.64-0.99 measured; a lost or sign-flipped gradient gives ~0 or < 0).
    for key in before:
        if key.endswith("weight"):
            update, reference = (after[key] - before[key]).flatten(), (after_fp32[key] - before[key]).flatten()
            assert update.abs().sum() > 0, key
            assert torch.nn.functional.cosine_similarity(update, reference, dim=0) > 0.3, key
    assert bf16.step(*batch(1)).applied
    # Pool images are stored in fp32 even though the generators ran in bf16.
    assert all(img.dtype == torch.float32 for img in bf16.step.pools.a.images)


def test_non_finite_loss_skips_the_whole_update_and_the_pool_change():
    parts = components()
    parts.step(*batch(0))
    before = params(parts)
    pool_before = parts.step.pools.b.state_dict()
    real_a, real_b = batch(1)
    real_a[0, 0, 0, 0] = float("nan")
    result = parts.step(real_a, real_b)
    assert not result.applied
    assert all(torch.equal(before[k], v) for k, v in params(parts).items())
    assert torch.equal(pool_before["images"], parts.step.pools.b.state_dict()["images"])


def test_stop_request_is_reported_after_the_step():
    parts = components()
    result = parts.step(*batch(0), stop_requested=True)
    assert result.applied and result.stop


def test_channels_last_gives_the_same_step_within_rounding():
    # Only the first step's losses are compared: after one Adam step, biases in front of InstanceNorm (true
    # gradient 0) move by +-lr on the sign of rounding noise, which is layout-dependent.
    plain, nhwc = components(), components("perf.channels_last=true")
    a, b = plain.step(*batch(0)), nhwc.step(*batch(0))
    for key in a.losses:
        # float32 through NHWC vs NCHW kernels: ~45 conv layers of <= 150-term sums between input and loss give
        # 1.2e-7 x sqrt(150) x sqrt(45) ~ 1e-5 a priori (7e-7 measured); 1e-4 is 10x that bound.
        assert torch.allclose(a.losses[key], b.losses[key], rtol=1e-4, atol=1e-6), key
    assert nhwc.step(*batch(1)).applied
    assert nhwc.gens.G_ab.model[1].weight.is_contiguous(memory_format=torch.channels_last)


def test_compiled_networks_train_and_keep_reference_keys():
    # The eager backend checks dynamo tracing and guards without minutes of C++ code generation on CI.
    plain, compiled = components(), components("perf.compile=true", "perf.compile_backend=eager")
    for i in range(3):
        a = plain.step(*batch(i))
        b = compiled.step(*batch(i))
        for key in a.losses:
            assert torch.equal(a.losses[key], b.losses[key]), key  # the eager backend runs the same kernels
    assert "model.1.weight" in compiled.gens.G_ab.state_dict()


def test_fused_calls_match_one_call_per_term_within_rounding():
    """Batching translation with identity inputs (and real with fake for D) changes only summation order."""
    torch.set_default_dtype(torch.float64)
    try:
        fused, separate = components("perf.fused_calls=true"), components("perf.fused_calls=false")
        assert fused.gens.fused and not separate.gens.fused
        a, b = fused.step(*batch(0)), separate.step(*batch(0))
        grads = {f"{n}.{k}": p.grad for n, net in fused.nets.items() for k, p in net.named_parameters()}
        ref = {f"{n}.{k}": p.grad for n, net in separate.nets.items() for k, p in net.named_parameters()}
    finally:
        torch.set_default_dtype(torch.float32)
    for key in a.losses:
        assert torch.allclose(a.losses[key], b.losses[key], rtol=1e-10, atol=1e-12), key
    for key in grads:
        assert torch.allclose(grads[key], ref[key], rtol=1e-7, atol=1e-10), key


def test_fused_calls_are_refused_with_batch_norm():
    import pytest

    with pytest.raises(ValueError, match="fused_calls"):
        components("perf.fused_calls=true", "model.norm=batch")


def test_default_step_stays_within_rounding_of_the_reference_style_step():
    from support.reference_step import ReferenceStyleStep, reference_adam

    from pipeline.gan.cyclegan import build_objective

    torch.set_default_dtype(torch.float64)
    try:
        ours = components()  # defaults: fused calls, foreach Adam, one D backward
        theirs = components("perf.fused_calls=false", "perf.instance_norm_kernel=instance_norm")
        assert type(ours.nets["G_ab"].model[2]).__name__ == "GroupKernelInstanceNorm2d"  # auto on CPU
        assert type(theirs.nets["G_ab"].model[2]) is torch.nn.InstanceNorm2d
        cfg = load_config([], TINY)
        ref = ReferenceStyleStep(theirs.gens, theirs.discs, build_objective(cfg.loss),
                                 reference_adam(theirs.gens.parameters()), reference_adam(theirs.discs.parameters()),
                                 theirs.step.pools.a, theirs.step.pools.b)
        for i in range(3):
            a, b = ours.step(*batch(i)).losses, ref(*batch(i))
            for key in a:
                assert torch.allclose(a[key], b[key], rtol=1e-6, atol=1e-9), (i, key)
    finally:
        torch.set_default_dtype(torch.float32)
