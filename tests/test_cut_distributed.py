"""CUT under DDP (real torchrun processes, gloo on CPU): G runs 3 times (5 with identity NCE) before one
backward, F is complete before DDP wraps it, and D steps before G's loss. 2 ranks x 1 image must equal one
process that runs each rank's step and averages the gradients in rank order, bit for bit."""

from __future__ import annotations

import subprocess

import pytest
import torch
from support.ddp_worker import fixed_batch
from support.runs import ROOT, nets_equal, process_env, tiny_overrides, train_cmd
from test_distributed import run_workers

from pipeline.config import load_config
from pipeline.engine.checkpoint import load_checkpoint
from pipeline.engine.optim import build_adam
from pipeline.gan.cut.model import PatchSampling, build_cut_networks, build_cut_objective
from pipeline.gan.networks import uses_group_kernel_norm

pytestmark = pytest.mark.slow

TINY = ["model.generator=resnet_6blocks", "model.ngf=4", "model.ndf=4", "train.seed=5", "cut.num_patches=16"]


def averaged(grads: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    out = []
    for per_rank in zip(*grads):
        total = per_rank[0]
        for g in per_rank[1:]:
            total = total + g
        out.append(total / len(per_rank))
    return out


def reference(method: str, steps: int, world: int) -> list[torch.Tensor]:
    """One process, written apart from CUTStep: each rank's forward, D's gradients averaged and applied, then
    each rank's G + F loss against the updated D, averaged and applied."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    try:
        cfg = load_config([], [f"model.method={method}", *TINY])
        objective = build_cut_objective(cfg.loss, cfg.cut)
        torch.manual_seed(cfg.train.seed)
        gens, disc = build_cut_networks(cfg.model, cfg.cut, objective, group_kernel_norm=uses_group_kernel_norm(
            cfg.perf.instance_norm_kernel, torch.device("cpu")))
        opt_g = build_adam(gens.parameters(), cfg.optim.lr, cfg.optim.beta1, cfg.optim.beta2)
        opt_d = build_adam(disc.parameters(), cfg.optim.lr, cfg.optim.beta1, cfg.optim.beta2)
        sampling = [PatchSampling(cfg.train.seed * 1000 + r) for r in range(world)]
        history = []
        for step in range(steps):
            batches = [fixed_batch(r, step, torch.float32) for r in range(world)]
            outs = [gens(a, b, sampling[r]) for r, (a, b) in enumerate(batches)]
            d_grads = []
            for (_, real_b), out in zip(batches, outs):
                disc.zero_grad(set_to_none=True)
                objective.gan.discriminator(disc(real_b), disc(out["fake_b"].detach())).backward()
                d_grads.append([p.grad.clone() for p in disc.parameters()])
            for p, g in zip(disc.parameters(), averaged(d_grads)):
                p.grad = g
            opt_d.step()
            disc.requires_grad_(False)
            g_grads = []
            for out in outs:
                gens.zero_grad(set_to_none=True)
                nce = (out["nce"] + out["nce_idt"]) * 0.5 if "nce_idt" in out else out["nce"]
                (objective.gan.generator(disc(out["fake_b"])) * objective.lambda_gan + nce).backward()
                g_grads.append([p.grad.clone() for p in gens.parameters()])
            disc.requires_grad_(True)
            for p, g in zip(gens.parameters(), averaged(g_grads)):
                p.grad = g
            opt_g.step()
            history.append(torch.cat([p.detach().reshape(-1) for net in (gens.G, gens.F, disc)
                                      for p in net.parameters()]))
        return history
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("method", ["cut", "fastcut"])
def test_two_ranks_equal_one_process_averaging_in_rank_order_bitwise(tmp_path, method):
    steps = 5
    ddp = run_workers(tmp_path, 2, steps, "float32", [f"model.method={method}", *TINY])
    want = reference(method, steps, 2)
    for step, (got, ref) in enumerate(zip(ddp["params"], want)):
        assert torch.equal(got, ref), f"step {step + 1}: max diff {(got - ref).abs().max().item()}"
    assert not torch.equal(ddp["params"][0], ddp["params"][-1])
    # Every parameter of G and F got a gradient through the one DDP forward (F's only through the queries).
    assert all(key.split(".")[0] in ("G", "F", "D") for key in ddp["grads"])
    assert {k.split(".")[0] for k in ddp["grads"]} == {"G", "F", "D"}
    assert sum(1 for k in ddp["grads"] if k.startswith("F.")) == 20


@pytest.mark.parametrize("nproc", [0, 2], ids=["1-process", "2-ranks"])
def test_fastcut_resume_equals_a_straight_run_bitwise(shards, tmp_path, nproc):
    base = {"model.method": "fastcut", "train.steps": 6, "checkpoint.every_steps": 0, "tracking.enabled": False,
            "report.sample_every_steps": 0, "train.ema_decay": 0.5, "cut.num_patches": 16}
    straight = tiny_overrides(shards, tmp_path / "straight", **base)
    chunked = tiny_overrides(shards, tmp_path / "chunked", **base, **{"control.stop_after_steps": 3})
    first = subprocess.run(train_cmd(nproc, straight), env=process_env(), cwd=ROOT, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    for _ in range(2):
        proc = subprocess.run(train_cmd(nproc, chunked), env=process_env(), cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode in (0, 3), proc.stderr[-3000:]
    a = load_checkpoint(tmp_path / "straight" / "ckpt-000000006")
    b = load_checkpoint(tmp_path / "chunked" / "ckpt-000000006")
    assert set(a["nets"]) == {"G", "F", "D"} and nets_equal(a, b)
    assert all(torch.equal(v, b["ema"]["nets"]["G"][k]) for k, v in a["ema"]["nets"]["G"].items())
    assert all(torch.equal(x["sampling"]["generator"], y["sampling"]["generator"])
               for x, y in zip(a["ranks"], b["ranks"]))
