"""Building one rank's training components: networks, optimisers, image pools, DDP wrappers, the step."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline.data.moments import PixelMoments
from pipeline.engine import dist
from pipeline.engine.kernels import configure_kernels
from pipeline.engine.optim import build_adam
from pipeline.gan.cut.model import PatchSampling, build_cut_networks, build_cut_objective
from pipeline.gan.cut.step import CUTStep
from pipeline.gan.cyclegan import build_networks, build_objective
from pipeline.gan.ema import GeneratorEMA
from pipeline.gan.image_pool import ImagePool
from pipeline.gan.methods import DIRECTIONS
from pipeline.gan.networks import use_sliced_reflection_pad, uses_group_kernel_norm
from pipeline.gan.step import StepNetworks, TrainStep
from pipeline.gan.stepping import Optimisers, Pools, StepSettings
from pipeline.train.colour_start import start_from_transfer

log = logging.getLogger("pipeline.train")


@dataclass
class Components:
    """The networks of one rank and the step that trains them (through DDP wrappers when distributed)."""

    gens: torch.nn.Module
    """CycleGAN's `Generators` (G_ab, G_ba) or CUT's `CUTGenerators` (G and the patch sampler F)."""
    discs: torch.nn.Module
    step: TrainStep | CUTStep
    nets: dict[str, torch.nn.Module]
    """What checkpoints hold, by name: G_ab, G_ba, D_a, D_b; or G, F, D."""
    directions: dict[str, str]
    """Direction (AtoB, BtoA) -> the attribute of `gens` that translates it."""
    ema: GeneratorEMA | None = None
    """The generators' moving average (train.ema_decay > 0), else None."""

    @property
    def eval_gens(self) -> torch.nn.Module:
        """What samples, evaluation and the logged models use: the average when there is one."""
        return self.ema.gens if self.ema is not None else self.gens

    def translators(self) -> dict[str, torch.nn.Module]:
        """Direction -> the generator that samples, evaluation and the logged models use."""
        return {d: getattr(self.eval_gens, name) for d, name in self.directions.items()}


def uses_cudagraphs(perf: DictConfig, device: torch.device) -> bool:
    """Whether torch.compile records CUDA graphs (inductor's reduce-overhead and max-autotune modes, or the
    cudagraphs backend)."""
    if not perf.compile or device.type != "cuda":
        return False
    return perf.compile_backend == "cudagraphs" or (
        perf.compile_backend == "inductor" and perf.compile_mode in ("reduce-overhead", "max-autotune"))


def build_components(cfg: DictConfig, info: dist.DistInfo, device: torch.device,
                     colour_moments: dict[str, PixelMoments] | None = None) -> Components:
    """Networks (identical on every rank: seeded from train.seed), optimisers, this rank's pools, DDP.

    `colour_moments`: the domains' pixel moments (`colour_start.domain_moments`), given to start the colour
    generators as the colour transfer between the domains (model.colour_start=transfer, a fresh run)."""
    if cfg.model.method != "cyclegan":
        return build_cut_components(cfg, info, device, colour_moments)
    configure_kernels(cfg.perf, device)
    torch.manual_seed(cfg.train.seed)
    gens, discs = build_networks(cfg.model, fused=cfg.perf.fused_calls,
                                 group_kernel_norm=uses_group_kernel_norm(cfg.perf.instance_norm_kernel, device))
    if colour_moments is not None:  # Before the average's copy and DDP's broadcast, which carry it everywhere.
        start_from_transfer(gens, DIRECTIONS["cyclegan"], colour_moments)
    memory_format = _place((gens, discs), cfg.perf, device)
    ema = (GeneratorEMA(gens, cfg.train.ema_decay, cfg.train.ema_start_step, cfg.train.ema_every)
           if cfg.train.ema_decay > 0 else None)  # Before compiling: the average is a plain eager copy.
    _compile((gens.G_ab, gens.G_ba, discs.D_a, discs.D_b), cfg.perf)
    pool_seed = cfg.train.seed * 1000 + info.rank
    pool_a = ImagePool(cfg.train.pool_size, seed=2 * pool_seed)
    pool_b = ImagePool(cfg.train.pool_size, seed=2 * pool_seed + 1)
    gens_call, discs_call = _wrap(gens, device), _wrap(discs, device)
    step = TrainStep(
        networks=StepNetworks(gens_call, discs_call, discs),
        objective=build_objective(cfg.loss),
        optimisers=_optimisers(gens, discs, cfg, device),
        pools=Pools(pool_a, pool_b),
        settings=_settings(cfg, device, memory_format),
    )
    nets = {"G_ab": gens.G_ab, "G_ba": gens.G_ba, "D_a": discs.D_a, "D_b": discs.D_b}
    return Components(gens, discs, step, nets, DIRECTIONS["cyclegan"], ema)


def build_cut_components(cfg: DictConfig, info: dist.DistInfo, device: torch.device,
                         colour_moments: dict[str, PixelMoments] | None = None) -> Components:
    """CUT / FastCUT: G + F in one module and D, one Adam over G and F (per-parameter, so the same as the
    reference's two), one for D, this rank's patch sampling; the same DDP, EMA and compile settings."""
    configure_kernels(cfg.perf, device)
    torch.manual_seed(cfg.train.seed)
    objective = build_cut_objective(cfg.loss, cfg.cut)
    gens, disc = build_cut_networks(cfg.model, cfg.cut, objective,
                                    group_kernel_norm=uses_group_kernel_norm(cfg.perf.instance_norm_kernel, device))
    if colour_moments is not None:
        start_from_transfer(gens, DIRECTIONS[cfg.model.method], colour_moments)
    memory_format = _place((gens, disc), cfg.perf, device)
    ema = (GeneratorEMA(gens, cfg.train.ema_decay, cfg.train.ema_start_step, cfg.train.ema_every, names=("G",))
           if cfg.train.ema_decay > 0 else None)
    _compile((gens.G, disc), cfg.perf)
    step = CUTStep(
        gens=_wrap(gens, device), disc=_wrap(disc, device), disc_module=disc, objective=objective,
        optimisers=_optimisers(gens, disc, cfg, device),
        settings=_settings(cfg, device, memory_format),
        sampling=PatchSampling(cfg.train.seed * 1000 + info.rank),
    )
    return Components(gens, disc, step, {"G": gens.G, "F": gens.F, "D": disc}, DIRECTIONS[cfg.model.method], ema)


def _place(modules: tuple[torch.nn.Module, ...], perf: DictConfig, device: torch.device) -> torch.memory_format:
    """Move the modules to the device in the configured memory format (deterministic kernels first swap the
    reflection pads torch has no deterministic CUDA backward for); returns that format."""
    if perf.deterministic:
        for module in modules:
            use_sliced_reflection_pad(module)
    memory_format = torch.channels_last if perf.channels_last else torch.contiguous_format
    for module in modules:
        module.to(device, memory_format=memory_format)
    return memory_format


def _compile(nets: tuple[torch.nn.Module, ...], perf: DictConfig) -> None:
    """torch.compile each network in place (perf.compile), after the EMA's eager copy was taken."""
    if not perf.compile:
        return
    # D is called with and without requires_grad and on pooled inputs: each is a recompile (guards), so the
    # default limit of 8 is hit and dynamo silently falls back to eager. Raise it.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    mode = None if perf.compile_mode == "default" else perf.compile_mode
    for net in nets:
        net.compile(backend=perf.compile_backend, mode=mode)


def _wrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP around the module when a process group exists, else the module itself. DDP averages gradients; D is
    called unwrapped and frozen in the G phase (never static_graph). A process group of one rank (a launcher
    check on one device) takes the same path as eight."""
    if not dist.is_distributed():
        return module
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)


def _optimisers(gens: torch.nn.Module, discs: torch.nn.Module, cfg: DictConfig, device: torch.device) -> Optimisers:
    """Adam for the generator side, Adam for the discriminators, and a GradScaler enabled in fp16 only."""
    opt_g = build_adam(gens.parameters(), cfg.optim.lr, cfg.optim.beta1, cfg.optim.beta2, device)
    opt_d = build_adam(discs.parameters(), cfg.optim.lr, cfg.optim.beta1, cfg.optim.beta2, device)
    return Optimisers(opt_g, opt_d, torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16"))


def _settings(cfg: DictConfig, device: torch.device, memory_format: torch.memory_format) -> StepSettings:
    return StepSettings(device, cfg.train.precision, check_finite=cfg.control.max_nonfinite_steps > 0,
                        distributed=dist.is_distributed(), memory_format=memory_format,
                        cudagraphs=uses_cudagraphs(cfg.perf, device))
