"""Shared by the LoRA tests: catch what diffusers/peft say when they load a file."""

import contextlib
import logging
import re
import warnings


@contextlib.contextmanager
def captured_messages():
    """Collect diffusers/peft/transformers log records and Python warnings."""
    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect(logging.WARNING)
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:  # warnings must reach us even if something made these libraries quiet
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages += [str(w.message) for w in caught]
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)


def assert_no_key_problems(messages):
    bad = [m for m in messages if re.search(r"(unexpected|missing)( adapter)? keys", m, re.IGNORECASE)]
    assert not bad, bad
