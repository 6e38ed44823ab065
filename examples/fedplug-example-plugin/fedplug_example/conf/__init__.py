"""Hydra config groups of fedplug-example-plugin (declared in the ``fedplug.conf`` entry-point group)."""
