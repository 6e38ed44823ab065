"""Built-in observer plugins (entry-point group ``fedplug.observers``)."""
