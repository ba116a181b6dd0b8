"""`rebind exporter`: port health for Prometheus.

Layers, as in the rest of rebind:

* :mod:`.facts` -- pure: the facts one scrape gathered (frozen dataclasses) and the judgements
  made from them (a restart's bindability through ``model.assess``, frees-in, listener groups,
  ephemeral-port counts, config warnings);
* :mod:`.families` -- pure: facts to Prometheus metric families (the metric names and labels are
  a contract, see docs/metrics.md);
* :mod:`.gather` -- I/O: kernel-filtered inet_diag dumps (:mod:`.bytecode` builds the filter,
  :mod:`.fastdiag` counts connections without decoding them), sysctls, and route lookups
  (:mod:`.route`), once per scrape;
* :mod:`.collector` -- the prometheus-client Collector that gathers at scrape time, cached for the
  interval; :mod:`.serve` the bounded HTTP server and the atomic ``--textfile`` writer;
* :mod:`.run_metrics` -- the metrics of ``rebind run --metrics``.

prometheus-client is imported only by ``families``, ``collector``, ``serve`` and ``run_metrics``.
"""
