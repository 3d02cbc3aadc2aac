"""Where ``[node] replicate_to`` sends each node's store: an S3 prefix or a directory.

Parsed once here, below ``config`` (which validates it) and ``node/replication`` (which
hands it to Litestream), so the two never read the string differently. Each instance gets a
place of its own under the target, named like its data directory (``names.storage_name``:
``i<N>``), because two stores replicating into one place corrupt each other's copy.

Only the two kinds the project tests are accepted: ``s3://bucket[/prefix]`` (AWS S3 or an
S3-compatible server through ``node.replicate_endpoint``) and a filesystem path (plain or
``file://``), which is for a laptop or a mounted network volume. Credentials never appear
here: Litestream takes them from the environment and the AWS credential chain.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from shardchat.names import storage_name

# S3's rules for bucket names (lower-case letters, digits, dots and hyphens, 3..63, starting
# and ending with a letter or digit); the stricter ones (no "..", no IP form) S3 enforces.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class TargetError(ValueError):
    """``replicate_to`` names no place this project can replicate to; says what would do."""


@dataclass(frozen=True)
class S3Target:
    bucket: str
    prefix: str  # without leading or trailing "/"; may be empty

    def key_prefix(self, number: int) -> str:
        """Instance ``number``'s place in the bucket: ``<prefix>/i<N>``."""
        name = storage_name(number)
        return f"{self.prefix}/{name}" if self.prefix else name

    def describe(self, number: int) -> str:
        return f"s3://{self.bucket}/{self.key_prefix(number)}"

    def pattern(self) -> str:
        """Every instance's place at once, for people: ``s3://bucket/prefix/i<N>/``."""
        return f"s3://{self.bucket}/{self.prefix + '/' if self.prefix else ''}i<N>/"


@dataclass(frozen=True)
class FileTarget:
    root: Path  # as written; relative paths are relative to the working directory

    def directory(self, number: int) -> Path:
        """Instance ``number``'s replica directory: ``<root>/i<N>``, absolute."""
        return (self.root / storage_name(number)).absolute()

    def describe(self, number: int) -> str:
        return str(self.directory(number))

    def pattern(self) -> str:
        return f"{self.root.absolute()}/i<N>/"


Target = S3Target | FileTarget


def parse(value: str) -> Target:
    """``s3://bucket/prefix``, ``file:///path`` or a path; raises TargetError."""
    text = value.strip()
    if not text:
        raise TargetError("is empty; set it to \"s3://bucket/prefix\" or a directory, or "
                          "leave the key out to replicate nowhere")
    scheme = _SCHEME.match(text)
    if scheme is None:
        return FileTarget(Path(text).expanduser())
    kind = scheme.group(1).lower()
    rest = text[scheme.end():]
    if kind == "file":
        if not rest.startswith("/"):
            raise TargetError(f"must be an absolute file URL such as \"file:///var/backups/"
                              f"shardchat\" (or a plain path), got {value!r}")
        return FileTarget(Path(rest))
    if kind != "s3":
        raise TargetError(f"must be \"s3://bucket/prefix\" or a directory; {kind}:// is not "
                          f"supported, got {value!r}")
    if "?" in rest or "#" in rest:
        raise TargetError("must not carry a query or fragment: set the S3 endpoint with "
                          "node.replicate_endpoint and the region with node.replicate_region"
                          f", got {value!r}")
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise TargetError(f"names the bucket {bucket!r}, which is not a valid S3 bucket name "
                          "(3..63 lower-case letters, digits, '.' or '-')")
    prefix = prefix.strip("/")
    if "//" in prefix:
        raise TargetError(f"has an empty part in its prefix {prefix!r}: write it as "
                          f"s3://{bucket}/{'/'.join(p for p in prefix.split('/') if p)}")
    return S3Target(bucket, prefix)
