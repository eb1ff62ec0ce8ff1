"""`vaegan probe`: a small diffusion transformer trained on each VAE's latents, with flow matching, and its report."""
