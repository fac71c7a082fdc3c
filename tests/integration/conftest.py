"""Fixtures shared by the integration tests."""

from tests._s3 import s3_endpoint

__all__ = ["s3_endpoint"]
