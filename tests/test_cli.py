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


@pytest.mark.slow
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
    assert len(err.splitlines()) == 1 and re.match(r"error: --mask .*notes\.npy: not a numpy", err,
                                                   re.IGNORECASE)
    assert "allow_pickle" not in err  # numpy's advice, about another problem


@pytest.mark.slow
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


@pytest.mark.parametrize("main, argv, named", [
    ("pretrain_main", ["--config", "c.py"], "the following arguments are required: --workdir"),
    ("pretrain_main", ["--config", "c.py", "--workdir", "w", "--stpes", "3"], "--stpes"),
    ("finetune_main", ["--config", "c.py", "--workdir", "w", "--int", "x"], "--int"),
    ("convert_main", ["to-torch", "--workdir", "w"], "required: --out"),
    ("convert_main", ["to-torch", "--workdir", "w", "--out", "o", "--format", "x"],
     "argument --format: invalid choice: 'x'"),
    ("convert_main", ["to-pytorch"], "invalid choice: 'to-pytorch'"),
    ("visualize_main", ["--workdir", "w", "--out", "o.png"], "required: --images"),
    ("eval_main", ["knn", "--workdir", "w", "--k", "ten"],
     "argument --k: invalid positive int value"),
    ("eval_main", [], "required: command"),
    ("bench_main", ["--steps", "x"], "argument --steps: invalid positive int value"),
    # Numbers that would divide by zero or train nothing (they ran, or failed late, before).
    ("eval_main", ["knn", "--workdir", "w", "--batch", "0"], "argument --batch: 0: must be > 0"),
    ("eval_main", ["knn", "--workdir", "w", "--k", "0"], "argument --k: 0: must be > 0"),
    ("eval_main", ["knn", "--workdir", "w", "--temperature", "0"],
     "argument --temperature: 0: must be > 0"),
    ("eval_main", ["linprobe", "--workdir", "w", "--epochs", "0"], "argument --epochs: 0: must"),
    ("eval_main", ["linprobe", "--workdir", "w", "--warmup-epochs", "-1"], "-1: must be >= 0"),
    ("bench_main", ["--batch", "0"], "argument --batch: 0: must be > 0"),
])
def test_a_bad_command_line_is_one_error_line(capsys, main, argv, named):
    """argparse's refusals as every other refusal: one `error:` line naming the flag and where
    the flags are listed (not the usage block first), exit 2."""
    with pytest.raises(SystemExit) as e:
        getattr(cli, main)(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and named in err and "--help` lists the flags" in err, err


# ---------------------------------------------------------------------------------------------
# What a new user runs into (issue 23): outputs, unwritable places, masks, help, the picture
# ---------------------------------------------------------------------------------------------


def _refused(main, argv, capsys) -> str:
    """The one `error:` line of a refused command (exit status 2)."""
    with pytest.raises(SystemExit) as e:
        getattr(cli, main)([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def _digest(path) -> bytes:
    import hashlib

    return hashlib.sha256(open(path, "rb").read()).digest()


def _images(setup, n=2):
    return sorted(str(p) for p in setup["folder"].iterdir())[:n]


def test_out_never_replaces_a_run_file_or_an_input(setup, imported, capsys):
    config_json = os.path.join(imported, "config.json")
    before = _digest(config_json)
    err = _refused("convert_main", ["to-torch", "--workdir", imported, "--out", config_json],
                   capsys)
    assert re.match(r"error: --out .*config\.json: config\.json belongs to the run in ", err), err
    image = _images(setup)[0]
    kept = _digest(image)
    err = _refused("visualize_main", ["--workdir", imported, "--images", *_images(setup),
                                      "--out", image], capsys)
    assert "is one of the tool's inputs" in err, err
    err = _refused("visualize_main", ["--workdir", imported, "--images", *_images(setup),
                                      "--out", os.path.join(imported, "checkpoints", "x.png")],
                   capsys)
    assert "checkpoints belongs to the run" in err, err
    assert _digest(config_json) == before and _digest(image) == kept


def test_an_existing_out_is_replaced_only_with_overwrite(imported, tmp_path, capsys):
    out = tmp_path / "model.pth"
    out.write_bytes(b"an earlier export")
    err = _refused("convert_main", ["to-torch", "--workdir", imported, "--out", out], capsys)
    assert err.endswith("exists; pass --overwrite to replace it"), err
    assert out.read_bytes() == b"an earlier export"
    _convert("to-torch", "--workdir", imported, "--out", out, "--overwrite")
    assert len(torch.load(out, weights_only=True)["model"]) > 10


def test_a_corrupt_config_snapshot_is_named(setup, imported, tmp_path, capsys):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(imported, workdir)
    (workdir / "config.json").write_bytes(b"PK\x03\x04\x80\x81 a torch zip, say")
    expected = (r"error: .*run/config\.json: the run's config snapshot cannot be read \(not "
                r"text")
    err = _refused("visualize_main", ["--workdir", workdir, "--images", *_images(setup),
                                      "--out", tmp_path / "v.png"], capsys)
    assert re.match(expected, err), err
    err = _refused("pretrain_main", ["--config", setup["config"], "--workdir", workdir], capsys)
    assert re.match(expected, err), err


def test_visualize_writes_the_format_its_name_says(setup, imported, tmp_path, capsys):
    out = tmp_path / "grid.jpg"
    cli.visualize_main(["--workdir", imported, "--images", *_images(setup), "--out", str(out)])
    assert out.read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG, not PNG bytes under a .jpg name
    assert Image.open(out).format == "JPEG"
    err = _refused("visualize_main", ["--workdir", imported, "--images", *_images(setup),
                                      "--out", tmp_path / "grid.foo"], capsys)
    assert re.match(r"error: --out .*grid\.foo: unknown image type '\.foo'", err), err


def test_unwritable_places_are_one_line(setup, imported, tmp_path, capsys):
    """A path through a file: one line naming the flag, the path and the cause; nothing made."""
    afile = tmp_path / "afile"
    afile.write_text("a file, not a folder\n")
    cases = [
        ("pretrain_main", ["--config", setup["config"], "--workdir", afile / "w"], "--workdir"),
        ("visualize_main", ["--workdir", imported, "--images", *_images(setup), "--out",
                            afile / "x.png"], "--out"),
        ("convert_main", ["to-torch", "--workdir", imported, "--out", afile / "x.pth"], "--out"),
        ("convert_main", ["from-torch", "--checkpoint", setup["official"], "--config",
                          setup["config"], "--workdir", afile / "w", "--trust-pickle"],
         "--workdir"),
    ]
    for main, argv, flag in cases:
        err = _refused(main, argv, capsys)
        assert re.match(rf"error: {flag} .*afile/\S+: ", err) and "afile" in err, err
        assert "not a directory" in err, err
    assert afile.read_text() == "a file, not a folder\n"
    assert sorted(os.listdir(tmp_path)) == ["afile"]


_READ_ONLY = """
import os, sys
from mixmae_jax import cli
shared, config, official, images = sys.argv[1:5]
cases = [
    ("pretrain_main", ["--config", config, "--workdir", os.path.join(shared, "run")]),
    ("pretrain_main", ["--config", config, "--workdir", os.path.join(shared, "new", "w")]),
    ("visualize_main", ["--workdir", os.path.join(shared, "run"), "--images", images,
                        "--out", os.path.join(shared, "x.png")]),
    ("convert_main", ["to-torch", "--workdir", os.path.join(shared, "run"),
                      "--out", os.path.join(shared, "x.pth")]),
    ("convert_main", ["from-torch", "--checkpoint", official, "--config", config,
                      "--workdir", os.path.join(shared, "new"), "--trust-pickle"]),
]
for main, argv in cases:
    try:
        getattr(cli, main)(argv)
        print("status 0")
    except SystemExit as e:
        print("status", e.code)
"""


def _listing(folder) -> dict[str, int]:
    """Every file under `folder` with its size."""
    return {os.path.join(d, f): os.path.getsize(os.path.join(d, f))
            for d, _, files in os.walk(folder) for f in files}


@pytest.mark.slow
def test_read_only_places_are_one_line(setup, imported, tmp_path):
    """A read-only workdir (a resume), a new workdir, --out and from-torch's --workdir in a
    read-only folder: one line each naming the place and the cause, exit 2, before any
    compile. Root writes anywhere, so as root the folder is a read-only mount (a private mount
    namespace); otherwise its permissions are taken away."""
    import shutil
    import subprocess
    import sys

    shared = str(tmp_path / "shared")
    shutil.copytree(imported, os.path.join(shared, "run"))
    os.makedirs(os.path.join(shared, "new"))
    for name in ("config", "official"):
        shutil.copy(setup[name], shared)
    image = shutil.copy(_images(setup)[0], shared)
    config = os.path.join(shared, os.path.basename(setup["config"]))
    official = os.path.join(shared, os.path.basename(setup["official"]))
    argv = [sys.executable, "-c", _READ_ONLY, shared, config, official, image]
    before = _listing(shared)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(cli.__file__)), os.path.dirname(__file__)]))
    if os.geteuid() == 0:
        mount = (f"mount --bind {shared} {shared} && mount -o remount,ro,bind {shared} "
                 f"{shared} && exec \"$@\"")
        if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
            pytest.skip("root without a private mount namespace: no read-only place to try")
        proc = subprocess.run(["unshare", "-m", "sh", "-c", mount, "sh", *argv],
                              capture_output=True, text=True, env=env)
    else:
        for d, _, _ in os.walk(shared):
            os.chmod(d, 0o555)
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, env=env)
        finally:
            for d, _, _ in os.walk(shared):
                os.chmod(d, 0o755)
    assert proc.stdout.split("\n")[:-1] == ["status 2"] * 5, (proc.stdout, proc.stderr[-3000:])
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 5, proc.stderr[-3000:]
    for line, flag in zip(errors, ["--workdir", "--workdir", "--out", "--out", "--workdir"],
                          strict=True):
        assert re.match(rf"error: {flag} \S+: cannot write in \S+ \((Permission denied|"
                        r"Read-only file system)\)$", line), line
    assert _listing(shared) == before  # nothing written, not even a log


def test_an_unreachable_bucket_is_one_line(setup, capsys):
    err = _refused("pretrain_main", ["--config", setup["config"], "--workdir",
                                     "gs://mixmae-no-such-bucket-4e1f/run"], capsys)
    assert re.match(r"error: --workdir gs://mixmae-no-such-bucket-4e1f/run: cannot write to "
                    r"bucket mixmae-no-such-bucket-4e1f \(.+\)$", err), err


def test_visualize_takes_a_mask_in_an_npz_and_names_what_it_cannot_use(setup, imported,
                                                                     tmp_path, capsys):
    mask = np.zeros((4, 4), np.int64)
    mask.flat[[0, 3, 5, 6, 9, 10, 12, 15]] = 1
    np.save(tmp_path / "m.npy", mask)
    np.savez(tmp_path / "m.npz", mask=mask)
    np.savez(tmp_path / "two.npz", mask=mask, vis_mask=mask)
    losses = []
    for name in ("m.npy", "m.npz"):
        cli.visualize_main(["--workdir", imported, "--images", *_images(setup, 4), "--out",
                            str(tmp_path / f"{name}.png"), "--mask", str(tmp_path / name)])
        losses += [line for line in capsys.readouterr().out.splitlines()
                   if line.startswith("loss: ")]
    assert len(losses) == 2 and losses[0] == losses[1]
    err = _refused("visualize_main", ["--workdir", imported, "--images", *_images(setup, 4),
                                      "--out", tmp_path / "x.png", "--mask",
                                      tmp_path / "two.npz"], capsys)
    assert re.match(r"error: --mask .*two\.npz: an \.npz of 2 arrays \(mask, vis_mask\); the "
                    r"run's method takes one array \(MixMIM: \.npy \(h, w\) 0/1", err), err


def test_visualize_refuses_an_image_count_its_method_cannot_batch(setup, tmp_path, capsys):
    """MixedAE mixes groups of method.num_sources images: one more is refused by name, before
    anything runs."""
    from recipes import load

    from mixmae_jax.train import checkpoint as ckpt_lib

    config = load("mixedae_vit_b.py", "tiny")
    exp = tasks.build_experiment(config, steps_per_epoch=1)
    ckpt = ckpt_lib.Checkpointer(tmp_path / "run", save_every=0, keep=0, config=config)
    ckpt.save(0, exp.init_state(), force=True)
    ckpt.close()
    n = config.method.num_sources + 1
    err = _refused("visualize_main", ["--workdir", tmp_path / "run", "--images",
                                      *_images(setup, n), "--out", tmp_path / "x.png"], capsys)
    assert re.match(rf"error: --images: {n} given, which this run cannot take as one batch "
                    rf"\(.*multiple of method\.num_sources={n - 1}", err), err
    assert not os.path.exists(tmp_path / "x.png")


def test_the_picture_names_its_columns_and_the_loss(setup, imported, tmp_path):
    """The grid's header holds text above every column (the panel names) and a title line; the
    images start below it."""
    out = tmp_path / "grid.png"
    cli.visualize_main(["--workdir", imported, "--images", *_images(setup, 2), "--out",
                        str(out)])
    grid = np.asarray(Image.open(out).convert("L"))
    size, pad, columns = 128, 2, 4  # 32 px images enlarged to 128; MixMIM's four panels
    header = grid.shape[0] - 2 * (size + pad)
    assert header >= 20, grid.shape  # two lines of text above the rows
    for j in range(columns):
        x = pad + j * (size + pad)
        band = grid[:header, x:x + size]
        assert (band < 128).sum() > 20, j  # dark text over column j
    assert (grid[:header // 2, :] < 128).sum() > 20  # the title line


def _parsers(monkeypatch):
    """Every tool's and subcommand's argparse parser, as the tools build them."""
    found = []

    def capture(self, args=None, namespace=None):
        found.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    from mixmae_jax import bench

    for main in (cli.pretrain_main, cli.finetune_main, cli.convert_main, cli.visualize_main,
                 cli.eval_main, bench.main):
        with pytest.raises(SystemExit):
            main([])
    out = []
    for p in found:
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        out += [p] if not subs else list(subs[0].choices.values())
    return out


def test_every_flag_has_help_its_default_and_debug(monkeypatch):
    parsers = _parsers(monkeypatch)
    assert len(parsers) == 8  # pretrain, finetune, to-torch, from-torch, visualize, knn,
    # linprobe, bench
    for p in parsers:
        flags = {a.option_strings[0]: a for a in p._actions if a.option_strings}
        assert "--debug" in flags, p.prog
        for flag, action in flags.items():
            assert action.help, (p.prog, flag)
        text = p.format_help()
        for flag, action in flags.items():
            shown = action.default not in (None, False, argparse.SUPPRESS)
            if shown and "%(default)" not in (action.help or ""):
                assert f"(default: {action.default})" in " ".join(text.split()), (p.prog, flag)


def test_help_names_the_run_length_and_fine_tuning_examples(capsys):
    with pytest.raises(SystemExit):
        cli.pretrain_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--config.total_steps=N" in text and "--config.epochs=E" in text
    with pytest.raises(SystemExit):
        cli.finetune_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "e.g. configs/finetune_mixmim_b.py" in text and "configs/demo.py:finetune" in text
    assert "e.g. configs/demo.py[:variant]" not in text


def test_a_long_list_of_problems_is_one_short_line(capsys):
    """An error listing its problems one a line (a conversion into the wrong config lists every
    missing tensor) prints its first four and how many more, on one line."""
    from mixmae_jax import console

    def body():
        raise ValueError("state_dict_to_params: 10 problem(s):\n" + "\n".join(
            f"  blocks.{i}.attn.qkv.weight: missing from the state_dict" for i in range(10)))

    assert console.run("mixmae-convert from-torch", body) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: state_dict_to_params: 10 problem(s): blocks.0.attn.qkv.weight")
    assert "blocks.3." in err and "blocks.4." not in err, err
    assert err.endswith("... and 6 more (--debug lists them)"), err
