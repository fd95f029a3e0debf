"""``modules.infotext_utils`` (quote / unquote / parse_generation_parameters)."""

from __future__ import annotations

import json
import re

re_param = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
paste_fields: dict = {}


def quote(text):
    if "," not in str(text) and "\n" not in str(text) and ":" not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def parse_generation_parameters(x: str) -> dict:
    res = {}
    lines = x.strip().split("\n")
    prompt, negative, params_line = [], [], ""
    if lines and len(re_param.findall(lines[-1])) >= 3:
        params_line = lines.pop()
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[16:].strip()
        (negative if in_negative else prompt).append(line)
    res["Prompt"] = "\n".join(prompt)
    res["Negative prompt"] = "\n".join(negative)
    for k, v in re_param.findall(params_line):
        res[k] = unquote(v)
    return res


# the WebUI's paste (connect_paste), the same in both hosts
from tests.fakes.common.paste import connect_paste, pasted_values  # noqa: E402,F401
