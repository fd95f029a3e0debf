"""Double of modules/errors.py: report() logs and records, so tests can see swallowed exceptions."""

import logging
import traceback

reported: list[str] = []
log = logging.getLogger("webui-double")


def report(message, *, exc_info=False):
    text = message + ("\n" + traceback.format_exc() if exc_info else "")
    reported.append(text)
    log.error(text)


def display(e, task, **kwargs):
    report(f"{task}: {e}", exc_info=True)
