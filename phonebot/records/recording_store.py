"""Where call recordings are kept, and for how long.

`Recordings` (one per app, `Records.recordings`) hands each call a `CallRecorder` when
RECORD_CALLS is on, stores the finished WAV, puts its place on the call's record
(`recording_path`: a file path, or `s3://bucket/key`), and deletes recordings older than
RECORDING_RETENTION_DAYS at startup and every hour.

A recording is written under RECORDINGS_DIR while the call goes on (`<CallSid>.wav.part`)
and, when the call ends, renamed to `<CallSid>.wav` there, or uploaded to the S3-compatible
bucket of RECORDINGS_S3_URL and removed locally. The bucket's endpoint and credentials
come from the standard AWS configuration (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, or ~/.aws), read by boto3 itself. boto3 is
synchronous: every call to it runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from loguru import logger
from sqlalchemy import update
from sqlalchemy.ext.asyncio import async_sessionmaker

from phonebot.config import Settings
from phonebot.records.recording import CallRecorder
from phonebot.records.schema import CallRecord
from phonebot.records.writer import RecordWriter

# A CallSid names the file: only these characters ever reach a path or an object key.
SAFE_CALL_SID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SUFFIX = ".wav"
PARTIAL_SUFFIX = ".wav.part"
RETENTION_EVERY_S = 3600.0
# A presigned GET link is valid this long: enough to start playing or downloading.
PRESIGNED_TTL_S = 300
# Waiting at shutdown for recordings still being saved (uploads of calls that just ended).
CLOSE_TIMEOUT_S = 30.0


class RecordingError(Exception):
    """A recording could not be stored, read or deleted."""


class LocalRecordings:
    """Recordings as files in one folder."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).resolve()

    def partial_path(self, call_sid: str) -> Path:
        return self.directory / f"{_checked(call_sid)}{PARTIAL_SUFFIX}"

    async def save(self, call_sid: str, partial: Path) -> str:
        final = self.directory / f"{_checked(call_sid)}{SUFFIX}"
        await asyncio.to_thread(os.replace, partial, final)
        return str(final)

    @staticmethod
    def is_recording_of(recording_path: str, call_sid: str) -> bool:
        """Only a file named `<CallSid>.wav` is ever served or deleted as a call's
        recording, whatever the record says (it may predate a move of RECORDINGS_DIR)."""
        return Path(recording_path).name == f"{call_sid}{SUFFIX}"

    async def delete(self, recording_path: str, call_sid: str) -> None:
        if self.is_recording_of(recording_path, call_sid):
            await asyncio.to_thread(Path(recording_path).unlink, missing_ok=True)

    async def expire(self, cutoff: datetime) -> list[str]:
        """Delete recordings (and partial ones a crash left) last written before `cutoff`."""
        return await asyncio.to_thread(self._expire, cutoff.timestamp())

    def _expire(self, cutoff_ts: float) -> list[str]:
        deleted: list[str] = []
        if not self.directory.is_dir():
            return deleted
        for entry in os.scandir(self.directory):
            if not entry.name.endswith((SUFFIX, PARTIAL_SUFFIX)) or not entry.is_file():
                continue
            with contextlib.suppress(FileNotFoundError):
                if entry.stat().st_mtime < cutoff_ts:
                    os.unlink(entry.path)
                    deleted.append(str(Path(entry.path)))
        return deleted


class S3Recordings:
    """Recordings as objects in an S3-compatible bucket (`s3://bucket/prefix`)."""

    def __init__(self, url: str, client_factory: Callable[[], Any] | None = None) -> None:
        self.bucket, prefix = parse_s3_url(url)
        self.prefix = f"{prefix.rstrip('/')}/" if prefix.strip("/") else ""
        self._client_factory = client_factory or _default_client
        self._client: Any = None

    @property
    def client(self) -> Any:
        # Created on first use (in a worker thread); boto3 clients are thread-safe.
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    def key(self, call_sid: str) -> str:
        return f"{self.prefix}{_checked(call_sid)}{SUFFIX}"

    async def save(self, call_sid: str, partial: Path) -> str:
        key = self.key(call_sid)
        await asyncio.to_thread(
            lambda: self.client.upload_file(
                str(partial), self.bucket, key, ExtraArgs={"ContentType": "audio/wav"}
            )
        )
        await asyncio.to_thread(partial.unlink, missing_ok=True)
        return f"s3://{self.bucket}/{key}"

    async def presigned_url(self, recording_path: str, call_sid: str) -> str:
        bucket, key = parse_s3_url(recording_path)
        params = {
            "Bucket": bucket,
            "Key": key,
            "ResponseContentType": "audio/wav",
            "ResponseContentDisposition": f'attachment; filename="{_checked(call_sid)}.wav"',
        }
        return await asyncio.to_thread(
            lambda: self.client.generate_presigned_url(
                "get_object", Params=params, ExpiresIn=PRESIGNED_TTL_S
            )
        )

    async def delete(self, recording_path: str) -> None:
        bucket, key = parse_s3_url(recording_path)
        await asyncio.to_thread(lambda: self.client.delete_object(Bucket=bucket, Key=key))

    async def expire(self, cutoff: datetime) -> list[str]:
        """Delete this prefix's recordings uploaded before `cutoff` (S3's LastModified)."""
        return await asyncio.to_thread(self._expire, cutoff)

    def _expire(self, cutoff: datetime) -> list[str]:
        old: list[str] = []
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix
        )
        for page in pages:
            for item in page.get("Contents", []):
                if item["Key"].endswith(SUFFIX) and item["LastModified"] < cutoff:
                    old.append(item["Key"])
        for start in range(0, len(old), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": key} for key in old[start : start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch})
        return [f"s3://{self.bucket}/{key}" for key in old]


class Recordings:
    """The app's recordings: a recorder per call, storage, retention. See the module doc."""

    def __init__(
        self,
        settings: Settings,
        writer: RecordWriter,
        sessions: async_sessionmaker,
        s3_client_factory: Callable[[], Any] | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.retention_days = settings.recording_retention_days
        self.local = LocalRecordings(settings.recordings_dir)
        self.s3 = (
            S3Recordings(settings.recordings_s3_url, s3_client_factory)
            if settings.recordings_s3_url
            else None
        )
        self._s3_client_factory = s3_client_factory
        self._s3_reader: S3Recordings | None = None  # for s3:// paths with S3 not configured
        self._writer = writer
        self._sessions = sessions
        self._now = now
        self._saving: set[asyncio.Task] = set()
        self._retention: asyncio.Task | None = None

    # --- a call -------------------------------------------------------------------------
    def recorder(self, call_sid: str) -> CallRecorder | None:
        """A recorder for this call (None for a CallSid that can't name a file)."""
        if not SAFE_CALL_SID.match(call_sid):
            logger.error(f"Call {call_sid!r}: not recorded, unexpected characters in CallSid")
            return None
        return CallRecorder(call_sid, self.local.partial_path(call_sid), on_stop=self._store)

    def _store(self, recorder: CallRecorder) -> None:
        """The call ended: finish and store its recording in the background."""
        task = asyncio.create_task(self._finish(recorder), name=f"recording-{recorder.call_sid}")
        self._saving.add(task)
        task.add_done_callback(self._saving.discard)

    async def _finish(self, recorder: CallRecorder) -> None:
        call_sid = recorder.call_sid
        partial = await recorder.finish()
        if partial is None:
            return
        try:
            target = self.s3 or self.local
            recording_path = await target.save(call_sid, partial)
        except Exception as error:  # S3 down, bad credentials: keep the file, say where
            logger.error(
                f"Call {call_sid}: recording not stored ({type(error).__name__}: "
                f"{str(error)[:200]}); the WAV stays at {partial}"
            )
            return
        self._writer.call_updated(call_sid, recording_path=recording_path)
        logger.info(
            f"Call {call_sid} recording saved: {recording_path} ({recorder.duration_s:.1f} s)"
        )

    # --- reading and deleting ----------------------------------------------------------
    def s3_for(self, recording_path: str) -> S3Recordings:
        """The S3 store to read or delete an `s3://` path, also one recorded while
        RECORDINGS_S3_URL was set and it no longer is (new recordings then stay local)."""
        if self.s3 is not None:
            return self.s3
        if self._s3_reader is None:
            bucket, _ = parse_s3_url(recording_path)
            self._s3_reader = S3Recordings(f"s3://{bucket}", self._s3_client_factory)
        return self._s3_reader

    async def delete(self, recording_path: str, call_sid: str) -> None:
        """Delete a call's recording wherever it is; raises RecordingError if that failed."""
        try:
            if is_s3(recording_path):
                await self.s3_for(recording_path).delete(recording_path)
            else:
                await self.local.delete(recording_path, call_sid)
        except Exception as error:
            raise RecordingError(f"{type(error).__name__}: {str(error)[:200]}") from error

    # --- retention ---------------------------------------------------------------------
    def start(self) -> None:
        if self.retention_days > 0 and self._retention is None:
            self._retention = asyncio.create_task(
                self._retention_loop(), name="recordings-retention"
            )

    async def _retention_loop(self) -> None:
        while True:
            try:
                await self.expire()
            except Exception as error:  # storage down: try again next round
                logger.error(f"Recordings retention failed: {type(error).__name__}: {error}")
            await asyncio.sleep(RETENTION_EVERY_S)

    async def expire(self) -> list[str]:
        """Delete recordings older than RECORDING_RETENTION_DAYS and clear them from their
        calls' records (which stay, with their transcripts)."""
        if self.retention_days <= 0:
            return []
        cutoff = self._now() - timedelta(days=self.retention_days)
        deleted = await self.local.expire(cutoff)
        if self.s3 is not None:
            deleted += await self.s3.expire(cutoff)
        finished = [path for path in deleted if not path.endswith(PARTIAL_SUFFIX)]
        await self._forget(finished)
        if deleted:
            logger.info(
                f"Recordings retention: deleted {len(deleted)} older than "
                f"{self.retention_days:g} days"
            )
        return deleted

    async def _forget(self, paths: Iterable[str]) -> None:
        paths = list(paths)
        for start in range(0, len(paths), 500):
            async with self._sessions.begin() as session:
                await session.execute(
                    update(CallRecord)
                    .where(CallRecord.recording_path.in_(paths[start : start + 500]))
                    .values(recording_path=None)
                )

    async def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Stop retention; wait (bounded) for recordings of ended calls to be stored."""
        if self._retention is not None:
            self._retention.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retention
            self._retention = None
        if self._saving:
            _, pending = await asyncio.wait(set(self._saving), timeout=timeout_s)
            if pending:
                logger.error(
                    f"Recordings: {len(pending)} not stored {timeout_s:g} s into the shutdown;"
                    " their WAVs stay in RECORDINGS_DIR"
                )


def call_recorder(
    writer: RecordWriter | None, call_sid: str, settings: Settings
) -> CallRecorder | None:
    """The call's recorder when its settings say RECORD_CALLS (a persona may override it)
    and it has records to put the recording on; else None."""
    if not settings.record_calls or writer is None or writer.recordings is None:
        return None
    return writer.recordings.recorder(call_sid)


def is_s3(recording_path: str) -> bool:
    return recording_path.startswith("s3://")


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/key` → ("bucket", "some/key")."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3://bucket/prefix URL: {url!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def _checked(call_sid: str) -> str:
    if not SAFE_CALL_SID.match(call_sid):
        raise ValueError(f"unexpected characters in CallSid {call_sid!r}")
    return call_sid


def _default_client() -> Any:
    """An S3 client configured by the standard AWS environment, with bounded waits."""
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=5,
        read_timeout=30,
        retries={"max_attempts": 3, "mode": "standard"},
        signature_version="s3v4",
    )
    return boto3.session.Session().client("s3", config=config)
