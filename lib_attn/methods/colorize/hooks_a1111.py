"""Reference colorization on A1111: the capture streams (gray input, colour reference, gray reference) are noised
to each step's level; those of the generation's size ride in the step's model call when the WebUI batches it, the
others run in a private call first; on the chosen layers the image's rows take the dual attention; the guidance's
plain rows are one more row per image (or the uncond rows, where CFG weighs them out or they carry the cond's
conditioning)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lib_attn import batch as batchmod
from lib_attn.hooks import A1111Hooks
from lib_attn.methods.colorize import core as col

CAPTURE_GROUPS = ("col_in", "col_ref", "col_refg")


def _same_cond(a: Any, b: Any) -> bool:
    """The same text conditioning, row for row (tensors, or SDXL's dicts of tensors)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same_cond(a[k], b[k]) for k in a)
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)


def _put_rows(out: torch.Tensor, rows: list[int], values: torch.Tensor) -> torch.Tensor:
    out = out.clone()
    out[rows] = values
    return out


class Hooks(A1111Hooks):
    transforms_rows = True

    def __init__(self, ctx: Any, run: Any = None):
        super().__init__(ctx, run)
        self.active = False  # the transfer acts at the step in progress
        self.plain_scale: float | None = None  # the plain rows are the uncond rows, which CFG weighs with this
        self.plain_out: torch.Tensor | None = None
        self.feats: dict = {}  # layer path -> {stream: {source: (q, k, v)}}

    def begin_sampling(self) -> None:
        self.run.begin(self.ctx.p, self.ctx.services)

    def sampler_function(self) -> Any:
        return self.run.sampler_function()

    def install(self, plan: Any, unet: Any, patches: Any) -> None:
        if plan is None:
            return
        for key, lp in zip(plan.layers, plan.params, strict=True):
            patches.wrap_forward(unet.get_submodule(key.module_path), self._attn1(key.module_path, lp))

    def step_active(self) -> bool:
        ctx, plan = self.ctx, self.ctx.plan.colorize
        self.plain_scale, self.plain_out, self.feats = None, None, {}
        self.active = plan is not None and not self.run.inverting and plan.active_at(ctx.step, ctx.total_steps)
        return self.active

    def rows(self, params: Any, layout: Any) -> tuple[list, list]:
        if not self.active:
            return [], []
        groups = []
        if self.ctx.plan.colorize.needs_plain_rows:
            self.plain_scale = self._plain_in_uncond(params, layout)
            if self.plain_scale is None:
                groups.append(("col_plain", list(range(layout.n_images)), {}))
        capture = self._capture_rows(params, layout)
        if self.ctx.in_batch(params):  # the streams of the generation's size ride along; smaller ones go first
            size = tuple(params.x.shape[-2:])
            groups += [g for g in capture if tuple(g[2]["x"].shape[-2:]) == size]
            capture = [g for g in capture if tuple(g[2]["x"].shape[-2:]) != size]
        return groups, capture

    def capture_failed(self) -> None:
        """The private capture call failed (the generation fails): this step runs without the transfer."""
        self.active = False

    def denoised(self, out: torch.Tensor) -> None:
        layout = self.ctx.st.layout
        plain = layout.group("col_plain")
        if len(plain):
            self.plain_out = out[plain.start : plain.stop].clone()
        elif self.plain_scale is not None:
            self.plain_out = out[layout.uncond.start : layout.uncond.stop].clone()

    def after_cfg(self, params: Any, delta: torch.Tensor) -> torch.Tensor:
        if self.plain_out is None:
            return delta
        cond_out = self.ctx.cond_out
        # colorization guidance: plain + w*(transferred - plain) in place of the transferred cond
        w = self.ctx.plan.colorize.guidance
        # the host's CFG gave uncond + s*(cond - uncond): the transferred rows' CFG, or, when the plain rows
        # are the uncond rows, plain + s*(transferred - plain)
        host = (
            cond_out
            if self.plain_scale is None
            else col.colorization_guidance(self.plain_out, cond_out, self.plain_scale)
        )
        return delta + col.colorization_guidance(self.plain_out, cond_out, w) - host

    # ---- rows ---------------------------------------------------------------------------------
    def _plain_in_uncond(self, params: Any, layout: Any) -> float | None:
        """Whether the uncond rows can be the colorization guidance's plain rows (one row per image saved): when
        CFG weighs the uncond rows out (scale 1; their conditioning then becomes the cond's) or they carry the
        same conditioning as the cond rows (empty prompt and negative prompt), so a non-transferred uncond row is
        the plain cond row.  Returns the scale CFG applies (the guidance corrects for it), or None: AND prompts,
        A1111 skipping uncond rows at some steps, or a scale that cannot be read."""
        if layout.n_cond != layout.n_images:
            return None
        scale = self.ctx.cfg_scale()
        if scale is None:
            return None
        ic, n = params.image_cond, layout.n_images  # no rows inserted yet: the uncond rows are the last B
        has_ic = isinstance(ic, torch.Tensor) and int(ic.shape[0]) == layout.n_cond + n
        if has_ic and not torch.equal(ic[list(layout.first_cond)], ic[-n:]):  # unCLIP: the uncond rows' is zeros
            return None
        tc, uc = params.text_cond, params.text_uncond
        if _same_cond(tc, uc):
            return scale
        if scale != 1.0:
            return None
        params.text_uncond = tc  # scale 1: the uncond rows' result is not used by CFG; they become plain cond rows
        return scale

    def _capture_rows(self, params: Any, layout: Any) -> list:
        """The capture streams at this step: input (gray), colour reference, gray reference, noised to the current
        level with fixed per-generation noise.  Each row borrows sigma, text and image conditioning from the first
        cond row of an image that uses it."""
        ci, ctx = self.run, self.ctx
        first = list(layout.first_cond)
        ref_of = ci.ref_index(layout.n_images)
        ic = params.image_cond
        has_ic = isinstance(ic, torch.Tensor) and int(ic.shape[0]) == layout.n_cond + layout.n_images
        images = list(range(layout.n_images))
        refs = sorted(set(ref_of))
        out = []
        for name, z, noise, src, owner in (
            ("col_in", ci.z_in, ci.noise_in, images, images),
            ("col_ref", ci.z_ref, ci.noise_ref, refs, [ref_of.index(r) for r in refs]),
            ("col_refg", ci.z_refg, ci.noise_refg, refs, [ref_of.index(r) for r in refs]),
        ):
            at = [first[i] for i in owner]
            sigma = params.sigma[at]
            given = {
                "x": ctx.noised(z[src].to(params.x), noise[src].to(params.x), sigma),
                "sigma": sigma,
                "text": batchmod.take_rows(params.text_cond, at),
            }
            if has_ic:
                given["image_cond"] = col.resize_spatial(ic[at], tuple(z.shape[-2:]))
            out.append((name, src, given))
        return out

    # ---- attention ----------------------------------------------------------------------------
    def _attn1(self, path: str, lp: col.LayerParams) -> Any:
        ctx = self.ctx

        def attn1(module: Any, call_next: Any, *args: Any, **kwargs: Any) -> Any:
            st, call = ctx.st, ctx.call
            if st is None or call is None or not self.active:
                return call_next(*args, **kwargs)
            x = args[0]
            n = int(x.shape[0])
            layout = ctx.private_layout or st.layout
            if n != call[1]:
                ctx.fail(
                    self.run.settings.FIELDS["enabled"].error(
                        "the attention rows do not match the model call (Hypertile?); switch Hypertile off"
                    )
                )
                return call_next(*args, **kwargs)
            store = self.feats.setdefault(path, {})
            for name in CAPTURE_GROUPS:
                span = batchmod.local_span(layout.group(name), call[0], call[1], n)
                if span is not None:
                    q, k, v = col.capture(module, x[span[0] : span[1]])
                    src = layout.sources(name)[span[0] + call[0] - layout.group(name).start :][: span[1] - span[0]]
                    store.setdefault(name, {}).update({s: (q[j], k[j], v[j]) for j, s in enumerate(src)})
            if ctx.private_layout is not None:
                return call_next(*args, **kwargs)
            # transferred rows: cond, PAG and uncond rows; the plain and capture rows keep plain attention
            owners = [self._owner(layout, call[0] + j, self.plain_scale is not None) for j in range(n)]
            rows = [j for j, i in enumerate(owners) if i is not None]
            if not rows:
                return call_next(*args, **kwargs)
            try:
                feats = self._features(store, layout, [owners[j] for j in rows])
            except KeyError:
                ctx.fail(RuntimeError("Attention Toolkit: colorization features missing at " + path))
                return call_next(*args, **kwargs)
            moved = col.transfer(module, x[rows], feats, lp, [owners[j] for j in rows])
            s = ctx.plan.colorize.strength
            if s < 1:
                out = call_next(*args, **kwargs)
                return _put_rows(out, rows, moved.to(out.dtype) * s + out[rows] * (1 - s))
            # strength 1: the plain attention runs only on the rows that keep it (runs of consecutive rows)
            parts, j = [], 0
            pos = {r: i for i, r in enumerate(rows)}
            while j < n:
                k = j
                keep = j not in pos
                while k < n and (k not in pos) == keep:
                    k += 1
                if keep:
                    parts.append(ctx.sub_call(call_next, args, kwargs, n, j, k))
                else:
                    parts.append(moved[pos[j] : pos[j] + (k - j)])
                j = k
            return torch.cat([p_.to(parts[0].dtype) for p_ in parts], dim=0)

        attn1.transforms_rows = True  # a wrapper further out (PAG) lets it see the whole call
        return attn1

    @staticmethod
    def _owner(layout: Any, row: int, plain_uncond: bool = False) -> int | None:
        """The image whose colours a row takes: cond, uncond (unless they are the plain rows) and the rows other
        methods insert as copies of an image's cond row (PAG's); None for colorization's own plain and capture
        rows."""
        if plain_uncond and row in layout.uncond:
            return None
        i = layout.image_of_row(row)
        if i is None:
            for name, src in layout.groups:
                span = layout.group(name)
                if not name.startswith("col_") and row in span:
                    return src[row - span.start]
        return i

    def _features(self, store: dict, layout: Any, owners: list[int]) -> col.Features:
        ref_of = self.run.ref_index(layout.n_images)
        q_in = torch.stack([store["col_in"][i][0] for i in owners])
        k_in = torch.stack([store["col_in"][i][1] for i in owners])
        k_refg = torch.stack([store["col_refg"][ref_of[i]][1] for i in owners])
        k_ref = torch.stack([store["col_ref"][ref_of[i]][1] for i in owners])
        v_ref = torch.stack([store["col_ref"][ref_of[i]][2] for i in owners])
        return col.Features(q_in, k_in, k_refg, k_ref, v_ref)
