"""One CUT optimisation step in the reference's order: G translates, D steps on that (detached) fake, then G and
F step against the updated D on the same fake (SPEC-CUT.md section 1). No image pool.

D's update comes before G's loss exists, so the ranks agree twice: after D's backward (all losses so far finite,
else the whole step is skipped) and after G's (G's loss finite, else only G's update is skipped: D's is applied;
and whether to stop). Each is one tiny collective, as CycleGAN's step has one.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from pipeline.engine.dist import all_reduce_max
from pipeline.gan.cut.model import CUTObjective, PatchSampling
from pipeline.gan.stepping import PRECISIONS, Optimisers, Pools, StepResult, StepSettings, update_scale


class CUTStep:
    """Runs the step on this rank: `gens` (G + F, maybe DDP-wrapped), `disc` (D, maybe wrapped) and
    `disc_module` (D unwrapped, called frozen in G's loss, so DDP never sees that use)."""

    def __init__(self, *, gens: nn.Module, disc: nn.Module, disc_module: nn.Module, objective: CUTObjective,
                 optimisers: Optimisers, settings: StepSettings, sampling: PatchSampling) -> None:
        self.gens, self.disc, self.disc_module = gens, disc, disc_module
        self.objective, self.optimisers, self.settings, self.sampling = objective, optimisers, settings, sampling
        self.pools = Pools(_NoPool(), _NoPool())
        self.scaler_skips = 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.settings.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.settings.device.type, dtype=PRECISIONS[self.settings.precision])

    def _agree(self, bad: Tensor | None, stop: bool) -> tuple[bool, bool]:
        settings = self.settings
        if not (settings.check_finite or settings.distributed):
            return True, stop
        flags = torch.zeros(2, device=settings.device)
        if settings.check_finite and bad is not None:
            flags[0] = (~torch.isfinite(bad)).float()
        flags[1] = float(stop)
        worst, stop_any = all_reduce_max(flags).tolist()
        return worst == 0.0, stop_any > 0.0

    def __call__(self, real_a: Tensor, real_b: Tensor, stop_requested: bool = False) -> StepResult:
        obj, opt, settings, D = self.objective, self.optimisers, self.settings, self.disc_module
        scale = opt.scaler.scale
        if settings.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        real_a = real_a.contiguous(memory_format=settings.memory_format)
        real_b = real_b.contiguous(memory_format=settings.memory_format)

        # Translate (and the NCE terms, which do not depend on D).
        opt.g.zero_grad(set_to_none=True)
        with self.autocast():
            out = self.gens(real_a, real_b, self.sampling)

        # D step on the detached fake.
        D.requires_grad_(True)
        opt.d.zero_grad(set_to_none=True)
        with self.autocast():
            pred_real, pred_fake = self.disc(real_b), self.disc(out["fake_b"].detach())
            loss_d = obj.gan.discriminator(pred_real, pred_fake)
        scale(loss_d).backward()
        nce_terms = [out[k] for k in ("nce", "nce_idt") if k in out]
        so_far = loss_d.detach() + sum(t.detach() for t in nce_terms)
        applied, _ = self._agree(so_far, False)
        stepped = applied
        if applied:
            opt.scaler.step(opt.d)

        # G and F against the updated D, on the same fake.
        D.requires_grad_(False)
        with self.autocast():
            losses: dict[str, Tensor] = {"G/gan": obj.gan.generator(D(out["fake_b"])) * obj.lambda_gan}
            if "nce" in out:
                losses["G/nce"] = out["nce"]
            if "nce_idt" in out:
                losses["G/nce_idt"] = out["nce_idt"]
            nce = (out["nce"] + out["nce_idt"]) * 0.5 if "nce_idt" in out else out.get("nce", 0.0)
            loss_g = losses["G/gan"] + nce
        scale(loss_g).backward()
        g_ok, stop = self._agree(loss_g.detach(), stop_requested)
        applied = applied and g_ok
        if applied:
            opt.scaler.step(opt.g)
        if stepped:  # The scaler updates after a step it took part in (not after a skipped one).
            self.scaler_skips += int(update_scale(opt.scaler))
        D.requires_grad_(True)
        losses["D"] = loss_d
        return StepResult({k: v.detach() for k, v in losses.items()}, applied, stop)


class _NoPool:
    """CUT keeps no history of fakes; checkpoints still hold a (empty) pool per domain."""

    def state_dict(self) -> dict:
        return {"images": []}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        pass
