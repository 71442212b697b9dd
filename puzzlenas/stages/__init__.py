"""One module per stage: its declaration (`STAGE`: the config it reads and the stages upstream,
from which its fingerprint derives), `run(cfg, run_dir) -> Path`, and its table. Method code
is imported inside `run`, so importing a stage module is light."""
