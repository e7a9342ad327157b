"""`python -m app`: the HTTP API under uvicorn, bound to CAI_HOST:CAI_PORT (`cai-dpo serve`)."""

import sys

import uvicorn

from app.main import create_app
from cai_dpo.core.logs import configure_logging
from cai_dpo.core.settings import UnsafeBind, get_settings


def main() -> int:
    configure_logging("api")
    settings = get_settings()
    try:
        app = create_app(settings)
    except UnsafeBind as exc:
        sys.exit(str(exc))
    # uvicorn closes idle connections after 5 s, exactly when httpx's pool stops reusing them: a
    # request sent on a connection the server is closing fails with ReadError (seen under load, 13
    # of 19,940 requests). vLLM made the same timeout configurable (vllm-project/vllm PR 18472).
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_keep_alive=settings.http_keep_alive_seconds,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
