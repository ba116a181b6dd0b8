"""Renderers that more than one front end calls (the CLI commands and `rebind top`'s keys):
a question's answer as the lines people read. They import the model, never ``cli`` or ``top``
(tests/unit/test_layers.py), nor Textual.

``console``: the markup printer (rich on a colour terminal, plain otherwise) and shared cells;
``why``: `rebind why`'s text; ``findings``: the localhost split-brain and well-known holders, as
text and JSON; ``free``: `rebind free`'s plan and result; ``reload``: `why --reload`'s advice;
``trace``: `rebind trace`'s lines and ``rebind.trace/1``; ``connect``: `why --connect`'s JSON
document (``rebind.connect/1``, also the API's).
"""
