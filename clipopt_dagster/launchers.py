"""How the training assets run a stage: in the Dagster process (default) or as a Dagster Pipes child.

``ComputeResource(launcher=TrainingLauncher(...))`` switches every training asset; each builds a
:class:`~clipopt_core.train.job.StageRequest` and :meth:`TrainingLauncher.run` decides only *where*
:func:`~clipopt_core.train.job.run_stage` runs:

* ``in_process`` (default, also when ``launcher`` is unset): in the asset's own process.
* ``pipes_subprocess``: ``dg.PipesSubprocessClient`` runs ``python -m clipopt_dagster.pipes_child`` or, with
  ``nproc_per_node`` > 1, ``python -m torch.distributed.run --standalone --nproc-per-node N -m
  clipopt_dagster.pipes_child`` (data-parallel, :mod:`clipopt_core.runtime.distributed`) on this machine.
* ``pipes_k8s``: ``dagster_k8s.PipesK8sClient`` runs the same command in a pod of ``image``
  (needs ``dagster-k8s``, not installed by default; see ``deploy/README.md``).

A child gets the request in ``$CLIPOPT_STAGE_REQUEST``, reads its inputs from the artifact store,
publishes ``models/<asset>`` itself and reports the asset's metadata (identity, best_val_score,
steps, uri, …) and its logs back over Pipes. S3 credentials never go into the request: a local
child gets them in its environment; a ``pipes_k8s`` pod gets them from the Kubernetes secrets named
in ``env_secrets`` (``envFrom: secretRef``), so the pod spec holds no secret value.
"""

import os
import sys
from typing import Any, Literal

import dagster as dg
from pydantic import Field

from clipopt_core.runtime.storage import ArtifactStore
from clipopt_core.train.job import REQUEST_ENV, StageRequest, run_stage
from clipopt_dagster._helpers import md_table, step_logger

PIPES_CHILD = "clipopt_dagster.pipes_child"
LAUNCHER_ENV = "CLIPOPT_LAUNCHER"
NPROC_ENV = "CLIPOPT_NPROC_PER_NODE"
S3_SECRET = "clipopt-s3"  # the Kubernetes secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (deploy/README.md)
K8S_CONTAINER = "dagster-pipes-execution"  # PipesK8sClient's container name


class TrainingLauncher(dg.ConfigurableResource):
    """Where training runs; ``mode`` ``in_process`` keeps the default behaviour.

    ``nproc_per_node``: ranks per machine (> 1 launches through torchrun; one GPU each on CUDA).
    ``python``: interpreter of the child (subprocess: this one; k8s: ``python`` in the image).
    ``env``: extra environment for the child (plain values: no secrets). ``image``/``namespace``/``gpus_per_pod``/
    ``env_secrets`` (Kubernetes secrets mounted as environment, default ``clipopt-s3``): ``pipes_k8s`` only.
    """

    mode: Literal["in_process", "pipes_subprocess", "pipes_k8s"] = "in_process"
    nproc_per_node: int = Field(default=1, ge=1)
    python: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    image: str | None = None
    namespace: str | None = None
    gpus_per_pod: int = Field(default=0, ge=0)
    env_secrets: list[str] = Field(default_factory=lambda: [S3_SECRET])

    @property
    def launches(self) -> bool:
        """True when the stage runs in a child process instead of the asset's own process."""
        return self.mode != "in_process"

    def command(self) -> list[str]:
        """The child's command line (torchrun when ``nproc_per_node`` > 1)."""
        python = self.python or (sys.executable if self.mode == "pipes_subprocess" else "python")
        if self.nproc_per_node == 1:
            return [python, "-m", PIPES_CHILD]
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={self.nproc_per_node}",
                "-m", PIPES_CHILD]

    def child_env(self, request: StageRequest, credentials: dict[str, str]) -> dict[str, str]:
        """The child's environment: the request, the store's ``AWS_*`` ``credentials`` for a local child
        only, then ``env``.

        A ``pipes_k8s`` pod gets its credentials from ``env_secrets`` (:meth:`pod_spec`): this mapping becomes
        the pod's plain ``env``, which anyone who can read the pod sees.
        """
        local = credentials if self.mode != "pipes_k8s" else {}
        return {REQUEST_ENV: request.to_json(), "OMP_WAIT_POLICY": "PASSIVE", **local, **self.env}

    def run(self, context: dg.AssetExecutionContext, request: StageRequest, store: ArtifactStore,
            credentials: dict[str, str]) -> dg.MaterializeResult:
        """Run ``request`` where this launcher says; the materialisation carries the stage's metadata.

        ``store`` serves the in-process run; a child opens the request's store itself, with ``credentials``.
        """
        if not self.launches:
            metadata = run_stage(request, store=store, log=step_logger(context), on_wait=context.log.warning)
            return dg.MaterializeResult(metadata={**metadata, "validation_history": md_table(
                metadata["validation_history"], 4)}, data_version=dg.DataVersion(metadata["identity"]))
        command = self.command()
        context.log.info(f"launching {request.asset} ({self.mode}): {' '.join(command)}")
        env = self.child_env(request, credentials)
        if self.mode == "pipes_subprocess":
            invocation = dg.PipesSubprocessClient(cwd=os.getcwd()).run(context=context, command=command, env=env)
        elif self.mode == "pipes_k8s":
            invocation = self._k8s_client().run(context=context, image=self.image, command=command, env=env,
                                                namespace=self.namespace, base_pod_spec=self.pod_spec())
        else:
            raise ValueError(f"unknown launcher mode {self.mode!r}")
        return invocation.get_materialize_result()

    def _k8s_client(self) -> Any:
        if not self.image:
            raise ValueError("TrainingLauncher(mode='pipes_k8s') needs image= (an image with clipopt installed)")
        try:
            from dagster_k8s import PipesK8sClient
        except ImportError as exc:
            raise dg.Failure(f"mode 'pipes_k8s' needs the dagster-k8s package in the code location image ({exc}); "
                             "see deploy/README.md") from exc
        return PipesK8sClient()

    def pod_spec(self) -> dict[str, Any]:
        """The training container's part of the pod: ``env_from`` the secrets, GPU limits (rest: cluster defaults)."""
        container: dict[str, Any] = {"name": K8S_CONTAINER,
                                     "env_from": [{"secret_ref": {"name": name}} for name in self.env_secrets]}
        if self.gpus_per_pod:
            container["resources"] = {"limits": {"nvidia.com/gpu": self.gpus_per_pod}}
        return {"containers": [container]}


def launcher_from_env() -> TrainingLauncher | None:
    """``$CLIPOPT_LAUNCHER`` (``pipes_subprocess``/``pipes_k8s``) and ``$CLIPOPT_NPROC_PER_NODE``; ``None`` if unset."""
    mode = os.environ.get(LAUNCHER_ENV)
    if not mode or mode == "in_process":
        return None
    return TrainingLauncher(mode=mode, nproc_per_node=int(os.environ.get(NPROC_ENV, "1")),
                            image=os.environ.get("CLIPOPT_TRAIN_IMAGE"))
