"""Latent datasets: `vaegan encode` (job, sources, shards, manifest, launcher), `vaegan decode`, and
`LatentDataset` for diffusion training."""
