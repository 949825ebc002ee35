"""Typed training configuration: dataclass defaults, YAML overlays, command-line overrides.

Defaults live only in the dataclasses below and follow the CycleGAN paper and its reference implementation
(../shared/SPEC.md). YAML files in `configs/` overlay them and `key=value` arguments overlay those. Every key is
checked against the schema before merging, so a misspelled key is an error that names the closest valid key
instead of silently becoming a new setting. No torch import here: configs load fast and in any process.
"""

from __future__ import annotations

import copy
import difflib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


@dataclass
class ModelConfig:
    method: str = "cyclegan"
    """What is trained: cyclegan (two generators, cycle loss), cut or fastcut (one generator, PatchNCE loss:
    Park et al. 2020). cut and fastcut first apply their presets (METHOD_PRESETS), which config files and
    overrides then change."""
    generator: str = "resnet_9blocks"
    """Generator architecture: resnet_9blocks, resnet_6blocks, unet_256 or unet_128."""
    discriminator: str = "basic"
    """Discriminator architecture: basic (70x70 PatchGAN), n_layers or pixel."""
    n_layers_d: int = 3
    """Number of strided layers of the n_layers discriminator (basic is 3)."""
    ngf: int = 64
    """Generator filters in the first convolution."""
    ndf: int = 64
    """Discriminator filters in the first convolution."""
    norm: str = "instance"
    """Normalisation layer: instance, batch, none (the reference's), group (GroupNorm, model.norm_groups) or layer
    (GroupNorm with one group)."""
    norm_groups: int = 32
    """Groups of model.norm=group; must divide every width (ngf, ndf and their multiples)."""
    padding: str = "reflect"
    """Padding of the resnet generators' residual blocks: reflect, replicate or zero (the reference's
    padding_type)."""
    antialias: bool = True
    """cut/fastcut: blur-pooled downsampling in the generator and discriminator (the CUT code's default; false is
    its --no_antialias)."""
    antialias_up: bool = True
    """cut/fastcut: antialiased upsampling in the generator (false is --no_antialias_up; both false give the
    CycleGAN reference's generator)."""
    g_variant: str = "reference"
    """Generator variant: reference (the paper's: blind to a colour cast and nearly to exposure, G(x + c) = G(x))
    or colour (sees absolute colour and intensity: a skip in tanh's logit space, a per-pixel colour branch, and
    the paper's network as a residual; starts as model.colour_start says). See pipeline/gan/colour.py."""
    d_variant: str = "reference"
    """Discriminator variant: reference (the paper's PatchGAN with model.norm), spectral (spectral norm on every
    convolution instead of norm layers: its scores see exposure) or colour (spectral, plus a score from each
    image's channel means, covariance and quantiles added to every patch's: sees global colour mappings
    directly)."""
    colour_start: str = "identity"
    """Where the colour generator starts (g_variant=colour): identity (G(x) = x) or transfer (its skip is fixed,
    before training, to the linear colour transfer from the source domain's pixel mean and covariance to the
    target's, and the network learns what that misses). transfer suits domains that differ in colour, not in
    content: colour grading, exposure, white balance, camera A -> B, stain, intensity windows."""
    colour_start_images: int = 512
    """colour_start=transfer: images of each domain its pixel statistics are taken over (read once at the start
    of a run, by every rank, from a stream apart from training's)."""
    channels_a: int = 3
    """Channels of domain A's images: 1 (grayscale), 3 (RGB) or a band count (multi-band TIFF or .npy). The
    reference's input_nc, per domain: G_ab maps channels_a -> channels_b, G_ba back, D_a judges channels_a."""
    channels_b: int = 3
    """Channels of domain B's images (the reference's output_nc)."""
    init_type: str = "normal"
    """Weight initialisation: normal, xavier, kaiming or orthogonal."""
    init_gain: float = 0.02
    """Scale of the initialisation (std for normal)."""


@dataclass
class LossConfig:
    gan_mode: str = "lsgan"
    """Adversarial loss: lsgan (least squares, the paper's), vanilla (BCE with logits) or hinge."""
    lambda_a: float = 10.0
    """Weight of the A->B->A cycle loss."""
    lambda_b: float = 10.0
    """Weight of the B->A->B cycle loss."""
    lambda_idt: float = 0.5
    """Identity loss weight relative to lambda_a/lambda_b; 0 disables it and skips its forward passes."""


@dataclass
class CutConfig:
    """The PatchNCE objective of model.method=cut|fastcut (SPEC-CUT.md); unused by cyclegan."""

    lambda_gan: float = 1.0
    """Weight of the adversarial term."""
    lambda_nce: float = 1.0
    """Weight of each PatchNCE term (cut: 1, fastcut: 10)."""
    nce_idt: bool = True
    """Identity NCE: G also translates real B and PatchNCE(y, G(y)) is averaged with PatchNCE(x, G(x))."""
    nce_layers: str = "0,4,8,12,16"
    """Generator layers whose features PatchNCE compares (indices of its top-level module list)."""
    num_patches: int = 256
    """Positions sampled per layer and image (fewer where a layer has fewer)."""
    nce_t: float = 0.07
    """Temperature of the PatchNCE logits."""
    mlp_width: int = 256
    """Width of the patch sampler F's two-layer MLPs."""
    flip_equivariance: bool = False
    """With probability 0.5 per step, flip the input horizontally before G and the queries back (fastcut)."""


# What model.method=cut|fastcut sets before config files and overrides (SPEC-CUT.md): CUT's initialisation,
# its loss weights and its schedule's shape (CUT 200 + 200 epochs, FastCUT 150 + 50).
METHOD_PRESETS: dict[str, dict[str, Any]] = {
    "cut": {"model": {"init_type": "xavier"}, "optim": {"decay_start_frac": 0.5}, "train": {"pool_size": 0},
            "cut": {"lambda_nce": 1.0, "nce_idt": True, "flip_equivariance": False}},
    "fastcut": {"model": {"init_type": "xavier"}, "optim": {"decay_start_frac": 0.75}, "train": {"pool_size": 0},
                "cut": {"lambda_nce": 10.0, "nce_idt": False, "flip_equivariance": True}},
}


@dataclass
class OptimConfig:
    lr: float = 2e-4
    """Adam learning rate for both the generators and the discriminators."""
    beta1: float = 0.5
    """Adam beta1."""
    beta2: float = 0.999
    """Adam beta2."""
    decay_start_frac: float = 0.5
    """Share of train.steps run at constant lr before the linear decay to 0 (the paper: half)."""
    lr_scaling: str = "none"
    """How lr follows the global batch (ranks x data.batch_per_rank): none (lr as given), linear or sqrt (lr times
    the global batch over optim.lr_reference_batch, or its square root). The start of a run logs both."""
    lr_reference_batch: int = 1
    """The global batch optim.lr was tuned at (the paper's: 1), for optim.lr_scaling."""


@dataclass
class DomainImagesConfig:
    """How one domain's stored values are read (model.channels_a/b says how many channels it has)."""

    depth: str = "uint8"
    """Type of the stored values: uint8, uint16 (16-bit PNG/TIFF), int16 (e.g. CT in HU, TIFF or .npy) or float32
    (TIFF or .npy). Translations into this domain are written with it (16-bit PNG/TIFF, or .npy)."""
    intensity: str = "full"
    """How stored values map to the networks' [-1, 1], values outside clipped: full (the depth's range: 0..255,
    0..65535), a window LOW..HIGH in stored units (-1000..1000 for CT in HU, 0..1 for float images) or per-image
    percentiles pLOW..pHIGH (p0.5..p99.5 for MRI). Stored in checkpoints and exports: translate writes the
    original units."""
    mismatch: str = "convert"
    """Images that disagree with the domain's channels or depth (a stray RGB file in a grayscale set, 8-bit
    files in a 16-bit set): convert (with a warning that counts them) or error. Images with more bits than the
    depth, or other band counts, are always an error naming the file and the setting."""
    bands: str = ""
    """Multi-band domains: the bands sample grids and MLflow show as RGB, e.g. '3,2,1' (0-based); empty: the
    first three. 1-channel domains are shown as grayscale."""


@dataclass
class DataConfig:
    train_a: str = ""
    """Shard pattern of domain A's training set (path, brace pattern, file:, pipe: or http(s) URL)."""
    train_b: str = ""
    """Shard pattern of domain B's training set."""
    test_a: str = ""
    """Shard pattern of domain A's held-out set (sample grids, evaluation); empty disables them."""
    test_b: str = ""
    """Shard pattern of domain B's held-out set."""
    preprocess: str = "resize_and_crop"
    """Train transform: resize_and_crop (the paper's), crop, scale_width_and_crop or none."""
    load_size: int = 286
    """Side the image is resized to before the random crop (pixels)."""
    crop_size: int = 256
    """Side of the random training crop and of held-out images (pixels)."""
    flip: bool = True
    """Random horizontal flip during training."""
    batch_per_rank: int = 1
    """Images of each domain per rank and step (the paper: 1)."""
    workers: int = 4
    """DataLoader worker processes per rank; 0 decodes in the training process."""
    shuffle_buffer: int = 512
    """Samples held in each stream's shuffle buffer."""
    prefetch_factor: int = 4
    """Batches each worker prepares ahead of the step."""
    max_image_pixels: int = 89_478_485
    """Images with more pixels are skipped with a warning, not decoded (decompression bombs: a few kilobytes
    that decode to gigabytes); PIL's own limit by default. 0: no limit."""
    domain_a: DomainImagesConfig = field(default_factory=DomainImagesConfig)
    """Domain A's stored values: depth, intensity mapping, mismatch handling, displayed bands."""
    domain_b: DomainImagesConfig = field(default_factory=DomainImagesConfig)
    """Domain B's stored values."""
    remote_retry_s: float = 120.0
    """How long a network shard (http(s)://, pipe:), or a local one with transient read errors (EIO, ESTALE), may
    keep failing, read again with a warning each time, before the run stops with an error naming it."""


@dataclass
class TrainConfig:
    """The algorithm's run: its length, seed, arithmetic, device and history of fakes."""

    steps: int = 266_800
    """Optimiser steps to run (reference: 200 epochs of horse2zebra's 1,334 images at batch 1)."""
    seed: int = 0
    """Seed of initialisation, data streams and image pools; each rank derives its own from it."""
    precision: str = "fp32"
    """Arithmetic of the forward passes: fp32, bf16 (autocast) or fp16 (autocast + GradScaler)."""
    device: str = "auto"
    """auto (CUDA when available), cpu or cuda."""
    pool_size: int = 50
    """Past fakes kept per discriminator and rank for the D step; 0 disables the history."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of both generators' weights with this decay per update (e.g. 0.999);
    samples, evaluation, translate, export and the logged models then use it. 0: no average."""
    ema_start_step: int = 0
    """Step at which the average starts, as a copy of the weights."""
    ema_every: int = 1
    """Steps between updates of the average."""


@dataclass
class PerfConfig:
    """Speed only: each setting changes how fast the same maths runs, not what it computes (beyond rounding)."""

    fused_calls: bool = True
    """Batch each generator's translation and identity inputs, and each D's real and fake, into one call."""
    instance_norm_kernel: str = "auto"
    """group_norm (the same statistics through GroupNorm's kernel: 1.7-2.8x faster on CPU), instance_norm
    (torch's own, as the reference), or auto: group_norm on CPU, instance_norm on CUDA (the GPU check measures both
    there: `make gpu-check`)."""
    channels_last: bool = False
    """NHWC activations (tensor cores like them; on CPU InstanceNorm copies layouts and it is slower)."""
    compile: bool = False
    """torch.compile each network in place (state_dict keys unchanged)."""
    compile_backend: str = "inductor"
    """torch.compile backend (inductor; aot_eager or eager to check tracing without code generation)."""
    compile_mode: str = "default"
    """torch.compile mode: default, reduce-overhead (CUDA graphs: one launch per graph instead of one per kernel,
    for launch-bound small batches) or max-autotune (also benchmarks kernel choices: minutes more compile time)."""
    tf32: bool = True
    """TF32 tensor cores for fp32 convolutions and matrix products on CUDA (torch's default for convolutions);
    false computes fp32 as true fp32. No effect on CPU or on bf16/fp16 work."""
    deterministic: bool = False
    """Bitwise reproducible CUDA runs (a resumed run equals a straight one): deterministic kernels, no cudnn
    autotuning, a reflection padding whose backward does not add with atomics. Slower; CPU runs are
    deterministic anyway."""
    threads: int = 0
    """CPU threads of each rank's intra-op pool (torch.set_num_threads); 0 keeps torch's default (OMP_NUM_THREADS,
    else one per core). Ranks x threads plus data.workers should not exceed the cores of a CPU machine."""


@dataclass
class ReportConfig:
    """What the run reports and how often: loss logs, sample grids, the data-wait warning."""

    log_every_steps: int = 100
    """Steps between loss logs (the only steps that synchronise the device for metrics)."""
    sample_every_steps: int = 1000
    """Steps between sample grids from the fixed held-out batch; 0 disables them."""
    sample_images: int = 4
    """Held-out images per domain in each sample grid."""
    data_wait_warn_share: float = 0.2
    """Warn (with a worker count that would help) when steps spend more than this share waiting for data."""
    health_after_steps: int = 1000
    """From this step on, warn (once per sign, with the evidence and the usual causes) when the run shows it is not
    learning: a cycle loss that has not fallen, discriminators winning outright, translations that no longer
    depend on the input (pipeline/train/health.py). The signals are logged as health/* metrics from the start;
    0 turns the warnings off."""


@dataclass
class ControlConfig:
    """When the run stops early: chained-job chunks and repeated non-finite losses."""

    stop_after_steps: int = 0
    """Stop (checkpoint, exit code 3) after this many steps of this process, for chained jobs; 0: run to the end."""
    max_nonfinite_steps: int = 10
    """Consecutive steps with a NaN/inf loss that are skipped before training stops with an error. 0 turns the
    check off (no per-step check and its device sync): a NaN loss is then applied to the weights, and the start
    of the run logs a warning saying so."""
    lock_stale_s: float = 120.0
    """The run directory's lock (one training per run_dir) held by a process on another host counts as abandoned
    once its heartbeat (renewed every quarter of this) is older than this; on the same host, and for a requeued
    Slurm job, a dead holder is recognised at once. Keep it well above the hosts' clock differences."""


@dataclass
class CheckpointConfig:
    every_steps: int = 5000
    """Steps between checkpoints; the final step (and a stop by signal) is always saved. 0: only those."""
    keep_last: int = 3
    """Newest checkpoints kept."""
    keep_every_steps: int = 0
    """Also keep checkpoints whose step is a multiple of this (0: none)."""
    min_free_mb: float = 100.0
    """Space to leave free on the run directory's filesystem: a checkpoint that would leave less (judged by the
    size of the last one) is not written, and the run says so, instead of filling the disk to its last byte."""
    resume: str = "auto"
    """auto (newest complete checkpoint in run_dir, if any), never, or the path of a checkpoint (a ckpt-* directory
    or a ckpt-*.pt file of an earlier version)."""
    init_from: str = ""
    """Warm start of a new run (optimisers, pools and counters start fresh): the networks of one of our checkpoints
    (a ckpt-* directory, a ckpt-*.pt file, a generators file) or a reference folder with latest_net_G_A.pth etc."""
    best_metric: str = ""
    """Keep run_dir/best.pt, the generators (raw and EMA) of the best evaluation so far by this metric
    (eval/AtoB/l1, eval/AtoB/fid, ...: the keys training logs); never pruned, never resumed from. Empty: none."""
    best_mode: str = "min"
    """Whether lower (min) or higher (max) values of checkpoint.best_metric are better."""


@dataclass
class TrackingConfig:
    enabled: bool = True
    """Record the run in MLflow (rank 0 only)."""
    uri: str = ""
    """MLflow tracking URI; empty uses MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory."""
    experiment: str = "cyclegan"
    """MLflow experiment name."""
    run_name: str = ""
    """MLflow run name; empty uses the run directory's name."""
    log_checkpoints: str = "last"
    """Checkpoints uploaded as MLflow artifacts (and best.pt, with checkpoint.best_metric): all, last (the final
    one) or none."""
    checkpoint_content: str = "generators"
    """What an uploaded checkpoint holds: generators (one file of the generators, raw and EMA, and the config: what
    a reviewer translates with) or full (the checkpoint directory, every rank's state included: resumable)."""
    log_model: bool = True
    """At the end, log both generators as MLflow PyTorch models with a signature and an input example."""
    flush_timeout_s: float = 120.0
    """At the end, how long to wait for records buffered during a tracking-server outage."""
    start_timeout_s: float = 60.0
    """At start-up, how long to keep trying to open the MLflow store (a busy SQLite file, a server that is down)
    before tracking.required decides."""
    required: bool = False
    """What happens when the store cannot be opened at start-up: false trains anyway (everything is kept in
    run_dir; `python -m pipeline.sync RUN_DIR` uploads it later), true stops the run with exit code 2."""


@dataclass
class EvalConfig:
    paired: bool = False
    """Held-out sets are paired by sample key (the synthetic set): report G_ab's L1 error against the truth."""
    every_steps: int = 0
    """Steps between evaluations during training; 0 evaluates only at the end."""
    features: str = ""
    """Local feature extractor file (Inception weights, see pipeline/eval/metrics/features.py) for FID/KID of both
    directions at each evaluation; empty: no FID/KID. Any evaluation also reports both cycle errors."""
    batch_size: int = 16
    """Images per forward pass of the generators and the extractor, here and in `pipeline.evaluate` (its
    default): the same batches make the command repeat the training's numbers exactly, not to rounding."""


@dataclass
class DistConfig:
    """The process group of a multi-rank (and multi-host) job."""

    timeout_s: float = 300.0
    """How long a collective waits for a lost or stuck peer before the job ends with an error naming it (torch's
    default is 30 minutes). Keep it above the longest pause of one rank: a checkpoint write, an evaluation."""
    socket_ifname: str = ""
    """Network interface for gloo and nccl's sockets (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME, which win when set);
    empty: the interface of the route to MASTER_ADDR."""


@dataclass
class Config:
    run_dir: str = "runs/cyclegan"
    """Folder of this run's checkpoints, samples, logs and resolved config."""
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    cut: CutConfig = field(default_factory=CutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)


# The generator architectures, each with the side multiple its inputs need (its two stride-2 steps for resnet,
# 2**num_downs for unet): the one list that config validation, the network builder and inference share.
GENERATORS: dict[str, int] = {"resnet_9blocks": 4, "resnet_6blocks": 4, "unet_256": 256, "unet_128": 128}

# Closed sets of string values, checked after merging so the error can list the choices.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.method": ("cyclegan", "cut", "fastcut"),
    "model.generator": tuple(GENERATORS),
    "model.discriminator": ("basic", "n_layers", "pixel"),
    "model.norm": ("instance", "batch", "none", "group", "layer"),
    "model.padding": ("reflect", "replicate", "zero"),
    "model.init_type": ("normal", "xavier", "kaiming", "orthogonal"),
    "model.g_variant": ("reference", "colour"),
    "model.d_variant": ("reference", "spectral", "colour"),
    "model.colour_start": ("identity", "transfer"),
    "loss.gan_mode": ("lsgan", "vanilla", "hinge"),
    "data.preprocess": ("resize_and_crop", "crop", "scale_width_and_crop", "none"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
    "perf.instance_norm_kernel": ("auto", "group_norm", "instance_norm"),
    "perf.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "tracking.log_checkpoints": ("all", "last", "none"),
    "tracking.checkpoint_content": ("generators", "full"),
    "checkpoint.best_mode": ("min", "max"),
    "optim.lr_scaling": ("none", "linear", "sqrt"),
    "data.domain_a.mismatch": ("convert", "error"),
    "data.domain_b.mismatch": ("convert", "error"),
    "data.domain_a.depth": ("uint8", "uint16", "int16", "float32"),
    "data.domain_b.depth": ("uint8", "uint16", "int16", "float32"),
}


class Schema:
    """A structured-config schema and the one way configs are built from it: defaults, then YAML files, then
    `key=value` overrides, each layer checked for unknown keys (naming the closest valid one) and wrong types.

    Used for the training config (`load_config`) and the launchers' Slurm settings (`prefix="slurm."`).
    """

    def __init__(self, cls: type, prefix: str = "", renamed: dict[str, str] | None = None) -> None:
        self.cls, self.prefix, self.renamed = cls, prefix, dict(renamed or {})
        self.keys = self._keys(cls)

    @classmethod
    def _keys(cls, schema: type, prefix: str = "") -> dict[str, type | None]:
        """Dotted key -> dataclass type (for groups) or None (for leaves)."""
        keys: dict[str, type | None] = {}
        for f in fields(schema):
            name = prefix + f.name
            sub = f.default_factory if is_dataclass(f.default_factory) else None  # type: ignore[arg-type]
            keys[name] = sub
            if sub is not None:
                keys.update(cls._keys(sub, name + "."))
        return keys

    def _closest(self, key: str) -> str:
        parent = key.rpartition(".")[0]
        siblings = [k for k in self.keys if k.rpartition(".")[0] == parent]
        match = difflib.get_close_matches(key, siblings, n=1, cutoff=0.5) or difflib.get_close_matches(
            key, list(self.keys), n=1, cutoff=0.5
        )
        if match:
            return f"did you mean '{self.prefix}{match[0]}'?"
        return "valid keys here: " + ", ".join(self.prefix + k for k in sorted(siblings))

    def check_keys(self, node: Any, source: str, prefix: str = "") -> None:
        """Raise ConfigError for the first key of `node` that the schema does not have."""
        if not isinstance(node, dict):
            if not prefix:
                raise ConfigError(f"{source} must hold settings (key: value), got {type(node).__name__}")
            return
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if dotted not in self.keys:
                raise ConfigError(f"unknown config key '{self.prefix}{dotted}' in {source}; {self._closest(dotted)}")
            if self.keys[dotted] is not None:
                if not isinstance(value, dict):
                    raise ConfigError(f"'{self.prefix}{dotted}' in {source} is a group of settings, not a value")
                self.check_keys(value, source, dotted + ".")

    def rename_old_keys(self, node: Any, source: str, warn: bool = True) -> Any:
        """A copy of `node` with each deprecated key moved to its new name, saying so once per key (a saved config
        is renamed silently: its reader cannot change it, and it must keep loading after the old names go)."""
        if not self.renamed or not isinstance(node, dict):
            return node
        node = copy.deepcopy(node)
        for old, new in self.renamed.items():
            *path, leaf = old.split(".")
            parent = node
            for part in path:
                parent = parent.get(part) if isinstance(parent, dict) else None
            if not isinstance(parent, dict) or leaf not in parent:
                continue
            value = parent.pop(leaf)
            *path, leaf = new.split(".")
            target = node
            for part in path:
                if target.get(part) is None:  # Absent, or a YAML group whose keys are all commented out.
                    target[part] = {}
                target = target[part]
                if not isinstance(target, dict):
                    raise ConfigError(f"'{self.prefix}{part}' in {source} is a group of settings, not a value")
            if leaf in target:
                raise ConfigError(f"{source} sets both '{old}' and '{new}'; '{old}' is the old name of '{new}': "
                                  f"keep only '{new}'")
            target[leaf] = value
            if warn:
                log.warning("config key '%s' in %s is now '%s'; the old name works in this release (0.1) only",
                            old, source, new)
        return node

    def merge(self, base: DictConfig, layer: Any, source: str, warn_renamed: bool = True) -> DictConfig:
        node = OmegaConf.to_container(layer) if isinstance(layer, DictConfig) else layer
        node = self.rename_old_keys(node, source, warn=warn_renamed)
        self.check_keys(node, source)
        try:
            return OmegaConf.merge(base, node)  # type: ignore[return-value]
        except OmegaConfBaseException as err:
            key = getattr(err, "full_key", None) or "?"
            reason = str(err).splitlines()[0]
            raise ConfigError(f"bad value for '{self.prefix}{key}' in {source}: {reason}") from None

    def load(self, yaml_files: Sequence[tuple[Path, str]], overrides: Sequence[str],
             presets: Sequence[tuple[dict[str, Any], str]] = ()) -> DictConfig:
        """Defaults, then `presets` (settings, their name), then each (file, how to name it in errors), then
        overrides; writable and not yet validated."""
        cfg: DictConfig = OmegaConf.structured(self.cls)
        for preset, label in presets:
            cfg = self.merge(cfg, preset, label)
        for path, label in yaml_files:
            cfg = self.merge(cfg, read_yaml(path) or OmegaConf.create({}), label)
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"command-line override '{item}' is not of the form key=value")
            try:
                OmegaConf.from_dotlist([item])
            except yaml.YAMLError as err:
                raise ConfigError(f"command-line override '{item}': its value is not valid YAML "
                                  f"({_yaml_problem(err)}); quote it, e.g. key='value'") from None
        if overrides:
            cfg = self.merge(cfg, OmegaConf.from_dotlist(list(overrides)), "the command line")
        return cfg


def _yaml_problem(err: yaml.YAMLError) -> str:
    if isinstance(err, yaml.MarkedYAMLError):
        return " ".join(part for part in (err.context, err.problem) if part)
    return str(err).splitlines()[0]


def read_yaml(path: Path) -> Any:
    """A YAML file's contents; a syntax error names the file, line and column in one line."""
    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML: {_yaml_problem(err)} (check the indentation and the ':' "
                          "after each key on that line or the one before)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{path}' is not a text file (not UTF-8); give a YAML file") from None
    except OSError as err:
        raise ConfigError(f"config file '{path}' cannot be read ({err.strerror or err})") from None


# Keys that moved when `train` was split by concern: the old names still work in this release (0.1), with a
# warning naming the new one, and go in the next.
RENAMED: dict[str, str] = {
    **{f"train.{k}": f"perf.{k}" for k in ("fused_calls", "instance_norm_kernel", "channels_last", "compile",
                                           "compile_backend", "threads")},
    **{f"train.{k}": f"report.{k}" for k in ("log_every_steps", "sample_every_steps", "sample_images",
                                             "data_wait_warn_share")},
    **{f"train.{k}": f"control.{k}" for k in ("stop_after_steps", "max_nonfinite_steps")},
}

SCHEMA = Schema(Config, renamed=RENAMED)


def validate(cfg: DictConfig) -> None:
    """Check value ranges and closed choices that the type system cannot express."""
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            near = difflib.get_close_matches(str(value), choices, n=1)
            hint = f"did you mean '{near[0]}'? " if near else ""
            raise ConfigError(f"'{key}' is '{value}'; {hint}choose one of: {', '.join(choices)}")
    positive = ["cut.num_patches", "cut.mlp_width", "cut.nce_t", "train.steps", "data.batch_per_rank",
                "data.crop_size", "data.load_size", "data.shuffle_buffer", "data.prefetch_factor",
                "report.log_every_steps", "report.sample_images", "dist.timeout_s", "model.norm_groups",
                "model.ngf", "model.ndf", "model.n_layers_d", "model.channels_a", "model.channels_b",
                "model.init_gain", "control.lock_stale_s", "optim.lr_reference_batch"]
    for key in positive:
        if OmegaConf.select(cfg, key) <= 0:
            raise ConfigError(f"'{key}' must be positive, got {OmegaConf.select(cfg, key)}")
    if cfg.control.lock_stale_s < 10:
        raise ConfigError(f"'control.lock_stale_s' must be at least 10 (s): the lock's heartbeat is renewed every "
                          f"quarter of it, got {cfg.control.lock_stale_s}")
    for key in ("optim.beta1", "optim.beta2"):
        if not 0.0 <= OmegaConf.select(cfg, key) < 1.0:
            raise ConfigError(f"'{key}' must lie in [0, 1), got {OmegaConf.select(cfg, key)}")
    if not 0.0 <= cfg.report.data_wait_warn_share <= 1.0:
        raise ConfigError(f"'report.data_wait_warn_share' must lie in [0, 1], got {cfg.report.data_wait_warn_share}")
    side = GENERATORS[cfg.model.generator]
    if cfg.data.preprocess != "none" and cfg.data.crop_size % side:
        raise ConfigError(f"data.crop_size={cfg.data.crop_size} is not a multiple of {side}, which "
                          f"model.generator={cfg.model.generator} needs (its downsampling steps): use "
                          f"{max(side, cfg.data.crop_size // side * side)}")
    if cfg.data.preprocess in ("resize_and_crop", "scale_width_and_crop") and cfg.data.load_size < cfg.data.crop_size:
        raise ConfigError(
            f"data.load_size ({cfg.data.load_size}) is smaller than data.crop_size ({cfg.data.crop_size}); "
            "the random crop needs load_size >= crop_size"
        )
    if cfg.model.method != "cyclegan":
        if not cfg.model.generator.startswith("resnet_"):
            raise ConfigError(f"model.method={cfg.model.method} trains a ResNet generator; model.generator is "
                              f"'{cfg.model.generator}': choose resnet_9blocks or resnet_6blocks")
        try:
            layers = [int(x) for x in str(cfg.cut.nce_layers).split(",") if x.strip()]
        except ValueError:
            layers = []
        if not layers or min(layers) < 0:
            raise ConfigError(f"'cut.nce_layers' is '{cfg.cut.nce_layers}'; give comma-separated generator layer "
                              "indices, e.g. 0,4,8,12,16")
    _validate_domains(cfg)
    if cfg.model.colour_start != "identity" and cfg.model.g_variant != "colour":
        raise ConfigError(f"model.colour_start={cfg.model.colour_start} sets the colour generator's skip; "
                          f"model.g_variant={cfg.model.g_variant} has none: set model.g_variant=colour, or "
                          "model.colour_start=identity")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise ConfigError(f"'train.ema_decay' must lie in [0, 1) (0: no EMA), got {cfg.train.ema_decay}")
    best = cfg.checkpoint.best_metric
    if best and not best.startswith("eval/"):
        raise ConfigError(f"'checkpoint.best_metric' is '{best}'; it names an evaluation metric as training logs "
                          "it, e.g. eval/AtoB/l1 or eval/AtoB/fid")
    if best and not (cfg.eval.every_steps > 0 and (cfg.eval.paired or cfg.eval.features)
                     and cfg.data.test_a and cfg.data.test_b):
        raise ConfigError(f"checkpoint.best_metric={best} needs an evaluation during training: set "
                          "eval.every_steps > 0, eval.paired=true (paired test sets) or eval.features, and "
                          "data.test_a / data.test_b")
    if not 0.0 <= cfg.optim.decay_start_frac <= 1.0:
        raise ConfigError(f"'optim.decay_start_frac' must lie in [0, 1], got {cfg.optim.decay_start_frac}")
    non_negative = ["train.pool_size", "data.workers", "checkpoint.every_steps", "checkpoint.keep_every_steps",
                    "tracking.start_timeout_s", "tracking.flush_timeout_s", "data.remote_retry_s",
                    "data.max_image_pixels", "optim.lr", "loss.lambda_a", "loss.lambda_b", "loss.lambda_idt",
                    "cut.lambda_gan", "cut.lambda_nce", "control.max_nonfinite_steps", "perf.threads",
                    "eval.every_steps", "report.sample_every_steps", "control.stop_after_steps",
                    "checkpoint.min_free_mb", "train.ema_start_step"]
    for key in non_negative:
        if OmegaConf.select(cfg, key) < 0:
            raise ConfigError(f"'{key}' must be >= 0, got {OmegaConf.select(cfg, key)}")
    for key in ("checkpoint.keep_last", "eval.batch_size", "train.ema_every", "model.colour_start_images"):
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"'{key}' must be at least 1, got {OmegaConf.select(cfg, key)}")


# Stored value types of data.domain_*.depth and the range `intensity: full` maps to [-1, 1] (float32: none).
DEPTH_RANGES: dict[str, tuple[float, float] | None] = {"uint8": (0, 255), "uint16": (0, 65535),
                                                       "int16": (-32768, 32767), "float32": None}
_WINDOW = re.compile(r"^(p?)(-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)\.\.(p?)(-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)$")


def parse_intensity(text: str, key: str = "intensity") -> tuple[str, float, float]:
    """data.domain_*.intensity as (kind, low, high): ("full", 0, 0), ("window", LOW, HIGH) from `LOW..HIGH`, or
    ("percentile", LOW, HIGH) from `pLOW..pHIGH`. Raises ConfigError naming `key` for anything else."""
    text = str(text).replace(" ", "")
    if text == "full":
        return "full", 0.0, 0.0
    match = _WINDOW.match(text)
    if match is None or match.group(1) != match.group(3):
        raise ConfigError(f"{key}={text!r}: give full (the depth's range), a window LOW..HIGH in stored units "
                          "(e.g. -1000..1000 for CT) or per-image percentiles pLOW..pHIGH (e.g. p0.5..p99.5)")
    low, high = float(match.group(2)), float(match.group(4))
    percentile = match.group(1) == "p"
    if not low < high or (percentile and not 0 <= low < high <= 100):
        raise ConfigError(f"{key}={text!r}: the low end must be below the high end"
                          + (", both within 0..100" if percentile else ""))
    return ("percentile" if percentile else "window"), low, high


def parse_bands(text: str, channels: int, key: str = "bands") -> tuple[int, ...]:
    """data.domain_*.bands as band indices (empty: none given); ConfigError for anything but 0-based indices
    below `channels`."""
    try:
        bands = tuple(int(b) for b in str(text).split(",") if b.strip())
    except ValueError:
        raise ConfigError(f"{key}={text!r}: give comma-separated 0-based band indices, e.g. 3,2,1") from None
    wrong = [b for b in bands if not 0 <= b < channels]
    if wrong or len(bands) not in (0, 1, 3):
        raise ConfigError(f"{key}={text!r}: give 1 or 3 band indices within 0..{channels - 1}")
    return bands


def _validate_domains(cfg: DictConfig) -> None:
    """Channels, depths and intensity mappings, and what a channel count that differs between A and B rules out."""
    for domain in ("a", "b"):
        group, key = cfg.data[f"domain_{domain}"], f"data.domain_{domain}"
        kind, _, _ = parse_intensity(group.intensity, f"{key}.intensity")
        parse_bands(group.bands, cfg.model[f"channels_{domain}"], f"{key}.bands")
        if kind == "full" and DEPTH_RANGES[group.depth] is None:
            raise ConfigError(f"{key}.depth=float32 has no fixed range: set {key}.intensity to a window LOW..HIGH "
                              "(e.g. 0..1) or percentiles pLOW..pHIGH")
    a, b = cfg.model.channels_a, cfg.model.channels_b
    if a == b:
        return
    if cfg.model.method == "cyclegan" and cfg.loss.lambda_idt > 0 and 1 not in (a, b):
        raise ConfigError(f"loss.lambda_idt={cfg.loss.lambda_idt} asks G_ab(b) to equal b, with b seen through A's "
                          f"channels: its luminance for a 1-channel A, replicated from a 1-channel B; channel counts "
                          f"{a} -> {b} have no such view (model.channels_a={a}, channels_b={b}): set "
                          "loss.lambda_idt=0")
    if cfg.model.g_variant == "colour":
        raise ConfigError(f"model.g_variant=colour keeps the input under its output, which needs as many channels "
                          f"in A as in B (model.channels_a={a}, channels_b={b}): use model.g_variant=reference")
    if cfg.model.method != "cyclegan" and 1 not in (a, b):
        raise ConfigError(f"model.method={cfg.model.method} compares G's features of its input and its output "
                          f"through the same encoder: channel counts {a} -> {b} cannot share it (one of them "
                          "must be 1, or both equal)")


def load_config(yaml_paths: Sequence[str | os.PathLike] = (), overrides: Sequence[str] = ()) -> DictConfig:
    """Build the run's config: dataclass defaults, then each YAML file, then `key=value` overrides.

    Args:
        yaml_paths: YAML files applied in order; each may contain a subset of the keys.
        overrides: `dotted.key=value` strings, as typed on the command line.

    Returns:
        A read-only DictConfig backed by the `Config` schema.

    Raises:
        ConfigError: a missing file, an unknown key (naming the closest valid one), a wrong type or value.
    """
    files = []
    for path in yaml_paths:
        if Path(path).is_dir():
            raise ConfigError(f"config file '{path}' is a folder: give a YAML file (see configs/ for the shipped ones)")
        if not Path(path).is_file():
            raise ConfigError(f"config file '{path}' does not exist (see configs/ for the shipped ones)")
        files.append((Path(path), f"config file '{path}'"))
    cfg = SCHEMA.load(files, overrides)
    if cfg.model.method in METHOD_PRESETS:
        # The method's preset sits under the files and overrides: what they set wins over it.
        preset = METHOD_PRESETS[cfg.model.method]
        cfg = SCHEMA.load(files, overrides, [(preset, f"the model.method={cfg.model.method} preset")])
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML, as saved beside every run."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def from_yaml(text: str) -> DictConfig:
    """Parse a config saved by `to_yaml` back into a schema-checked DictConfig."""
    cfg = SCHEMA.merge(OmegaConf.structured(Config), OmegaConf.create(text), "a saved config", warn_renamed=False)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def flatten(cfg: DictConfig) -> dict[str, Any]:
    """Dotted key -> leaf value, for experiment trackers."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out
