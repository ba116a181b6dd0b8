"""Acting on a busy port: wait, free, pick."""
