"""Ray: host groups for multi-host training and serving (``fax.cluster.hosts``), Ray Data jobs
(``fax.cluster.data``). Importing this package does not import Ray; its modules do."""


class ClusterError(RuntimeError):
    """The hosts could not be brought up (not enough resources, a worker that never joined)."""


class WorkerFailure(RuntimeError):
    """A host worker died or hung; a training run restarts the group from the latest checkpoint."""
