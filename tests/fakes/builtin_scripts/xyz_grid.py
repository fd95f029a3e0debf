"""Double of the WebUI's built-in ``scripts/xyz_grid.py`` (A1111 1.10.1 and Forge 2 ship the same script; Forge
adds a reset of its loading parameters), used by both doubles as their ``scripts/`` folder (``load_scripts``).

Kept, because extensions and the API depend on it:

- ``AxisOption(label, type, apply, format_value=..., confirm=None, cost=0.0, choices=None, prepare=None)``, the
  tab-restricted ``AxisOptionImg2Img`` / ``AxisOptionTxt2Img`` (``is_img2img``), and the module-level
  ``axis_options`` list that extensions append to;
- ``Script.ui()`` builds ``self.current_axis_options`` from ``axis_options`` *as it is at that call* and returns 18
  controls; the X/Y/Z type controls are ``gr.Dropdown(type="index")`` whose choices are those labels.  So
  ``/sdapi/v1/script-info`` lists the labels known at ui() time, and an API request passes an axis as an *index*
  into ``current_axis_options`` (``script_args[0]``, ``[3]``, ``[6]``); an axis appended after ui() is neither
  listed nor reachable;
- ``Script.run()`` resolves the indices with ``self.current_axis_options[i]`` (``None`` counts as 0, "Nothing"),
  takes the values from the dropdown list for axes with choices unless ``csv_mode``, else from the comma-separated
  text, converts them with the axis type, applies x, y then z to a shallow ``copy(p)`` per cell and runs
  ``process_images`` on it; the result is ``[grid, sub-grids if include_sub_grids, cells if include_lone_images]``
  with one infotext per image.

Not modelled: ``a-b`` / ``a-b [n]`` ranges, ``confirm``/``prepare``, legends and margins, the cost-based loop order
(every axis here costs 0, which gives the WebUI's default: z outermost, then y, then x), seed variation, grid saving,
and the grid infotext's "X Type"/"X Values" entries (a grid gets its first cell's infotext).
"""

from __future__ import annotations

import copy
import csv
import io

from modules import processing, scripts


def apply_field(field):
    def fun(p, x, xs):
        setattr(p, field, x)

    return fun


def do_nothing(p, x, xs):
    pass


def format_value_add_label(p, opt, x):
    return f"{opt.label}: {round(x, 8) if isinstance(x, float) else x}"


def format_nothing(p, opt, x):
    return ""


class AxisOption:
    def __init__(self, label, type, apply, format_value=format_value_add_label, confirm=None, cost=0.0, choices=None,
                 prepare=None):
        self.label = label
        self.type = type
        self.apply = apply
        self.format_value = format_value
        self.confirm = confirm
        self.cost = cost
        self.prepare = prepare
        self.choices = choices


class AxisOptionImg2Img(AxisOption):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.is_img2img = True


class AxisOptionTxt2Img(AxisOption):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.is_img2img = False


axis_options = [  # a subset of the WebUI's list, in its order
    AxisOption("Nothing", str, do_nothing, format_value=format_nothing),
    AxisOption("Seed", int, apply_field("seed")),
    AxisOption("Var. seed", int, apply_field("subseed")),
    AxisOption("Steps", int, apply_field("steps")),
    AxisOptionTxt2Img("Hires steps", int, apply_field("hr_second_pass_steps")),
    AxisOption("CFG Scale", float, apply_field("cfg_scale")),
    AxisOptionImg2Img("Image CFG Scale", float, apply_field("image_cfg_scale")),
    AxisOption("Denoising", float, apply_field("denoising_strength")),
]


def _csv(text):
    return [v.strip() for row in csv.reader(io.StringIO(text or ""), skipinitialspace=True) for v in row]


def _grid(images, rows):
    from PIL import Image

    cols = -(-len(images) // rows)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "black")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


class Script(scripts.Script):
    def title(self):
        return "X/Y/Z plot"

    def ui(self, is_img2img):
        import gradio as gr

        self.current_axis_options = [x for x in axis_options if type(x) is AxisOption or x.is_img2img == is_img2img]
        labels = [x.label for x in self.current_axis_options]
        controls = []
        for axis, default in (("x", 1), ("y", 0), ("z", 0)):
            name = axis.upper()
            controls += [
                gr.Dropdown(label=f"{name} type", choices=labels, value=labels[default], type="index",
                            elem_id=self.elem_id(f"{axis}_type")),
                gr.Textbox(label=f"{name} values", lines=1, elem_id=self.elem_id(f"{axis}_values")),
                gr.Dropdown(label=f"{name} values", visible=False, multiselect=True, interactive=True),
            ]
        checkbox = {key: gr.Checkbox(label=label, value=value, elem_id=self.elem_id(key)) for key, label, value in (
            ("draw_legend", "Draw legend", True), ("include_lone_images", "Include Sub Images", False),
            ("include_sub_grids", "Include Sub Grids", False), ("no_fixed_seeds", "Keep -1 for seeds", False),
            ("vary_seeds_x", "Vary seeds for X", False), ("vary_seeds_y", "Vary seeds for Y", False),
            ("vary_seeds_z", "Vary seeds for Z", False),
            ("csv_mode", "Use text inputs instead of dropdowns", False))}
        margin_size = gr.Slider(label="Grid margins (px)", minimum=0, maximum=500, value=0, step=2,
                                elem_id=self.elem_id("margin_size"))
        return [*controls, *(checkbox[k] for k in ("draw_legend", "include_lone_images", "include_sub_grids",
                                                   "no_fixed_seeds", "vary_seeds_x", "vary_seeds_y", "vary_seeds_z")),
                margin_size, checkbox["csv_mode"]]

    def run(self, p, x_type, x_values, x_values_dropdown, y_type, y_values, y_values_dropdown, z_type, z_values,
            z_values_dropdown, draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds, vary_seeds_x,
            vary_seeds_y, vary_seeds_z, margin_size, csv_mode):
        if not no_fixed_seeds and hasattr(processing, "fix_seed"):
            processing.fix_seed(p)

        def axis(index, values, dropdown):
            opt = self.current_axis_options[index or 0]
            if opt.label == "Nothing":
                return opt, [0]
            raw = list(dropdown or []) if opt.choices is not None and not csv_mode else _csv(values)
            return opt, [opt.type(v) for v in raw if str(v).strip() != ""]

        (x_opt, xs), (y_opt, ys), (z_opt, zs) = (axis(x_type, x_values, x_values_dropdown),
                                                 axis(y_type, y_values, y_values_dropdown),
                                                 axis(z_type, z_values, z_values_dropdown))
        cells = []  # index ix + iy * len(xs) + iz * len(xs) * len(ys), as the WebUI orders them
        for z in zs:
            for y in ys:
                for x in xs:
                    pc = copy.copy(p)
                    x_opt.apply(pc, x, xs)
                    y_opt.apply(pc, y, ys)
                    z_opt.apply(pc, z, zs)
                    cells.append(processing.process_images(pc))
        per_grid = len(xs) * len(ys)
        sub_grids = [_grid([c.images[0] for c in cells[i * per_grid:(i + 1) * per_grid]], rows=len(ys))
                     for i in range(len(zs))]
        result = copy.copy(cells[0])
        result.images = [_grid(sub_grids, rows=1)]
        result.infotexts = [cells[0].infotexts[0]]
        if include_sub_grids:
            result.images += sub_grids
            result.infotexts += [cells[i * per_grid].infotexts[0] for i in range(len(zs))]
        if include_lone_images:
            result.images += [c.images[0] for c in cells]
            result.infotexts += [c.infotexts[0] for c in cells]
        return result
