"""Distributed jobs: one resolve and one fetch per job (or per node-local cache), all ranks on one commit.

Not imported by ``import flowhub``: :mod:`flowhub.hub` imports it only when the launcher's variables are
set. :mod:`~flowhub.distributed.job` reads the job from them, :mod:`~flowhub.distributed.comm` holds the
collectives (OneFlow's, imported lazily), :mod:`~flowhub.distributed.roles` decides which rank fills
which cache, :mod:`~flowhub.distributed.coordinate` runs one load's agreement and
:mod:`~flowhub.distributed.weights` broadcasts a checkpoint's tensors (``broadcast_weights``).
"""
