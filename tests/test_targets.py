"""Exports into Hugging Face transformers and timm, proven by numbers in the libraries' own
classes (fp32, relative 1e-5): ViTMAEForPreTraining's loss with the noise of this project's MAE
plan equals the method's loss (`panels`, what mixmae-visualize prints); SimMIM's with the plan's
bool_masked_pos; classifier logits and encoder features equal this project's classifier and
`features`. Every folder loads strictly (no missing or unexpected key) and reads back into the
same params. Parameters are perturbed away from their init (LayerNorm weights not 1, biases not
0), so a swapped or mis-cut tensor shows. Nothing is downloaded (tests/foreign.py)."""

import re

import numpy as np
import pytest
import torch
from flax import nnx
from foreign import Lazy, TorchvisionUsed, import_timm, import_transformers
from recipes import load

from mixmae_jax.interop import layout_for, targets, to_torch
from mixmae_jax.interop.from_torch import read_checkpoint, state_dict_to_params
from mixmae_jax.interop.keymap import ConversionError
from mixmae_jax.methods import get_method
from mixmae_jax.models.layers import InitKeys
from mixmae_jax.models.paths import flatten, unflatten

T = Lazy(import_transformers)
timm = Lazy(import_timm)
TOL = 1e-5
SWIN_ONE_WINDOW = ["--config.model.window_sizes=(4,4,4)"]  # transformers: one window per model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _noisy(params, seed):
    rng = np.random.default_rng(seed)
    return unflatten({k: np.asarray(v) + 0.05 * rng.standard_normal(np.shape(v)).astype(
        np.float32) for k, v in flatten(params).items()})


def _build(config, build, seed):
    graph, state = nnx.split(build(InitKeys(0)), nnx.Param)
    params = _noisy(nnx.to_pure_dict(state), seed)
    nnx.replace_by_pure_dict(state, params)
    return params, nnx.merge(graph, state)


def _pretraining(name, overrides=(), seed=1):
    config = load(name, "tiny", overrides)
    method = get_method(config)
    return (config, method, *_build(config, method.build_model, seed))


def _classifier(name, overrides=(), seed=2):
    config = load(name, "tiny", overrides)
    method = get_method(config)
    return (config, method, *_build(config, lambda r: method.build_classifier(
        config.num_classes, r), seed))


def _images(config, n=4, seed=0):
    size = config.model.img_size
    return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def _loss(method, model, x, plan):
    """The method's loss on these images and plan as mixmae-visualize computes it (`panels`),
    compiled (eager Swin is slow)."""
    import jax

    return float(jax.jit(lambda x, plan: method.panels(model, x, plan)[0])(x, plan))


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _export(tmp_path, config, params, target, fmt, num_classes=1000):
    export = targets.export(config, params, target=target, fmt=fmt, num_classes=num_classes)
    folder = tmp_path / f"{target}_{fmt}"
    to_torch.save_export_dir(folder, export.config, export.tensors, {"method": "test"})
    return str(folder), export


def _rel(ours, theirs):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(ours)))


def _loaded_strictly(cls, folder, **kwargs):
    model, info = cls.from_pretrained(folder, output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    return model.eval()


def _reads_back(folder, config, params, absent_paths=()):
    """The folder through from-torch's reader and the official checks: the same params (bit
    for bit), except the parts the library has no place for, which keep the template's."""
    ckpt = read_checkpoint(folder)
    sd, absent, _ = targets.to_official(ckpt.kind, ckpt.foreign_config, ckpt.tensors, config,
                                        folder)
    template = unflatten({k: np.zeros_like(np.asarray(v)) for k, v in flatten(params).items()})
    back, _ = state_dict_to_params(sd, layout_for(config), template, absent=absent)
    flat_back, flat = flatten(back), flatten(params)
    for path, value in flat.items():
        want = 0.0 * np.asarray(value) if path.startswith(absent_paths) else np.asarray(value)
        np.testing.assert_array_equal(flat_back[path], want, err_msg=path)


# ---------------------------------------------------------------------------------------------
# transformers: MAE-style ViTs.
# ---------------------------------------------------------------------------------------------


def _vitmae_loss(folder, x, noise):
    hf = _loaded_strictly(T.ViTMAEForPreTraining, folder)
    with torch.no_grad():
        out = hf(_nchw(x), noise=torch.from_numpy(np.asarray(noise)))
    return float(out.loss), out.mask.numpy()


def test_vitmae_loss_with_the_plans_noise_equals_the_mae_loss(tmp_path):
    import jax

    config, method, params, model = _pretraining("mae_vit_b.py")
    folder, export = _export(tmp_path, config, params, "transformers", "pretrain")
    assert export.config["layer_norm_eps"] == 1e-6 and export.config["norm_pix_loss"] is True
    x, key = _images(config), jax.random.PRNGKey(3)
    plan = method.make_plan(key, len(x), 1)
    noise = jax.random.uniform(key, (len(x), method.num_patches()))  # what make_plan drew
    ours = _loss(method, model, x, plan)  # mixmae-visualize's loss
    theirs, mask = _vitmae_loss(folder, x, noise)
    np.testing.assert_array_equal(mask, plan["mask"])
    print(f"\nmeasured: ViTMAEForPreTraining loss vs MAE: rel {abs(theirs - ours) / ours:.2e}")
    assert abs(theirs - ours) <= TOL * ours
    _reads_back(folder, config, params)


def test_where_transformers_vitmae_differs_from_maes(tmp_path):
    """Measured, not asserted away: (1) transformers' default (and the hub's MAE configs')
    layer_norm_eps is 1e-12, MAE's 1e-6 (the export writes 1e-6); (2) its sin-cos function gives
    MAE's table, but transformers 5.23 builds ViTMAEForPreTraining(config) with zero tables (its
    init skips them), so the export stores both tables and the loaded model has MAE's."""
    import jax

    from mixmae_jax.models.vit import pos_embed_with_cls

    config, method, params, model = _pretraining("mae_vit_b.py")
    folder, _ = _export(tmp_path, config, params, "transformers", "pretrain")
    x, key = _images(config), jax.random.PRNGKey(3)
    noise = torch.from_numpy(np.asarray(jax.random.uniform(key, (len(x), method.num_patches()))))
    ours = _loss(method, model, x, method.make_plan(key, len(x), 1))
    hub = T.ViTMAEForPreTraining.from_pretrained(folder, layer_norm_eps=1e-12).eval()
    with torch.no_grad():
        theirs = float(hub(_nchw(x), noise=noise).loss)
    print(f"\nmeasured: ViTMAE with layer_norm_eps 1e-12 vs MAE: rel "
          f"{abs(theirs - ours) / ours:.2e}")
    assert theirs != ours and abs(theirs - ours) <= 1e-3 * ours

    m = config.model
    grid = m.img_size // m.patch_size
    fresh = T.ViTMAEForPreTraining(T.ViTMAEConfig.from_pretrained(folder))
    assert float(fresh.decoder.decoder_pos_embed.abs().max()) == 0.0
    embeddings = fresh.vit.embeddings
    embeddings.patch_embeddings.projection._is_hf_initialized = False  # run its table init
    embeddings.initialize_weights()
    dev = np.abs(embeddings.position_embeddings.detach().numpy()[0]
                 - pos_embed_with_cls(m.embed_dim, grid)).max()
    print(f"measured: transformers' sin-cos table vs MAE's: max abs {dev:.1e}")
    assert dev <= 1e-6
    loaded = read_checkpoint(folder).tensors
    for name, dim in (("vit.embeddings.position_embeddings", m.embed_dim),
                      ("decoder.decoder_pos_embed", m.decoder_dim)):
        np.testing.assert_array_equal(loaded[name].numpy()[0], pos_embed_with_cls(dim, grid))


def test_ummae_vit_loss_without_secondary_masking_and_vis_mask_token(tmp_path):
    """UM-MAE's ViT: ViTMAE has no secondary masking, so `vis_mask_token` stays behind (named
    in the notes); with no kept unit replaced, ViTMAE fed the plan's order as noise computes
    UM-MAE's loss."""
    import jax
    import jax.numpy as jnp

    config, method, params, model = _pretraining("ummae_vit_b.py")
    folder, export = _export(tmp_path, config, params, "transformers", "pretrain")
    assert any("vis_mask_token" in n for n in export.notes), export.notes
    x = _images(config)
    plan = method.make_plan(jax.random.PRNGKey(5), len(x), 1)
    plan = {**plan, "sm": jnp.zeros_like(plan["sm"])}
    ours = _loss(method, model, x, plan)
    _, masked_ids, kept_ids = method.unit_ids(plan["slot"])
    order = np.concatenate([np.asarray(kept_ids), np.asarray(masked_ids)], axis=1)
    noise = np.argsort(order, axis=1).astype(np.float32)  # argsort(noise) == order
    theirs, _ = _vitmae_loss(folder, x, noise)
    print(f"\nmeasured: ViTMAEForPreTraining loss vs UM-MAE ViT (no secondary masking): rel "
          f"{abs(theirs - ours) / ours:.2e}")
    assert abs(theirs - ours) <= TOL * ours
    _reads_back(folder, config, params, absent_paths=("vis_mask_token",))


@pytest.mark.slow
def test_mixedae_exports_maes_model_and_objective(tmp_path):
    """MixedAE's ViT and decoder are MAE's: ViTMAE with its weights computes MAE's loss."""
    import jax

    config, _, params, _ = _pretraining("mixedae_vit_b.py")
    folder, _ = _export(tmp_path, config, params, "transformers", "pretrain")
    mae_config = load("mae_vit_b.py", "tiny")
    mae = get_method(mae_config)
    graph, state = nnx.split(mae.build_model(InitKeys(0)), nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    x, key = _images(config), jax.random.PRNGKey(7)
    ours = float(mae.panels(nnx.merge(graph, state), x, mae.make_plan(key, len(x), 1))[0])
    theirs, _ = _vitmae_loss(folder, x, jax.random.uniform(key, (len(x), mae.num_patches())))
    assert abs(theirs - ours) <= TOL * ours
    _reads_back(folder, config, params)


def test_vit_encoder_to_vitmodel_and_a_fresh_vitforimageclassification(tmp_path):
    import jax.numpy as jnp

    config, _, params, model = _pretraining("mae_vit_b.py")
    folder, export = _export(tmp_path, config, params, "transformers", "finetune")
    assert "decoder" in export.notes[0] and "add_pooling_layer=False" in export.load
    hf = _loaded_strictly(T.ViTModel, folder, add_pooling_layer=False)
    x = _images(config)
    enc = model.encoder
    ours = np.asarray(enc.encode(enc.embed(jnp.asarray(x))))
    with torch.no_grad():
        theirs = hf(_nchw(x)).last_hidden_state.numpy()
    print(f"\nmeasured: ViTModel tokens vs the encoder's: rel {_rel(ours, theirs):.2e}")
    assert _rel(ours, theirs) <= TOL
    # A user's transformers fine-tuning starts from it: only the new classifier is fresh.
    _, info = T.ViTForImageClassification.from_pretrained(folder, num_labels=3,
                                                          output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"], info
    assert not info["unexpected_keys"]
    _reads_back(folder, config, params, absent_paths=("decoder",))


def test_a_finetuned_vit_classifier_has_no_transformers_model(tmp_path):
    config, _, params, _ = _classifier("finetune_mae_vit_b.py")
    with pytest.raises(ConversionError, match=r"--to transformers: .*global pool.*--to timm"):
        targets.export(config, params, target="transformers", fmt="finetune", num_classes=10)


# ---------------------------------------------------------------------------------------------
# transformers: SimMIM's Swin.
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_swinformaskedimagemodeling_loss_equals_simmims(tmp_path):
    import jax

    config, method, params, model = _pretraining("simmim_swin_b.py", SWIN_ONE_WINDOW)
    folder, export = _export(tmp_path, config, params, "transformers", "pretrain")
    assert export.config["window_size"] == 4 and export.config["encoder_stride"] == 16
    hf = _loaded_strictly(T.SwinForMaskedImageModeling, folder)
    x = _images(config)
    plan = method.make_plan(jax.random.PRNGKey(3), len(x), 1)
    ours = _loss(method, model, x, plan)
    token_mask, _ = method.upsampled(plan["mask"], model)
    bool_masked_pos = torch.from_numpy(np.asarray(token_mask).reshape(len(x), -1) > 0)
    with torch.no_grad():
        theirs = float(hf(_nchw(x), bool_masked_pos=bool_masked_pos).loss)
    print(f"\nmeasured: SwinForMaskedImageModeling loss vs SimMIM: rel "
          f"{abs(theirs - ours) / ours:.2e}")
    assert abs(theirs - ours) <= TOL * ours
    _reads_back(folder, config, params)


@pytest.mark.slow
def test_swin_classifier_logits_in_transformers(tmp_path):
    config, _, params, model = _classifier("finetune_simmim_swin_b.py", SWIN_ONE_WINDOW)
    folder, _ = _export(tmp_path, config, params, "transformers", "finetune",
                        config.num_classes)
    hf = _loaded_strictly(T.SwinForImageClassification, folder)
    x = _images(config)
    ours = np.asarray(model(x))
    with torch.no_grad():
        theirs = hf(_nchw(x)).logits.numpy()
    print(f"\nmeasured: SwinForImageClassification logits vs the classifier: rel "
          f"{_rel(ours, theirs):.2e}")
    assert _rel(ours, theirs) <= TOL
    # Its encoder alone: SwinModel's pooled output is the classifier's pooled features.
    encoder = T.SwinModel.from_pretrained(folder).eval()
    pooled = np.asarray(model.forward_features(x))  # mean over tokens (Swin: no fc_norm)
    with torch.no_grad():
        assert _rel(pooled, encoder(_nchw(x)).pooler_output.numpy()) <= TOL
    _reads_back(folder, config, params)
    # a transformers 4 file also holds the index buffers: read, not refused
    ckpt = read_checkpoint(folder)
    tensors = dict(ckpt.tensors, **{
        "swin.encoder.layers.0.blocks.0.attention.self.relative_position_index":
            torch.zeros(16, 16, dtype=torch.int64)})
    targets.to_official("transformers", ckpt.foreign_config, tensors, config, folder)


def test_swin_with_per_stage_windows_has_no_transformers_model():
    config, _, params, _ = _pretraining("simmim_swin_b.py")  # windows 4, 4, 2
    with pytest.raises(ConversionError, match=r"model.window_sizes=\(4, 4, 2\).*--to timm"):
        targets.export(config, params, target="transformers", fmt="pretrain")


def test_official_only_backbones_say_so():
    for name in ("mixmim_b.py", "ummae_swin_t.py"):
        config, _, params, _ = _pretraining(name)
        for target in ("transformers", "timm"):
            with pytest.raises(ConversionError, match=rf"--to {target}: .* --to official"):
                targets.export(config, params, target=target, fmt="pretrain")


# ---------------------------------------------------------------------------------------------
# timm.
# ---------------------------------------------------------------------------------------------


def _timm_model(folder, export):
    """The folder through timm's own loader, and the same weights into the model a user creates
    by name, strictly."""
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    by_name = timm.create_model(export.config["architecture"], pretrained=False,
                                **export.config["model_args"]).eval()
    by_name.load_state_dict(read_checkpoint(folder).tensors, strict=True)
    return model, by_name


@pytest.mark.slow
@pytest.mark.parametrize("name", ["finetune_mae_vit_b.py", "finetune_simmim_swin_b.py"])
def test_timm_classifier_logits(tmp_path, name):
    config, _, params, model = _classifier(name)
    folder, export = _export(tmp_path, config, params, "timm", "finetune", config.num_classes)
    x = _images(config)
    ours = np.asarray(model(x))
    for tm in _timm_model(folder, export):
        with torch.no_grad():
            theirs = tm(_nchw(x)).numpy()
        print(f"\nmeasured: timm {type(tm).__name__} logits vs the classifier: rel "
              f"{_rel(ours, theirs):.2e}")
        assert _rel(ours, theirs) <= TOL
    _reads_back(folder, config, params)


def test_timm_vit_encoder_features(tmp_path):
    config, method, params, model = _pretraining("mae_vit_b.py")
    folder, export = _export(tmp_path, config, params, "timm", "pretrain")
    assert export.config["model_args"]["fc_norm"] is False and export.config["num_classes"] == 0
    x = _images(config)
    ours = np.asarray(method.features(model, x))  # what k-NN and the linear probe read
    for tm in _timm_model(folder, export):
        with torch.no_grad():
            theirs = tm(_nchw(x)).numpy()
        print(f"\nmeasured: timm ViT encoder output vs features: rel {_rel(ours, theirs):.2e}")
        assert _rel(ours, theirs) <= TOL
    _reads_back(folder, config, params, absent_paths=("decoder",))


def test_timm_pretraining_start_matches_the_official_finetune_export(tmp_path):
    """A pretraining run's --to timm --format finetune holds the tensors of --to official
    --format finetune (encoder, fresh fc_norm and head as main_finetune.py makes them)."""
    config, method, params, _ = _pretraining("mae_vit_b.py")
    _, export = _export(tmp_path, config, params, "timm", "finetune", 7)
    official = to_torch.params_to_state_dict(params, layout_for(method.config), format="finetune",
                                             num_classes=7)
    assert list(export.tensors) == list(official)
    for k, v in official.items():
        assert torch.equal(export.tensors[k], v), k


def test_timm_swin_has_no_pretraining_model():
    config, _, params, _ = _pretraining("simmim_swin_b.py")
    with pytest.raises(ConversionError, match="timm has no SimMIM decoder.*--format finetune"):
        targets.export(config, params, target="timm", fmt="pretrain")


def test_timm_imports_without_torchvision():
    """The stand-ins are gone after the import, and using one fails loudly."""
    import sys

    import_timm()
    assert "torchvision" not in sys.modules
    from timm.layers import create_norm

    with pytest.raises(TorchvisionUsed):
        create_norm.FrozenBatchNorm2d(4)


# ---------------------------------------------------------------------------------------------
# Import errors.
# ---------------------------------------------------------------------------------------------


def test_a_folder_of_another_backbone_is_refused_by_name(tmp_path):
    config, _, params, _ = _pretraining("mae_vit_b.py")
    folder, _ = _export(tmp_path, config, params, "transformers", "pretrain")
    ckpt = read_checkpoint(folder)
    swin = load("simmim_swin_b.py", "tiny")
    with pytest.raises(ConversionError, match=r"a transformers ViTMAEForPreTraining; the config "
                       r"is simmim on model.name='swin'"):
        targets.to_official(ckpt.kind, ckpt.foreign_config, ckpt.tensors, swin, folder)
    tensors = dict(ckpt.tensors)
    tensors["vit.extra.weight"] = tensors.pop("vit.layernorm.weight")
    with pytest.raises(ConversionError, match=r"vit\.layernorm\.weight \(official norm\.weight\)"
                       r": missing(.|\n)*vit\.extra\.weight: unexpected"):
        targets.to_official("transformers", ckpt.foreign_config, tensors, config, folder)


# ---------------------------------------------------------------------------------------------
# The command line, both ways.
# ---------------------------------------------------------------------------------------------


def test_convert_cli_round_trips_a_transformers_folder(tmp_path, capsys):
    """from-torch reads a ViTMAE folder into a workdir; to-torch --to transformers writes the
    same folder back, tensor for tensor, config.json field for field."""
    import json

    from recipes import CONFIGS

    from mixmae_jax import cli

    config, _, params, _ = _pretraining("mae_vit_b.py")
    folder, _ = _export(tmp_path, config, params, "transformers", "pretrain")
    workdir, back = tmp_path / "w", tmp_path / "back"
    cli.convert_main(["from-torch", "--checkpoint", folder, "--config",
                      f"{CONFIGS}/mae_vit_b.py:tiny", "--workdir", str(workdir)])
    cli.convert_main(["to-torch", "--workdir", str(workdir), "--to", "transformers", "--out",
                      str(back)])
    out = capsys.readouterr().out
    assert "transformers ViTMAEForPreTraining" in out and "from_pretrained(" in out
    first, second = read_checkpoint(folder), read_checkpoint(back)
    assert sorted(first.tensors) == sorted(second.tensors)
    for k, v in first.tensors.items():
        assert torch.equal(second.tensors[k], v), k
    with open(f"{folder}/config.json") as a, open(back / "config.json") as b:
        assert json.load(a) == json.load(b)
    assert second.metadata["method"] == "mae" and second.metadata["image_size"] == "32"
    # An existing export folder is replaced only with --overwrite; a file is not a folder.
    again = ["to-torch", "--workdir", str(workdir), "--to", "transformers", "--out", str(back)]
    before = (back / "model.safetensors").stat().st_mtime_ns
    (tmp_path / "notes.txt").write_text("mine")
    for argv, expected in [(again, r"error: --out \S+back: exists; pass --overwrite"),
                           (again[:-1] + [str(tmp_path / "notes.txt")], r"error: --out \S+: "
                            "is a file; this output is a folder")]:
        with pytest.raises(SystemExit) as e:
            cli.convert_main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and re.match(expected, err), err
    assert (back / "model.safetensors").stat().st_mtime_ns == before
    assert (tmp_path / "notes.txt").read_text() == "mine"
    cli.convert_main([*again, "--overwrite"])
    assert read_checkpoint(back).tensors.keys() == first.tensors.keys()
