"""An image's ``User`` (or a create's ``user``) as numeric ids, read from the image's files.

The forms Docker takes: ``name``, ``uid``, ``name:group``, ``uid:gid``, ``name:gid``,
``uid:group``. Names come from the image's own ``/etc/passwd`` and ``/etc/group`` (the topmost
layer that has the file; an overlay whiteout there means the image has none), never the
node's. A numeric uid needs no passwd entry (its gid is then 0 and its home ``/``, as Docker
does); a name the image does not know is refused.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from rock_serve.errors import Conflict

__all__ = ["ImageUser", "resolve_user"]

_MAX_ID = 65535  # the ids a sandbox's user namespace maps


@dataclass(frozen=True)
class ImageUser:
    """Who a sandbox's processes run as, inside its user namespace."""

    uid: int
    gid: int
    home: str
    #: Supplementary groups: those of /etc/group that list the user's name.
    groups: tuple[int, ...] = ()

    @property
    def root(self) -> bool:
        return self.uid == 0 and self.gid == 0


def _find(lowers: list[str], rel: str) -> list[list[str]]:
    """The ``:``-split lines of ``rel`` in the topmost layer (of ``lowers``, top first)."""
    for d in lowers:
        path = os.path.join(d, rel)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            return []  # whiteout: deleted by an upper layer
        if not stat.S_ISREG(st.st_mode) or st.st_size > 16 << 20:
            return []
        with open(path, encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n").split(":") for line in f if line.strip()]
    return []


def _number(text: str) -> int | None:
    if not text.isdigit():
        return None
    value = int(text)
    if value > _MAX_ID:
        raise Conflict(f"user id {value} is outside a sandbox's ids (0..{_MAX_ID})")
    return value


def resolve_user(spec: str, lowers: list[str], what: str = "the image") -> ImageUser:
    """``spec`` (``user[:group]``) as ids, with names looked up in ``lowers`` (top first).

    Raises:
        Conflict: a name ``what`` does not define, or an id beyond the sandbox's range.
    """
    spec = spec.strip()
    if not spec:
        return ImageUser(0, 0, "/root")
    user, _, group = spec.partition(":")
    passwd = _find(lowers, "etc/passwd")
    uid = _number(user)
    entry = None
    for fields in passwd:
        if len(fields) < 7:
            continue
        if (uid is None and fields[0] == user) or (uid is not None and fields[2] == str(uid)):
            entry = fields
            break
    if uid is None:
        if entry is None:
            raise Conflict(f"user {user!r} is not in {what}'s /etc/passwd")
        uid = _number(entry[2])
        if uid is None:
            raise Conflict(f"user {user!r} has no numeric uid in {what}'s /etc/passwd")
    gid: int | None = 0
    home = "/"
    if entry is not None:
        gid = _number(entry[3]) if entry[3].isdigit() else 0
        home = entry[5] or "/"
    if group:
        gid = _number(group)
        if gid is None:
            for fields in _find(lowers, "etc/group"):
                if len(fields) >= 3 and fields[0] == group and fields[2].isdigit():
                    gid = _number(fields[2])
                    break
            else:
                raise Conflict(f"group {group!r} is not in {what}'s /etc/group")
    extra: list[int] = []
    if entry is not None:
        for fields in _find(lowers, "etc/group"):
            if len(fields) >= 4 and entry[0] in fields[3].split(",") and fields[2].isdigit():
                number = int(fields[2])
                if number <= _MAX_ID:
                    extra.append(number)
    return ImageUser(uid, gid or 0, home, tuple(sorted(set(extra))))
