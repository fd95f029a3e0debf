"""XYZ axes with the WebUI started as ``--nowebui`` (API only), on both doubles.

webui.py's ``api_only()`` (A1111 1.10) / ``api_only_worker()`` (Forge 2) builds the script runners inside ``Api()``,
calling xyz_grid's ``ui()``, which fixes its axis list, and runs ``before_ui_callback()`` only afterwards; so
axes added in ``on_before_ui`` alone are missing from ``/sdapi/v1/script-info`` and out of reach of an API request (it
names an axis by its index in that list).  The doubles' ``start()`` follows that order (and webui()'s, for the UI).
"""

from __future__ import annotations

import contextlib
import json

import pytest

from lib_attn import settings as S
from tests.fakes.a1111_double import a1111_host
from tests.fakes.forge_env import forge_host
from tests.support.helpers import SCRIPT

BASE = {"prompt": "a red cube", "negative_prompt": "", "seed": 2, "steps": 2, "cfg_scale": 4.0, "width": 64,
        "height": 64, "sampler_name": "Euler"}
AXIS = S.XYZ_PREFIX + "PAG scale"


@contextlib.contextmanager
def started(kind, *, nowebui, xyz_last=False):
    """A double started as webui.py does (``nowebui``: API only); ``xyz_last``: xyz_grid.py loads after our script.
    Yields the double's ``Api`` and a txt2img call returning the response's infotexts."""
    factory = a1111_host if kind == "a1111" else forge_host
    with factory("sd1") as h:
        files = None
        if xyz_last:
            files = h.modules.scripts.list_scripts([SCRIPT])
            files = [f for f in files if f.filename != "xyz_grid.py"] + [f for f in files if f.filename == "xyz_grid.py"]
        api = h.start([SCRIPT], nowebui=nowebui, files=files)

        def txt2img(payload):
            status, resp = h.api_txt2img(payload)
            assert status == 200, resp
            return json.loads(resp["info"])["infotexts"]

        yield h, api, txt2img


def xyz_info(api, is_img2img):
    return next(s for s in api.get_script_info() if s.name == "x/y/z plot" and s.is_img2img == is_img2img)


def expected_labels(is_img2img):
    tab = "img2img" if is_img2img else "txt2img"
    return [S.XYZ_PREFIX + f.infotext for f in S.FIELDS
            if f.kind != "image" and tab in S.SECTION_TABS.get(f.section, ("txt2img", "img2img"))]


@pytest.mark.parametrize("kind", ["a1111", "forge"])
@pytest.mark.parametrize(("nowebui", "xyz_last"), [(True, False), (True, True), (False, False)],
                         ids=["nowebui", "nowebui-xyz-loads-last", "webui"])
def test_axes_are_listed_and_usable_through_the_api(kind, nowebui, xyz_last):
    with started(kind, nowebui=nowebui, xyz_last=xyz_last) as (h, api, txt2img):
        assert h.errors == []
        for is_img2img in (False, True):
            choices = xyz_info(api, is_img2img).args[0].choices  # "X type"
            assert choices[0] == "Nothing"
            ours = [c for c in choices if c.startswith(S.XYZ_PREFIX)]
            assert ours == expected_labels(is_img2img)  # each once, in table order
        choices = xyz_info(api, False).args[0].choices
        args = [choices.index(AXIS), "1.5, 3", [], 0, "", [], 0, "", [], True, True, False, False, False, False,
                False, 0, False]
        infotexts = txt2img({**BASE, "script_name": "x/y/z plot", "script_args": args})
        assert len(infotexts) == 3  # grid, then each cell
        assert "PAG scale: 1.5" in infotexts[1] and "PAG scale: 3" in infotexts[2]
        assert "PAG" not in txt2img(BASE)[0]  # the axis set nothing outside the plot
        assert h.errors == []


@pytest.mark.parametrize("layout", ["classic", "none"])
def test_img2img_only_axes_stay_off_txt2img_whatever_the_plot_module_holds(layout):
    """Forge Classic's xyz_grid imports only ``AxisOption`` (from its ``lib_xyz.classes``, which defines
    ``AxisOptionImg2Img``); the class is found there, or, where no module defines one, a subclass marked
    ``is_img2img`` is made.  Either way the plot's own filter (``type(x) == AxisOption or x.is_img2img == tab``, as
    A1111 and Classic write it) keeps the img2img-only axes off txt2img: on Classic it listed all 112 there."""
    import sys
    import types

    classes = types.ModuleType("attn_test_lib_xyz_classes")

    class AxisOption:
        def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
            self.label, self.type, self.apply, self.choices = label, type, apply, choices

    AxisOption.__module__ = classes.__name__
    classes.AxisOption = AxisOption
    if layout == "classic":
        class AxisOptionImg2Img(AxisOption):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.is_img2img = True

        classes.AxisOptionImg2Img = AxisOptionImg2Img
    xyz = types.ModuleType("xyz_grid.py")
    xyz.AxisOption = AxisOption  # what Classic's xyz_grid imports
    sys.modules[classes.__name__] = classes
    try:
        with a1111_host("sd1"):
            from lib_attn.host import xyz as host_xyz

            options = host_xyz.axis_options(xyz)
            cls = host_xyz.img2img_axis_class(xyz)
    finally:
        del sys.modules[classes.__name__]
    if layout == "classic":
        assert cls is classes.AxisOptionImg2Img
    for is_img2img in (False, True):
        listed = [x.label for x in options if type(x) is AxisOption or x.is_img2img == is_img2img]
        assert listed == expected_labels(is_img2img)
    assert len(expected_labels(False)) < len(expected_labels(True))
