"""One process of a distributed search: `python -m fer_pipeline.components.tuner.worker
'<settings json>'`, with KerasTuner's KERASTUNER_TUNER_ID ("chief" or "tunerN"),
KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT in its environment (distributed.py).

The chief serves the oracle (which trial runs next) over gRPC until every worker is told
to stop; each worker asks it for trials and trains them."""
from __future__ import annotations

import json
import sys

from fer_pipeline.core import quiet

quiet.install()  # before TensorFlow loads, as the console scripts do

__all__ = ["main"]


def main(argv: list[str]) -> None:
    from fer_pipeline.components.tuner.search import SearchSettings, run_search

    run_search(SearchSettings(**json.loads(argv[0])))


if __name__ == "__main__":
    main(sys.argv[1:])
