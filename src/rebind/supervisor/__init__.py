"""`rebind run` and the LISTEN_FDS protocol."""
