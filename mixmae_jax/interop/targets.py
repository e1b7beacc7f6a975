"""Exports beyond the official layout: Hugging Face transformers and timm, both ways.

Both go through the official state_dict, whose layout the tests prove against the plain torch
references: params -> official state_dict (`to_torch.params_to_state_dict`) -> the library's
names (`hf_layout`, `timm_layout`); and back, the library's tensors -> official names ->
`from_torch.state_dict_to_params` with all its checks. What the library has no place for
(a decoder, UM-MAE's `vis_mask_token`) is reported, never dropped silently.

    TARGETS[target](config)  ->  which models of that library this run exports to
    export(config, params, target=..., fmt=..., num_classes=...)  ->  Export
    to_official(checkpoint, config)  ->  (official state_dict, absent official keys, notes)

Torch-free at import (torch, transformers and timm are imported only where used).
"""

from __future__ import annotations

import collections
import dataclasses

from mixmae_jax.interop import hf_layout as HF
from mixmae_jax.interop import timm_layout as TIMM
from mixmae_jax.interop.keymap import ConversionError

TARGETS = ("official", "transformers", "timm")


def backbone(config) -> str | None:
    """"vit" (the MAE-style ViT of MAE, MixedAE and UM-MAE), "swin" (SimMIM's official Swin),
    or None (MixMIM's Swin, UM-MAE's Swin and PVT: official layout only)."""
    if config.model.name == "vit" and config.method.name in ("mae", "mixedae", "ummae"):
        return "vit"
    if config.model.name == "swin" and config.method.name == "simmim":
        return "swin"
    return None


@dataclasses.dataclass
class Export:
    config: dict  # config.json
    tensors: collections.OrderedDict  # the library's names -> torch tensors
    model: str  # what loads it, e.g. "transformers ViTMAEForPreTraining"
    load: str  # one line of Python that loads the folder
    notes: list[str]


def _rename_out(state_dict, names):
    """Official state_dict -> the library's tensors (q, k, v cut from qkv) and the official
    keys it has no place for."""
    out, dropped = collections.OrderedDict(), []
    for key, value in state_dict.items():
        parts = names(key)
        if not parts:
            dropped.append(key)
        for name, chunk in parts:
            out[name] = value if chunk is None else value.chunk(3, dim=0)[chunk].clone()
    return out, dropped


def _dropped_notes(dropped, layout, why: str) -> list[str]:
    """One line naming the parameters (by module) the library has no place for; the computed
    buffers it recomputes go unmentioned."""
    params = [k for k in dropped if not layout.is_constant_key(k) and not k.endswith("attn_mask")]
    if not params:
        return []
    modules = list(dict.fromkeys(k.split(".")[0] for k in params))
    return [f"not exported ({why}): {', '.join(modules)} ({len(params)} tensors)"]


def export(config, params, *, target: str, fmt: str, num_classes: int = 1000) -> Export:
    """A run's params as the `target` library's checkpoint. fmt "pretrain": the pretraining model
    (transformers) or the pretraining encoder (timm's ViT); "finetune": the fine-tuning start
    (encoder + a fresh head, as `--to official`) or a fine-tuning run's classifier."""
    from mixmae_jax.interop import layout_for
    from mixmae_jax.interop.to_torch import params_to_state_dict

    layout = layout_for(config)
    kind, m = backbone(config), config.model
    finetune_run = config.get("task", "pretrain") == "finetune"
    what = f"{config.method.name} on model.name={m.name!r}"
    if kind is None:
        raise ConversionError(f"--to {target}: {what} has no {target} model (only MAE-style "
                              "ViTs and SimMIM's Swin have one; see the README's conversion "
                              "table); export with --to official")
    if target == "transformers":
        if kind == "vit":
            if finetune_run:
                raise ConversionError(
                    f"--to transformers: {what} is a fine-tuned classifier that averages the "
                    "patch tokens into fc_norm (MAE's global pool); transformers' "
                    "ViTForImageClassification classifies the cls token after a final "
                    "LayerNorm, so no transformers class computes it. Use --to timm (exact) or "
                    "--to official")
            arch = "ViTMAEForPreTraining" if fmt == "pretrain" else "ViTModel"
            sd = params_to_state_dict(params, layout, format="pretrain")
            cfg = HF.vit_config(m, config.method, arch)
            extra = ", add_pooling_layer=False" if arch == "ViTModel" else ""
        else:
            arch = ("SwinForMaskedImageModeling" if fmt == "pretrain"
                    else "SwinForImageClassification")
            sd = params_to_state_dict(params, layout, format=fmt, num_classes=num_classes)
            cfg = HF.swin_config(m, arch, num_classes if fmt == "finetune" else 0)
            extra = ""
        tensors, dropped = _rename_out(sd, HF.names_for(arch))
        return Export(cfg, tensors, f"transformers {arch}",
                      f"transformers.{arch}.from_pretrained(DIR{extra})",
                      _dropped_notes(dropped, layout, f"transformers' {arch} has no place"))
    if target != "timm":
        raise ValueError(f"target must be one of {TARGETS[1:]}, got {target!r}")
    if kind == "vit":
        if fmt == "finetune":
            sd = params_to_state_dict(params, layout, format="finetune", num_classes=num_classes)
            cfg = TIMM.vit_config(m, num_classes, fc_norm=True)
        else:
            sd = params_to_state_dict(params, layout, format="pretrain")
            cfg = TIMM.vit_config(m, 0, fc_norm=False)
        names, why = TIMM.vit_names, "timm's ViT has no MAE decoder"
    else:
        if fmt == "pretrain":
            raise ConversionError(
                "--to timm --format pretrain: timm has no SimMIM decoder; --format finetune "
                "exports the encoder with a head (timm's forward_head(x, pre_logits=True) gives "
                "the pooled features)")
        sd = params_to_state_dict(params, layout, format="finetune", num_classes=num_classes)
        cfg = TIMM.swin_config(m, num_classes)
        names, why = TIMM.swin_names, "timm's Swin has no SimMIM decoder"
    tensors, dropped = _rename_out(sd, names)
    role = "classifier" if cfg["num_classes"] else "encoder"
    return Export(cfg, tensors, f"timm {cfg['architecture']} ({role})",
                  'timm.create_model("local-dir:DIR", pretrained=True)',
                  _dropped_notes(dropped, layout, why))


# ---------------------------------------------------------------------------------------------
# Import.
# ---------------------------------------------------------------------------------------------


def to_official(kind: str, foreign: dict, tensors: dict, config, source: str):
    """A transformers or timm checkpoint (`kind`, its config.json `foreign`, its tensors) as
    the official state_dict of `config`'s method: (state_dict, absent official keys the file's
    model has no place for (the target keeps its own values), notes)."""
    import torch

    from mixmae_jax.interop import layout_for

    layout = layout_for(config)
    ours = backbone(config)
    if kind == "transformers":
        arch = (foreign.get("architectures") or [None])[0]
        if arch not in HF.ARCHITECTURES:
            raise ConversionError(f"{source}: transformers architecture {arch!r}; mixmae-jax "
                                  f"reads {', '.join(HF.ARCHITECTURES)}")
        kind_b, fmt, _, _ = HF.ARCHITECTURES[arch]
        names = HF.names_for(arch)
        notes = HF.config_notes(foreign, config.model, config.method)
        what = f"a transformers {arch}"
    else:
        kind_b, fmt, encoder_only = TIMM.describe(foreign)
        names = TIMM.vit_names if kind_b == "vit" else TIMM.swin_names
        if encoder_only and kind_b == "swin":  # a timm Swin without a head
            names = lambda key: [] if key.startswith("head.") else TIMM.swin_names(key)  # noqa
        notes, what = [], f"a timm {foreign.get('architecture')}"
    if kind_b != ours:
        raise ConversionError(f"{source}: {what}; the config is {config.method.name} on "
                              f"model.name={config.model.name!r}, which reads "
                              f"{'no ' + kind + ' model' if ours is None else 'another backbone'}")
    problems, sd, used, absent = [], {}, set(), set()
    for key in layout.reference_layout(fmt, num_classes=1):
        parts = names(key)
        if not parts:
            absent.add(key)
            continue
        missing = [n for n, _ in parts if n not in tensors]
        if missing:
            problems.append(f"{', '.join(missing)} (official {key}): missing")
            continue
        values = [tensors[n] for n, _ in parts]
        sd[key] = values[0] if parts[0][1] is None else torch.cat(values, dim=0)
        used.update(n for n, _ in parts)
    # transformers 4 saved Swin's index buffers too; both libraries recompute them
    problems += [f"{n}: unexpected for {what}" for n in tensors
                 if n not in used and not n.endswith(".relative_position_index")]
    if problems:
        raise ConversionError(f"{source}: {len(problems)} problem(s) reading {what} as "
                              f"{config.method.name}'s official {fmt} layout:\n  "
                              + "\n  ".join(problems))
    params = sorted(k for k in absent if not layout.is_constant_key(k)
                    and not k.endswith("attn_mask") and not k.startswith("head."))
    if params:
        notes.append(f"{what} has no place for {', '.join(params)}: the config's fresh values "
                     "are kept")
    return sd, absent, notes
