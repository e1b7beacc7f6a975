"""The console tools end to end: from-torch -> visualize / resume -> to-torch, and their errors."""

import argparse
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from references.mixmim import MixMIMFinetuneTorch, MixMIMPretrainTorch

from mixmae_jax import cli, tasks
from mixmae_jax import config as config_lib
from mixmae_jax.visualize import load_images

CONFIG_FILE = '''
from recipes import mixmim_config

def get_config(arg=None):
    c = mixmim_config()
    c.model.update(img_size=32, embed_dim=16, depths=(1, 1), num_heads=(2, 4),
                   window_sizes=(4, 4), decoder_dim=32, decoder_depth=1, decoder_num_heads=2)
    c.data.update(image_size=32, source="folder", folder=FOLDER)
    c.batch_size = 8
    c.total_steps = 1
    c.optim.warmup_epochs = 0
    c.log_every = 1
    c.checkpoint_every = 1
    return c
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny config file, a folder of images and an 'official' checkpoint pickling `args`."""
    root = tmp_path_factory.mktemp("cli")
    folder = root / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
            folder / f"{i:02d}.png")
    config_path = root / "tiny.py"
    config_path.write_text(CONFIG_FILE.replace("FOLDER", repr(str(folder))))
    config = config_lib.load_config(str(config_path))
    torch.manual_seed(0)
    reference = MixMIMPretrainTorch.from_model_config(config.model).eval()
    official = root / "official.pth"
    torch.save({"model": reference.state_dict(), "epoch": 3,
                "args": argparse.Namespace(model="mixmim_tiny")}, official)
    return {"root": root, "folder": folder, "config": str(config_path),
            "cfg": config, "reference": reference, "official": str(official)}


def _convert(*args):
    cli.convert_main([str(a) for a in args])


def test_from_torch_needs_trust_pickle(setup, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _convert("from-torch", "--checkpoint", setup["official"], "--config", setup["config"],
                 "--workdir", tmp_path / "w")
    assert e.value.code == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


@pytest.fixture(scope="module")
def imported(setup):
    workdir = setup["root"] / "imported"
    _convert("from-torch", "--checkpoint", setup["official"], "--config", setup["config"],
             "--workdir", workdir, "--trust-pickle")
    return str(workdir)


def test_from_torch_then_to_torch_is_bit_exact(setup, imported, tmp_path):
    out = tmp_path / "back.pth"
    _convert("to-torch", "--workdir", imported, "--step", 0, "--out", out)
    back = torch.load(out, weights_only=True)["model"]
    original = setup["reference"].state_dict()
    assert list(back) == list(original)
    for k, v in original.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_finetune_export_loads_strictly(setup, imported, tmp_path):
    out = tmp_path / "ft.pth"
    _convert("to-torch", "--workdir", imported, "--step", 0, "--out", out, "--format", "finetune",
             "--num-classes", 7)
    sd = torch.load(out, weights_only=True)["model"]
    model = MixMIMFinetuneTorch.from_model_config(setup["cfg"].model, num_classes=7)
    model.load_state_dict(sd, strict=True)
    assert sd["head.weight"].shape == (7, setup["cfg"].model.embed_dim * 2)


def test_safetensors_export_holds_the_pth_tensors_and_metadata(setup, imported, tmp_path):
    import json

    from safetensors import safe_open

    _convert("to-torch", "--workdir", imported, "--out", tmp_path / "m.pth")
    _convert("to-torch", "--workdir", imported, "--out", tmp_path / "m.safetensors")
    pth = torch.load(tmp_path / "m.pth", weights_only=True)["model"]
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert list(f.keys()) == sorted(pth)  # safetensors stores its keys sorted
        for k, v in pth.items():
            assert f.get_tensor(k).dtype == v.dtype and torch.equal(f.get_tensor(k), v), k
        meta = f.metadata()
    # what mixmae-finetune --init reads: the same state_dict as the .pth
    from mixmae_jax.interop.from_torch import load_torch_checkpoint

    init = load_torch_checkpoint(str(tmp_path / "m.safetensors"))
    assert sorted(init) == sorted(pth) and all(torch.equal(init[k], pth[k]) for k in pth)
    cfg = setup["cfg"]
    assert (meta["method"], meta["model"], meta["image_size"], meta["layout"]) == (
        "mixmim", "swin", "32", "official pretrain")
    run = json.loads(meta["config"])
    assert run["model"]["embed_dim"] == cfg.model.embed_dim == 16
    assert run["model"]["window_sizes"] == list(cfg.model.window_sizes)


def test_from_torch_reads_safetensors_without_trust_pickle(setup, imported, tmp_path):
    _convert("to-torch", "--workdir", imported, "--out", tmp_path / "m.safetensors")
    _convert("from-torch", "--checkpoint", tmp_path / "m.safetensors", "--config",
             setup["config"], "--workdir", tmp_path / "w")
    _convert("to-torch", "--workdir", tmp_path / "w", "--step", 0, "--out", tmp_path / "b.pth")
    back = torch.load(tmp_path / "b.pth", weights_only=True)["model"]
    original = setup["reference"].state_dict()
    assert list(back) == list(original)
    for k, v in original.items():
        assert torch.equal(back[k], v), k


def test_to_transformers_and_timm_name_what_cannot_be_exported(imported, tmp_path, capsys):
    """MixMIM's Swin has no transformers or timm model; a folder target refuses a file name."""
    for argv, expected in [
        (["--to", "transformers", "--out", tmp_path / "hf"],
         r"error: --to transformers: mixmim on model.name='swin' has no transformers model.*"
         r"--to official"),
        (["--to", "timm", "--out", tmp_path / "t"],
         r"error: --to timm: mixmim on model.name='swin' has no timm model"),
        (["--to", "timm", "--out", tmp_path / "x.safetensors"],
         r"error: --out .*x\.safetensors: --to timm writes a folder"),
    ]:
        with pytest.raises(SystemExit) as e:
            _convert("to-torch", "--workdir", imported, *argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.match(expected, err), err
    assert not os.listdir(tmp_path)


def test_visualize_loss_matches_the_torch_reference(setup, imported, tmp_path, capsys):
    paths = sorted(str(p) for p in setup["folder"].iterdir())[:4]
    mask = np.zeros((4, 4), np.int64)
    mask.flat[[0, 3, 5, 6, 9, 10, 12, 15]] = 1
    np.save(tmp_path / "mask.npy", mask)
    out = tmp_path / "grid.png"
    cli.visualize_main(["--workdir", imported, "--images", *paths, "--out", str(out),
                        "--mask", str(tmp_path / "mask.npy")])
    printed = capsys.readouterr().out
    line = [s for s in printed.splitlines() if s.startswith("loss: ")]
    assert len(line) == 1, printed
    jax_loss = float(line[0].split()[1])
    grid = np.asarray(Image.open(out))
    assert grid.shape[0] > 4 * 32 and grid.std() > 10  # 4 rows of real pictures

    # The same images (resized and cropped to 32 px by the tool), normalised, same mask.
    images = load_images(paths, 32)
    x = (images / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    x = torch.tensor(x, dtype=torch.float32).permute(0, 3, 1, 2)
    ref = setup["reference"]
    m = torch.tensor(mask, dtype=torch.float32)
    with torch.no_grad():
        masks = ref.make_stage_masks(m)
        z = ref.forward_encoder(x, masks)
        loss = ref.forward_loss(x, ref.forward_decoder(z, masks[-1]), masks[-1])
    assert abs(jax_loss - float(loss)) <= 1e-5 * abs(float(loss)) + 1e-6


def test_visualize_rejects_a_bad_mask(imported, setup, tmp_path, capsys):
    np.save(tmp_path / "bad.npy", np.ones((3, 3)))
    paths = sorted(str(p) for p in setup["folder"].iterdir())[:2]
    with pytest.raises(SystemExit):
        cli.visualize_main(["--workdir", imported, "--images", *paths, "--out",
                            str(tmp_path / "x.png"), "--mask", str(tmp_path / "bad.npy")])
    assert re.search(r"--mask .*bad\.npy.*4x4", capsys.readouterr().err)
    assert not os.path.exists(tmp_path / "x.png")


def test_visualize_names_a_mask_file_that_is_no_array(imported, setup, tmp_path, capsys):
    notes = tmp_path / "notes.npy"
    notes.write_text("not an array\n")
    paths = sorted(str(p) for p in setup["folder"].iterdir())[:2]
    with pytest.raises(SystemExit) as e:
        cli.visualize_main(["--workdir", imported, "--images", *paths, "--out",
                            str(tmp_path / "x.png"), "--mask", str(notes)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.match(r"error: --mask .*notes\.npy: not a numpy", err)


def test_pretrain_resumes_from_an_imported_checkpoint(setup, imported):
    config = config_lib.load_config(setup["config"])
    lines = []
    out = tasks.train(config, imported, print_fn=lines.append)
    assert any("Resumed from step 0" in s for s in lines)
    assert out["step"] == 1 and np.isfinite(out["loss"])


def test_from_torch_refuses_a_workdir_with_checkpoints(setup, imported, capsys):
    with pytest.raises(SystemExit):
        _convert("from-torch", "--checkpoint", setup["official"], "--config", setup["config"],
                 "--workdir", imported, "--trust-pickle")
    assert "already holds checkpoints" in capsys.readouterr().err


def test_pretrain_user_errors_are_one_line(tmp_path, capsys):
    """A missing config file, a misspelt key, a bad value, an unknown variant and a directory
    end in one `error:` line, exit 2."""
    from recipes import CONFIGS

    tiny = f"{CONFIGS}/mixmim_b.py:tiny"
    for argv, expected in [
        (["--config", f"{CONFIGS}/nope.py"], "error: --config: no such file"),
        (["--config", tiny, "--config.batch_sise=8"],
         "error: --config.batch_sise: no such config key in .* did you mean batch_size"),
        (["--config", tiny, "--config.batch_size=-8"], "error: batch_size: -8: the global batch"),
        (["--config", f"{CONFIGS}/mixmim_b.py:tyni"],
         r"error: --config: .*mixmim_b.py:tyni: unknown variant 'tyni' \(known: tiny, res="),
        (["--config", CONFIGS], "error: --config: .* is a directory"),
    ]:
        with pytest.raises(SystemExit) as e:
            cli.pretrain_main([*argv, "--workdir", str(tmp_path / "w")])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.match(expected, err), err
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_pretrain_help_lists_its_flags(capsys):
    with pytest.raises(SystemExit) as e:
        cli.pretrain_main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--config", "--workdir", "--config.KEY=VALUE", "--coordinator_address",
                 "--jax_distributed", "--debug"):
        assert flag in out, flag


def test_from_torch_names_a_file_that_is_no_checkpoint(setup, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint\n")
    with pytest.raises(SystemExit) as e:
        _convert("from-torch", "--checkpoint", notes, "--config", setup["config"],
                 "--workdir", tmp_path / "w")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "notes.txt: " in err
    assert "not a readable PyTorch checkpoint" in err or "safe loader" in err


@pytest.mark.parametrize("main, argv, flags", [
    ("finetune_main", [], ("--config", "--workdir", "--init", "--debug", "--config.KEY=VALUE")),
    ("convert_main", [], ("to-torch", "from-torch", "--best", "--format")),
    ("convert_main", ["to-torch"], ("--workdir", "--step", "--best", "--out", "--format",
                                    "--num-classes", "--to", "transformers", "timm",
                                    ".safetensors")),
    ("convert_main", ["from-torch"], ("--checkpoint", "--config", "--workdir",
                                      "--trust-pickle", "--allow-ape-mismatch",
                                      ".safetensors")),
    ("visualize_main", [], ("--workdir", "--images", "--out", "--mask")),
    ("eval_main", [], ("knn", "linprobe")),
    ("eval_main", ["knn"], ("--workdir", "--data", "--k", "--temperature", "--crop-pct")),
    ("eval_main", ["linprobe"], ("--workdir", "--epochs", "--base-lr")),
])
def test_every_tool_has_help(capsys, main, argv, flags):
    """`--help` of every tool and subcommand exits 0 and lists its flags."""
    with pytest.raises(SystemExit) as e:
        getattr(cli, main)([*argv, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in flags:
        assert flag in out, flag
