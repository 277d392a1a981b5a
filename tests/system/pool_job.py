"""A job with one step in the pool ``clipopt_gpu`` that records when it held the slot (for test_postgres.py)."""
import os
import time

import dagster as dg


@dg.op(pool="clipopt_gpu")
def hold_gpu(context: dg.OpExecutionContext) -> None:
    """Append ``start end`` (epoch seconds) of this step to ``$POOL_LOG``; holds the slot ``$POOL_HOLD_S`` s."""
    started = time.time()
    time.sleep(float(os.environ.get("POOL_HOLD_S", "3")))
    with open(os.environ["POOL_LOG"], "a") as handle:
        handle.write(f"{context.run_id} {started} {time.time()}\n")


@dg.job(executor_def=dg.in_process_executor)
def pool_job() -> None:
    hold_gpu()


defs = dg.Definitions(jobs=[pool_job])
