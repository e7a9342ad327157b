"""`python -m workers.training`: one training worker process (`cai-dpo worker ...`).

Under torchrun (`torchrun --nproc-per-node N -m workers.training`, or `cai-dpo worker train
--nproc-per-node N`) every process runs this: rank 0 is the worker, the others follow it
(distributed.py). Without torchrun, or with one process, it is the single-process worker.
"""

import os
import sys

from cai_dpo.core.db import database_url, upgrade_database
from cai_dpo.core.logs import configure_logging
from cai_dpo.core.settings import get_settings
from workers.training.worker import main

if __name__ == "__main__":
    ranks = None
    settings = get_settings()
    # One compile cache for every training process of this data folder, ranks and later runs
    # included: a shape compiled once (inductor's and Triton's kernels) is not compiled again. The
    # operator's own setting wins.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(settings.data_dir / "cache" / "torchinductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(settings.data_dir / "cache" / "triton"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun, with other ranks
        from workers.training.distributed import follow
        from workers.training.ranks import init_from_env

        ranks = init_from_env()
    if ranks is not None and not ranks.leader:
        configure_logging(f"train.{ranks.rank}")
        code = follow(ranks, settings)
        ranks.close()
        sys.exit(code)
    configure_logging("train")
    # A worker may be the first process on a new database (several start at once: Alembic's
    # advisory lock makes the others wait).
    upgrade_database(database_url(settings))
    code = main(settings, ranks)
    if ranks is not None:
        ranks.close()
    sys.exit(code)
