"""Online scoring: the batch-scoring cascade behind a Ray Serve HTTP endpoint.

One deployment (``SteelEndpoint``) per application; each replica loads the bundle once, warms every
model up, and answers (paths under the application's ``route_prefix``)::

    POST /score?id=NAME        body: one JPEG (raw bytes)          -> 200 one result
    POST /score/batch          body: {"images": [{"id": NAME, "jpeg_b64": BASE64}, ...]}
                                                                   -> 200 {"bundle": ..., "results": [...]}
    GET  /healthz              the replica answers                 -> 200
    GET  /ready                models loaded and warmed up         -> 200 (with counters), else 503

A result is ``{"ImageId", "p_defect", "classes": [{"ClassId", "p_class", "EncodedPixels", "area"} x 4],
"bundle_version"}``: the very rows batch scoring writes (``p_class`` is null where the binary gate
stopped the image, as NaN in the parquet shards).

**Same answers as ``steel score``** (:mod:`steel.serve.scorer`). Images are decoded by :func:`steel.data.images.decode` and
scored by :class:`steel.score.stages.CascadeActor` around :class:`steel.model.predictor.BundleCascade`, with
thresholds and TTA resolved as batch scoring does (the bundle's ``thresholds.json``, ``score.tta``,
``score.allow_resize``, ``score.image_formats``); rows come from :func:`steel.score.io.result_rows`.

**Batching.** Each JPEG is decoded in a worker thread as its request arrives (libjpeg releases the
GIL, so decoding overlaps the cascade); concurrent requests are then grouped by ``serve.batch``
(``serve.max_batch_size``, ``serve.batch_wait_timeout_s``) into one cascade call, run in a worker
thread so the replica keeps answering health checks meanwhile. ``/ready`` counts cascade calls,
images, decoded images and the wall time spent decoding and in the cascade. ``serve.access_log``
(default off) is Serve's log line per request in the proxy and the replica.

**Errors.** A body over ``serve.max_image_bytes`` is refused with 413 before it is read in full (by its
Content-Length when given, else while streaming); an image batch scoring would give an error row
gets 422 with the same reason (empty, truncated, not an image, wrong format/mode/size); a failure of
the cascade is a 500 with its reason, and a request that takes longer than ``serve.request_timeout_s``
a 504: never a hang. In the batch form every image has an entry (``error`` and ``status`` for the
failed ones); the response's status is 200 when all were scored, else the first failure's.

**New bundle versions.** The bundle URI is a constructor argument, so deploying the application
again with another bundle (``steel serve --bundle NEW``, or ``serve deploy`` with a changed
``args.bundle``) makes Serve start replicas of the new version and retire the old ones gracefully:
requests in flight finish on the old replicas, new ones wait in Serve's queue until a replica of
either version can take them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, Callable

import numpy as np

from steel.core import s3
from steel.core.config import ScoreConfig, ServeConfig
from steel.model import thresholds as th
from steel.model.bundle import resolve_bundle
from steel.model.predictor import BundleCascade
from steel.serve.scorer import RequestError, Scorer, parse_batch_body

log = logging.getLogger(__name__)

DEPLOYMENT = "SteelEndpoint"



# --------------------------------------------------------------------------------------------
# The Serve application
# --------------------------------------------------------------------------------------------

def _endpoint_class():
    """The Serve deployment class (built here so that importing this module does not import Ray)."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    class SteelEndpoint:
        def __init__(self, factory: Callable[[], Any], bundle_uri: str, version: str, score_cfg: ScoreConfig,
                     serve_cfg: ServeConfig):
            self.bundle = {"uri": bundle_uri, "version": version}
            self.cfg = serve_cfg
            self.ready = False
            self._score_batch.set_max_batch_size(serve_cfg.max_batch_size)
            self._score_batch.set_batch_wait_timeout_s(serve_cfg.batch_wait_timeout_s)
            self.scorer = Scorer(factory, version, score_cfg, serve_cfg.max_image_bytes)
            self.ready = True
            log.info("replica ready: bundle %s (%s), load %.1f s, warm-up %.1f s", bundle_uri, version,
                     self.scorer.load_s, self.scorer.warmup_s)

        def check_health(self) -> None:  # Serve's periodic health check
            if not self.ready:
                raise RuntimeError("models not loaded")

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
        async def _score_batch(self, items: list[tuple[str, np.ndarray]]) -> list:
            ids = [i for i, _ in items]
            images = [img for _, img in items]
            try:
                return await asyncio.to_thread(self.scorer.score, ids, images)
            except Exception as e:  # noqa: BLE001 - every request of the batch gets the reason
                err = RequestError(500, f"scoring failed: {type(e).__name__}: {e}")
                return [err] * len(items)

        async def _score_one(self, image_id: str, data: bytes) -> dict | RequestError:
            try:
                # In a worker thread (libjpeg releases the GIL): requests decode while a batch is
                # scored, and the event loop keeps taking requests, so batches fill.
                image = await asyncio.to_thread(self.scorer.decode, data)
            except RequestError as e:
                return e
            try:
                return await asyncio.wait_for(self._score_batch((image_id, image)), self.cfg.request_timeout_s)
            except asyncio.TimeoutError:
                return RequestError(504, f"scoring took longer than {self.cfg.request_timeout_s} s")

        async def _read_body(self, request: Request, limit: int) -> bytes:
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                raise RequestError(413, f"body of {length} bytes is over the limit of {limit} bytes")
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise RequestError(413, f"body is over the limit of {limit} bytes")
            return bytes(body)

        @staticmethod
        def _error(e: RequestError, image_id: str | None = None) -> dict:
            out = {"error": e.reason, "status": e.status}
            return {"ImageId": image_id, **out} if image_id is not None else out

        async def __call__(self, request: Request):
            path = request.scope.get("path", "/")
            root = request.scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root):]
            path = "/" + path.strip("/")
            try:
                if path == "/healthz" and request.method == "GET":
                    return JSONResponse({"status": "ok"})
                if path == "/ready" and request.method == "GET":
                    body = {"ready": self.ready, "bundle": self.bundle,
                            "load_s": round(self.scorer.load_s, 3), "warmup_s": round(self.scorer.warmup_s, 3),
                            "batches": self.scorer.batches, "images": self.scorer.images,
                            "decoded": self.scorer.decoded, "decode_s": round(self.scorer.decode_s, 3),
                            "score_s": round(self.scorer.score_s, 3)}
                    return JSONResponse(body, status_code=200 if self.ready else 503)
                if path == "/score" and request.method == "POST":
                    image_id = request.query_params.get("id") or "image"
                    data = await self._read_body(request, self.cfg.max_image_bytes)
                    answer = await self._score_one(image_id, data)
                    if isinstance(answer, RequestError):
                        return JSONResponse(self._error(answer, image_id), status_code=answer.status)
                    return JSONResponse(answer)
                if path == "/score/batch" and request.method == "POST":
                    limit = self.cfg.max_images_per_request * (self.cfg.max_image_bytes * 4 // 3 + 256) + 1024
                    items = parse_batch_body(await self._read_body(request, limit), self.cfg.max_images_per_request)
                    answers = await asyncio.gather(*(self._score_one(i, d) for i, d in items))
                    results, status = [], 200
                    for (image_id, _), a in zip(items, answers):
                        if isinstance(a, RequestError):
                            results.append(self._error(a, image_id))
                            status = a.status if status == 200 else status
                        else:
                            results.append(a)
                    return JSONResponse({"bundle": self.bundle, "results": results}, status_code=status)
                known = {"/healthz": "GET", "/ready": "GET", "/score": "POST", "/score/batch": "POST"}
                if path in known:
                    return JSONResponse({"error": f"{path} takes {known[path]}"}, status_code=405)
                return JSONResponse({"error": f"no route {path}; routes: " + ", ".join(f"{m} {p}" for p, m in
                                                                                   known.items())}, status_code=404)
            except RequestError as e:
                return JSONResponse(self._error(e), status_code=e.status)
            except Exception as e:  # noqa: BLE001 - a 5xx with the reason, never a dropped connection
                log.exception("request failed")
                return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}", "status": 500},
                                    status_code=500)

    SteelEndpoint.__name__ = SteelEndpoint.__qualname__ = DEPLOYMENT
    return SteelEndpoint


def build_app(bundle_uri: str, score_cfg: ScoreConfig | None = None, serve_cfg: ServeConfig | None = None,
              thresholds: dict | str | None = None, *, predictor: Callable[..., Callable[[], Any]] = BundleCascade,
              endpoint: str | None = None):
    """The Serve application for ``bundle_uri`` (deploy it with ``serve.run`` or :func:`run`).

    The bundle, its thresholds and the TTA are resolved as :func:`steel.score.run.score` does;
    ``serve_cfg`` sets replicas (or autoscaling), CPUs/GPUs per replica, batching and limits.
    ``predictor``: the factory class each replica's predictor comes from (batch scoring's:
    :class:`steel.model.predictor.BundleCascade`). ``endpoint``: the S3 endpoint replicas use.
    """
    from ray import serve

    from steel.core.keras_env import runtime_env

    score_cfg = score_cfg or ScoreConfig()
    serve_cfg = serve_cfg or ServeConfig()
    resolved = resolve_bundle(bundle_uri)
    uri, version = resolved.uri, resolved.version
    used = th.resolve(uri, thresholds)
    tta = score_cfg.tta if score_cfg.tta is not None else used.get("tta", "none")
    score_cfg = dataclasses.replace(score_cfg, tta=tta)
    # As batch scoring's actors: CPU replicas sharing a node get TF pools of their CPU share;
    # a single replica keeps TensorFlow's default (the whole machine).
    shared = serve_cfg.autoscaling is not None or serve_cfg.replicas > 1
    threads = max(1, int(serve_cfg.cpus_per_replica)) if serve_cfg.gpus_per_replica == 0 and shared else None
    factory = predictor(uri, used, tta, endpoint=endpoint or s3.current_endpoint(), threads=threads)
    actor_options: dict = {"num_cpus": serve_cfg.cpus_per_replica, "runtime_env": runtime_env()}
    if serve_cfg.gpus_per_replica > 0:
        actor_options["num_gpus"] = serve_cfg.gpus_per_replica
    options: dict = {"ray_actor_options": actor_options, "max_ongoing_requests": serve_cfg.max_ongoing_requests,
                     "logging_config": {"enable_access_log": serve_cfg.access_log},
                     # a retiring replica (new bundle, scale-down) first finishes what it holds
                     "graceful_shutdown_timeout_s": serve_cfg.request_timeout_s + 10}
    if serve_cfg.autoscaling is not None:
        options["autoscaling_config"] = dataclasses.asdict(serve_cfg.autoscaling)
    else:
        options["num_replicas"] = serve_cfg.replicas
    deployment = serve.deployment(_endpoint_class(), name=DEPLOYMENT, **options)
    return deployment.bind(factory, uri, version, score_cfg, serve_cfg)


def app_builder(args: dict):
    """Application builder for ``serve run`` / ``serve deploy`` (``import_path: steel.serve.app:app_builder``).

    ``args``: ``bundle`` (URI, required), ``config`` (a steel YAML config for ``score.*`` and
    ``serve.*``; optional), ``thresholds`` (URI; optional), ``set`` (a list of ``key=value``
    overrides; optional). Replicas and resources may also be overridden in the Serve config's
    ``deployments`` section, which Serve applies on top.
    """
    from steel.core.config import load_config

    args = dict(args or {})
    unknown = sorted(set(args) - {"bundle", "config", "thresholds", "set"})
    if unknown:
        raise ValueError(f"steel.serve.app:app_builder: unknown args {unknown}; known: bundle, config, thresholds, set")
    overrides = args.get("set") or []
    cfg = load_config(args.get("config"), list(overrides) if isinstance(overrides, list) else [str(overrides)])
    bundle = args.get("bundle") or cfg.bundle
    if cfg.storage_endpoint:
        s3.set_endpoint(cfg.storage_endpoint)
    return build_app(bundle, cfg.score, cfg.serve, args.get("thresholds"))


def start(serve_cfg: ServeConfig) -> None:
    """Start Serve's HTTP proxy on ``serve.host:serve.port`` (Ray must be initialised)."""
    from ray import serve

    serve.start(http_options={"host": serve_cfg.host, "port": serve_cfg.port,
                              "request_timeout_s": serve_cfg.request_timeout_s + 5},
                logging_config={"enable_access_log": serve_cfg.access_log})


def run(app, serve_cfg: ServeConfig):
    """Deploy (or update in place) the application; returns its handle once every replica is ready."""
    from ray import serve

    return serve.run(app, name=serve_cfg.app_name, route_prefix=serve_cfg.route_prefix)


__all__ = ["build_app", "app_builder", "start", "run", "DEPLOYMENT"]
