"""``modules.errors``: ``report`` prints like the WebUI and also keeps every report in ``reported``."""

from __future__ import annotations

import sys
import textwrap
import traceback

exception_records: list = []
reported: list = []  # (message, exception or None), newest last


def record_exception():
    _, e, tb = sys.exc_info()
    if e is None or (exception_records and exception_records[-1]["exception_obj"] is e):
        return
    exception_records.append({"exception": str(e), "exception_obj": e, "traceback": traceback.extract_tb(tb)})
    del exception_records[:-5]


def report(message: str, *, exc_info: bool = False) -> None:
    record_exception()
    reported.append((message, sys.exc_info()[1]))
    for line in message.splitlines():
        print("***", line, file=sys.stderr)
    if exc_info:
        print(textwrap.indent(traceback.format_exc(), "    "), file=sys.stderr)
        print("---", file=sys.stderr)


def print_error_explanation(message):
    record_exception()
    print(message.strip(), file=sys.stderr)


def display(e: Exception, task, *, full_traceback=False):
    record_exception()
    print(f"{task or 'error'}: {type(e).__name__}", file=sys.stderr)
    print(traceback.format_exc(), file=sys.stderr)


def run(code, task):
    try:
        code()
    except Exception as e:
        display(e, task)
