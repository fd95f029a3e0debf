#!/usr/bin/env python3
"""Write a random-weight Stable Diffusion 1.x checkpoint for the live WebUI checks (tests/test_webui_live.py).

No weights are downloaded: every module is built from the real ``ldm`` classes (``LatentDiffusion`` with a
``UNetModel``, an ``AutoencoderKL`` and a ``FrozenCLIPEmbedder``) with random initialization, from the same YAML
config that is written beside the checkpoint, and the model's ``state_dict`` is saved with the key names the
WebUI expects (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.*``).

Written files, for ``--out DIR/NAME.safetensors``:

* ``DIR/NAME.safetensors``  the weights;
* ``DIR/NAME.yaml``         the ldm config (A1111 uses ``NAME.yaml`` next to ``NAME.safetensors``);
* ``DIR/NAME.clip/``        the CLIP tokenizer (the real CLIP BPE vocabulary, 49408 tokens) and the text encoder's
                            ``config.json``; the YAML's ``FrozenCLIPEmbedder`` points at it (absolute path), so
                            nothing is looked up on the Hugging Face hub.

The tokenizer is built from the CLIP BPE merges file ``bpe_simple_vocab_16e6.txt.gz`` that ``open_clip_torch``
(an A1111 requirement) and OpenAI's ``clip`` package ship; ``--bpe`` names it explicitly.

Sizes: ``tiny`` (the SD1 block layout -- channel_mult 1,2,4,4, attention at 3 levels, 16 self-attention layers --
at 32 base channels, a 2-layer 32-wide text encoder, a small VAE with the 8x latent factor) and ``sd15`` (the
real SD1.5 sizes, random weights, ~1.1B parameters, ~4.3 GB in float32).

Needs ``torch``, ``transformers``, ``omegaconf``, ``safetensors`` and an ``ldm`` package whose
``ldm.models.diffusion.ddpm`` imports (it needs ``pytorch_lightning``): A1111's venv with
``--ldm /path/to/webui/repositories/stable-diffusion-stability-ai``, or any env with ``stable-diffusion-sdkit``.

    python tests/live/make_checkpoint.py --out /work/webui/models/Stable-diffusion/tiny-sd1.safetensors \\
        --ldm /work/webui/repositories/stable-diffusion-stability-ai
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import pathlib
import sys

SIZES: dict[str, dict] = {
    "tiny": {
        "unet": {"model_channels": 32, "channel_mult": [1, 2, 4, 4], "attention_resolutions": [4, 2, 1],
                 "num_res_blocks": 2, "num_heads": 2, "transformer_depth": 1},
        "vae": {"ch": 32, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1},
        "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
    },
    "sd15": {
        "unet": {"model_channels": 320, "channel_mult": [1, 2, 4, 4], "attention_resolutions": [4, 2, 1],
                 "num_res_blocks": 2, "num_heads": 8, "transformer_depth": 1},
        "vae": {"ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2},
        "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
    },
}

N_MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 256 bytes x 2 (plain and word-final), the merges, 2 specials
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def find_bpe(explicit: str | None) -> pathlib.Path:
    if explicit:
        return pathlib.Path(explicit)
    for package in ("open_clip", "clip"):
        spec = importlib.util.find_spec(package)  # locates the package without importing it
        if spec and spec.origin:
            candidate = pathlib.Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
            if candidate.is_file():
                return candidate
    sys.exit("no CLIP BPE vocabulary found: install open_clip_torch (or clip), or pass --bpe FILE")


def write_clip_dir(path: pathlib.Path, bpe: pathlib.Path, text: dict) -> None:
    """A transformers ``CLIPTokenizer`` + ``CLIPTextModel`` config directory (no weights)."""
    from transformers import CLIPTextConfig
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    with gzip.open(bpe, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : N_MERGES + 1]  # the first line is a header
    if len(merges) != N_MERGES or any(len(m.split()) != 2 for m in merges):
        sys.exit(f"{bpe}: not a CLIP BPE merges file")
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == 49408, len(vocab)

    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    tok_cfg = {**special, "model_max_length": 77, "do_lower_case": True, "errors": "replace",
               "tokenizer_class": "CLIPTokenizer"}
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    CLIPTextConfig(vocab_size=len(vocab), max_position_embeddings=77, hidden_act="quick_gelu",
                   projection_dim=text["hidden_size"], bos_token_id=vocab[BOS], eos_token_id=vocab[EOS],
                   pad_token_id=vocab[EOS], **text).save_pretrained(path)


def ldm_config(size: dict, clip_dir: pathlib.Path) -> dict:
    unet, vae, text = size["unet"], size["vae"], size["text"]
    return {"model": {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": 0.00085, "linear_end": 0.0120, "num_timesteps_cond": 1, "log_every_t": 200,
            "timesteps": 1000, "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": 64, "channels": 4,
            "cond_stage_trainable": False, "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema",
            "scale_factor": 0.18215, "use_ema": False,
            "unet_config": {
                "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                "params": {"image_size": 32, "in_channels": 4, "out_channels": 4, **unet,
                           "use_spatial_transformer": True, "context_dim": text["hidden_size"],
                           "use_checkpoint": False, "legacy": False},
            },
            "first_stage_config": {
                "target": "ldm.models.autoencoder.AutoencoderKL",
                "params": {"embed_dim": 4, "monitor": "val/rec_loss",
                           "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                                        "out_ch": 3, **vae, "attn_resolutions": [], "dropout": 0.0},
                           "lossconfig": {"target": "torch.nn.Identity"}},
            },
            "cond_stage_config": {
                "target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                "params": {"version": str(clip_dir)},
            },
        },
    }}


def build(config: dict, seed: int):
    """Instantiate the LatentDiffusion model of ``config`` with random weights (nothing is loaded)."""
    import ldm.modules.encoders.modules as encoders
    import torch
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf
    from transformers import CLIPTextConfig, CLIPTextModel

    class _RandomCLIPTextModel:  # FrozenCLIPEmbedder calls CLIPTextModel.from_pretrained(version)
        @staticmethod
        def from_pretrained(version, *args, **kwargs):
            return CLIPTextModel(CLIPTextConfig.from_pretrained(version))

    original = encoders.CLIPTextModel
    encoders.CLIPTextModel = _RandomCLIPTextModel
    try:
        torch.manual_seed(seed)
        model = instantiate_from_config(OmegaConf.create(config).model)
    finally:
        encoders.CLIPTextModel = original

    # ldm zero-initializes the UNet's output projections (zero_module), which would make every attention layer and
    # the whole UNet output vanish; redraw them so that the model's output depends on every layer.
    with torch.no_grad():
        for p in model.model.diffusion_model.parameters():
            if p.numel() and not p.any():
                p.normal_(0.0, 0.05)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output .safetensors path; NAME.yaml and NAME.clip/ go beside it")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ldm", help="directory to put on sys.path that holds the ldm package "
                                  "(e.g. WEBUI/repositories/stable-diffusion-stability-ai)")
    ap.add_argument("--bpe", help="CLIP bpe_simple_vocab_16e6.txt.gz (default: the one open_clip or clip ships)")
    args = ap.parse_args(argv)

    out = pathlib.Path(args.out).resolve()
    if out.suffix != ".safetensors":
        ap.error("--out must end with .safetensors")
    if args.ldm:
        sys.path.insert(0, str(pathlib.Path(args.ldm).resolve()))

    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    size = SIZES[args.size]
    clip_dir = out.with_suffix(".clip")
    write_clip_dir(clip_dir, find_bpe(args.bpe), size["text"])
    config = ldm_config(size, clip_dir)
    model = build(config, args.seed)

    state = {k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"format": "pt", "attn_toolkit_random": args.size})
    out.with_suffix(".yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    n = sum(v.numel() for v in state.values())
    print(f"wrote {out} ({n / 1e6:.1f}M values, {len(state)} tensors), {out.with_suffix('.yaml')}, {clip_dir}/")


if __name__ == "__main__":
    main()
