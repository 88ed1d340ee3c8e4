"""The KerasTuner internals kerastl relies on, each behind one small wrapper.

KerasTuner has no public API for these needs:

- **Declaring a space without building models.** `BaseTuner.__init__` calls the
  private hook `_populate_initial_space` on a fresh project, and KerasTuner's
  version builds the model again and again to discover conditional
  hyperparameters: for kerastl that would build a backbone per pass.
  `TransferTuner` overrides the hook under the name below and declares the space.
- **A chief that ends when the search does.** KerasTuner's public chief
  (`keras_tuner.src.distribute.oracle_chief.start_server`, reached by `search()`
  in a chief process) sleeps 20 s between its checks once the search is over.
  `serve_oracle` runs the same `OracleServicer` and lets kerastl poll every 0.2 s.
- **Running one trial as `search()` does**, when a search claims several at once
  (`TransferTuner.search`, populations): `run_one_trial` calls the private step that runs a
  trial and records its status and error.
- **A chief ends when the oracle has forgotten every tuner id.** An id is forgotten when the
  oracle tells it to stop, so a tuner that claims under several ids asks each once more at the
  end (`TransferTuner._claim`); `oracle_forgets_stopped_ids` checks that rule.

`tests/test_tune_internals.py` fails loudly when any of them changes.
"""

from __future__ import annotations

from concurrent import futures
from typing import Any, Callable

import grpc
import keras_tuner
from keras_tuner.src import protos
from keras_tuner.src.distribute import oracle_chief

POPULATE_SPACE_HOOK = "_populate_initial_space"  # the name BaseTuner.__init__ calls
RUN_TRIAL_STEP = "_try_run_and_update_trial"  # the step of BaseTuner.search that runs one trial


def declare_space_on_init(tuner_class: type, declare: Callable[[Any], None]) -> type:
    """Makes `tuner_class` run `declare(tuner)` where KerasTuner would build models to find the space."""
    setattr(tuner_class, POPULATE_SPACE_HOOK, declare)
    return tuner_class


def serve_oracle(oracle: keras_tuner.Oracle, address: str) -> tuple[grpc.Server, oracle_chief.OracleServicer]:
    """Starts KerasTuner's own oracle servicer on `address` ("ip:port"); returns (server, servicer)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    servicer = oracle_chief.OracleServicer(oracle)
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    server.add_insecure_port(address)
    server.start()
    return server, servicer


def search_finished(servicer: oracle_chief.OracleServicer, oracle: keras_tuner.Oracle) -> bool:
    """Whether the oracle said stop and every worker has finished its last trial."""
    return bool(servicer.stop_triggered and oracle_chief.exit_chief(oracle))


def run_one_trial(tuner: keras_tuner.Tuner, trial, *fit_args, **fit_kwargs) -> None:
    """Runs `trial` as KerasTuner's `search()` runs each: `run_trial`, then its status, scores or error."""
    getattr(tuner, RUN_TRIAL_STEP)(trial, *fit_args, **fit_kwargs)
