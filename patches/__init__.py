"""One module per model family; each declares ``ADAPTER`` (a :class:`visionfx.registry.AdapterSpec`)."""
