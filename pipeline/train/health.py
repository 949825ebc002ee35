"""Is the run learning? The signals of a failing GAN run, read from the losses it logs, and one warning each.

A CycleGAN whose cycle loss does not fall is not learning, whatever its adversarial terms do: its generators do
not even reconstruct their input (for CUT/FastCUT, a PatchNCE loss that does not fall: G's output does not keep
its input's content) (the paper's networks on a colour-cast task, a learning rate of 0, inputs that
do not match the domains). A discriminator at chance cannot tell translated images from real ones; one winning
outright gives the generators nothing to follow; generators whose outputs no longer depend on their inputs have
collapsed. Each signal is logged as a `health/*` metric at every loss log, and the first time one shows after
`report.health_after_steps`, one warning line gives the evidence and the usual causes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# A discriminator's loss when it outputs the same score for real and fake (per its loss, averaged over them).
CHANCE = {"lsgan": 0.25, "vanilla": 0.6931, "hinge": 1.0}

# The cycle loss must fall below this fraction of its start, and D's loss stay above this fraction of chance.
NOT_FALLING, D_WINNING, INDEPENDENT = 0.9, 0.1, 0.05
# A cycle error (mean L1 per direction, in [-1, 1] units) below this is a working reconstruction even if it does
# not fall: generators that start as the identity (model.g_variant=colour) start with a near-zero cycle error,
# which grows a little as they learn the mapping. Unrelated images are about 0.5 apart.
RECONSTRUCTS = 0.1

_CAUSES = {
    "cycle": ("usual causes: generators that cannot represent the mapping (the paper's networks are blind to a colour "
              "cast and to exposure: set model.g_variant=colour for colour, tone, stain or intensity tasks, or use "
              "configs/colour.yaml), a learning rate of 0 or far too small, or data that does not match its domain"),
    "nce": ("usual causes: a generator that cannot keep its input's structure through the translation (the paper's "
            "networks on a colour or intensity task: model.g_variant=colour), a learning rate of 0 or far too small, "
            "or cut.nce_layers that name layers past the encoder"),
    "d_winning": ("usual causes: a discriminator much stronger than the generators (lower model.ndf, use "
                  "model.d_variant=spectral), a learning rate too high for the generators, or domains that differ in "
                  "something the generators cannot change (size, borders, compression)"),
    "independent": ("usual causes: mode collapse after the discriminator won, or a learning rate too high; resume "
                    "from an earlier checkpoint with a lower optim.lr"),
}


@dataclass
class TrainingHealth:
    """Watches the logged losses of one run (every rank sees the same averaged losses; rank 0 warns).

    Args:
        after_steps: the first step at which a signal may warn (0: never warn; the metrics are still logged).
        gan_mode: the adversarial loss, which sets what chance is for a discriminator's loss.
    """

    after_steps: int
    gan_mode: str = "lsgan"
    cycle_weight: float = 10.0
    """The cycle terms' weight (loss.lambda_a, lambda_b): logged cycle losses over it are L1 errors."""
    nce_weight: float = 1.0
    """CUT: each PatchNCE term's weight (cut.lambda_nce)."""
    nce_chance: float = 5.55
    """CUT: a PatchNCE term when output and input are unrelated: log(cut.num_patches + 1) (the positive is one of
    num_patches + 1 equally likely keys)."""
    cycle: list[float] = field(default_factory=list)
    nce: list[float] = field(default_factory=list)
    """CUT/FastCUT: the logged PatchNCE terms' sum at each log."""
    warned: set[str] = field(default_factory=set)
    dependence: float | None = None
    """`input_dependence` of the last sample grid's translations, logged with the losses until the next grid."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps, so that a resumed run's health metrics and warnings are the straight run's."""
        return {"cycle": list(self.cycle), "nce": list(self.nce), "warned": sorted(self.warned),
                "dependence": self.dependence}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cycle, self.warned = list(state["cycle"]), set(state["warned"])
        self.nce = list(state.get("nce", []))
        self.dependence = state.get("dependence")

    def observe(self, step: int, metrics: dict[str, float]) -> tuple[dict[str, float], list[str]]:
        """(health metrics to log, warnings to give) for the losses logged at `step`."""
        signals: dict[str, float] = {}
        if self.dependence is not None:
            metrics = {**metrics, "health/input_dependence": self.dependence}
            signals["health/input_dependence"] = self.dependence
        evidence: dict[str, str] = {}
        cycle_terms = sorted(k for k in metrics if k.startswith("loss/") and k.endswith("/cycle"))
        if cycle_terms:
            self.cycle.append(sum(metrics[k] for k in cycle_terms))
            third = max(1, len(self.cycle) // 3)
            start, now = _mean(self.cycle[:third]), _mean(self.cycle[-third:])
            error = now / (len(cycle_terms) * self.cycle_weight) if self.cycle_weight > 0 else 0.0
            signals["health/cycle_l1"] = error
            if start > 0:
                signals["health/cycle_progress"] = now / start
                if now / start > NOT_FALLING and error > RECONSTRUCTS and len(self.cycle) >= 3:
                    evidence["cycle"] = (f"the cycle loss has not fallen in {step} steps ({' + '.join(cycle_terms)}: "
                                         f"{start:.3g} at the start, {now:.3g} now, {now / start:.0%}; a "
                                         f"reconstruction error of {error:.2f} in [-1, 1] units, where unrelated "
                                         "images are about 0.5 apart)")
        nce_terms = sorted(k for k in metrics if k.startswith("loss/") and "/nce" in k)
        if nce_terms:
            self.nce.append(sum(metrics[k] for k in nce_terms))
            third = max(1, len(self.nce) // 3)
            start, now = _mean(self.nce[:third]), _mean(self.nce[-third:])
            if start > 0:
                signals["health/nce_progress"] = now / start
                per_term = now / (len(nce_terms) * self.nce_weight) if self.nce_weight > 0 else 0.0
                signals["health/nce_vs_chance"] = per_term / self.nce_chance
                # Low from the start (a generator that starts as the identity) is keeping the content.
                if now / start > NOT_FALLING and per_term > 0.5 * self.nce_chance and len(self.nce) >= 3:
                    evidence["nce"] = (f"the PatchNCE loss has not fallen in {step} steps ({' + '.join(nce_terms)}: "
                                       f"{start:.3g} at the start, {now:.3g} now, {now / start:.0%}): the "
                                       "translations do not keep their inputs' content")
        d_terms = sorted(k for k in metrics if k.startswith("loss/D"))
        chance = CHANCE.get(self.gan_mode)
        if d_terms and chance:
            d_loss = _mean([metrics[k] for k in d_terms])
            signals["health/d_vs_chance"] = d_loss / chance
            if d_loss < D_WINNING * chance:
                evidence["d_winning"] = (f"the discriminators win outright ({', '.join(d_terms)} average {d_loss:.3g}, "
                                         f"chance {chance:g}): the generators get no useful gradient")
            elif "cycle" in evidence and abs(d_loss / chance - 1) < 0.15:
                evidence["cycle"] += (f"; the discriminators are at chance ({d_loss:.3g} against {chance:g}): they "
                                      "cannot tell translated images from real ones either")
        if "health/input_dependence" in metrics and metrics["health/input_dependence"] < INDEPENDENT:
            evidence["independent"] = (f"the translations no longer depend on the input (their differences are "
                                       f"{metrics['health/input_dependence']:.1%} of the inputs' on held-out images)")
        warnings = []
        if self.after_steps and step >= self.after_steps:
            for kind, text in evidence.items():
                if kind not in self.warned:
                    self.warned.add(kind)
                    warnings.append(f"training health at step {step}: {text}. This run is not learning; "
                                    f"{_CAUSES[kind]} (report.health_after_steps={self.after_steps})")
        return signals, warnings


def input_dependence(inputs, outputs) -> float:
    """How much a generator's outputs differ between images, relative to how much its inputs do: mean |out_i -
    out_j| / mean |in_i - in_j| over neighbouring pairs of a batch (about 1 for the identity, 0 for a constant)."""
    if inputs.shape[0] < 2:
        return 1.0
    spread_in = (inputs[1:] - inputs[:-1]).abs().mean().item()
    spread_out = (outputs[1:] - outputs[:-1]).abs().mean().item()
    return spread_out / spread_in if spread_in > 0 else 1.0


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
