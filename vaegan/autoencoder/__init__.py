"""The VAE usable alone: the network and its presets, tiny (TAESD-family) networks, the latent normalisation and
its linear preview, the frozen `Codec`, and exact, blended and halo tiling."""
