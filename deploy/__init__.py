"""Deployment as one process per platform: Flower's processes and the app project handed to
``flwr run`` (``flower``), test certificates (``certs``), per-platform datasets (``split``),
SuperLink/SuperNode command lines (``commands``), all of it on loopback (``local``), the
watchdog that stops a run's processes if fedrec dies (``reaper``), and the ``fedrec deploy``
commands (``cli``). Never imports ``fedrec.server`` or ``fedrec.client``."""
