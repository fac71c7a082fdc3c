"""A node's image store: pulls an image once, keeps its layers unpacked and content-addressed.

Layout under ``root`` (keep it short: an overlay mount lists every layer's path):

- ``layers/sha256/<diffid>/``: one unpacked layer (see :mod:`._image_unpack`), shared by every
  image that has it; made in ``tmp/`` and renamed into place, so a partial or corrupt layer is
  never visible (its blob digest and its diff id are both checked first).
- ``images/<config digest>.json``: one image: the references naming it, its manifest digest,
  layer diff ids (lowest first) and sizes, the config fields a runtime honours (Env,
  WorkingDir, User, labels), whether its own python3 can run the rocklet, and last use.
- ``blobs/sha256/<digest>`` and ``layers/sha256/<diffid>.blob.json`` (its descriptor): a
  layer's compressed blob as pulled, kept only with ``keep_layer_blobs``, so that a push
  sends it unchanged.
- ``tmp/``: skopeo's OCI layouts and unpacks in progress (cleared at start).

Single flight: concurrent requests for one missing reference share one pull (and its
progress). A disk budget (``max_bytes``) evicts unused images, least recently used first; an
image a sandbox uses is never evicted or removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from rock_serve.config import ImageStoreConfig
from rock_serve.errors import (
    Conflict,
    ImageNotFound,
    ImageStoreFull,
    InvalidConfig,
    InvalidImageReference,
    InvalidRequest,
    PermissionDenied,
    RegistryUnavailable,
    RockError,
)
from rock_serve.protocol.images import (
    ImageInfo,
    ImagePullEvent,
    ImageRef,
    RegistryAuth,
    parse_image_ref,
)
from rock_serve.runtime._image_commit import upper_to_layer
from rock_serve.runtime._image_pull import skopeo_copy
from rock_serve.runtime._image_push import export_layout, probe_registry, skopeo_push
from rock_serve.runtime._image_unpack import LayerEscape, unpack_layer
from rock_serve.runtime._sync import run_sync

__all__ = ["Image", "ImageStore"]

log = logging.getLogger(__name__)

_LAYER_TYPES = (
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
)


@dataclass
class Image:
    """One image in the store."""

    id: str
    manifest_digest: str
    refs: list[str]
    layers: list[str]
    layer_sizes: list[int]
    env: list[str] = field(default_factory=list)
    workdir: str = ""
    user: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    #: "python3" when the image's own interpreter runs the rocklet; None = bring the node's.
    python: str | None = None
    last_used: float = 0.0

    @property
    def size(self) -> int:
        """Bytes of its unpacked layers."""
        return sum(self.layer_sizes)

    def env_dict(self) -> dict[str, str]:
        """``Env`` as a dict."""
        out = {}
        for item in self.env:
            key, _, value = item.partition("=")
            if key:
                out[key] = value
        return out


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def _hex(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise InvalidRequest(f"unsupported digest {digest!r} (sha256 only)")
    return hexpart


def _python_of(dirs: list[str]) -> str | None:
    """``python3`` if the image has a glibc python3 >= 3.8 on PATH, else None."""
    if any(glob.glob(os.path.join(d, "lib", "ld-musl-*")) for d in dirs):
        return None
    names = ("usr/local/bin/python3", "usr/bin/python3", "bin/python3")
    if not any(os.path.lexists(os.path.join(d, n)) for d in dirs for n in names):
        return None
    minors = []
    for d in dirs:
        for pattern in ("usr/lib/python3.*/os.py", "usr/local/lib/python3.*/os.py"):
            for p in glob.glob(os.path.join(d, pattern)):
                with contextlib.suppress(ValueError):
                    minors.append(int(p.split("python3.")[1].split("/")[0]))
    return "python3" if minors and max(minors) >= 8 else None


def _write_json(path: str, data: Any) -> None:
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


class _Pull:
    """One pull in flight: its task, its progress and who listens."""

    def __init__(self, ref: str) -> None:
        self.event = ImagePullEvent(image=ref, phase="queued")
        self.listeners: list[asyncio.Queue[ImagePullEvent]] = []
        self.task: asyncio.Task[Image] | None = None
        self.loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._layers_done = 0

    def update(self, **changes: Any) -> None:
        """New progress; callable from the unpack threads too (handed to the loop)."""
        try:
            on_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._apply(changes)
        else:
            self.loop.call_soon_threadsafe(self._apply, changes)

    def layer_done(self) -> None:
        """One more layer unpacked (from any unpack thread)."""
        with self._lock:
            self._layers_done += 1
            done = self._layers_done
        self.update(layers_done=done)

    def _apply(self, changes: dict[str, Any]) -> None:
        if "layers_done" in changes:  # threads finish out of order: progress never goes back
            changes["layers_done"] = max(changes["layers_done"], self.event.layers_done)
        self.event = self.event.model_copy(update=changes)
        for q in self.listeners:
            q.put_nowait(self.event)


class ImageStore:
    """Pulled images and their unpacked layers on one node (see the module docstring)."""

    def __init__(self, config: ImageStoreConfig | None = None) -> None:
        self.config = config = config or ImageStoreConfig()
        if not os.path.isabs(config.root):
            raise InvalidConfig(f"image store root {config.root!r} must be absolute")
        self.root = os.path.realpath(config.root)
        if any(c in self.root for c in ",:\\\n"):
            raise InvalidConfig(f"image store root {self.root!r} must be free of ',', ':', '\\'")
        self.skopeo = shutil.which(config.skopeo_path) or config.skopeo_path
        for sub in ("layers/sha256", "images", "tmp", "blobs/sha256"):
            os.makedirs(os.path.join(self.root, sub), mode=0o711, exist_ok=True)
        os.chmod(self.root, 0o711)
        self._images: dict[str, Image] = {}
        self._refs: dict[str, str] = {}
        self._users: dict[str, str] = {}  # sandbox id -> image id
        self._pulls: dict[str, _Pull] = {}
        #: How many pulls (skopeo transfers) this store ran; the bench and tests read it.
        self.pull_count = 0
        #: Pulls that failed, and pushes done (for /metrics).
        self.pull_failures = 0
        self.pushes = 0
        #: Called (on the loop or a worker thread) after each change: a pull starting or
        #: ending, an image saved, evicted or removed. Metrics hang here.
        self.listeners: list[Callable[[ImageStore], None]] = []
        self._clear_tmp()
        self._load()

    # ------------------------------------------------------------------ records

    def _clear_tmp(self) -> None:
        tmp = os.path.join(self.root, "tmp")
        for name in os.listdir(tmp):
            path = os.path.join(tmp, name)
            # only leftovers of dead processes (another store on this root may be pulling)
            with contextlib.suppress(OSError):
                if time.time() - os.lstat(path).st_mtime > 3600:
                    shutil.rmtree(path, ignore_errors=True)

    def _load(self) -> None:
        d = os.path.join(self.root, "images")
        for name in os.listdir(d):
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(d, name)) as f:
                    img = Image(**json.load(f))
            except (OSError, ValueError, TypeError):
                continue
            if not all(os.path.isdir(self.layer_dir(lid)) for lid in img.layers):
                continue
            self._images[img.id] = img
            for ref in img.refs:
                self._refs[ref] = img.id

    def _save(self, img: Image) -> None:
        _write_json(os.path.join(self.root, "images", f"{_hex(img.id)}.json"), asdict(img))
        self._changed()

    def _changed(self) -> None:
        for listener in list(self.listeners):
            try:
                listener(self)
            except Exception:  # a metrics hiccup never fails a pull
                log.debug("image store listener failed", exc_info=True)

    def stats(self) -> dict[str, int]:
        """Numbers for /metrics: bytes used, budget, images, pulls in flight, failures."""
        return {
            "bytes": self.disk_bytes(),
            "budget": self.config.max_bytes,
            "images": len(self._images),
            "pulls_in_flight": len(self._pulls),
            "pull_failures": self.pull_failures,
            "pulls": self.pull_count,
            "pushes": self.pushes,
        }

    def layer_dir(self, diff_id: str) -> str:
        """Where a layer is unpacked."""
        return os.path.join(self.root, "layers", "sha256", _hex(diff_id))

    def layer_dirs(self, img: Image) -> list[str]:
        """The image's layer directories, lowest first."""
        return [self.layer_dir(lid) for lid in img.layers]

    def lookup(self, ref: str) -> Image | None:
        """The stored image that ``ref`` names, if any (no pull)."""
        key = str(parse_image_ref(ref)) if not ref.startswith("sha256:") else ref
        image_id = self._refs.get(key) or (key if key in self._images else None)
        if image_id is None:
            # another store on this root may have pulled it meanwhile
            self._load()
            image_id = self._refs.get(key)
        return self._images.get(image_id) if image_id else None

    # ------------------------------------------------------------------ use

    def acquire(self, img: Image, user: str) -> None:
        """Mark ``img`` in use by ``user`` (a sandbox id): it is not evicted or removed."""
        self._users[user] = img.id
        img.last_used = time.time()

    def release(self, user: str) -> None:
        """``user`` no longer uses its image."""
        self._users.pop(user, None)

    def in_use(self, image_id: str) -> int:
        """Sandboxes using the image now."""
        return sum(1 for i in self._users.values() if i == image_id)

    # ------------------------------------------------------------------ pull

    async def get(
        self, ref: str, auth: RegistryAuth | None = None, *, force: bool = False
    ) -> Image:
        """The image ``ref`` names, pulled first if the store lacks it (one pull per ref)."""
        parsed = parse_image_ref(ref)  # malformed: InvalidImageReference (422)
        self._check_source(parsed)
        key = str(parsed)
        if not force:
            img = self.lookup(key)
            if img is not None:
                img.last_used = time.time()
                return img
        pull = self._start(parsed, auth)
        assert pull.task is not None
        return await asyncio.shield(pull.task)

    def _check_source(self, ref: ImageRef) -> None:
        """Refuse host paths outside ``local_sources`` and (if off) the Docker daemon."""
        if ref.transport == "host":
            raise InvalidRequest(f"{str(ref)!r} is a host path, not an image")
        if ref.transport == "docker-daemon" and not self.config.allow_docker_daemon:
            raise PermissionDenied("docker-daemon: images are not allowed on this node")
        if ref.transport in ("oci", "oci-archive", "docker-archive"):
            path = os.path.realpath(ref.name.split(":", 1)[0])
            roots = [os.path.realpath(r).rstrip("/") + "/" for r in self.config.local_sources]
            if not any((path + "/").startswith(r) for r in roots):
                raise PermissionDenied(
                    f"image path {path!r} is outside the allowed local sources {roots}"
                )

    async def events(
        self, ref: str, auth: RegistryAuth | None = None, *, force: bool = False
    ) -> AsyncIterator[ImagePullEvent]:
        """Pull (or join the pull of) ``ref`` and yield its progress, ending with done/error."""
        try:
            parsed = parse_image_ref(ref)
        except InvalidImageReference as exc:
            yield ImagePullEvent(
                image=ref, phase="error", error={"code": exc.code.value, "message": exc.message}
            )
            return
        try:
            self._check_source(parsed)
        except RockError as exc:
            err = {"code": exc.code.value, "message": exc.message}
            yield ImagePullEvent(image=ref, phase="error", error=err)
            return
        img = None if force else self.lookup(str(parsed))
        if img is not None:
            yield self._done_event(ref, img)
            return
        pull = self._start(parsed, auth)
        queue: asyncio.Queue[ImagePullEvent] = asyncio.Queue()
        pull.listeners.append(queue)
        yield pull.event.model_copy(update={"image": ref})
        assert pull.task is not None
        try:
            while not pull.task.done():
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, pull.task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    ev = getter.result()
                    if ev.phase not in ("done", "error"):
                        yield ev.model_copy(update={"image": ref})
                else:
                    getter.cancel()
            failure = pull.task.exception()
            if failure is None:
                yield self._done_event(ref, pull.task.result())
            else:
                code = getattr(getattr(failure, "code", None), "value", "internal")
                body = {"code": str(code), "message": str(failure)}
                yield ImagePullEvent(image=ref, phase="error", error=body)
        finally:
            with contextlib.suppress(ValueError):
                pull.listeners.remove(queue)

    def _done_event(self, ref: str, img: Image) -> ImagePullEvent:
        n = len(img.layers)
        return ImagePullEvent(
            image=ref,
            phase="done",
            layers_done=n,
            layers_total=n,
            digest=img.id,
            size_bytes=img.size,
        )

    def progress(self, ref: str) -> ImagePullEvent | None:
        """The progress of a pull in flight for ``ref``, if any."""
        pull = self._pulls.get(str(parse_image_ref(ref)))
        return pull.event if pull is not None else None

    def pulls(self) -> list[ImagePullEvent]:
        """The progress of every pull in flight (what a create waiting on one sees too)."""
        return [p.event for p in self._pulls.values()]

    def _start(self, ref: ImageRef, auth: RegistryAuth | None) -> _Pull:
        key = str(ref)
        pull = self._pulls.get(key)
        if pull is None:
            pull = self._pulls[key] = _Pull(key)
            pull.task = asyncio.ensure_future(self._pull(ref, auth, pull))

            def done(task: asyncio.Task[Image], key: str = key) -> None:
                self._pulls.pop(key, None)
                if not task.cancelled():
                    task.exception()  # retrieved: waiters re-raise it themselves
                self._changed()

            pull.task.add_done_callback(done)
            self._changed()
        return pull

    async def _pull(self, ref: ImageRef, auth: RegistryAuth | None, pull: _Pull) -> Image:
        work = os.path.join(self.root, "tmp", f"pull-{uuid.uuid4().hex[:12]}")
        os.mkdir(work, 0o700)
        try:
            pull.update(phase="pulling")
            await self._copy(ref, auth, os.path.join(work, "oci"))
            self.pull_count += 1
            img = await run_sync(self._commit_layout, ref, os.path.join(work, "oci"), work, pull)
            pull.update(
                phase="done", digest=img.id, size_bytes=img.size, layers_done=len(img.layers)
            )
            return img
        except BaseException as exc:
            code = getattr(getattr(exc, "code", None), "value", "internal")
            pull.update(phase="error", error={"code": code, "message": str(exc)})
            if not isinstance(exc, asyncio.CancelledError):
                self.pull_failures += 1
            raise
        finally:
            await run_sync(shutil.rmtree, work, True)

    async def _copy(self, ref: ImageRef, auth: RegistryAuth | None, dest: str) -> None:
        insecure = ref.loopback or (ref.registry in self.config.insecure_registries)
        delay = self.config.retry_backoff_seconds
        for attempt in range(1, self.config.pull_attempts + 1):
            try:
                await skopeo_copy(
                    self.skopeo,
                    ref,
                    dest,
                    auth=auth,
                    insecure=insecure,
                    timeout=self.config.pull_timeout_seconds,
                )
                return
            except RegistryUnavailable:
                if attempt == self.config.pull_attempts:
                    raise
                log.info("pull of %s: source unavailable, retry %d in %.1fs", ref, attempt, delay)
                await run_sync(shutil.rmtree, dest, True)
                await asyncio.sleep(delay)
                delay *= 2

    # ------------------------------------------------------------------ unpack (sync)

    def _blob(self, layout: str, digest: str) -> str:
        path = os.path.join(layout, "blobs", "sha256", _hex(digest))
        if _sha256_file(path) != digest:
            raise RegistryUnavailable(f"blob {digest} is corrupt (digest mismatch)")
        return path

    def _commit_layout(self, ref: ImageRef, layout: str, work: str, pull: _Pull) -> Image:
        with open(os.path.join(layout, "index.json")) as f:
            index = json.load(f)
        manifest_digest = index["manifests"][0]["digest"]
        with open(self._blob(layout, manifest_digest)) as f:
            manifest = json.load(f)
        config_digest = manifest["config"]["digest"]
        with open(self._blob(layout, config_digest)) as f:
            config = json.load(f)
        diff_ids = list(config.get("rootfs", {}).get("diff_ids", []))
        descs = manifest.get("layers", [])
        if len(diff_ids) != len(descs):
            raise InvalidRequest(f"image {ref}: {len(descs)} layers but {len(diff_ids)} diff ids")
        pull.update(phase="unpacking", layers_total=len(descs), layers_done=0)
        for desc in descs:
            if desc.get("mediaType") not in _LAYER_TYPES:
                raise InvalidRequest(f"image {ref}: unsupported layer type {desc.get('mediaType')}")

        def one(desc: dict[str, Any], diff_id: str) -> int:
            size = self._ensure_layer(layout, desc["digest"], diff_id, work, desc["mediaType"])
            pull.layer_done()
            return size

        # Layers unpack side by side (each into a tmp dir of its own, renamed when whole):
        # inflating, hashing and the disk's latency overlap across layers.
        unique = {d: desc for desc, d in zip(descs, diff_ids, strict=True)}
        workers = max(1, min(len(unique), self.config.unpack_threads))
        with ThreadPoolExecutor(workers, thread_name_prefix="layer-unpack") as pool:
            futures = {d: pool.submit(one, desc, d) for d, desc in unique.items()}
            try:
                by_id = {d: fut.result() for d, fut in futures.items()}
            except BaseException:
                for fut in futures.values():
                    fut.cancel()
                raise
        sizes = [by_id[d] for d in diff_ids]
        cfg = config.get("config") or {}
        existing = self._images.get(config_digest)
        refs = sorted({*(existing.refs if existing else []), str(ref)})
        img = Image(
            id=config_digest,
            manifest_digest=manifest_digest,
            refs=refs,
            layers=diff_ids,
            layer_sizes=sizes,
            env=list(cfg.get("Env") or []),
            workdir=str(cfg.get("WorkingDir") or ""),
            user=str(cfg.get("User") or ""),
            labels=dict(cfg.get("Labels") or {}),
            python=_python_of([self.layer_dir(d) for d in reversed(diff_ids)]),
            last_used=time.time(),
        )
        self._fit(img)
        for other in self._images.values():  # a ref moves to the image it names now
            if other.id != img.id and str(ref) in other.refs:
                other.refs.remove(str(ref))
                self._save(other)
        self._save(img)
        self._images[img.id] = img
        self._refs[str(ref)] = img.id
        return img

    def _ensure_layer(
        self, layout: str, digest: str, diff_id: str, work: str, media_type: str = ""
    ) -> int:
        final = self.layer_dir(diff_id)
        size_file = final + ".size"
        if os.path.isdir(final):
            with contextlib.suppress(OSError, ValueError), open(size_file) as f:
                return int(f.read())
            return 0
        blob = os.path.join(layout, "blobs", "sha256", _hex(digest))
        tmp = os.path.join(work, f"layer-{_hex(diff_id)[:12]}")
        os.mkdir(tmp, 0o755)
        try:
            result = unpack_layer(blob, tmp)
        except LayerEscape as exc:
            raise InvalidRequest(f"layer {digest} refused: {exc}") from None
        except (ValueError, EOFError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno == 28:  # ENOSPC
                raise ImageStoreFull(f"no space left unpacking layer {digest}") from None
            raise InvalidRequest(f"layer {digest} cannot be unpacked: {exc}") from None
        if result["digest"] != digest:  # one pass: the blob is hashed as it is unpacked
            raise RegistryUnavailable(f"layer blob {digest} is corrupt (digest mismatch)")
        if result["diff_id"] != diff_id:
            raise RegistryUnavailable(
                f"layer {digest}: diff id {result['diff_id']} does not match {diff_id}"
            )
        size = int(result["size"])
        if self.config.keep_layer_blobs:
            size += self._keep_blob(blob, final, digest, media_type)
        _write_json(size_file, size)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isdir(final):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another pull made it first
        return size

    def _keep_blob(self, blob: str, final: str, digest: str, media_type: str) -> int:
        """Link the checked blob into ``blobs/`` (by its digest: concurrent pulls of one layer
        write the same bytes to the same name) and describe it beside the layer; its size.
        Done before the layer dir appears, so a visible layer's descriptor names a whole blob.
        """
        kept = self._blob_path(digest)
        if not os.path.isfile(kept):
            tmp = f"{kept}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                os.link(blob, tmp)  # tmp/ is on the store's filesystem
            except OSError:
                shutil.copyfile(blob, tmp)
            os.replace(tmp, kept)
        size = os.path.getsize(kept)
        _write_json(final + ".blob.json", {"mediaType": media_type, "digest": digest, "size": size})
        return size

    def _blob_path(self, digest: str) -> str:
        return os.path.join(self.root, "blobs", "sha256", _hex(digest))

    def kept_blob(self, diff_id: str) -> tuple[str, dict[str, Any]] | None:
        """The layer's compressed blob as pulled and its descriptor, if the store kept it."""
        try:
            with open(self.layer_dir(diff_id) + ".blob.json") as f:
                desc: dict[str, Any] = json.load(f)
            path = self._blob_path(str(desc["digest"]))
        except (OSError, ValueError, KeyError):
            return None
        if not os.path.isfile(path):
            return None
        return path, {**desc, "diff_id": diff_id}

    # ------------------------------------------------------------------ commit

    async def commit(
        self,
        upper: str,
        parent: Image,
        ref: str,
        skip: frozenset[str] = frozenset(),
        shift: int = 0,
    ) -> Image:
        """A new image ``ref``: ``parent``'s layers plus ``upper`` (an overlay upper dir)."""
        parsed = parse_image_ref(ref)  # malformed: InvalidImageReference (422)
        if parsed.transport != "docker":
            raise InvalidRequest(f"commit needs a plain reference (repo:tag), not {ref!r}")
        return await run_sync(self._commit_sync, upper, parent, str(parsed), skip, shift)

    def _commit_sync(
        self, upper: str, parent: Image, ref: str, skip: frozenset[str], shift: int
    ) -> Image:
        work = os.path.join(self.root, "tmp", f"commit-{uuid.uuid4().hex[:12]}")
        os.mkdir(work, 0o700)
        try:
            blob = os.path.join(work, "layer.tar")
            diff_id = upper_to_layer(upper, blob, skip, shift)
            size = self._ensure_committed_layer(blob, diff_id, work)
            layers = [*parent.layers, diff_id]
            config = {
                "architecture": "amd64",
                "os": "linux",
                "config": {
                    "Env": parent.env,
                    "WorkingDir": parent.workdir,
                    "User": parent.user,
                    "Labels": {**parent.labels, "rock-serve.committed-from": parent.id},
                },
                "rootfs": {"type": "layers", "diff_ids": layers},
            }
            data = json.dumps(config, sort_keys=True).encode()
            image_id = f"sha256:{hashlib.sha256(data).hexdigest()}"
            img = Image(
                id=image_id,
                manifest_digest="",
                refs=[ref],
                layers=layers,
                layer_sizes=[*parent.layer_sizes, size],
                env=list(parent.env),
                workdir=parent.workdir,
                user=parent.user,
                labels=dict(config["config"]["Labels"]),  # type: ignore[index]
                python=_python_of([self.layer_dir(d) for d in reversed(layers)]),
                last_used=time.time(),
            )
            self._fit(img)
            for other in self._images.values():
                if other.id != img.id and ref in other.refs:
                    other.refs.remove(ref)
                    self._save(other)
            self._save(img)
            self._images[img.id] = img
            self._refs[ref] = img.id
            return img
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _ensure_committed_layer(self, blob: str, diff_id: str, work: str) -> int:
        final = self.layer_dir(diff_id)
        if os.path.isdir(final):
            return self._ensure_layer(work, "", diff_id, work)
        tmp = os.path.join(work, "layer")
        os.mkdir(tmp, 0o755)
        result = unpack_layer(blob, tmp)
        if result["diff_id"] != diff_id:  # pragma: no cover - the tar we just wrote
            raise RegistryUnavailable(f"committed layer changed while unpacking ({diff_id})")
        _write_json(final + ".size", result["size"])
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isdir(final):
                raise
        return int(result["size"])

    # ------------------------------------------------------------------ push

    async def push(self, ref: str, dest: str, auth: RegistryAuth | None = None) -> str:
        """Push the stored image ``ref`` to the registry reference ``dest``; its digest.

        The image stays in use (never evicted) while its layers are written out.
        """
        target = parse_image_ref(dest)  # malformed: InvalidImageReference (422)
        if target.transport != "docker":
            raise InvalidRequest(f"push to a registry reference (host/repo:tag), not {dest!r}")
        if "@" in target.name:
            raise InvalidRequest(f"push to a tag, not a digest: {dest!r}")
        img = self.lookup(ref)
        if img is None:
            raise ImageNotFound(f"no image {ref!r} in this node's store")
        holder = f"push-{uuid.uuid4().hex[:12]}"
        self.acquire(img, holder)
        work = os.path.join(self.root, "tmp", holder)
        os.mkdir(work, 0o700)
        try:
            config = {
                "Env": img.env,
                "WorkingDir": img.workdir,
                "User": img.user,
                "Labels": img.labels,
            }
            insecure = target.loopback or (target.registry in self.config.insecure_registries)
            # before writing anything out: an unreachable registry is a fast typed error
            timeout = self.config.registry_answer_timeout_seconds
            await probe_registry(target, insecure=insecure, timeout=timeout)
            layout = os.path.join(work, "oci")
            kept = [self.kept_blob(lid) for lid in img.layers]
            await run_sync(export_layout, self.layer_dirs(img), config, layout, kept)
            digest = await skopeo_push(
                self.skopeo,
                layout,
                target,
                auth=auth,
                insecure=insecure,
                timeout=self.config.pull_timeout_seconds,
            )
            log.info("image store: pushed %s as %s (%s)", ref, target, digest)
            self.pushes += 1
            return digest
        finally:
            self.release(holder)
            await run_sync(shutil.rmtree, work, True)

    # ------------------------------------------------------------------ budget

    def disk_bytes(self, images: list[Image] | None = None) -> int:
        """Bytes of the unique layers of ``images`` (default: all stored images)."""
        seen: dict[str, int] = {}
        for img in self._images.values() if images is None else images:
            for lid, size in zip(img.layers, img.layer_sizes, strict=True):
                seen[lid] = size
        return sum(seen.values())

    def _fit(self, new: Image) -> None:
        """Evict unused images (LRU) until ``new`` fits the budget; ImageStoreFull if not."""
        budget = self.config.max_bytes
        if not budget:
            return
        others = [i for i in self._images.values() if i.id != new.id]
        while self.disk_bytes([*others, new]) > budget:
            victims = sorted(
                (i for i in others if not self.in_use(i.id)), key=lambda i: i.last_used
            )
            if not victims:
                keep = {lid for i in others for lid in i.layers}
                self._drop_layers(new.layers, keep)
                raise ImageStoreFull(
                    f"image {new.refs[-1] if new.refs else new.id} ({new.size} bytes) does not "
                    f"fit the store's budget of {budget} bytes; images in use cannot be evicted"
                )
            victim = victims[0]
            log.info("image store: evicting %s (%d bytes)", victim.refs, victim.size)
            others.remove(victim)
            self._forget(victim, keep={lid for i in [*others, new] for lid in i.layers})

    def _forget(self, img: Image, keep: set[str]) -> None:
        self._images.pop(img.id, None)
        self._changed()
        for ref in img.refs:
            if self._refs.get(ref) == img.id:
                del self._refs[ref]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.root, "images", f"{_hex(img.id)}.json"))
        self._drop_layers(img.layers, keep)

    def _drop_layers(self, layers: list[str], keep: set[str]) -> None:
        for lid in layers:
            if lid in keep:
                continue
            final = self.layer_dir(lid)
            doomed = os.path.join(self.root, "tmp", f"rm-{uuid.uuid4().hex[:12]}")
            with contextlib.suppress(OSError):
                os.rename(final, doomed)  # gone from view at once, then deleted
                shutil.rmtree(doomed, ignore_errors=True)
            kept = self.kept_blob(lid)
            if kept is not None:
                with contextlib.suppress(OSError):
                    os.unlink(kept[0])
            for suffix in (".size", ".blob.json"):
                with contextlib.suppress(OSError):
                    os.unlink(final + suffix)

    # ------------------------------------------------------------------ list / remove

    def list(self, node: str = "") -> list[ImageInfo]:
        """Every stored image."""
        return [
            ImageInfo(
                node=node,
                refs=list(img.refs),
                id=img.id,
                manifest_digest=img.manifest_digest,
                layers=list(img.layers),
                size_bytes=img.size,
                last_used=img.last_used,
                in_use=self.in_use(img.id),
            )
            for img in sorted(self._images.values(), key=lambda i: -i.last_used)
        ]

    async def remove(self, ref: str) -> Image:
        """Remove the image ``ref`` (a reference or an image id) unless a sandbox uses it."""
        try:
            img = self.lookup(ref)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        if img is None:
            raise ImageNotFound(f"no image {ref!r} in this node's store")
        if self.in_use(img.id):
            raise Conflict(f"image {ref!r} is used by {self.in_use(img.id)} sandbox(es)")
        keep = {lid for i in self._images.values() if i.id != img.id for lid in i.layers}
        await run_sync(self._forget, img, keep)
        return img

    async def close(self) -> None:
        """Cancel pulls in flight."""
        for pull in list(self._pulls.values()):
            if pull.task is not None:
                pull.task.cancel()
                with contextlib.suppress(BaseException):
                    await pull.task
