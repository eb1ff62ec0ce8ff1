"""Training: `vaegan fit` and `vaegan validate`, the Lightning module, its data, losses, regularisers and
discriminator, the GAN-aware DDP strategy, and `vaegan export`."""
