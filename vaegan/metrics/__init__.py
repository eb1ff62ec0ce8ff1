"""Numbers about images and latents: reconstruction metrics, distribution distances, latent diagnostics."""
