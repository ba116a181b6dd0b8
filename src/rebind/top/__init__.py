"""`rebind top`: a live view of ports (issue 14).

Pure parts (no I/O, unit-tested): :mod:`rebind.top.model` (per-port view model, countdowns,
queue bars, filtering, the bindable-now assessment) and :mod:`rebind.top.events` (owner/port
event diffing, the JSON-lines record format and history). I/O parts: :mod:`rebind.top.sampler`
(kernel-filtered dumps + owners), :mod:`rebind.top.record` (the --record file),
:mod:`rebind.top.keys` (what the w/f/W/r keys run). The Textual app is in rebind.cli.top.
"""
