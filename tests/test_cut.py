"""CUT and FastCUT (model.method=cut|fastcut): the reference's networks, keys and counts, PatchNCE by hand,
the presets, and the method through the shared pipeline (training, EMA, best checkpoint, translate, evaluate,
export, reference files)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import ConfigError, load_config
from pipeline.engine.checkpoint import load_checkpoint
from pipeline.gan.cut.model import PatchSampling, build_cut_networks, build_cut_objective
from pipeline.gan.cut.networks import CUTDiscriminator, CUTGenerator, l2_normalize
from pipeline.gan.cut.patchnce import patch_nce
from pipeline.gan.networks import build_generator, count_parameters
from pipeline.infer.generators import infer_generator_settings, load_generators
from pipeline.train.cli import main as train_main
from pipeline.translate import main as translate_main


def networks(*overrides: str):
    cfg = load_config([], ["model.method=cut", *overrides])
    objective = build_cut_objective(cfg.loss, cfg.cut)
    torch.manual_seed(0)
    gens, disc = build_cut_networks(cfg.model, cfg.cut, objective)
    return cfg, objective, gens, disc


# The networks: the reference's counts and keys (SPEC-CUT.md section 2).


def test_parameter_counts_buffers_and_feature_shapes_are_the_references():
    _, objective, gens, disc = networks()
    assert count_parameters(gens.G) == 11_378_179
    assert count_parameters(disc) == 2_764_737
    assert count_parameters(gens.F) == 560_384  # Built eagerly: complete before DDP and the optimiser.
    assert sum(b.numel() for b in gens.G.buffers()) == 9_600
    assert sum(b.numel() for b in disc.buffers()) == 4_032
    x = torch.zeros(1, 3, 256, 256)
    with torch.no_grad():
        feats = gens.G.encode(x, objective.layers)
        assert [tuple(f.shape[1:]) for f in feats] == [(3, 262, 262), (128, 256, 256), (256, 128, 128),
                                                        (256, 64, 64), (256, 64, 64)]
        assert disc(x).shape == (1, 1, 30, 30)
        assert gens.G(x).shape == x.shape


def test_state_dict_keys_are_the_references():
    _, _, gens, disc = networks()
    g_keys = set(gens.G.state_dict())
    assert {k.split(".")[1] for k in g_keys if not k.endswith("filt") and ".conv_block." not in k} == \
        {"1", "4", "8", "22", "26", "30"}
    assert {k for k in g_keys if k.endswith("filt")} == {f"model.{i}.filt" for i in (7, 11, 21, 25)}
    assert {k for k in g_keys if ".conv_block." in k} == {
        f"model.{b}.conv_block.{c}.{p}" for b in range(12, 21) for c in (1, 5) for p in ("weight", "bias")}
    assert set(disc.state_dict()) == {f"model.{i}.{p}" for i in (0, 3, 7, 11, 14) for p in ("weight", "bias")} | \
        {f"model.{i}.filt" for i in (2, 6, 10)}
    assert set(gens.F.state_dict()) == {f"mlp_{i}.{j}.{p}" for i in range(5) for j in (0, 2)
                                        for p in ("weight", "bias")}
    # The filters: [1,2,1] x [1,2,1] / 16 down, [1,3,3,1] x [1,3,3,1] / 16 up.
    torch.testing.assert_close(gens.G.model[7].filt[0, 0], torch.tensor([[1., 2, 1], [2, 4, 2], [1, 2, 1]]) / 16)
    assert gens.G.model[21].filt[0, 0].sum().item() == pytest.approx(4.0)
    assert gens.G.model[21].filt[0, 0, 0].tolist() == pytest.approx([1 / 16, 3 / 16, 3 / 16, 1 / 16])


def test_without_antialiasing_the_generator_is_junyanzs():
    plain = CUTGenerator(antialias=False, antialias_up=False)
    reference_shape = build_generator("resnet_9blocks")
    assert {k: v.shape for k, v in plain.state_dict().items()} == \
        {k: v.shape for k, v in reference_shape.state_dict().items()}
    assert count_parameters(CUTDiscriminator(antialias=False)) == 2_764_737
    # Then layer 8 is a norm and 12 / 16 are blocks 3 and 7 (the taps keep their indices, not their meaning).
    assert type(plain.model[8]).__name__ == "InstanceNorm2d"


def test_upsampling_doubles_exactly_and_blur_pool_halves():
    _, _, gens, _ = networks("model.ngf=4")
    x = torch.rand(1, 16, 7, 9)
    assert gens.G.model[21](x).shape == (1, 16, 14, 18)
    assert gens.G.model[7](torch.rand(1, 8, 14, 18)).shape == (1, 8, 7, 9)
    # A constant image stays constant through both (the filters sum to one per output pixel).
    ones = torch.ones(1, 16, 6, 6)
    torch.testing.assert_close(gens.G.model[21](ones), torch.ones(1, 16, 12, 12))


# PatchNCE.


def test_patch_nce_on_two_hand_built_patches_equals_the_formula():
    # One image, two patches, 2-D embeddings: q1 = k1 = (1, 0), q2 = (0, 1), k2 = (0.6, 0.8).
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # float64: the losses are ~1e-5.
    k = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    t = 0.07
    got = patch_nce(q, k, batch=1, temperature=t)
    # Row i: logits [q_i.k_i, q_i.k_1, q_i.k_2] / t with the diagonal negative (j = i) at -10.
    row1 = [1.0 / t, -10.0 / t, 0.6 / t]
    row2 = [0.8 / t, 0.0 / t, -10.0 / t]
    want = [math.log(sum(math.exp(v) for v in row)) - row[0] for row in (row1, row2)]
    assert got.tolist() == pytest.approx(want, rel=1e-9)


def test_an_all_zero_patch_embedding_has_finite_gradients():
    # A zero row (all-zero ReLU inputs in a narrow layer, zero biases): the reference's sqrt of 0 gives a NaN
    # gradient there, which turned every weight NaN at the first update.
    x = torch.zeros(3, 4)
    x[1] = torch.tensor([1.0, 2.0, 2.0, 0.0])
    x.requires_grad_()
    out = l2_normalize(x)
    torch.testing.assert_close(out[1], torch.tensor([1.0, 2.0, 2.0, 0.0]) / (3 + 1e-7))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_patch_nce_takes_negatives_from_the_same_image_only_and_detaches_the_keys():
    q = l2_normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0))).requires_grad_()
    k = l2_normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(1))).requires_grad_()
    per_image = patch_nce(q, k, batch=2)
    alone = torch.cat([patch_nce(q[:3], k[:3], batch=1), patch_nce(q[3:], k[3:], batch=1)])
    torch.testing.assert_close(per_image, alone)
    per_image.sum().backward()
    assert q.grad is not None and k.grad is None


def test_the_nce_term_equals_the_reference_computed_by_hand():
    """CUTGenerators.nce against the reference's calculate_NCE_loss written out here: encoder taps, the same
    positions for queries and keys, the MLP, L2 normalisation, the logits row by row, the mean over rows and
    layers, times lambda_NCE."""
    _, objective, gens, _ = networks("model.ngf=4", "cut.num_patches=5", "cut.lambda_nce=2.0")
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    y = torch.tanh(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4)))
    sampling = PatchSampling(7)
    got = gens.nce(x, y, flipped=False, sampling=sampling)

    ids_rng = PatchSampling(7).generator
    total = 0.0
    with torch.no_grad():
        feats_k, feats_q, h_k, h_q = [], [], x, y
        for index, layer in enumerate(gens.G.model):
            h_k, h_q = layer(h_k), layer(h_q)
            if index in objective.layers:
                feats_k.append(h_k.clone())
                feats_q.append(h_q.clone())
            if index == 16:
                break
        for layer, (fk, fq) in enumerate(zip(feats_k, feats_q)):
            b, c, h, w = fk.shape
            ids = torch.randperm(h * w, generator=ids_rng)[: min(5, h * w)]
            mlp = getattr(gens.F, f"mlp_{layer}")

            embedded = []
            for f in (fk, fq):
                rows = f.permute(0, 2, 3, 1).reshape(b, h * w, c)[:, ids].reshape(-1, c)
                hidden = torch.relu(rows @ mlp[0].weight.T + mlp[0].bias) @ mlp[2].weight.T + mlp[2].bias
                embedded.append(hidden / (hidden.norm(dim=1, keepdim=True) + 1e-7))
            keys, queries = embedded
            losses = []
            for image in range(b):
                for i in range(len(ids)):
                    row = image * len(ids) + i
                    logits = [float(queries[row] @ keys[row])]
                    for j in range(len(ids)):
                        other = image * len(ids) + j
                        logits.append(-10.0 if j == i else float(queries[row] @ keys[other]))
                    logits = [v / 0.07 for v in logits]
                    top = max(logits)
                    losses.append(top + math.log(sum(math.exp(v - top) for v in logits)) - logits[0])
            total += 2.0 * sum(losses) / len(losses)
    assert got.item() == pytest.approx(total / 5, rel=1e-5)


# Presets and config errors.


def test_presets_set_the_specs_defaults_and_files_and_overrides_win():
    cut, fast = load_config([], ["model.method=cut"]), load_config([], ["model.method=fastcut"])
    assert (cut.cut.lambda_nce, cut.cut.nce_idt, cut.cut.flip_equivariance, cut.optim.decay_start_frac) == \
        (1.0, True, False, 0.5)
    assert (fast.cut.lambda_nce, fast.cut.nce_idt, fast.cut.flip_equivariance, fast.optim.decay_start_frac) == \
        (10.0, False, True, 0.75)
    assert cut.model.init_type == fast.model.init_type == "xavier" and cut.cut.nce_t == 0.07
    assert load_config([], ["model.method=fastcut", "cut.lambda_nce=1"]).cut.lambda_nce == 1.0
    assert load_config([], []).model.init_type == "normal"  # CycleGAN's defaults are untouched.
    with pytest.raises(ConfigError, match="did you mean 'cut.lambda_nce'"):
        load_config([], ["model.method=cut", "cut.lambda_nc=1"])
    with pytest.raises(ConfigError, match="'model.method' is 'fastcat'; did you mean 'fastcut'"):
        load_config([], ["model.method=fastcat"])
    with pytest.raises(ConfigError, match="model.method=cut trains a ResNet generator"):
        load_config([], ["model.method=cut", "model.generator=unet_256"])
    with pytest.raises(ConfigError, match="cut.nce_layers"):
        load_config([], ["model.method=cut", "cut.nce_layers=a,b"])


# Through the pipeline.


@pytest.fixture(scope="module")
def cut_run(shards, tmp_path_factory):
    from support.runs import tiny_overrides

    root = tmp_path_factory.mktemp("cut")
    overrides = tiny_overrides(shards, root / "run", **{
        "model.method": "cut", "train.steps": 6, "eval.paired": True, "eval.every_steps": 2,
        "checkpoint.best_metric": "eval/AtoB/l1", "train.ema_decay": 0.9, "tracking.log_model": True})
    assert train_main(overrides) == 0
    return root


def test_cut_trains_with_ema_and_best_checkpoint_and_records_its_losses(cut_run):
    run = cut_run / "run"
    ckpt = load_checkpoint(run / "ckpt-000000006")
    assert set(ckpt["nets"]) == {"G", "F", "D"} and ckpt["ema"]["started"]
    assert set(ckpt["ema"]["nets"]) == {"G"}
    assert "sampling" in ckpt["ranks"][0]
    best = load_checkpoint(run / "best.pt")["best"]
    assert best["metric"] == "eval/AtoB/l1" and best["step"] in (2, 4, 6)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"loss/D", "loss/G/gan", "loss/G/nce", "loss/G/nce_idt"} <= set(records[-1])
    # PatchNCE starts near log(P + 1) for P sampled patches of unrelated embeddings and goes down.
    assert records[0]["loss/G/nce"] < math.log(257) + 0.5
    saved = json.loads((run / "eval.json").read_text())["results"]
    assert list(saved) == ["AtoB"] and "cycle_l1" not in saved["AtoB"]  # One generator: no cycle.
    grid = Image.open(sorted((run / "samples").glob("*.png"))[-1])
    assert grid.width == 4 * 32  # real_a | fake_b | real_b | idt_b

    # The MLflow record: CUT's loss curves, the evaluation, and its one generator as a logged model.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{cut_run / 'mlflow.db'}")
    run_id = ckpt["mlflow_run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "loss/G/nce")] == [2, 4, 6]
    assert client.get_metric_history(run_id, "eval/AtoB/l1")
    assert client.get_run(run_id).data.params["model.method"] == "cut"
    experiment = client.get_run(run_id).info.experiment_id
    models = client.search_logged_models(experiment_ids=[experiment])
    assert [m.name for m in models if m.source_run_id == run_id] == ["G"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cut_trains_in_low_precision(shards, tmp_path, precision):
    from support.runs import tiny_overrides

    overrides = tiny_overrides(shards, tmp_path / "run", **{
        "model.method": "fastcut", "train.steps": 4, "train.precision": precision, "tracking.enabled": False,
        "report.sample_every_steps": 0, "cut.num_patches": 16})
    assert train_main(overrides) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss/G/nce"]) for r in records) and records[-1]["nonfinite_steps"] == 0


def test_cut_checkpoints_and_reference_files_translate(cut_run, tmp_path, capsys):
    ckpt = cut_run / "run" / "ckpt-000000006"
    images = tmp_path / "in"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 45, 3), dtype=np.uint8)).save(images / "x.png")
    gens = load_generators(ckpt, "AtoB")
    assert gens.weights == "ema" and gens.reverse is None and gens.model.method == "cut"
    assert translate_main(["--checkpoint", str(ckpt), "--input", str(images), "--output", str(tmp_path / "ours"),
                           "--device", "cpu", "--weights", "raw"]) == 0
    assert translate_main(["--checkpoint", str(ckpt), "--input", str(images), "--output", str(tmp_path / "tiled"),
                           "--device", "cpu", "--weights", "raw", "--tile", "16"]) == 0
    ours = np.asarray(Image.open(tmp_path / "ours" / "images" / "x.png"), dtype=np.int16)
    tiled = np.asarray(Image.open(tmp_path / "tiled" / "images" / "x.png"), dtype=np.int16)
    assert np.abs(ours - tiled).max() <= 1

    # The CUT code's own file: `latest_net_G.pth`, architecture read off its keys (the filters mark CUT).
    state = load_checkpoint(ckpt)["nets"]["G"]
    reference = tmp_path / "reference"
    reference.mkdir()
    torch.save(state, reference / "latest_net_G.pth")
    assert infer_generator_settings(state) == {"method": "cut", "generator": "resnet_6blocks", "ngf": 4,
                                               "norm": "instance", "antialias": True, "antialias_up": True}
    assert translate_main(["--checkpoint", str(reference / "latest_net_G.pth"), "--input", str(images),
                           "--output", str(tmp_path / "ref"), "--device", "cpu"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "ref" / "images" / "x.png"), dtype=np.int16), ours)
    assert translate_main(["--checkpoint", str(reference), "--input", str(images), "--output",
                           str(tmp_path / "ref_dir"), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert translate_main(["--checkpoint", str(ckpt), "--direction", "BtoA", "--input", str(images),
                           "--output", str(tmp_path / "x")]) == 2
    assert re.search(r"cut checkpoint: one generator, A->B only", capsys.readouterr().err)


def test_cut_exports_and_evaluates(cut_run, shards, tmp_path, capsys):
    from pipeline.evaluate import main as evaluate_main
    from pipeline.export import main as export_main

    ckpt = cut_run / "run" / "ckpt-000000006"
    out = tmp_path / "g.pt"
    assert export_main(["--checkpoint", str(ckpt), "--format", "torchscript", "--output", str(out)]) == 0
    scripted = torch.jit.load(str(out))
    x = torch.rand(1, 3, 20, 28) * 2 - 1
    gens = load_generators(ckpt, "AtoB")
    from pipeline.infer.generators import PaddedGenerator

    with torch.no_grad():
        torch.testing.assert_close(scripted(x), PaddedGenerator(gens.net.eval(), 4)(x), atol=1e-5, rtol=0)
    result = tmp_path / "eval.json"
    assert evaluate_main(["--checkpoint", str(ckpt), "--test-a", shards["testA"], "--test-b", shards["testB"],
                          "--no-mlflow", "--json", str(result), "--device", "cpu"]) == 0
    record = json.loads(result.read_text())
    assert list(record["results"]) == ["AtoB"] and math.isfinite(record["results"]["AtoB"]["l1"])
