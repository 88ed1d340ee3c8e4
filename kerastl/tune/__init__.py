"""The search wing: KerasTuner searches over both training phases.

`config` (TuneConfig, what is searchable), `space` (the search space), `hypermodel`
(TransferHyperModel for any KerasTuner tuner), `trial` (one trial and its folder),
`tuner` (TransferTuner), `tables`, `distribute` (chief and workers), `search`
(`run_search`) and `worker` (the process entry point). The wing imports the core;
the core never imports the wing. `kerastl.run_search` and friends are re-exported
lazily from the package's top level.
"""
