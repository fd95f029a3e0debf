"""The methods, in one ordered list.

:data:`ORDER` fixes the UI order (sections appear in the order their methods first appear), the positional API
order, the order in which the methods' hooks run at each host event, and the order of the infotext entries.
An entry is a method (all its fields that no later entry names, in declaration order) or ``(method, field name)``
for a field added to a method later: it is appended, so that no positional index ever moves.  A new method is one
folder and one entry at the end.
"""

from __future__ import annotations

from lib_attn.methods import ag, apg, cfg_zero, colorize, edit_mask, fdg, nag, pag, sag, seg, style, swg, tpg, yoda
from lib_attn.methods.base import Method

ORDER: tuple = (
    pag.METHOD,
    colorize.METHOD,
    style.METHOD,
    edit_mask.METHOD,
    yoda.METHOD,
    (colorize.METHOD, "reference_scale"),
    seg.METHOD,
    sag.METHOD,
    nag.METHOD,
    apg.METHOD,
    cfg_zero.METHOD,
    fdg.METHOD,
    ag.METHOD,
    tpg.METHOD,
    swg.METHOD,
    (edit_mask.METHOD, "seeds"),
    (style.METHOD, "adain_mode"),
    (style.METHOD, "pairing"),
    (style.METHOD, "mode"),
    (style.METHOD, "transfer_lr"),
    (colorize.METHOD, "paper"),
    (colorize.METHOD, "passes"),
    (edit_mask.METHOD, "inpaint_model"),
)

METHODS: tuple[Method, ...] = tuple(dict.fromkeys(e if isinstance(e, Method) else e[0] for e in ORDER))
BY_NAME: dict[str, Method] = {m.name: m for m in METHODS}


def positional_fields() -> list:
    """Every field in positional order (see the module docstring)."""
    later = {(e[0].name, e[1]) for e in ORDER if not isinstance(e, Method)}
    out = []
    for e in ORDER:
        if isinstance(e, Method):
            out += [f for f in e.fields if (e.name, f.name) not in later]
        else:
            out.append(e[0].field(e[1]))
    return out
