"""One module per method; each declares ``METHOD`` (a :class:`visionfx.registry.MethodSpec`)."""
