"""Isolated workers: each repository's ``hubconf.py`` runs in its own process.

Three layers, each readable on its own (see the README's architecture section):

* ``wire``: what crosses a socket, identical on both ends: ``protocol`` (framing, fd passing),
  ``transfer`` (tensors in a sealed memfd), ``byvalue`` (cloudpickle skeletons), ``codec``
  (proxy mode's restricted JSON), ``failures`` (exceptions), ``messages`` (shared constants);
* ``proc``: the code that runs inside a zygote or worker process: ``zygote``, ``child``,
  ``objects`` (proxy mode's object table), ``sandbox_child``, ``weights_task``;
* ``host``: the caller's side: ``launch`` (zygotes), ``pool`` (one worker per key, calls, reaping),
  ``proxy`` (handles on objects kept in a worker), ``sandbox`` (sandboxed workers' folders, limits,
  watchdog), ``fetch_service`` (downloads made for them), ``output`` (their stdout/stderr),
  ``weights_only`` (one-shot weights-only loads).

``host`` never imports ``proc`` (it starts a process by naming its entry point as a string) and
``proc`` never imports ``host``, ``flowhub.hub`` or ``flowhub.api``.
"""
