"""DDP computes the same maths as one process: real torchrun processes, gloo on CPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from support.ddp_worker import fixed_batch, fixed_moments
from support.runs import ROOT, WORKER, free_port, nets_equal, process_env, single_rank_cmd, tiny_overrides, train_cmd

from pipeline.config import load_config
from pipeline.engine.checkpoint import load_checkpoint
from pipeline.engine.optim import build_adam
from pipeline.gan.cyclegan import build_networks, build_objective
from pipeline.gan.image_pool import ImagePool
from pipeline.gan.methods import DIRECTIONS
from pipeline.gan.networks import uses_group_kernel_norm
from pipeline.train.colour_start import start_from_transfer

pytestmark = pytest.mark.slow

TINY = ["model.generator=resnet_6blocks", "model.ngf=4", "model.ndf=4", "train.pool_size=2", "train.seed=5"]


def torchrun(args: list[str], timeout: float = 180, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *args], env=env or process_env(),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def run_workers(tmp_path, nproc: int, steps: int, dtype: str, overrides=TINY) -> dict:
    out = tmp_path / f"ddp-{nproc}-{dtype}.pt"
    proc = torchrun([f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                     str(WORKER), str(out), str(steps), dtype, *overrides])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def reference(steps: int, dtype: torch.dtype, world: int, batches, overrides=TINY) -> dict:
    """One process, written independently of TrainStep: per-rank G and D phases, gradients averaged in rank order."""
    default, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(dtype)
    torch.set_num_threads(1)  # As the workers (OMP_NUM_THREADS=1): kernels then sum in the same order.
    torch.set_flush_denormal(True)  # As build_components does on CPU.
    try:
        cfg = load_config([], overrides)
        torch.manual_seed(cfg.train.seed)
        gens, discs = build_networks(cfg.model, fused=cfg.perf.fused_calls,  # as the workers
                                     group_kernel_norm=uses_group_kernel_norm(cfg.perf.instance_norm_kernel,
                                                                              torch.device("cpu")))
        if cfg.model.colour_start == "transfer":
            start_from_transfer(gens, DIRECTIONS["cyclegan"], fixed_moments())
        objective = build_objective(cfg.loss)
        opt_g = build_adam(gens.parameters(), cfg.optim.lr, cfg.optim.beta1, cfg.optim.beta2)
        opt_d = build_adam(discs.parameters(), cfg.optim.lr, cfg.optim.beta1, cfg.optim.beta2)
        pools = [(ImagePool(2, 2 * (5000 + r)), ImagePool(2, 2 * (5000 + r) + 1)) for r in range(world)]
        nets = [gens.G_ab, gens.G_ba, discs.D_a, discs.D_b]
        history, first_grads = [], {}
        for step in range(steps):
            g_grads, d_grads = [], []
            # Buffers a forward pass changes (spectral norm's power-iteration vectors, which depend on the weights
            # only): each rank starts the step from the same ones, as every rank of a DDP job does.
            at_start = {name: b.clone() for name, b in discs.named_buffers()}
            for rank in range(world):
                with torch.no_grad():
                    for name, b in discs.named_buffers():
                        b.copy_(at_start[name])
                real_a, real_b = batches(rank, step)
                for p in discs.parameters():
                    p.requires_grad_(False)
                gens.zero_grad(set_to_none=True)
                out = gens(real_a, real_b, objective.identity)
                sum(objective.generator_losses(out, real_a, real_b, discs.D_a, discs.D_b).values()).backward()
                g_grads.append([p.grad.clone() for p in gens.parameters()])
                for p in discs.parameters():
                    p.requires_grad_(True)
                discs.zero_grad(set_to_none=True)
                fake_a = pools[rank][0].query(out["fake_a"].detach())
                fake_b = pools[rank][1].query(out["fake_b"].detach())
                d = objective.discriminator_losses(discs(real_a, fake_a, real_b, fake_b))
                (d["D_a"] + d["D_b"]).backward()
                d_grads.append([p.grad.clone() for p in discs.parameters()])
            for params, per_rank in ((gens.parameters(), g_grads), (discs.parameters(), d_grads)):
                for p, *grads in zip(params, *per_rank):
                    total = grads[0]
                    for g in grads[1:]:
                        total = total + g
                    p.grad = total / world
            if step == 0:
                names = ["G_ab", "G_ba", "D_a", "D_b"]
                first_grads = {f"{n}.{k}": p.grad.clone() for n, net in zip(names, nets)
                               for k, p in net.named_parameters()}
            opt_g.step()
            opt_d.step()
            history.append(torch.cat([p.detach().reshape(-1) for net in nets for p in net.parameters()]))
        return {"params": history, "grads": first_grads}
    finally:
        torch.set_default_dtype(default)
        torch.set_num_threads(threads)


@pytest.mark.parametrize("variants", [[], ["model.g_variant=colour", "model.d_variant=colour",
                                           "model.colour_start=transfer"],
                                      ["model.channels_a=1", "model.channels_b=4", "loss.lambda_idt=0"]],
                         ids=["reference-networks", "colour-networks", "channels-1-to-4"])
def test_two_ranks_equal_one_process_averaging_in_rank_order_bitwise(tmp_path, variants):
    steps = 6  # Pool of 2 fills after 2 steps: later steps exercise the swaps.
    ddp = run_workers(tmp_path, 2, steps, "float32", [*TINY, *variants])
    channels = load_config([], [*TINY, *variants]).model
    ref = reference(steps, torch.float32, 2, lambda r, s: fixed_batch(r, s, torch.float32, channels=(
        channels.channels_a, channels.channels_b)), [*TINY, *variants])
    assert len(ddp["params"]) == steps
    for step, (got, want) in enumerate(zip(ddp["params"], ref["params"])):
        assert torch.equal(got, want), f"step {step + 1}: max diff {(got - want).abs().max().item()}"
    # Parameters moved: the comparison is not between two untouched initialisations.
    assert not torch.equal(ddp["params"][0], ddp["params"][-1])


def test_two_ranks_equal_one_process_batch_two_in_float64(tmp_path):
    ddp = run_workers(tmp_path, 2, 1, "float64")

    def batch_of_two(rank, step):
        a0, b0 = fixed_batch(0, step, torch.float64)
        a1, b1 = fixed_batch(1, step, torch.float64)
        return torch.cat([a0, a1]), torch.cat([b0, b1])

    ref = reference(1, torch.float64, 1, batch_of_two)
    assert ddp["grads"].keys() == ref["grads"].keys()
    worst = 0.0
    for key, got in ddp["grads"].items():
        want = ref["grads"][key]
        worst = max(worst, (got - want).abs().max().item())
        # Mean, not sum: a summed all-reduce would be twice the batch-of-two gradient.
        if want.abs().max() > 1e-6:
            assert not torch.allclose(got, 2 * want, atol=1e-9), key
    assert worst < 1e-9, worst
    total = sum(g.abs().sum().item() for g in ref["grads"].values())
    assert total > 0


def test_two_nodes_by_rendezvous_equal_two_processes_on_one_node(tmp_path):
    steps = 3
    one_node = run_workers(tmp_path, 2, steps, "float32")
    port = free_port()
    outs = [tmp_path / f"node{i}.pt" for i in range(2)]
    env = process_env()
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
             "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two-nodes",
             str(WORKER), str(out), str(steps), "float32", *TINY],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for out in outs
    ]
    logs = [agent.communicate(timeout=180)[0] for agent in agents]
    assert all(agent.returncode == 0 for agent in agents), "\n".join(log[-2000:] for log in logs)
    written = [out for out in outs if out.exists()]
    assert len(written) == 1  # Only global rank 0 writes, whichever agent it landed on.
    two_nodes = torch.load(written[0], weights_only=True)
    for got, want in zip(two_nodes["params"], one_node["params"]):
        assert torch.equal(got, want)


def test_eight_ranks_oversubscribed_stay_equal(tmp_path):
    # The worker gathers all 8 ranks' parameters after every step and exits non-zero if any differs.
    result = run_workers(tmp_path, 8, 2, "float32")
    assert result["world_size"] == 8 and len(result["params"]) == 2


def test_a_failing_rank_ends_the_job_with_its_reason(tmp_path):
    import time

    out = tmp_path / "never.pt"
    t0 = time.monotonic()
    proc = torchrun(["--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                     str(WORKER), str(out), "5", "float32", *TINY],
                    timeout=120, env=process_env(TEST_FAIL_AT="1:2"))
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 120
    assert "injected failure on rank 1 at step 2" in proc.stderr
    assert "exitcode" in proc.stderr and not out.exists()  # torchrun's failure report, naming the failed rank


def test_a_process_group_of_one_rank_equals_a_plain_run_bitwise(shards, tmp_path):
    """The DDP path on one device (what the GPU check runs with nccl): DDP and collectives change no bit."""
    common = {"train.steps": 4, "checkpoint.every_steps": 4, "report.log_every_steps": 1}
    plain = subprocess.run(train_cmd(0, tiny_overrides(shards, tmp_path / "plain", **common)), env=process_env(),
                           cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert plain.returncode == 0, plain.stderr[-3000:]
    group = subprocess.run(single_rank_cmd(tiny_overrides(shards, tmp_path / "group", **common)),
                           env=process_env(), cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert group.returncode == 0, group.stderr[-3000:]
    assert "rank 0/1 joined the gloo process group" in group.stderr
    a = load_checkpoint(tmp_path / "plain" / "ckpt-000000004")
    b = load_checkpoint(tmp_path / "group" / "ckpt-000000004")
    assert nets_equal(a, b)
    assert torch.equal(a["ranks"][0]["pool_a"]["images"], b["ranks"][0]["pool_a"]["images"])


def test_the_generators_average_is_equal_on_every_rank_without_communication(tmp_path):
    # The worker gathers all parameters, the average's included (after the four networks'), after every step
    # and exits non-zero on a difference between ranks.
    last = run_workers(tmp_path, 2, 3, "float32", [*TINY, "train.ema_decay=0.5"])["params"][-1]
    cfg = load_config([], TINY)
    gens, discs = build_networks(cfg.model)
    n_g, n_d = (sum(p.numel() for p in m.parameters()) for m in (gens, discs))
    assert last.numel() == 2 * n_g + n_d
    # After 3 steps at decay 0.5 the average is not the weights.
    assert not torch.equal(last[n_g + n_d:], last[:n_g])


@pytest.mark.parametrize("method,fail", [("cyclegan", False), ("fastcut", False), ("cyclegan", True)],
                         ids=["cyclegan", "fastcut", "failing-run"])
def test_the_process_group_is_freed_at_teardown_not_at_interpreter_exit(shards, tmp_path, method, fail):
    """The bug: the DDP wrappers outlived destroy_process_group in reference cycles (and, when the run raised,
    in its traceback's frames), holding the gloo group until interpreter finalisation, where a rank sometimes
    died of SIGABRT after a successful run (a flaky 2-rank resume test). With the cyclic collector off, nothing
    but the teardown itself can free them."""
    overrides = tiny_overrides(shards, tmp_path / "run", **{"model.method": method, "train.steps": 2,
                                                            "tracking.enabled": False})
    proc = torchrun(["--standalone", "--nproc_per_node=2", str(ROOT / "tests" / "support" / "teardown_worker.py"),
                     *(["--fail"] if fail else []), *overrides])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("failed: injected failure") == (2 if fail else 0), proc.stdout
    assert proc.stdout.count("alive DDP=0") == 2, proc.stdout
