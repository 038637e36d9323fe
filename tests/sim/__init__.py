"""The deterministic cluster simulation (docs/replication.md, "Simulation").

Nodes with real stores and the production replication code, over trio memory
streams through a seeded fault injector, under MockClock(autojump_threshold=0).
`sim.run.run_seed(seed, base)` runs one seed; a failure names the command that
replays it; `python -m sim SEED` (with src and tests on PYTHONPATH) replays it
from the shell. `sim.forgery` makes the forged records a compromised peer
would send.
"""
