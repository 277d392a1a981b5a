"""The child side of Dagster Pipes: train one stage and report the asset materialisation back.

    python -m clipopt_dagster.pipes_child [--request FILE]      # request JSON else in $CLIPOPT_STAGE_REQUEST
    torchrun --standalone --nproc-per-node N -m clipopt_dagster.pipes_child

Launched by ``clipopt_dagster.launchers.TrainingLauncher`` (``PipesSubprocessClient`` or
``PipesK8sClient``). Only this module imports ``dagster_pipes`` — a small package with no
dependencies that is *not* ``dagster`` — and nothing in clipopt_core imports this module, so the
core library stays free of Dagster. Under torchrun only rank 0 opens the Pipes channel (logs,
materialisation); the other ranks just train.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from clipopt_core.runtime import distributed  # noqa: E402
from clipopt_core.runtime.memory import retain_freed_memory  # noqa: E402
from clipopt_core.runtime.text import format_event, is_loggable, markdown_table  # noqa: E402
from clipopt_core.train.job import REQUEST_ENV, StageRequest, run_stage  # noqa: E402


def _event_logger(pipes: Any, every: int = 10) -> Callable[[dict[str, float]], None]:
    """Validations and every ``every``-th step go to the Dagster run log."""
    def _log(event: dict[str, float]) -> None:
        if is_loggable(event, every):
            pipes.log.info(format_event(event))
    return _log


def pipes_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """Metadata in the Pipes wire form (the validation history as a markdown table)."""
    history = metadata.get("validation_history", [])
    return {**metadata, "validation_history": {"raw_value": markdown_table(history, 4), "type": "md"},
            "launched_by": {"raw_value": "dagster-pipes", "type": "text"}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipopt_dagster.pipes_child", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--request", default=None, help=f"request JSON file (default: ${REQUEST_ENV})")
    request = StageRequest.load(parser.parse_args(argv).request)
    retain_freed_memory()  # no page faults per training step (runtime/memory.py)
    request.join_ranks()  # know the rank before opening the channel
    if not distributed.is_main():
        run_stage(request)
        return 0
    try:
        from dagster_pipes import open_dagster_pipes
    except ImportError as exc:  # pragma: no cover - dagster-pipes ships with the project
        raise SystemExit(f"clipopt_dagster.pipes_child needs the dagster-pipes package: {exc}") from exc
    with open_dagster_pipes() as pipes:
        pipes.log.info(f"training {request.asset} ({request.stage.kind}) on {distributed.world_size()} rank(s), "
                       f"device {request.device}, cache {request.cache_dir}")
        metadata = run_stage(request, log=_event_logger(pipes))
        pipes.report_asset_materialization(metadata=pipes_metadata(metadata or {}),
                                           data_version=(metadata or {}).get("identity"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
