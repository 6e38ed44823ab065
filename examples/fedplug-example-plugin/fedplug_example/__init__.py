"""Example fedplug plugins, installed with pip and found through entry points.

* :mod:`fedplug_example.clipped` -- aggregator ``fedavg_clipped``: FedAvg with
  server-side L2 clipping of each client's update.
* :mod:`fedplug_example.drift` -- observer ``model_drift``: per-round figures of
  how far the global model moved, written to ``<run_dir>/model_drift.csv``.
* :mod:`fedplug_example.conf` -- the ``aggregator/fedavg_clipped.yaml`` config.

fedplug never imports this package by name: it reads the entry points declared
in ``pyproject.toml``.
"""

__version__ = "0.1.0"
