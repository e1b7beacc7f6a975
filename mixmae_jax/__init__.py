"""mixmae-jax: MixMIM/MixMAE masked image modelling for hierarchical ViTs in JAX/Flax."""
