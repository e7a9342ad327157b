"""`python -m workers.generation`: one generation worker process (`cai-dpo worker ...`)."""

import sys

from cai_dpo.core.db import database_url, upgrade_database
from cai_dpo.core.logs import configure_logging
from cai_dpo.core.settings import get_settings
from workers.generation.worker import main

if __name__ == "__main__":
    configure_logging("generate")
    settings = get_settings()
    # A worker may be the first process on a new database (several start at once: Alembic's
    # advisory lock makes the others wait).
    upgrade_database(database_url(settings))
    sys.exit(main(settings))
