"""`python -m cai_dpo.api`: the HTTP API under uvicorn, bound to CAI_HOST:CAI_PORT (`cai-dpo serve`)."""

import sys

import uvicorn

from cai_dpo.api.app import create_app
from cai_dpo.core.logs import configure_logging
from cai_dpo.core.settings import UnsafeBind, get_settings


def main() -> int:
    configure_logging("api")
    settings = get_settings()
    try:
        app = create_app(settings)
    except UnsafeBind as exc:
        sys.exit(str(exc))
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
