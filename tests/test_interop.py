"""Reference-implementation weight files: load ours from theirs, write theirs from ours."""

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.config import load_config
from pipeline.engine.checkpoint import CheckpointError
from pipeline.gan.cyclegan import REFERENCE_NAMES
from pipeline.gan.networks import build_discriminator, build_generator
from pipeline.infer.interop import export_reference, load_generator, load_reference_dir, nets_from_checkpoint
from pipeline.interop import main
from pipeline.train.loop import run


def reference_files(tmp_path, ngf=8, ndf=8):
    """Files as the reference's save_networks writes them: `torch.save(net.cpu().state_dict(), path)`."""
    torch.manual_seed(3)
    nets = {"G_A": build_generator("resnet_9blocks", ngf=ngf), "G_B": build_generator("resnet_9blocks", ngf=ngf),
            "D_A": build_discriminator("basic", ndf=ndf), "D_B": build_discriminator("basic", ndf=ndf)}
    for name, net in nets.items():
        torch.save(net.state_dict(), tmp_path / f"latest_net_{name}.pth")
    return nets


def model_cfg(**kw):
    values = {"generator": "resnet_9blocks", "ngf": 8, "ndf": 8, **kw}
    return load_config([], [f"model.{k}={v}" for k, v in values.items()]).model


def test_reference_generator_translates_like_the_saved_network(tmp_path):
    saved = reference_files(tmp_path)
    G = load_generator(tmp_path / "latest_net_G_A.pth", model_cfg())
    x = torch.rand(1, 3, 36, 36) * 2 - 1
    with torch.no_grad():
        assert torch.equal(G(x), saved["G_A"](x))


def test_reference_folder_initialises_all_four_networks(tmp_path):
    saved = reference_files(tmp_path)
    torch.manual_seed(0)
    ours = {name: (build_generator("resnet_9blocks", ngf=8) if name.startswith("G")
                   else build_discriminator("basic", ndf=8)) for name in REFERENCE_NAMES}
    assert sorted(load_reference_dir(tmp_path, ours)) == sorted(REFERENCE_NAMES)
    for ours_name, theirs in REFERENCE_NAMES.items():
        for key, value in saved[theirs].state_dict().items():
            assert torch.equal(ours[ours_name].state_dict()[key], value)


def test_stale_instance_norm_statistics_are_ignored(tmp_path):
    saved = reference_files(tmp_path)
    state = saved["G_A"].state_dict()
    state["model.2.running_mean"] = torch.zeros(8)  # written by PyTorch < 0.4
    torch.save(state, tmp_path / "old_net_G_A.pth")
    load_generator(tmp_path / "old_net_G_A.pth", model_cfg())


def test_wrong_architecture_is_named(tmp_path):
    reference_files(tmp_path)
    with pytest.raises(CheckpointError, match="resnet_6blocks generator.*model.generator"):
        load_generator(tmp_path / "latest_net_G_A.pth", model_cfg(generator="resnet_6blocks"))


def test_export_has_exactly_the_reference_keys(tiny, tmp_path):
    run(load_config([], tiny(**{"train.steps": 2, "checkpoint.every_steps": 2, "tracking.enabled": False})))
    ckpt = tmp_path / "run" / "ckpt-000000002"
    assert main(["export", str(ckpt), str(tmp_path / "ref")]) == 0
    cfg = load_config([tmp_path / "run" / "config.yaml"])
    ours = nets_from_checkpoint(ckpt, cfg.model)
    for ours_name, theirs in REFERENCE_NAMES.items():
        exported = torch.load(tmp_path / "ref" / f"latest_net_{theirs}.pth", weights_only=True)
        assert list(exported) == list(ours[ours_name].state_dict())
        assert all(torch.equal(exported[k], v) for k, v in ours[ours_name].state_dict().items())
    expected_g = set(build_generator("resnet_6blocks", ngf=4).state_dict())
    assert set(torch.load(tmp_path / "ref" / "latest_net_G_A.pth", weights_only=True)) == expected_g


def test_export_writes_files_the_exporter_reads_back(tmp_path):
    nets = {name: (build_generator("resnet_6blocks", ngf=4) if name.startswith("G")
                   else build_discriminator("basic", ndf=4)) for name in REFERENCE_NAMES}
    paths = export_reference(nets, tmp_path, epoch="15")
    assert sorted(p.name for p in paths) == sorted(f"15_net_{n}.pth" for n in ("G_A", "G_B", "D_A", "D_B"))
    cfg = model_cfg(generator="resnet_6blocks", ngf=4)
    G = load_generator(tmp_path / "15_net_G_B.pth", cfg)
    assert all(torch.equal(G.state_dict()[k], v) for k, v in nets["G_ba"].state_dict().items())
    assert OmegaConf.is_config(cfg)
