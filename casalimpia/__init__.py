"""casalimpia: empty furnished room photos at catalogue scale."""

import logging

__version__ = "0.1.0"


def configure_logging(level: int = logging.INFO) -> None:
    """Send casalimpia's log lines to stderr once per process (drivers and Ray workers alike)."""
    logger = logging.getLogger("casalimpia")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)
