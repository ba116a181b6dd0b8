"""Renderers that more than one front end calls (the CLI commands and `rebind top`'s keys):
a question's answer as the lines people read. They import the model, never ``cli`` or ``top``."""
