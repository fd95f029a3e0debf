"""reForge and Forge Classic: the Forge double in their flavours (``forge_host(flavour=...)``, docs/forks.md) runs every
method through the fork's own adapter and gives what it gives on Forge 2, call for call; where the forks differ
(reForge's CFG step, one hook call in the hires pass, a sampler that drops the post-CFG functions) the adapters
cope."""

from __future__ import annotations

import functools
import pathlib

import pytest
import torch

from lib_attn import settings as S
from tests.fakes.forge_env import forge_host
from tests.support.helpers import SCRIPT
from tests.support.images import photo, small

BASE = {
    "prompt": "a red cube on a table",
    "negative_prompt": "blurry",
    "seed": 5,
    "steps": 4,
    "cfg_scale": 5.0,
    "width": 64,
    "height": 64,
    "batch_size": 2,
    "sampler_name": "Euler",
}
FORKS = ("reforge", "classic")


def assert_no_leftovers(h):
    """Nothing of the toolkit on the WebUI's own UNet patcher, its module or the callbacks (patches live on clones)."""
    unet = h.sd_model.forge_objects_after_applying_lora.unet
    assert not getattr(unet, "_attn_toolkit_session", None)
    options = unet.model_options
    assert not options.get("sampler_post_cfg_function") and "sampler_cfg_function" not in options
    assert not options.get("transformer_options", {}).get("patches_replace")
    for name, m in unet.model.diffusion_model.named_modules():
        forward = m.__dict__.get("forward")  # Forge restores an object patch by setting the bound method back
        assert forward is None or getattr(forward, "__func__", None) is type(m).forward, f"patch left on {name}"
    assert h.callback_count() == 0


def _reference():
    return photo("lion.jpg").resize((64, 64))


def _gray():
    return small("cheetah1.jpg", (64, 64)).convert("L").convert("RGB")


# method -> (txt2img or img2img, named script args, extra processing fields)
CASES = {
    "pag": ("txt2img", {"pag": {"scale": 3.0}}, {}),
    "seg": ("txt2img", {"seg": {}}, {}),
    "sag": ("txt2img", {"sag": {}}, {}),
    "nag": ("txt2img", {"nag": {}}, {}),
    "tpg": ("txt2img", {"tpg": {}}, {}),
    "swg": ("txt2img", {"swg": {}}, {}),
    "apg": ("txt2img", {"apg": {}}, {}),
    "cfg_zero": ("txt2img", {"cfg_zero": {}}, {}),
    "fdg": ("txt2img", {"fdg": {}}, {}),
    "ag": ("txt2img", {"ag": {"threshold": 0.9}}, {}),
    "style": ("txt2img", {"style": {"reference": "lion", "iters": 1, "strength": 0.2}}, {}),
    "colorize": ("img2img", {"colorize": {"reference": "lion"}}, {"init": "gray", "denoising_strength": 0.6}),
    "edit_mask": ("img2img", {"edit_mask": {}, "pag": {}}, {"init": "photo", "denoising_strength": 0.6}),
    "yoda": ("img2img", {"yoda": {"source": "unet"}}, {"init": "photo", "denoising_strength": 0.6}),
    "pag+hires": (
        "txt2img",
        {"pag": {"scale": 3.0}, "nag": {}},
        {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "denoising_strength": 0.5, "hr_cfg": 3.0},
    ),
}
CFG1 = ("pag", "nag", "style", "sag")  # methods that read the negative prompt's conds where CFG 1 drops them


def _run(h, case: str | None, **override):
    mode, named, extra = CASES[case] if case is not None else ("txt2img", {}, {})
    named = {
        section: {k: (_reference() if v == "lion" else v) for k, v in values.items()} for section, values in named.items()
    }
    kw = {**BASE, **{k: v for k, v in extra.items() if k != "init"}, **override}
    h.unet_calls.clear()
    if mode == "img2img":
        init = _gray() if extra["init"] == "gray" else small("cheetah2.jpg", (64, 64))
        out = h.img2img(init_images=[init], script_args=[named], **kw)
    else:
        out = h.txt2img(script_args=[named] if named else None, **kw)
    calls = [(c["rows"], tuple(c["cond_or_uncond"])) for c in h.unet_calls]
    assert_no_leftovers(h)
    return out.samples.clone(), calls


@functools.cache
def _results(flavour: str, kind: str = "sd1") -> dict:
    """Every case on one host of ``flavour`` with a ``kind`` model: ``{(case, cfg): (samples, model calls)}`` and the
    plain run."""
    out = {}
    with forge_host(kind, flavour=flavour) as h:
        h.load_script(SCRIPT)
        assert h.loaded_scripts[-1][1].host.detect() == {"forge2": "forge"}.get(flavour, flavour)
        out["plain"] = _run(h, None)
        for case in CASES:
            out[case, 5.0] = _run(h, case)
        for case in CFG1 if flavour != "forge2" and kind == "sd1" else ():
            out[case, 1.0] = _run(h, case, cfg_scale=1.0)
    return out


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
@pytest.mark.parametrize("flavour", FORKS)
@pytest.mark.parametrize("case", list(CASES))
def test_every_method_on_the_fork_equals_forge_2(flavour, case, kind):
    fork, forge2 = _results(flavour, kind)[case, 5.0], _results("forge2", kind)[case, 5.0]
    assert fork[1] == forge2[1]  # the same model calls, row for row (AG: the uncond rows stop at the same step)
    assert torch.allclose(fork[0], forge2[0], atol=1e-5, rtol=0), (fork[0] - forge2[0]).abs().max()
    if CASES[case][0] == "txt2img" and "enable_hr" not in CASES[case][2]:  # the method did something
        plain = _results(flavour, kind)["plain"]
        assert fork[1] != plain[1] or (fork[0] - plain[0]).abs().max() > 1e-3


@pytest.mark.parametrize("case", CFG1)
def test_reforge_at_cfg_1_gives_the_methods_the_negative_prompt_as_classic_does(case):
    """Both forks make the negative prompt's conds at CFG 1 (Forge 2 makes none); reForge then hands post-CFG
    functions ``uncond=None``, Classic the conds.  reForge's adapter passes on the conds that its CFG denoiser had, so
    style (the negative prompt's features), NAG and the others see what they see on Classic."""
    reforge, classic = _results("reforge")[case, 1.0], _results("classic")[case, 1.0]
    assert reforge[1] == classic[1]
    assert torch.allclose(reforge[0], classic[0], atol=1e-5, rtol=0)


def test_ag_drops_the_uncond_rows_on_every_fork():
    calls = _results("reforge")["ag", 5.0][1]
    with_uncond = [1 in flags for _, flags in calls]
    assert with_uncond[0] and not with_uncond[-1], calls


def other_extension(tmp_path, name: str, priority: int, body: str, head: str = "") -> pathlib.Path:
    """Another extension's AlwaysOn script ``<name>`` (``sorting_priority`` ``priority``; lower runs first), whose
    ``process_before_every_sampling(self, p, ...)`` body is ``body`` (indented 8); ``head`` goes above the class."""
    path = tmp_path / name.lower() / "scripts" / f"{name.lower()}.py"
    path.parent.mkdir(parents=True)
    path.write_text(
        f"from modules import scripts\n{head}"
        f"class {name}(scripts.Script):\n"
        f"    sorting_priority = {priority}\n"
        "    on = True\n"
        f"    def title(self):\n        return '{name}'\n"
        "    def show(self, is_img2img):\n        return scripts.AlwaysVisible\n"
        "    def process_before_every_sampling(self, p, *args, **kwargs):\n" + body
    )
    return path


@pytest.mark.parametrize("flavour", FORKS)
def test_a_sampler_that_drops_the_post_cfg_functions_fails_with_its_name(flavour, tmp_path):
    """reForge's CFG++ samplers replace the UNet's post-CFG list with their own; here another script does the same
    after the toolkit patched the clone.  The generation fails naming the sampler; the next one works."""
    path = other_extension(
        tmp_path,
        "Dropper",
        100,
        "        if Dropper.on:\n"
        "            unet = p.sd_model.forge_objects.unet\n"
        "            unet.model_options['sampler_post_cfg_function'] = [lambda args: args['denoised']]\n",
    )
    with forge_host("sd1", flavour=flavour) as h:
        h.load_script(SCRIPT)
        dropper = h.load_script(path)
        dropper.Dropper.on = True
        with pytest.raises(S.SettingsError, match=r"Sampler \(sampler_name\): Euler drops the post-CFG functions"):
            h.txt2img(**BASE, script_args=None, args_by_title={S.TITLE: [{"pag": {}}]})
        dropper.Dropper.on = False
        h.txt2img(**BASE, args_by_title={S.TITLE: [{"pag": {}}]})
        assert_no_leftovers(h)


def test_reforge_chains_another_extensions_calc_cond_batch_function(tmp_path):
    """reForge's single ``sampler_calc_cond_batch_function`` slot: a function another extension put there still runs
    (with the conds the toolkit passes on)."""
    path = other_extension(
        tmp_path,
        "Batcher",
        -100,
        "        from ldm_patched.modules.samplers import calc_cond_batch\n"
        "        unet = p.sd_model.forge_objects.unet.clone()\n"
        "        def fn(args):\n"
        "            CALLS.append(args['conds'][1] is None)\n"
        "            return calc_cond_batch(args['model'], args['conds'], args['input'], args['sigma'], "
        "args['model_options'])\n"
        "        unet.set_model_sampler_calc_cond_batch_function(fn)\n"
        "        p.sd_model.forge_objects.unet = unet\n",
        head="CALLS = []\n",
    )
    with forge_host("sd1", flavour="reforge") as h:
        batcher = h.load_script(path)
        h.load_script(SCRIPT)
        out = h.txt2img(**{**BASE, "steps": 6}, args_by_title={S.TITLE: [{"ag": {"threshold": 0.9}}]})
        assert batcher.CALLS and batcher.CALLS[0] is False and batcher.CALLS[-1] is True, batcher.CALLS
        assert out.samples.isfinite().all()


@pytest.mark.parametrize("flavour", FORKS)
def test_the_fork_hires_pass_patches_once_and_reaches_the_hires_layers(flavour):
    calls = _results(flavour)["pag+hires", 5.0][1]
    rows = [r for r, _ in calls]
    assert calls == _results("forge2")["pag+hires", 5.0][1]
    assert len(rows) > BASE["steps"]  # the hires pass ran patched too (PAG's extra rows)


@pytest.mark.parametrize("flavour", FORKS)
def test_a_model_without_a_unet_gets_the_message(flavour):
    with forge_host("flux", flavour=flavour) as h:
        h.load_script(SCRIPT)
        with pytest.raises(S.SettingsError, match=r"Model \(model\): this model has no UNet attention layers"):
            h.txt2img(**BASE, script_args=[{"pag": {}}])
        h.txt2img(**BASE)


@pytest.mark.parametrize("flavour", ["forge2", "reforge"])
def test_another_extensions_model_function_wrapper_still_runs_and_no_block_patch_outlives_a_call(flavour, tmp_path):
    """TPG swaps its blocks' forwards only inside the model-function wrapper (Forge Neo's object patches cannot hold a
    function); a wrapper another extension set on the UNet runs inside the toolkit's, at every model call."""
    path = other_extension(
        tmp_path,
        "Wrapper",
        -100,
        "        unet = p.sd_model.forge_objects.unet.clone()\n"
        "        def wrap(apply_model, args):\n"
        "            CALLS.append(args['input'].shape[0])\n"
        "            if Wrapper.fail_at == len(CALLS):\n"
        "                raise RuntimeError('injected')\n"
        "            return apply_model(args['input'], args['timestep'], **args['c'])\n"
        "        unet.set_model_unet_function_wrapper(wrap)\n"
        "        p.sd_model.forge_objects.unet = unet\n",
        head="CALLS = []\n",
    )
    with forge_host("sd1", flavour=flavour) as h:
        wrapper = h.load_script(path)
        wrapper.Wrapper.fail_at = 0
        h.load_script(SCRIPT)
        h.txt2img(**BASE, args_by_title={S.TITLE: [{"tpg": {}}]})
        assert len(wrapper.CALLS) == len(h.unet_calls) > BASE["steps"]
        unet = h.sd_model.forge_objects_after_applying_lora.unet.model.diffusion_model
        assert not [n for n, m in unet.named_modules() if "forward" in m.__dict__]
        assert h.callback_count() == 0
        wrapper.CALLS.clear()
        wrapper.Wrapper.fail_at = 2  # an exception inside a model call, with the blocks' forwards swapped
        with pytest.raises(RuntimeError, match="injected"):
            h.txt2img(**BASE, args_by_title={S.TITLE: [{"tpg": {}}]})
        assert not [n for n, m in unet.named_modules() if "forward" in m.__dict__]
        assert h.callback_count() == 0
