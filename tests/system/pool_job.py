"""A job with one step in the pool ``clipopt_gpu`` that records when it held the slot (test_postgres.py,
test_killed_run.py), run by the code location's executor (frees slots of killed runs)."""
import os
import time

import dagster as dg

from clipopt_dagster.run_claims import releasing_in_process_executor


@dg.op(pool="clipopt_gpu")
def hold_gpu(context: dg.OpExecutionContext) -> None:
    """Append ``start end`` (epoch seconds) of this step to ``$POOL_LOG``; holds the slot ``$POOL_HOLD_S`` s."""
    started = time.time()
    if os.environ.get("POOL_STARTED"):
        open(os.environ["POOL_STARTED"], "w").close()
    time.sleep(float(os.environ.get("POOL_HOLD_S", "3")))
    with open(os.environ["POOL_LOG"], "a") as handle:
        handle.write(f"{context.run_id} {started} {time.time()}\n")


@dg.job(executor_def=releasing_in_process_executor)
def pool_job() -> None:
    hold_gpu()


defs = dg.Definitions(jobs=[pool_job])
