"""pytest plugin: the `free_port` fixture (see rebind.actions.pick)."""
