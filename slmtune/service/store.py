"""Every database operation of the service: the routes and the workers call only these.

Job life cycle (status):
    validating_files -> queued -> running -> succeeded | failed | cancelled
    queued/running -> paused -> (resume) queued;  any unfinished status -> cancelled

Claiming is atomic: a worker picks a candidate (`SELECT ... FOR UPDATE SKIP LOCKED` on PostgreSQL)
and takes it with a conditional `UPDATE ... WHERE status='queued' AND <no live worker>`, which
counts only if exactly one row changed, so on SQLite too two workers never get the same job.
A running job belongs to its worker (`worker_id`) while that worker's heartbeats are fresh; every
worker-side write is conditional on still owning the job. A job whose worker stopped sending
heartbeats goes back to the queue (requeue_stale) and resumes from its last checkpoint.
"""

from __future__ import annotations

import fcntl
import secrets
import time
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, event, func, or_, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from slmtune.service.models import ApiKey, Checkpoint, Event, File, Job, Tenant

FINAL = ("succeeded", "failed", "cancelled")
MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def new_id(prefix: str, n: int = 12) -> str:
    return f"{prefix}-{secrets.token_hex(n)}"


def make_engine(url: str) -> Engine:
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def migrate(engine: Engine) -> None:
    """Apply the alembic migrations shipped in the package (idempotent; safe from many processes
    on PostgreSQL thanks to an advisory lock)."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import text

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with sqlite_file_lock(engine), engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(74521)"))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


@contextmanager
def sqlite_file_lock(engine: Engine):
    """SQLite has no advisory lock and its DDL races ("table already exists" when several processes
    migrate a fresh home at once): an exclusive lock file beside the database file serializes them."""
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:":
        yield
        return
    lock_path = Path(database).with_suffix(".migrate.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def migration_heads() -> tuple[str, ...]:
    """The head revision(s) of the migrations shipped in the package."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return tuple(ScriptDirectory.from_config(cfg).get_heads())


class Store:
    def __init__(self, url: str):
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self):
        with self.sessions.begin() as s:
            yield s

    def migrate(self) -> None:
        migrate(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # --- health and metrics ---------------------------------------------------------------------
    def migration_problem(self) -> str | None:
        """None when the database answers and is migrated to this package's head, else why not."""
        from alembic.migration import MigrationContext

        with self.engine.connect() as conn:
            current = MigrationContext.configure(conn, opts={"version_table": "slm_alembic_version"}).get_current_heads()
        heads = migration_heads()
        if tuple(sorted(current)) != tuple(sorted(heads)):
            return f"database at revision {', '.join(current) or 'none'}, this version needs {', '.join(heads)}"
        return None

    def job_counts(self) -> dict[str, int]:
        """Jobs by status (every tenant)."""
        with self.session() as s:
            return {status: n for status, n in s.execute(select(Job.status, func.count()).group_by(Job.status))}

    def queued_by_tenant(self) -> dict[str, int]:
        with self.session() as s:
            rows = s.execute(select(Tenant.name, func.count()).join(Job, Job.tenant_id == Tenant.id)
                             .where(Job.status == "queued").group_by(Tenant.name))
            return {name: n for name, n in rows}

    def finished_job_stats(self) -> tuple[int, float, int]:
        """(finished jobs, their summed seconds from creation to finish, trained tokens of all jobs)."""
        with self.session() as s:
            n, seconds = s.execute(select(func.count(), func.coalesce(func.sum(Job.finished_at - Job.created_at), 0.0))
                                   .where(Job.finished_at.is_not(None))).one()
            tokens = s.scalar(select(func.coalesce(func.sum(Job.trained_tokens), 0)))
            return int(n), float(seconds), int(tokens)

    # --- tenants and keys -----------------------------------------------------------------------
    def create_key(self, tenant: str, key_hash: str) -> None:
        with self.session() as s:
            row = s.scalar(select(Tenant).where(Tenant.name == tenant))
            if row is None:
                row = Tenant(name=tenant, created_at=time.time())
                s.add(row)
                s.flush()
            s.add(ApiKey(tenant_id=row.id, key_hash=key_hash, created_at=time.time()))

    def list_keys(self) -> list[tuple[int, str, str, float]]:
        """(key id, tenant, first 12 hex digits of the key's sha256, created_at) of every key."""
        with self.session() as s:
            rows = s.execute(select(ApiKey.id, Tenant.name, ApiKey.key_hash, ApiKey.created_at)
                             .join(Tenant, Tenant.id == ApiKey.tenant_id).order_by(ApiKey.id)).all()
            return [(r[0], r[1], r[2][:12], r[3]) for r in rows]

    def revoke_key(self, key_id: int) -> bool:
        with self.session() as s:
            row = s.get(ApiKey, key_id)
            if row is None:
                return False
            s.delete(row)
            return True

    def tenant_by_name(self, name: str) -> Tenant | None:
        with self.session() as s:
            return s.scalar(select(Tenant).where(Tenant.name == name))

    def tenant_for_key(self, key_hash: str) -> Tenant | None:
        with self.session() as s:
            return s.scalar(select(Tenant).join(ApiKey, ApiKey.tenant_id == Tenant.id)
                            .where(ApiKey.key_hash == key_hash))

    # --- files ----------------------------------------------------------------------------------
    def add_file(self, file: File) -> File:
        with self.session() as s:
            s.add(file)
        return file

    def get_file(self, tenant_id: int, file_id: str) -> File | None:
        with self.session() as s:
            return s.scalar(select(File).where(File.id == file_id, File.tenant_id == tenant_id))

    def list_files(self, tenant_id: int, purpose: str | None, after: str | None, limit: int) -> tuple[list[File], bool]:
        return self._page(File, [File.tenant_id == tenant_id] + ([File.purpose == purpose] if purpose else []),
                          after, limit, owner=(File.tenant_id, tenant_id))

    def delete_file(self, tenant_id: int, file_id: str) -> File | None:
        with self.session() as s:
            row = s.scalar(select(File).where(File.id == file_id, File.tenant_id == tenant_id))
            if row is not None:
                s.delete(row)
            return row

    # --- jobs -----------------------------------------------------------------------------------
    def create_job(self, job: Job, messages: list[str]) -> Job:
        with self.session() as s:
            s.add(job)
            for m in messages:
                s.add(_event(job.id, m))
        return job

    def active_jobs(self, tenant_id: int) -> int:
        """The tenant's jobs that are queued, running or paused."""
        with self.session() as s:
            return s.scalar(select(func.count()).select_from(Job).where(
                Job.tenant_id == tenant_id, Job.status.in_(("validating_files", "queued", "running", "paused"))))

    def files_usage(self, tenant_id: int) -> tuple[int, int]:
        """(files, bytes) the tenant keeps."""
        with self.session() as s:
            n, size = s.execute(select(func.count(), func.coalesce(func.sum(File.bytes), 0))
                                .where(File.tenant_id == tenant_id)).one()
            return int(n), int(size)

    def file_in_use(self, tenant_id: int, file_id: str) -> str | None:
        """A job not yet finished that trains on the file, if any."""
        with self.session() as s:
            return s.scalar(select(Job.id).where(
                Job.tenant_id == tenant_id, Job.status.in_(("validating_files", "queued", "running", "paused")),
                or_(Job.training_file == file_id, Job.validation_file == file_id)).limit(1))

    def get_job(self, job_id: str, tenant_id: int | None = None) -> Job | None:
        with self.session() as s:
            q = select(Job).where(Job.id == job_id)
            if tenant_id is not None:
                q = q.where(Job.tenant_id == tenant_id)
            return s.scalar(q)

    def list_jobs(self, tenant_id: int, after: str | None, limit: int) -> tuple[list[Job], bool]:
        return self._page(Job, [Job.tenant_id == tenant_id], after, limit, owner=(Job.tenant_id, tenant_id))

    def succeeded_models(self, tenant_id: int | None = None) -> list[Job]:
        with self.session() as s:
            q = select(Job).where(Job.status == "succeeded").order_by(Job.seq)
            if tenant_id is not None:
                q = q.where(Job.tenant_id == tenant_id)
            return list(s.scalars(q))

    def job_for_model(self, name: str) -> Job | None:
        with self.session() as s:
            return s.scalar(select(Job).where(Job.fine_tuned_model == name, Job.status == "succeeded"))

    def set_status(self, job_id: str, to: str, *, allowed_from: tuple[str, ...], message: str) -> bool:
        """User actions (cancel / pause / resume): a conditional update, so they race safely with workers."""
        with self.session() as s:
            values = {"status": to} | ({"finished_at": time.time()} if to in FINAL else {})
            done = s.execute(update(Job).where(Job.id == job_id, Job.status.in_(allowed_from))
                             .values(**values)).rowcount == 1
            if done:
                s.add(_event(job_id, message))
            return done

    def fail_job(self, job_id: str, code: str, message: str, param: str | None = None) -> None:
        with self.session() as s:
            s.execute(update(Job).where(Job.id == job_id, Job.status.not_in(FINAL)).values(
                status="failed", finished_at=time.time(), error={"code": code, "message": message, "param": param}))
            s.add(_event(job_id, f"Job failed: {message}", level="error"))

    # --- worker side ----------------------------------------------------------------------------
    def requeue_stale(self, timeout: float) -> list[str]:
        """Running jobs whose worker went silent go back to the queue."""
        cutoff = time.time() - timeout
        with self.session() as s:
            stale = list(s.scalars(select(Job.id).where(Job.status == "running", Job.heartbeat_at < cutoff)))
            requeued = []
            for job_id in stale:
                if s.execute(update(Job).where(Job.id == job_id, Job.status == "running", Job.heartbeat_at < cutoff)
                             .values(status="queued", worker_id=None)).rowcount == 1:
                    s.add(_event(job_id, "The worker running this job stopped responding; the job is queued "
                                         "again and resumes from its last checkpoint.", level="warn"))
                    requeued.append(job_id)
            return requeued

    def claim(self, worker_id: str, timeout: float) -> Job | None:
        """Take a queued job nobody is working on, or None: the oldest job of the tenant served least
        recently (its jobs' latest heartbeat, claims included), so one tenant's backlog cannot starve
        the others; each tenant's own jobs run in order."""
        cutoff = time.time() - timeout
        free = or_(Job.worker_id.is_(None), Job.heartbeat_at < cutoff)
        served = (select(Job.tenant_id, func.max(Job.heartbeat_at).label("last")).group_by(Job.tenant_id)
                  .subquery())
        for _ in range(5):
            with self.session() as s:
                candidate = s.scalar(select(Job.id).join(served, served.c.tenant_id == Job.tenant_id)
                                     .where(Job.status == "queued", free)
                                     .order_by(func.coalesce(served.c.last, 0.0), Job.seq)
                                     .limit(1).with_for_update(skip_locked=True, of=Job))
                if candidate is None:
                    return None
                now = time.time()
                taken = s.execute(update(Job).where(Job.id == candidate, Job.status == "queued", free).values(
                    status="running", worker_id=worker_id, heartbeat_at=now, attempts=Job.attempts + 1)).rowcount
                if taken == 1:
                    return s.scalar(select(Job).where(Job.id == candidate))
        return None

    def heartbeat(self, job_id: str, worker_id: str) -> str | None:
        """Refresh the heartbeat; returns the job's status, or None when this worker lost the job."""
        with self.session() as s:
            if s.execute(update(Job).where(Job.id == job_id, Job.worker_id == worker_id)
                         .values(heartbeat_at=time.time())).rowcount != 1:
                return None
            return s.scalar(select(Job.status).where(Job.id == job_id))

    def append_event(self, job_id: str, message: str, *, level: str = "info", type: str = "message",
                     data: dict | None = None) -> None:
        with self.session() as s:
            s.add(_event(job_id, message, level=level, type=type, data=data))

    def add_checkpoint(self, job_id: str, step: int, path: str, metrics: dict) -> None:
        with self.session() as s:
            s.add(Checkpoint(id=new_id("ftckpt"), job_id=job_id, step=step, path=path, metrics=metrics,
                             created_at=time.time()))

    def mark_best_checkpoints(self, job_id: str, step: int) -> None:
        """Flag the job's checkpoints of `step` (the best evaluation's) with metrics["best"]."""
        with self.session() as s:
            for checkpoint in s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step == step)):
                checkpoint.metrics = dict(checkpoint.metrics or {}) | {"best": True}  # a new dict: JSON columns
                # do not track changes made in place

    def finish(self, job_id: str, worker_id: str, status: str, *, error: dict | None = None,
               message: str = "", **values) -> bool:
        """Final state, written only while the worker still owns a running job."""
        with self.session() as s:
            done = s.execute(update(Job).where(Job.id == job_id, Job.worker_id == worker_id, Job.status == "running")
                             .values(status=status, error=error, finished_at=time.time(), worker_id=None,
                                     **values)).rowcount == 1
            if done and message:
                s.add(_event(job_id, message, level="error" if status == "failed" else "info"))
            return done

    def release(self, job_id: str, worker_id: str) -> None:
        """The worker stopped working on the job (paused / cancelled): others may take it."""
        with self.session() as s:
            s.execute(update(Job).where(Job.id == job_id, Job.worker_id == worker_id).values(worker_id=None))

    def requeue(self, job_id: str, worker_id: str) -> None:
        """The worker shut down mid-job (after a checkpoint): the job waits for the next worker."""
        with self.session() as s:
            if s.execute(update(Job).where(Job.id == job_id, Job.worker_id == worker_id, Job.status == "running")
                         .values(status="queued", worker_id=None)).rowcount == 1:
                s.add(_event(job_id, "The worker shut down; the job is queued again and resumes from its "
                                     "checkpoint."))
            else:
                s.execute(update(Job).where(Job.id == job_id, Job.worker_id == worker_id).values(worker_id=None))

    # --- events and checkpoints -----------------------------------------------------------------
    def list_events(self, job_id: str, after: str | None, limit: int) -> tuple[list[Event], bool]:
        return self._page(Event, [Event.job_id == job_id], after, limit, owner=(Event.job_id, job_id))

    def list_checkpoints(self, job_id: str, after: str | None, limit: int) -> tuple[list[Checkpoint], bool]:
        return self._page(Checkpoint, [Checkpoint.job_id == job_id], after, limit,
                          owner=(Checkpoint.job_id, job_id))

    def _page(self, model, where: list, after: str | None, limit: int, owner) -> tuple[list, bool]:
        """Newest first; `after` is the id of the last item of the previous page."""
        with self.session() as s:
            q = select(model).where(*where)
            if after:
                cursor = s.scalar(select(model.seq).where(model.id == after, owner[0] == owner[1]))
                if cursor is None:
                    raise LookupError(after)
                q = q.where(model.seq < cursor)
            rows = list(s.scalars(q.order_by(model.seq.desc()).limit(limit + 1)))
            return rows[:limit], len(rows) > limit

    def count(self, model) -> int:
        with self.session() as s:
            return s.scalar(select(func.count()).select_from(model))


def _event(job_id: str, message: str, *, level: str = "info", type: str = "message", data: dict | None = None):
    return Event(id=new_id("ftevent"), job_id=job_id, level=level, type=type, message=message, data=data,
                 created_at=time.time())
