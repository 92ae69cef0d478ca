"""The Python DatabaseManager's statements, as its design document gives them
(../shared/seed/database-manager-spec.txt), driven one request at a time by the Rust tests
of the rolling migration (python_compat.rs).

Each line on stdin is a JSON request {"op": ..., ...}; each answer is one JSON line on
stdout: {"ok": true, "value": ...} or {"ok": false, "error": "..."}. The connection comes
from LEGACY_DSN, its search path from LEGACY_SCHEMA (the Python service's own tables would
be on its default path). Timestamps are the Python service's: naive datetime.now().

Statements marked "verbatim" are the design document's text; the others (cancel, load,
status) are written the way its method descriptions say, in the same style.
"""

import asyncio
import json
import os
import sys
import time
from datetime import datetime

import asyncpg

# 6.2 _create_tables, verbatim: what every Python service start-up runs.
CREATE_TABLES = """
CREATE TABLE IF NOT EXISTS task_history (
id SERIAL PRIMARY KEY,
user_id TEXT NOT NULL,
task_id TEXT NOT NULL,
step INTEGER NOT NULL,
result JSONB NOT NULL,
timestamp TIMESTAMP NOT NULL,
status TEXT NOT NULL DEFAULT 'pending'
);
-- Create indexes to optimize query performance
CREATE INDEX IF NOT EXISTS idx_task_history_user_id ON task_history (user_id);
CREATE INDEX IF NOT EXISTS idx_task_history_task_id ON task_history (task_id);
CREATE INDEX IF NOT EXISTS idx_task_history_status ON task_history (status);
CREATE INDEX IF NOT EXISTS idx_task_history_timestamp ON task_history (timestamp);
-- Composite indexes to optimize common queries
CREATE INDEX IF NOT EXISTS idx_task_history_user_task ON task_history (user_id, task_id);
CREATE INDEX IF NOT EXISTS idx_task_history_user_timestamp ON task_history (user_id, timestamp DESC);
"""

# 6.3 save_task_history, verbatim.
INSERT = 'INSERT INTO task_history (user_id, task_id, step, result, timestamp, status) VALUES ($1, $2, $3, $4, $5, $6)'

# 6.4 save_batch_task_history, verbatim.
BATCH_INSERT = '''INSERT INTO task_history (user_id, task_id, step, result, timestamp, status)
VALUES ($1, $2, $3, $4, $5, $6)'''

# 6.4 get_user_tasks_optimized, verbatim.
USER_TASKS = '''SELECT DISTINCT task_id,
MAX(timestamp) as last_updated,
(SELECT status FROM task_history th2
WHERE th2.user_id = $1 AND th2.task_id = th1.task_id
ORDER BY step DESC LIMIT 1) as status
FROM task_history th1
WHERE user_id = $1
GROUP BY task_id
ORDER BY last_updated DESC
LIMIT $2 OFFSET $3'''

# mark_task_as_cancelled: every row of the task to 'cancelled'.
CANCEL = 'UPDATE task_history SET status = $1 WHERE user_id = $2 AND task_id = $3'

# load_task_history and check_task_status.
LOAD = 'SELECT step, result, timestamp, status FROM task_history WHERE user_id = $1 AND task_id = $2 ORDER BY step ASC'
STATUS = 'SELECT status FROM task_history WHERE user_id = $1 AND task_id = $2 ORDER BY step DESC LIMIT 1'


def step_result(req):
    """TaskStepResult.dict() for a request's step."""
    status = req["status"]
    return {
        "step": f"step_{req['step']}",
        "result": req.get("result"),
        "completed": status == "completed",
        "message": req.get("message", f"Step {req['step']} {status}"),
        "status": status,
        "error_code": "E003" if status == "failed" else None,
        "error_message": "boom" if status == "failed" else None,
    }


async def startup(pool, req):
    async with pool.acquire() as conn:
        await conn.execute(CREATE_TABLES)


async def save(pool, req):
    async with pool.acquire() as conn:
        await conn.execute(
            INSERT,
            req["user_id"], req["task_id"], req["step"], json.dumps(step_result(req)),
            datetime.now(), req["status"]
        )
    return True


async def save_concurrently(pool, req):
    """Many of save_task_history's saves at once, as a busy service makes them: one
    coroutine per task, each saving its steps in the order given, all sharing the pool.
    Not one of the service's methods (the statement is): for the test racing Rust writers.
    Returns the wall-clock window (time.time()) and, per write, whether it was acknowledged
    (with the time) or refused (with the error)."""
    started = time.time()
    acked, refused = [], []

    async def one_task(task):
        for step, status in task["steps"]:
            write = {"user_id": req["user_id"], "task_id": task["task_id"], "step": step,
                     "status": status, "result": {"by": "python", "step": step},
                     "message": f"python step {step}"}
            try:
                await save(pool, write)
                acked.append([task["task_id"], step, time.time()])
            except Exception as e:  # as the service would log it
                refused.append([task["task_id"], step, f"{type(e).__name__}: {e}"])

    await asyncio.gather(*(one_task(task) for task in req["tasks"]))
    return {"started": started, "ended": time.time(), "acked": acked, "refused": refused}


async def save_batch(pool, req):
    records = req["records"]
    async with pool.acquire() as conn:
        await conn.executemany(
            BATCH_INSERT,
            [
                (
                    record['user_id'],
                    record['task_id'],
                    record['step'],
                    json.dumps(step_result(record)),
                    datetime.now(),
                    record['status']
                )
                for record in records
            ]
        )


async def save_with_transaction(pool, req):
    """8, Issue 3: save_task_with_transaction, verbatim: update the step if it exists."""
    user_id, task_id, step = req["user_id"], req["task_id"], req["step"]
    async with pool.acquire() as conn:
        async with conn.transaction():
            existing = await conn.fetchrow(
                "SELECT id FROM task_history WHERE user_id = $1 AND task_id = $2 AND step = $3",
                user_id, task_id, step
            )
            if existing:
                await conn.execute(
                    "UPDATE task_history SET result = $1, timestamp = $2, status = $3 WHERE id = $4",
                    json.dumps(step_result(req)), datetime.now(), req["status"], existing['id']
                )
            else:
                await conn.execute(
                    "INSERT INTO task_history (user_id, task_id, step, result, timestamp, status) VALUES ($1, $2, $3, $4, $5, $6)",
                    user_id, task_id, step, json.dumps(step_result(req)), datetime.now(), req["status"]
                )


async def cancel(pool, req):
    async with pool.acquire() as conn:
        result = await conn.execute(CANCEL, "cancelled", req["user_id"], req["task_id"])
    return result != "UPDATE 0"


async def load(pool, req):
    async with pool.acquire() as conn:
        rows = await conn.fetch(LOAD, req["user_id"], req["task_id"])
    return [
        {"step": r["step"], "status": r["status"], "result": json.loads(r["result"]),
         "timestamp": r["timestamp"].isoformat()}
        for r in rows
    ]


async def status(pool, req):
    async with pool.acquire() as conn:
        value = await conn.fetchval(STATUS, req["user_id"], req["task_id"])
    return value or "pending"


async def tasks(pool, req):
    async with pool.acquire() as conn:
        rows = await conn.fetch(USER_TASKS, req["user_id"], req.get("limit", 100), 0)
    return [{"task_id": r["task_id"], "status": r["status"]} for r in rows]


async def call_save_function(pool, req):
    """Not the Python service's: a role calling the mode's function directly (refused)."""
    async with pool.acquire() as conn:
        await conn.fetch(
            "SELECT * FROM taskhistory_python_save($1, $2, 0, '{}'::jsonb, now(), 'running')",
            req["user_id"], req["task_id"])


OPS = {
    "call_save_function": call_save_function,
    "startup": startup,
    "save": save,
    "save_batch": save_batch,
    "save_concurrently": save_concurrently,
    "save_with_transaction": save_with_transaction,
    "cancel": cancel,
    "load": load,
    "status": status,
    "tasks": tasks,
}


async def main():
    pool = await asyncpg.create_pool(
        dsn=os.environ["LEGACY_DSN"], min_size=1, max_size=2,
        server_settings={"search_path": os.environ["LEGACY_SCHEMA"]},
    )
    print(json.dumps({"ok": True, "value": "ready"}), flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        req = json.loads(line)
        try:
            reply = {"ok": True, "value": await OPS[req["op"]](pool, req)}
        except Exception as e:  # the Python service surfaced every error like this
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply, default=str), flush=True)
    await pool.close()


asyncio.run(main())
