"""Differential privacy for fedplug: clipping, seeded Gaussian noise, adaptive clipping, the accountant.

Who uses what:

* :mod:`fedplug.privacy.clipping` -- the L2 norm of an update's change from the
  global model and its clipping; called by the DP aggregators (server side,
  ``fedplug_plugins.aggregators.dp_fedavg``) and by the client-side update
  filters (``fedplug_plugins.update_filters``).
* :mod:`fedplug.privacy.noise` -- the Gaussian noise, drawn from a
  ``torch.Generator`` seeded from ``os.urandom`` (or from a fixed seed: the test seam).
* :mod:`fedplug.privacy.adaptive` -- Andrew et al. 2021's quantile-tracking clip norm.
* :mod:`fedplug.privacy.accountant` -- (epsilon, delta) from opacus' RDP/PRV accountants.
* :mod:`fedplug.privacy.ledger` -- the server's per-round bookkeeping: epsilon in the
  round's metrics and the ``privacy.max_epsilon`` budget stop.

``docs/privacy.md`` says what each mechanism protects against and what it costs.
"""
