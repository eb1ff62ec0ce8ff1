"""The VAE usable alone: the network and its presets, the latent normalisation, the frozen `Codec`, and exact
and blended tiling."""
