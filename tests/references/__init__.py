"""Plain `torch.nn` references of the official models, written from the method specs (no timm, no
torchvision): the oracles of the parity tests, and what a converted checkpoint loads into without
the official repositories. Not part of the installed package; from a checkout:

    import sys; sys.path.insert(0, "tests")        # the repository's tests/ directory
    from references.mixmim import mixmim_base
    mixmim_base().load_state_dict(torch.load("mixmim.pth", weights_only=True)["model"])

mixmim: `models_mixmim` / `models_mixmim_ft` (Sense-X/MixMIM); mae: `models_mae` / `models_vit`
(facebookresearch/mae); simmim: SimMIM's Swin and its classifier (microsoft/SimMIM); ummae:
UM-MAE's Swin, PVT and ViT and the paper's SimMIM baselines (implus/UM-MAE).
"""


def build(layout, fmt: str, num_classes: int = 1000):
    """The reference model of a mixmae-jax `interop` layout's official `fmt` state_dict ("pretrain"
    or "finetune"), built from the layout's model config (use under `torch.device("meta")` for
    the layout alone)."""
    from mixmae_jax.interop.mae_layout import MAELayout
    from mixmae_jax.interop.mixmim_layout import MixMIMLayout
    from mixmae_jax.interop.simmim_layout import SimMIMLayout
    from mixmae_jax.interop.ummae_layout import UMViTLayout, UnitLayout

    from . import mae, mixmim, simmim, ummae

    cfg = layout.model_cfg
    cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    finetune = fmt == "finetune"
    method = cfg.pop("method", None)
    vis_mask_ratio = cfg.pop("vis_mask_ratio", 0.0)
    if isinstance(layout, UMViTLayout) and not finetune:
        return ummae.UMViTPretrainTorch.from_model_config(cfg, vis_mask_ratio=vis_mask_ratio)
    if isinstance(layout, MAELayout):  # MAE, MixedAE and UM-MAE's ViT fine-tuning
        if finetune:
            return mae.MAEFinetuneTorch.from_model_config(cfg, num_classes=num_classes)
        return mae.MAEPretrainTorch.from_model_config(cfg)
    if isinstance(layout, MixMIMLayout):
        if finetune:
            return mixmim.MixMIMFinetuneTorch.from_model_config(cfg, num_classes=num_classes)
        return mixmim.MixMIMPretrainTorch.from_model_config(cfg)
    if isinstance(layout, SimMIMLayout):
        cfg["ape"] = False  # the reference reads a bool; ours is "none" / "sincos"
        if finetune:
            return simmim.SimMIMFinetuneTorch.from_model_config(cfg, num_classes=num_classes)
        return simmim.SimMIMPretrainTorch.from_model_config(cfg)
    if isinstance(layout, UnitLayout):
        swin = cfg["name"] == "ummae_swin"
        if finetune:
            cls = ummae.UMSwinFinetuneTorch if swin else ummae.UMPVTFinetuneTorch
            return cls.from_model_config(cfg, num_classes=num_classes)
        if method == "simmim":
            return (ummae.SimMIMUMSwinTorch if swin else ummae.SimMIMPVTTorch).from_model_config(
                cfg)
        cls = ummae.UMSwinPretrainTorch if swin else ummae.UMPVTPretrainTorch
        return cls.from_model_config(cfg, vis_mask_ratio=vis_mask_ratio)
    raise TypeError(f"no reference model for {type(layout).__name__}")
