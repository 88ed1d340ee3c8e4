"""Process entry points of a search: `python -m kerastl.worker trial DIR | search PROJECT`.

`trial DIR` runs one trial from `DIR/request.json` and writes `DIR/result.json`
(see `kerastl.tuning.run_in_process`). `search PROJECT` runs the search saved in
`PROJECT/search.json` as a KerasTuner chief or worker, as KERASTUNER_TUNER_ID says.
Both exit 0 on success, and 1 with the error as the last line of output.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path


def _trial(trial_dir: Path) -> None:
    from kerastl.config import RunConfig
    from kerastl.devices import setup_devices
    from kerastl.tuning import REQUEST_FILE, TrialContext

    request = json.loads((trial_dir / REQUEST_FILE).read_text())
    setup = setup_devices(request["mixed_precision"])
    context = TrialContext(request["project_dir"], device=setup.device, verbose=2)
    context.run(RunConfig.from_dict(request["config"]), trial_dir, request["budget"])


def _search(project: Path) -> None:
    from kerastl.config import RunConfig, TuneConfig
    from kerastl.search import SEARCH_FILE, search_here, serve_chief

    record = json.loads((project / SEARCH_FILE).read_text())
    base, tune = RunConfig.from_dict(record["run"]), TuneConfig.from_dict(record["tune"])
    tune.project_dir = str(project)
    if "chief" in os.environ.get("KERASTUNER_TUNER_ID", ""):
        serve_chief(base, tune)
    else:
        search_here(base, tune, None)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("trial", "search"):
        print("usage: python -m kerastl.worker trial DIR | search PROJECT", file=sys.stderr)
        return 2
    from kerastl.devices import die_with_parent

    die_with_parent()
    if os.getppid() == 1:  # the parent died before the line above took effect
        return 1
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        (_trial if argv[0] == "trial" else _search)(Path(argv[1]))
    except Exception as error:  # the caller reads the last line
        traceback.print_exc()
        print(f"error: {type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
