"""Process entry points of a search: `python -m kerastl.tune.worker trial DIR | search PROJECT`.

`trial DIR` runs one trial from `DIR/request.json` and writes `DIR/result.json`
(see `kerastl.tune.trial.run_in_process`). `search PROJECT` runs the search saved in
`PROJECT/search.json` as a KerasTuner chief or worker, as KERASTUNER_TUNER_ID says.
Both exit 0 on success, and 1 with the error as the last line of output.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

from kerastl.tune.distribute import die_with_parent
from kerastl.tune.hypermodel import TransferHyperModel
from kerastl.tune.search import read_search, run_as_chief, search_here
from kerastl.tune.trial import serve_request


def _search(project: Path) -> None:
    base, tune = read_search(project)
    hypermodel = TransferHyperModel(base, tune.space)
    if "chief" in os.environ.get("KERASTUNER_TUNER_ID", ""):
        run_as_chief(hypermodel, tune)
    else:
        search_here(hypermodel, tune, None)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("trial", "search"):
        print("usage: python -m kerastl.tune.worker trial DIR | search PROJECT", file=sys.stderr)
        return 2
    die_with_parent()
    if os.getppid() == 1:  # the parent died before the line above took effect
        return 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        (serve_request if argv[0] == "trial" else _search)(Path(argv[1]))
    except Exception as error:  # the caller reads the last line
        traceback.print_exc()
        print(f"error: {type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
