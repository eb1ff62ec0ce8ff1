"""Frozen pretrained networks from files: the weights lookup, LPIPS, Inception, vision backbones, features."""
