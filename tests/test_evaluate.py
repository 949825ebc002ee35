"""Evaluation: FID/KID maths and code paths with a small explicit feature extractor, paired metrics on the
synthetic set's ground truth, the command with MLflow, and periodic evaluation during training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import evaluate
from pipeline.data.held_out import iter_inputs
from pipeline.engine.checkpoint import load_checkpoint
from pipeline.eval.evaluate import evaluate_direction
from pipeline.eval.metrics import distribution, paired
from pipeline.eval.metrics.features import FeatureError, InceptionFeatures, find_weights, load_extractor
from pipeline.eval.metrics.inception import InceptionV3
from pipeline.interop import main as interop_main
from pipeline.train.cli import main as train_main


class ColourFeatures(nn.Module):
    """A small explicit extractor: a 4x4 thumbnail and per-channel means and spreads (54 numbers)."""

    name = "colour thumbnail"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        thumb = F.adaptive_avg_pool2d(images, 4).flatten(1)
        return torch.cat([thumb, images.mean(dim=(2, 3)), images.std(dim=(2, 3))], dim=1)


class ColourMap(nn.Module):
    """The synthetic set's exact A->B map (or its inverse) as a 'generator' on [-1, 1] images."""

    def __init__(self, synthetic, inverse: bool = False) -> None:
        super().__init__()
        gain = torch.tensor(synthetic.GAIN, dtype=torch.float32).view(1, 3, 1, 1)
        offset = torch.tensor(synthetic.OFFSET, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("gain", gain)
        self.register_buffer("offset", offset)
        self.inverse = inverse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x01 = (x + 1) / 2
        y01 = (x01 - self.offset) / self.gain if self.inverse else x01 * self.gain + self.offset
        return (y01 * 2 - 1).clamp(-1, 1)


@pytest.fixture(scope="module")
def domains(tmp_path_factory, synthetic) -> Path:
    """32 held-out pairs at 32 px: testB is the exact colour map of testA under the same names."""
    root = tmp_path_factory.mktemp("domains")
    synthetic.make_synthetic(root, train=0, test=32, size=32, seed=3)
    return root


def features_of(folder: Path) -> np.ndarray:
    images = torch.stack([torch.from_numpy(np.asarray(item.image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
                          for item in iter_inputs(str(folder))])
    return ColourFeatures()(images).double().numpy()


# FID and KID.


def test_frechet_distance_of_gaussians_in_closed_form():
    rng = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    var1, var2 = rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    # Covariances sharing eigenvectors: tr((S1 S2)^(1/2)) = sum sqrt(var1 * var2).
    sigma1, sigma2 = rotation @ np.diag(var1) @ rotation.T, rotation @ np.diag(var2) @ rotation.T
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert distribution.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(want, rel=1e-9)
    # Singular covariances (fewer samples than dimensions) stay finite and symmetric.
    a, b = rng.normal(size=(5, 20)), rng.normal(size=(5, 20)) + 1
    # With round-off eigenvalues (+-n eps max|lambda|) cut to 0, the 16 null directions add nothing, so the two
    # orders differ by float64 rounding of 20-term sums (2e-16 relative measured); without the cut their
    # sqrt(1e-15) terms made it ~1e-8, in a sign pattern set by the LAPACK build.
    assert distribution.fid(a, b) == pytest.approx(distribution.fid(b, a), rel=1e-12)
    # tr S + tr S - 2 tr S with tr S ~ 20: rounding ~ n eps tr S ~ 1e-13 (1.4e-14 measured, before the clamp at 0).
    assert distribution.fid(a, a) == pytest.approx(0, abs=1e-11)


def test_fid_and_kid_with_a_small_extractor_on_synthetic_domains(domains):
    a, b = features_of(domains / "testA"), features_of(domains / "testB")
    half_a, other_half_a = a[::2], a[1::2]

    assert distribution.fid(a, a) == pytest.approx(0, abs=1e-11)  # As above: rounding of tr S ~ 1, not sqrt(eps).
    fid_ab = distribution.fid(a, b)
    assert fid_ab > 1.0  # Dark scenes vs brightened, tinted ones.
    # Two samples of one domain are much closer than two of different domains (same sample sizes: FID's bias
    # grows as samples shrink).
    assert distribution.fid(half_a, b[1::2]) > 5 * distribution.fid(half_a, other_half_a)

    kid_self = distribution.kid(a, a, subsets=20, subset_size=16)
    kid_ab = distribution.kid(a, b, subsets=20, subset_size=16)
    assert abs(kid_self.value) < 0.05 * kid_ab.value  # Unbiased: about 0 within a domain, either sign.
    assert kid_ab.value > 5 * kid_ab.std > 0 and kid_ab.subset_size == 16 and kid_ab.subsets == 20
    # Deterministic for a seed.
    assert distribution.kid(a, b, subsets=5, subset_size=16, seed=3) == distribution.kid(a, b, 5, 16, seed=3)


def test_kid_of_sets_no_larger_than_a_subset_is_the_whole_set_estimate_with_no_spread(domains):
    a, b = features_of(domains / "testA"), features_of(domains / "testB")  # 32 each.
    whole = distribution.kid(a, b, subsets=5, subset_size=32)
    # Every "subset" would be the whole set: one estimate, no spread (it printed as "± 0.0000"), and the same
    # number whatever the subset count or a larger subset size.
    assert whole.std is None and whole.subset_size == 0 and whole.subsets == 1
    assert whole == distribution.kid(a, b, subsets=100, subset_size=1000)
    # The whole-set estimate is the unbiased MMD^2 over all pairs, written out here with loops; unequal set
    # sizes use each set's own (n (n - 1)) normaliser.
    x, y = a[:32].astype(np.float64), b[:20].astype(np.float64)
    dim = x.shape[1]

    def k(u, v):
        return (u @ v / dim + 1) ** 3

    def within(s):
        return sum(k(s[i], s[j]) for i in range(len(s)) for j in range(len(s)) if i != j) / (len(s) * (len(s) - 1))

    cross = sum(k(u, v) for u in x for v in y) / (len(x) * len(y))
    want = within(x) + within(y) - 2 * cross
    # float64 sums of ~1,000 terms of size ~1 in another order: round-off ~1e-13, far below this tolerance.
    assert distribution.kid(x, y).value == pytest.approx(want, rel=1e-9, abs=1e-12)
    # Subsets smaller than the sets do give a spread.
    assert distribution.kid(a, b, subsets=10, subset_size=8).std > 0


# Paired metrics.


def test_paired_metrics_on_known_values():
    rng = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 24, 20, generator=rng) * 2 - 1
    assert torch.all(paired.psnr(x, x) == math.inf)
    torch.testing.assert_close(paired.ssim(x, x), torch.ones(3, dtype=torch.float64))
    assert torch.all(paired.l1(x, x) == 0)

    # A constant offset of d (in [0, 1] units): PSNR 10 log10(1 / d^2), L1 2d in [-1, 1] units.
    y = x + 0.2
    torch.testing.assert_close(paired.psnr(x, y), torch.full((3,), 10 * math.log10(1 / 0.1**2),
                                                             dtype=torch.float64))
    torch.testing.assert_close(paired.l1(x, y), torch.full((3,), 0.2))
    # Constant images: SSIM reduces to the luminance term (2 mx my + c1) / (mx^2 + my^2 + c1).
    c1 = 0.01**2
    ssim = paired.ssim(torch.full((1, 3, 16, 16), -0.5), torch.full((1, 3, 16, 16), 0.0))
    assert ssim.item() == pytest.approx((2 * 0.25 * 0.5 + c1) / (0.25**2 + 0.5**2 + c1))
    # More noise, lower SSIM; symmetric in its arguments.
    noisy = [x + s * torch.randn(x.shape, generator=rng) for s in (0.05, 0.2, 0.5)]
    scores = [paired.ssim(x, n).mean().item() for n in noisy]
    assert scores == sorted(scores, reverse=True) and scores[-1] < 0.9
    torch.testing.assert_close(paired.ssim(x, noisy[0]), paired.ssim(noisy[0], x))


def test_evaluate_direction_scores_the_ground_truth_map_perfect(domains, synthetic):
    gt, gt_inverse = ColourMap(synthetic), ColourMap(synthetic, inverse=True)
    kwargs = dict(multiple=4, source=str(domains / "testA"), target=str(domains / "testB"),
                  device=torch.device("cpu"), features=ColourFeatures(), paired_keys=True, kid_subsets=10)
    perfect = evaluate_direction(gt, gt_inverse, **kwargs)
    nothing = evaluate_direction(nn.Identity(), nn.Identity(), **kwargs)

    assert perfect["images"] == perfect["real_images"] == perfect["pairs"] == 32
    # The map rounds to 8 bits as the files do: off by at most one level.
    assert perfect["l1"] < 1.5 / 127.5 and perfect["psnr"] > 45 and perfect["ssim"] > 0.999
    assert perfect["fid"] < 1e-3 * nothing["fid"]
    assert abs(perfect["kid"]) < 0.05 * nothing["kid"]  # Unbiased: about 0 for the same distribution.
    assert perfect["kid_subset_size"] == 0 and "kid_std" not in perfect  # 32 images: whole sets.
    assert perfect["cycle_l1"] < 2 / 127.5  # Inverse of the map: back to A up to rounding.
    # Returning the input: the same error as the "input" baseline; the cycle is exact.
    assert nothing["l1"] == pytest.approx(nothing["l1_identity"]) and nothing["l1"] > 0.2
    assert nothing["ssim"] == pytest.approx(nothing["ssim_identity"])
    assert nothing["cycle_l1"] == 0


# Feature extractors.


def test_inception_weight_files_load_and_others_are_refused(tmp_path):
    net = InceptionV3(fid_blocks=True)
    state = dict(net.state_dict())
    state["Conv2d_1a_3x3.bn.num_batches_tracked"] = torch.tensor(0)  # As torchvision saves them.
    torch.save(state, tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    extractor = load_extractor(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    assert isinstance(extractor, InceptionFeatures) and extractor.fid_blocks
    with torch.no_grad():
        assert extractor(torch.rand(2, 3, 40, 56) * 2 - 1).shape == (2, 2048)

    # torchvision's ImageNet file: 1000 classes and an auxiliary classifier; loads as the non-FID variant.
    tv = dict(InceptionV3(fid_blocks=False, num_classes=1000).state_dict())
    tv["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    torch.save(tv, tmp_path / "inception_v3_google.pth")
    assert not load_extractor(tmp_path / "inception_v3_google.pth").fid_blocks

    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(FeatureError, match="not of Inception-v3"):
        load_extractor(tmp_path / "other.pth")
    with pytest.raises(FeatureError, match="--features PATH"):
        load_extractor(tmp_path / "missing.pth")


class NvidiaStyle(nn.Module):
    """Has NVIDIA's TorchScript Inception's calling convention: [0, 255] images and return_features."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return x.mean(dim=(2, 3)) if return_features else x.amax(dim=(2, 3))


def test_torchscript_extractors_follow_their_calling_convention(tmp_path):
    torch.jit.save(torch.jit.script(NvidiaStyle()), tmp_path / "inception-2015-12-05.pt")
    torch.jit.save(torch.jit.script(ColourFeatures()), tmp_path / "colour.pt")
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    nvidia = load_extractor(tmp_path / "inception-2015-12-05.pt")
    torch.testing.assert_close(nvidia(x), ((x + 1) * 127.5).mean(dim=(2, 3)))
    torch.testing.assert_close(load_extractor(tmp_path / "colour.pt")(x), ColourFeatures()(x))


def test_weights_are_only_looked_up_locally(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("CYCLEGAN_INCEPTION_WEIGHTS", raising=False)
    assert find_weights() is None
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert find_weights() == cached
    monkeypatch.setenv("CYCLEGAN_INCEPTION_WEIGHTS", "/somewhere/inception.pth")
    assert find_weights() == Path("/somewhere/inception.pth")
    assert find_weights("explicit.pt") == Path("explicit.pt")


# The command and training.


def test_training_evaluates_periodically_and_the_command_logs_to_its_run(tiny, shards, tmp_path, capsys,
                                                                        monkeypatch):
    import mlflow

    features = tmp_path / "colour.pt"
    torch.jit.save(torch.jit.script(ColourFeatures()), features)
    assert train_main(tiny(**{"train.steps": 4, "eval.paired": True, "eval.every_steps": 2,
                              "eval.features": str(features), "report.sample_every_steps": 0,
                              "checkpoint.every_steps": 4})) == 0
    run_dir = tmp_path / "run"
    saved = json.loads((run_dir / "eval.json").read_text())
    # The layout of `pipeline.evaluate --json`: per-direction results nested under "results".
    assert saved["step"] == 4 and sorted(saved["results"]) == ["AtoB", "BtoA"]
    during = {f"{d}/{k}": v for d, r in saved["results"].items() for k, v in r.items()}
    for key in ("AtoB/fid", "AtoB/kid", "AtoB/ssim", "BtoA/fid", "BtoA/cycle_l1"):
        assert math.isfinite(during[key]), key
    # One paired L1 (of the 8-bit translations): no second, unrounded copy beside the per-direction one.
    assert set(saved) == {"step", "results"} and saved["results"]["AtoB"]["pairs"] == 8
    # The end-of-training line reports that same number.
    said = capsys.readouterr().out
    assert f"G_ab {during['AtoB/l1']:.4f} vs identity {during['AtoB/l1_identity']:.4f}" in said

    ckpt = run_dir / "ckpt-000000004"
    out = tmp_path / "eval.json"
    assert evaluate.main(["--checkpoint", str(ckpt), "--features", str(features), "--json", str(out),
                          "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "AtoB: 8 translated vs 8 real | FID" in printed and "cycle reconstruction L1" in printed
    assert "(whole sets, no spread: no more images than --kid-subset-size)" in printed and "± 0.0000" not in printed
    assert "logged to MLflow run" in printed
    record = json.loads(out.read_text())
    assert record["step"] == 4 and record["paired"] is True and record["size"] == 32
    result = record["results"]["AtoB"]
    # The same held-out set, size, extractor, norm kernel and batches as the evaluation at the end of training:
    # the same computation, so the same bits (a 1.4e-6 relative difference here was GroupNorm's kernel in
    # training vs InstanceNorm's in the command).
    for key in ("fid", "kid", "cycle_l1", "l1", "psnr", "ssim"):
        assert result[key] == during[f"AtoB/{key}"], key

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = load_checkpoint(ckpt)["mlflow_run_id"]
    history = client.get_metric_history(run_id, "eval/AtoB/fid")
    assert [m.step for m in history] == [2, 4, 4]  # Two during training, one from the command.
    assert history[-1].value == result["fid"]  # MLflow stores the double as it is.
    assert "evaluation" in [a.path for a in client.list_artifacts(run_id)]

    # Reference-implementation files of the same generators give the same numbers; a G_A file is A->B only.
    assert interop_main(["export", str(ckpt), str(tmp_path / "reference")]) == 0
    assert evaluate.main(["--checkpoint", str(tmp_path / "reference" / "latest_net_G_A.pth"), "--test-a",
                          shards["testA"], "--test-b", shards["testB"], "--size", "32", "--paired", "--features",
                          str(features), "--json", str(tmp_path / "ref.json"), "--device", "cpu",
                          "--batch-size", "16"]) == 0  # A reference file records no eval.batch_size: the run's.
    from_reference = json.loads((tmp_path / "ref.json").read_text())["results"]
    assert list(from_reference) == ["AtoB"]
    assert from_reference["AtoB"] == result  # Same weights, same kernel and batches: the same numbers.
    capsys.readouterr()

    # No weights anywhere: says how to provide them, and still reports everything else.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    assert evaluate.main(["--checkpoint", str(ckpt), "--direction", "AtoB", "--json", str(out), "--no-mlflow"]) == 0
    err = capsys.readouterr().err
    assert "FID/KID skipped: no Inception weights" in err and "--features PATH" in err
    assert "fid" not in json.loads(out.read_text())["results"]["AtoB"]

    # An unreachable tracking server is a warning, not a failure.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    assert evaluate.main(["--checkpoint", str(ckpt), "--direction", "AtoB", "--json", str(out),
                          "--max-images", "2", "--tracking-uri", "http://127.0.0.1:9"]) == 0
    captured = capsys.readouterr()
    assert "logged to MLflow" not in captured.out and "results written to" in captured.out
    # --max-images on paired sets: the first 2 sources with their own ground truth (the shards are shuffled, so
    # the first 2 of each set would not pair).
    limited = json.loads(out.read_text())["results"]["AtoB"]
    assert limited["images"] == limited["real_images"] == limited["pairs"] == 2


def test_moments_summed_over_parts_give_the_mean_covariance_and_fid_of_the_whole_set():
    """What ranks all-reduce instead of gathering features: float64 sums, so parts in any split give the whole
    set's statistics to round-off (relative 1e-12 here, D = 16 and values of order 1)."""
    from pipeline.eval.metrics.distribution import Moments, feature_stats, fid, fid_of_moments

    rng = np.random.default_rng(0)
    fake, real = rng.normal(0.3, 1.0, (50, 16)), rng.normal(0.5, 1.2, (41, 16))
    mu, sigma = feature_stats(fake)
    parts = [Moments.of(fake[:17], 16), Moments.of(fake[17:], 16), Moments.of(fake[:0], 16)]
    summed = Moments(sum(p.count for p in parts), sum(p.total for p in parts), sum(p.outer for p in parts))
    got_mu, got_sigma = summed.stats()
    np.testing.assert_allclose(got_mu, mu, rtol=1e-12)
    np.testing.assert_allclose(got_sigma, sigma, rtol=1e-12, atol=1e-12)
    assert fid_of_moments(summed, Moments.of(real, 16)) == pytest.approx(fid(fake, real), rel=1e-10)


def test_the_real_sets_are_embedded_once_per_run_and_read_back_after_a_resume(tiny, shards, tmp_path, caplog):
    """Two evaluations and a resume: each real set is decoded and embedded once (the first evaluation), kept
    in the run directory, and read from there by the resumed process; a set whose files changed is embedded
    again."""
    import shutil

    from pipeline.eval import evaluate as evaluation

    features = tmp_path / "colour.pt"
    torch.jit.save(torch.jit.script(ColourFeatures()), features)
    sets = {}
    for split in ("testA", "testB"):
        sets[split] = tmp_path / split
        shutil.copytree(Path(shards[split]).parent, sets[split])
    settings = {"eval.paired": True, "eval.every_steps": 2, "eval.features": str(features),
                "report.sample_every_steps": 0, "checkpoint.every_steps": 2, "tracking.enabled": False,
                "data.test_a": str(sets["testA"]), "data.test_b": str(sets["testB"])}
    from pipeline.config import load_config
    from pipeline.train.loop import run

    with caplog.at_level("INFO"):  # run(), not main(): main's logging set-up would replace caplog's handler.
        run(load_config([], tiny(**settings, **{"train.steps": 4})))
        computed = [r.getMessage() for r in caplog.records if "real-set features of" in r.getMessage()]
        assert len(computed) == 2 and all("computed (8 images)" in m for m in computed)  # Test B, then test A.
        first = json.loads((tmp_path / "run" / "eval.json").read_text())["results"]
        caplog.clear()
        evaluation._REAL_SETS.clear()  # A new process: only the run directory remembers.
        run(load_config([], tiny(**settings, **{"train.steps": 6})))
    again = [r.getMessage() for r in caplog.records if "real-set features of" in r.getMessage()]
    assert len(again) == 2 and all("read from" in m for m in again)
    assert len(list((tmp_path / "run" / "eval-cache").glob("real-*.npz"))) == 2
    assert math.isfinite(first["AtoB"]["fid"])
    assert math.isfinite(json.loads((tmp_path / "run" / "eval.json").read_text())["results"]["AtoB"]["fid"])

    changed = next(sets["testB"].glob("*.tar"))
    changed.write_bytes(changed.read_bytes())  # Written again: a new time, as a set replaced by a new copy.
    caplog.clear()
    evaluation._REAL_SETS.clear()
    evaluation._fingerprint.cache_clear()
    with caplog.at_level("INFO"):
        run(load_config([], tiny(**settings, **{"train.steps": 8})))
    said = [r.getMessage() for r in caplog.records if "real-set features of" in r.getMessage()]
    assert sorted(m.split(" of ")[1].split(" ")[0] for m in said if "computed" in m) == [str(sets["testB"])]
    assert [m for m in said if "read from" in m][0].startswith(f"real-set features of {sets['testA']}")
