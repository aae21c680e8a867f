"""Keep the libraries' loading chatter (torchvision fallback notices, per-shard bars) out of our output."""

from contextlib import contextmanager


@contextmanager
def quiet_libraries():
    """Errors only from diffusers and transformers, and no weight-loading bars, inside the block."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (dlog, tlog)]
    for lib in (dlog, tlog):
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, verbosity, bars in saved:
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()
