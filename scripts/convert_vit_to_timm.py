"""Convert a Hugging Face ViT checkpoint into timm's VisionTransformer, and check the logits agree.

    python scripts/convert_vit_to_timm.py HF_DIR OUT.safetensors [--timm-model vit_tiny_patch16_224]

HF_DIR is a `save_pretrained` directory of a `ViTForImageClassification` (e.g. the ImageNet ViT-Tiny/16);
OUT gets timm's state dict (safetensors), which `timm.create_model(NAME, pretrained=True,
pretrained_cfg_overlay={"file": OUT})` or `model=timm_vit model.name=NAME model.weights=OUT` load. The two
models run the same images (random, 224 px) and the script prints the largest logit difference and the
top-1 agreement, exiting 1 if they differ by more than --atol.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import Tensor, nn


def timm_state_dict(hf: nn.Module) -> dict[str, Tensor]:
    """The state dict of timm's VisionTransformer holding the weights of a transformers
    `ViTForImageClassification` (q/k/v stacked into timm's fused qkv; LayerNorms, MLP, embeddings, head)."""
    sd = hf.state_dict()
    out = {
        "cls_token": sd["vit.embeddings.cls_token"],
        "pos_embed": sd["vit.embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["vit.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["vit.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["vit.layernorm.weight"],
        "norm.bias": sd["vit.layernorm.bias"],
        "head.weight": sd["classifier.weight"],
        "head.bias": sd["classifier.bias"],
    }
    for i in range(hf.config.num_hidden_layers):
        hf_block, block = f"vit.layers.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [sd[f"{hf_block}attention.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{block}attn.qkv.{kind}"] = torch.cat(qkv)
            for ours, theirs in (
                ("norm1", "layernorm_before"),
                ("attn.proj", "attention.o_proj"),
                ("norm2", "layernorm_after"),
                ("mlp.fc1", "mlp.fc1"),
                ("mlp.fc2", "mlp.fc2"),
            ):
                out[f"{block}{ours}.{kind}"] = sd[f"{hf_block}{theirs}.{kind}"]
    return {k: v.contiguous() for k, v in out.items()}


def timm_twin(hf: nn.Module, name: str) -> nn.Module:
    """timm's `name` (a VisionTransformer of the same shape) with the weights of `hf`."""
    import timm

    config = hf.config
    model = timm.create_model(name, pretrained=False, num_classes=config.num_labels)
    model.load_state_dict(timm_state_dict(hf), strict=True)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dir", help="a save_pretrained directory of a ViTForImageClassification")
    parser.add_argument("out", help="where to write timm's state dict (.safetensors)")
    parser.add_argument("--timm-model", default="vit_tiny_patch16_224", help="timm model of the same shape")
    parser.add_argument("--images", type=int, default=8, help="random images the logits are compared on")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest logit difference allowed")
    args = parser.parse_args(argv)

    from safetensors.torch import save_file
    from transformers import ViTForImageClassification

    hf = ViTForImageClassification.from_pretrained(args.hf_dir, attn_implementation="eager").eval()
    model = timm_twin(hf, args.timm_model)
    save_file(timm_state_dict(hf), args.out)
    size = hf.config.image_size
    x = torch.randn(args.images, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = hf(pixel_values=x).logits, model(x)
    diff = (want - got).abs().max().item()
    agree = (want.argmax(-1) == got.argmax(-1)).float().mean().item()
    print(
        f"{args.hf_dir} -> {args.out} ({args.timm_model}): logits of {args.images} images differ by at most "
        f"{diff:.2e} (scale {want.abs().max().item():.3g}); top-1 agreement {agree:.0%}"
    )
    return 0 if diff <= args.atol else 1


if __name__ == "__main__":
    sys.exit(main())
