"""The S3 artifact store: bundles as objects ``<prefix>/sha256/<digest>`` in one bucket.

Works with any S3-protocol server (AWS, MinIO, Ceph, moto). boto3 is imported when the store is
built; credentials come from boto3's usual chain. The boto3 client is thread-safe, so one store
serves every thread of the process.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from rock_serve.envs.hub._config import S3StoreConfig
from rock_serve.envs.hub._store import ArtifactStore, check_digest, verify_file
from rock_serve.errors import InvalidConfig, NotFound, RockError, RuntimeUnavailable

__all__ = ["S3ArtifactStore"]

_MISSING = {"404", "NoSuchKey", "NotFound"}


class S3ArtifactStore(ArtifactStore):
    """Artifacts in an S3 bucket, through boto3."""

    kind = "s3"

    def __init__(self, config: S3StoreConfig, *, client: Any = None) -> None:
        """Build the store.

        Args:
            config: Bucket, prefix, endpoint and region.
            client: A boto3 S3 client to use instead of building one (custom sessions).

        Raises:
            InvalidConfig: boto3 is not installed.
        """
        self.config = config
        self.prefix = config.prefix.strip("/")
        if client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise InvalidConfig(
                    "the S3 artifact store needs boto3: pip install 'rock-serve[envs]'"
                ) from None
            client = boto3.client(
                "s3",
                endpoint_url=config.endpoint_url,
                region_name=config.region,
                config=Config(signature_version="s3v4", retries={"mode": "standard"}),
            )
        self._s3 = client

    def key(self, sha256: str) -> str:
        """The object key of a digest."""
        check_digest(sha256)
        return f"{self.prefix}/sha256/{sha256}" if self.prefix else f"sha256/{sha256}"

    def _where(self, sha256: str) -> str:
        return f"s3://{self.config.bucket}/{self.key(sha256)}"

    def _error(self, exc: Exception, what: str) -> RockError:
        """A typed error for a botocore failure."""
        from botocore.exceptions import BotoCoreError, ClientError

        if not isinstance(exc, ClientError) and isinstance(exc.__context__, ClientError):
            exc = exc.__context__  # boto3's transfer manager wraps it (S3UploadFailedError)
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _MISSING:
                return NotFound(f"{what}: not found")
            if code == "NoSuchBucket":
                return InvalidConfig(f"{what}: bucket {self.config.bucket!r} does not exist")
            return RuntimeUnavailable(f"{what}: S3 answered {code or 'an error'}", retry_after=1)
        if isinstance(exc, BotoCoreError):
            return RuntimeUnavailable(f"{what}: S3 is unreachable ({type(exc).__name__})")
        raise exc

    def put_file(self, path: Path, sha256: str) -> None:
        """Upload the file (multipart when large) unless the object exists."""
        if self.exists(sha256):
            return
        try:
            self._s3.upload_file(
                str(path),
                self.config.bucket,
                self.key(sha256),
                ExtraArgs={
                    "ContentType": "application/octet-stream",
                    "Metadata": {"sha256": sha256},
                },
            )
        except Exception as exc:
            raise self._error(exc, f"upload of {self._where(sha256)}") from None

    def fetch(self, sha256: str, dest: Path) -> None:
        """Download to a temp file next to ``dest``, check the digest, then rename."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".fetch-")
        os.close(fd)
        try:
            try:
                self._s3.download_file(self.config.bucket, self.key(sha256), tmp)
            except Exception as exc:
                raise self._error(exc, f"download of {self._where(sha256)}") from None
            verify_file(Path(tmp), sha256, self._where(sha256))
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, sha256: str) -> bool:
        """A HEAD on the object."""
        try:
            self._s3.head_object(Bucket=self.config.bucket, Key=self.key(sha256))
        except Exception as exc:
            error = self._error(exc, f"lookup of {self._where(sha256)}")
            if isinstance(error, NotFound):
                return False
            raise error from None
        return True

    def delete(self, sha256: str) -> None:
        """Delete the object (S3 deletes of missing keys succeed)."""
        try:
            self._s3.delete_object(Bucket=self.config.bucket, Key=self.key(sha256))
        except Exception as exc:
            raise self._error(exc, f"delete of {self._where(sha256)}") from None

    def url(self, sha256: str, expires: int | None = None) -> str:
        """A presigned GET URL (``expires`` seconds, default ``presign_seconds``).

        Raises:
            NotFound: no artifact with that digest.
        """
        if not self.exists(sha256):
            raise NotFound(f"no artifact {self._where(sha256)}")
        url: str = self._s3.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.config.bucket, "Key": self.key(sha256)},
            ExpiresIn=expires or self.config.presign_seconds,
        )
        return url

    def upload_url(
        self,
        sha256: str,
        *,
        content_type: str = "application/octet-stream",
        expires: int | None = None,
    ) -> str:
        """A presigned PUT URL through which a client uploads the artifact itself.

        The client must send the same ``Content-Type`` header (it is part of the signature).
        Nothing checks the uploaded bytes until they are fetched, when a wrong digest raises
        :class:`~rock_serve.envs.hub.ArtifactCorrupt`.
        """
        url: str = self._s3.generate_presigned_url(
            "put_object",
            Params={
                "Bucket": self.config.bucket,
                "Key": self.key(sha256),
                "ContentType": content_type,
            },
            ExpiresIn=expires or self.config.presign_seconds,
        )
        return url

    def close(self) -> None:
        """Close the client's connection pool."""
        close = getattr(self._s3, "close", None)
        if callable(close):
            close()
