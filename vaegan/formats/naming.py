"""How a VAE's files and tensors are named: diffusers' file names and config keys, and the renaming between
diffusers' tensor names and the original (CompVis, SD3, Flux, FLUX.2) ones."""

from __future__ import annotations

import importlib.metadata
import re

# (original, diffusers) name fragments; `{i}` is a number carried across. The decoder's level index is
# additionally reversed (see `_reverse_up_levels`). Every fragment is dot-delimited, so no rule can
# match inside a name that is already in the other convention.
RENAMES = [
    ("encoder.down.{i}.block.", "encoder.down_blocks.{i}.resnets."),
    ("encoder.down.{i}.downsample.", "encoder.down_blocks.{i}.downsamplers.0."),
    ("decoder.up.{i}.block.", "decoder.up_blocks.{i}.resnets."),
    ("decoder.up.{i}.upsample.", "decoder.up_blocks.{i}.upsamplers.0."),
    (".mid.block_1.", ".mid_block.resnets.0."),
    (".mid.block_2.", ".mid_block.resnets.1."),
    (".mid.attn_1.norm.", ".mid_block.attentions.0.group_norm."),
    (".mid.attn_1.q.", ".mid_block.attentions.0.to_q."),
    (".mid.attn_1.k.", ".mid_block.attentions.0.to_k."),
    (".mid.attn_1.v.", ".mid_block.attentions.0.to_v."),
    (".mid.attn_1.proj_out.", ".mid_block.attentions.0.to_out.0."),
    (".nin_shortcut.", ".conv_shortcut."),
    (".norm_out.", ".conv_norm_out."),
]


# diffusers < 0.14 named the attention projections differently; single files from that era still circulate.
LEGACY_ATTENTION = [
    (".attentions.0.query.", ".attentions.0.to_q."),
    (".attentions.0.key.", ".attentions.0.to_k."),
    (".attentions.0.value.", ".attentions.0.to_v."),
    (".attentions.0.proj_attn.", ".attentions.0.to_out.0."),
]


# Black Forest Labs' FLUX.2 autoencoder keeps the quant convs inside its encoder and decoder; CompVis, sgm and
# diffusers keep them at the top level. (top level, nested) prefixes.
NESTED_QUANT_CONVS = [("quant_conv.", "encoder.quant_conv."), ("post_quant_conv.", "decoder.post_quant_conv.")]


ATTENTION_PROJECTIONS = re.compile(r"\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")


ORIGINAL_NAMING = re.compile(r"^(encoder|decoder)\.(down|up|mid)\.")


def rename(key: str, rules: list[tuple[str, str]], to_diffusers: bool) -> str:
    for original, diffusers in rules:
        source, target = (original, diffusers) if to_diffusers else (diffusers, original)
        pattern = re.escape(source).replace(re.escape("{i}"), r"(\d+)")
        key = re.sub(pattern, target.replace("{i}", r"\1"), key)
    return key


def _reverse_up_levels(key: str, prefix: str, num_levels: int) -> str:
    """`decoder.<prefix>.k.` -> `decoder.<prefix>.(n-1-k).`: the same renumbering in both directions."""
    return re.sub(
        rf"^decoder\.{re.escape(prefix)}\.(\d+)\.",
        lambda m: f"decoder.{prefix}.{num_levels - 1 - int(m[1])}.",
        key,
    )


def to_original_name(key: str, num_levels: int, nested_quant_convs: bool = False) -> str:
    """diffusers name -> original name, e.g. `decoder.up_blocks.0.resnets.1.conv1.weight` ->
    `decoder.up.3.block.1.conv1.weight` for 4 levels; `nested_quant_convs` for Black Forest Labs' FLUX.2
    naming (`quant_conv.weight` -> `encoder.quant_conv.weight`)."""
    if nested_quant_convs:
        for top_level, nested in NESTED_QUANT_CONVS:
            if key.startswith(top_level):
                key = nested + key[len(top_level):]
    return _reverse_up_levels(rename(key, RENAMES, to_diffusers=False), "up", num_levels)


def to_diffusers_name(key: str, num_levels: int) -> str:
    """Original name (CompVis or Black Forest Labs) -> diffusers name; the inverse of `to_original_name`."""
    for top_level, nested in NESTED_QUANT_CONVS:
        if key.startswith(nested):
            key = top_level + key[len(nested):]
    return rename(_reverse_up_levels(key, "up", num_levels), RENAMES, to_diffusers=True)


WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


CONFIG_NAME = "config.json"


CARD_NAME = "README.md"


# Our config JSON: in a single file's safetensors metadata, and in a training checkpoint's top-level dict.
METADATA_KEY = "vaegan_config"


# The latent -> RGB preview map (`vaegan.autoencoder.preview`): a file of its own in a diffusers folder (diffusers
# ignores files it does not know, but warns about unknown config.json keys), a metadata entry in a single file.
PREVIEW_NAME = "latent_preview.json"
PREVIEW_METADATA_KEY = "vaegan_latent_preview"


# In order of preference: full precision first, the fp16 variant only when it is all there is.
WEIGHTS_CANDIDATES = (
    WEIGHTS_NAME,
    WEIGHTS_NAME + ".index.json",  # sharded: the index maps each tensor to its shard file
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)


# The config.json keys of each diffusers class, beyond `_class_name`: its constructor's arguments, and so the
# only keys `from_pretrained` takes without a warning (it ignores the others, and so does `load`).
SHARED_KEYS = (
    "in_channels", "out_channels", "block_out_channels", "layers_per_block", "act_fn", "latent_channels",
    "norm_num_groups", "sample_size", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention",
)


DIFFUSERS_KEYS = {
    "AutoencoderKL": (
        *SHARED_KEYS, "scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast",
    ),
    # No scalar normalisation: FLUX.2's pipelines normalise with the `bn` statistics alone.
    "AutoencoderKLFlux2": (
        *SHARED_KEYS, "decoder_block_out_channels", "batch_norm_eps", "batch_norm_momentum", "patch_size",
    ),
}


def diffusers_version() -> str:
    """The `_diffusers_version` a config.json we write carries."""
    try:
        return importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        return "0.30.0"  # diffusers is optional here; this is the oldest version pyproject allows
