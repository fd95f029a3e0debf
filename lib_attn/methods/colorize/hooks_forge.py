"""Reference colorization on the Forge family: a model-function wrapper runs the capture streams once per step
(one call per latent size), then the host's call with the transfer on the chosen layers (``attn1`` replace); the
guidance's plain prediction is one more cond-only call without the transfer, after CFG."""

from __future__ import annotations

from typing import Any

import torch

from lib_attn.hooks import MODE, ForgeHooks, with_transformer_option
from lib_attn.methods.colorize import core as col


class Hooks(ForgeHooks):
    def __init__(self, ctx: Any, run: Any = None):
        super().__init__(ctx, run)
        self.params: dict = {}  # forge key -> LayerParams
        self.feats: dict = {}  # forge key -> {stream: {source: (q, k, v)}}
        self.feats_sigma: float | None = None

    def begin_sampling(self) -> None:
        self.run.begin(self.ctx.p, self.ctx.services)

    def sampler_function(self) -> Any:
        return self.run.sampler_function()

    def install(self, plan: Any) -> dict:
        self.params = {}
        if plan is None:
            return {}
        self.params = dict(zip((k.forge_key for k in plan.layers), plan.params, strict=True))
        self.feats, self.feats_sigma = {}, None
        return {"attn1": set(self.params), "unet_wrapper": self.unet_wrapper}

    def post_cfg(self, args: dict, denoised: Any) -> Any:
        c, ctx = self.ctx.plan.colorize, self.ctx
        if c is None or not c.needs_plain_rows or self.run.inverting or not c.active_at(ctx.step, ctx.total_steps):
            return denoised
        # colorization guidance: one cond-only call without the transfer gives the plain prediction
        options = with_transformer_option(args["model_options"], MODE, "off")
        plain, _ = ctx.calc(args["model"], args["cond"], None, args["input"], args["sigma"], options)
        cond = args["cond_denoised"]
        return denoised + col.colorization_guidance(plain, cond, c.guidance) - cond

    def unet_wrapper(self, apply_model: Any, args: dict) -> Any:
        """Capture the streams once per step (one extra call), then run the host's call with the transfer."""
        x, t, c = args["input"], args["timestep"], args["c"]
        to = c.get("transformer_options", {})
        plan, ctx = self.ctx.plan.colorize, self.ctx
        if plan is None or to.get(MODE) == "off" or self.run.inverting or not plan.active_at(ctx.step, ctx.total_steps):
            return apply_model(x, t, **c)
        n_images = self.run.z_in.shape[0]
        sigma = float(t[0])
        if self.feats_sigma != sigma:
            self._capture(apply_model, x, t, c, n_images)
            self.feats_sigma = sigma
        c2 = dict(c)
        c2["transformer_options"] = {**to, MODE: "transfer", "attn_toolkit_images": n_images}
        return apply_model(x, t, **c2)

    def _capture(self, apply_model: Any, x: Any, t: Any, c: dict, n_images: int) -> None:
        """One capture call per latent size: the input stream at the generation's, the reference streams at
        theirs (the same call when ``reference_scale`` is 1)."""
        ci = self.run
        ref_of = ci.ref_index(n_images)
        refs = sorted(set(ref_of))
        ref_owners = [ref_of.index(r) for r in refs]
        streams = [
            ("col_in", list(range(n_images)), list(range(n_images)), ci.z_in, ci.noise_in),
            ("col_ref", refs, ref_owners, ci.z_ref[refs], ci.noise_ref[refs]),
            ("col_refg", refs, ref_owners, ci.z_refg[refs], ci.noise_refg[refs]),
        ]
        self.feats = {}
        for size in dict.fromkeys(tuple(z.shape[-2:]) for *_, z, _ in streams):
            part = [st for st in streams if tuple(st[3].shape[-2:]) == size]
            owners = [o for _, _, own, _, _ in part for o in own]
            rows = [o % x.shape[0] for o in owners]
            sigma = t[rows]
            z = torch.cat([st[3] for st in part]).to(x)
            noise = torch.cat([st[4] for st in part]).to(x)
            x_cap = z + noise * sigma.view(-1, 1, 1, 1).to(x)
            c_cap = {
                k: (
                    col.resize_spatial(v[rows], size) if isinstance(v, torch.Tensor) and v.shape[0] == x.shape[0] else v
                )
                for k, v in c.items()
            }
            c_cap["transformer_options"] = {
                **c.get("transformer_options", {}),
                MODE: "capture",
                "attn_toolkit_groups": [(name, src) for name, src, *_ in part],
                "cond_or_uncond": [0],
            }
            apply_model(x_cap, sigma, **c_cap)

    def attn1(self, key: tuple, q: Any, k: Any, v: Any, extra_options: dict) -> Any:
        """On the colorization layers (q, k, v projected: (rows, N, C)): capture calls store the streams' q/k/v,
        transfer calls take the dual attention; None elsewhere."""
        mode = extra_options.get(MODE)
        if mode == "capture":
            store = self.feats.setdefault(key, {})
            row = 0
            for name, src in extra_options["attn_toolkit_groups"]:
                for s in src:
                    store.setdefault(name, {})[s] = (q[row], k[row], v[row])
                    row += 1
            return None
        if mode != "transfer":
            return None
        heads = int(extra_options["n_heads"])
        store = self.feats.get(key)
        if not store:
            self.ctx.fail(RuntimeError(f"Attention Toolkit: colorization features missing at {key}"))
            return None
        n_images = int(extra_options["attn_toolkit_images"])
        ref_of = self.run.ref_index(n_images)
        owners = [r % n_images for r in range(q.shape[0])]
        feats = col.Features(
            torch.stack([store["col_in"][i][0] for i in owners]),
            torch.stack([store["col_in"][i][1] for i in owners]),
            torch.stack([store["col_refg"][ref_of[i]][1] for i in owners]),
            torch.stack([store["col_ref"][ref_of[i]][1] for i in owners]),
            torch.stack([store["col_ref"][ref_of[i]][2] for i in owners]),
        )
        lp = self.params[key]
        moved = col.dual_attention(
            q, v, feats.q_in, feats.k_in, feats.k_refg, feats.k_ref, feats.v_ref, heads, lp.gamma, lp.beta
        )
        s = self.ctx.plan.colorize.strength
        return moved if s >= 1 else moved * s + self.ctx.attention(q, k, v, heads, extra_options) * (1 - s)
