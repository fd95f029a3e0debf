"""Double of modules/infotext_utils.py: parse 'key: value, key: "quoted, value"' infotext lines."""

import json
import re

_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_generation_parameters(text):
    res = {}
    lines = text.strip().split("\n")
    last = lines[-1]
    res["Prompt"] = lines[0]
    for k, v in _RE_PARAM.findall(last):
        v = v.strip()
        if v.startswith('"') and v.endswith('"'):
            v = json.loads(v)
        res[k.strip()] = v
    return res


# the WebUI's paste (connect_paste), the same in both hosts
from tests.fakes.common.paste import connect_paste, pasted_values  # noqa: E402,F401
