"""Online scoring (steel.serve.app): unit tests without Ray, then one Ray Serve on the session's local Ray.

The Serve tests share one Serve start (module fixture ``endpoint``) on 127.0.0.1 with a tiny real
bundle (random-weight models, the thresholds of tests/test_scoring.py that make masks visible). The
predictor is the real :class:`steel.model.predictor.BundleCascade` wrapped so that an all-black image raises
(to see a replica error as a 5xx). Serve is shut down by its handle at the end of the module.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest
import requests
from PIL import Image

from steel.core import storage
from steel.core.config import ConfigError, ScoreConfig, ServeConfig, load_config
from steel.data import images as image_io
from steel.model.predictor import BundleCascade
from steel.model.thresholds import bundle_thresholds, save_thresholds
from steel.score import io as score_io
from tests.conftest import free_port
from tests.test_scoring import jpeg_bytes, tiny_models, visible_thresholds

H, W = 256, 1600


def bad_inputs() -> dict[str, bytes]:
    """Files that batch scoring turns into error rows, one per reason."""
    good = jpeg_bytes(99)
    black = np.zeros((H, W), np.uint8)
    png = io.BytesIO()
    Image.fromarray(black, "L").save(png, "PNG")
    return {
        "empty.jpg": b"",
        "text.jpg": b"this is not a jpeg at all",
        "truncated.jpg": good[: len(good) // 3],
        "small.jpg": jpeg_bytes(5, size=(800, 128)),
        "png.jpg": png.getvalue(),
        "cmyk.jpg": jpeg_bytes(7, mode="CMYK"),
    }


class FailOnBlack:
    """The real cascade, except that an all-black image raises (a replica error on demand)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def predict(self, images):
        images = np.asarray(images)
        if (images.reshape(len(images), -1).max(axis=1) == 0).any():
            raise RuntimeError("black image")
        return self.inner.predict(images)


class FailOnBlackCascade(BundleCascade):
    """:class:`steel.model.predictor.BundleCascade` whose cascade raises on an all-black image."""

    def __call__(self):
        return FailOnBlack(super().__call__())


def black_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((H, W), np.uint8), "L").save(buf, "JPEG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Unit tests (no Ray)
# --------------------------------------------------------------------------------------------

class Echo:
    """Stand-in predictor: p_defect = mean brightness / 255; no masks."""

    def predict(self, images):
        return [{"p_defect": float(img.mean() / 255), "p_class": [np.nan] * 4, "masks": [""] * 4,
                 "areas": [0] * 4} for img in np.asarray(images)]


def test_scorer_decodes_like_batch_scoring_and_limits_size():
    from steel.serve.scorer import RequestError, Scorer

    scorer = Scorer(Echo, "v1", ScoreConfig(), max_image_bytes=1_000_000)
    for name, data in bad_inputs().items():
        with pytest.raises(RequestError) as e:
            scorer.decode(data)
        with pytest.raises(image_io.BadImage) as batch:
            image_io.decode(data)
        assert (e.value.status, e.value.reason) == (422, str(batch.value)), name
    big = b"\xff" * 1_000_001
    with pytest.raises(RequestError) as e:
        scorer.decode(big)
    assert e.value.status == 413 and "1000001 bytes" in e.value.reason
    image = scorer.decode(jpeg_bytes(1))
    [answer] = scorer.score(["a.jpg"], [image])
    assert answer["ImageId"] == "a.jpg" and answer["bundle_version"] == "v1"
    assert answer["p_defect"] == pytest.approx(image.mean() / 255)
    assert [c["ClassId"] for c in answer["classes"]] == [1, 2, 3, 4]
    assert all(c["p_class"] is None and c["EncodedPixels"] == "" and c["area"] == 0 for c in answer["classes"])
    json.dumps(answer, allow_nan=False)  # NaN became null


def test_parse_batch_body_errors():
    from steel.serve.scorer import RequestError, parse_batch_body

    ok = {"images": [{"id": "a", "jpeg_b64": base64.b64encode(b"xy").decode()}, {"jpeg_b64": ""}]}
    assert parse_batch_body(json.dumps(ok).encode(), 4) == [("a", b"xy"), ("image-1", b"")]
    cases = [
        (b"not json", 400, "not JSON"),
        (b'{"images": []}', 400, "at least one image"),
        (b'{"images": [{"id": "a"}]}', 400, "images[0]"),
        (json.dumps({"images": [{"id": "a", "jpeg_b64": "%%%"}]}).encode(), 400, "not base64"),
        (json.dumps({"images": [{"id": "a", "jpeg_b64": ""}] * 2}).encode(), 400, "given twice"),
        (json.dumps({"images": [{"jpeg_b64": ""}] * 5}).encode(), 413, "limit is 4"),
    ]
    for body, status, words in cases:
        with pytest.raises(RequestError) as e:
            parse_batch_body(body, 4)
        assert e.value.status == status and words in e.value.reason, (body, e.value.reason)


def test_serve_config_checks():
    cfg = load_config(None, ["serve.max_batch_size=4", "serve.autoscaling={min_replicas: 1, max_replicas: 3}"])
    assert cfg.serve.max_batch_size == 4 and cfg.serve.autoscaling.max_replicas == 3
    assert cfg.serve.host == "127.0.0.1"
    for bad, words in [("serve.max_batch_size=0", "max_batch_size"), ("serve.route_prefix=score", "route_prefix"),
                       ("serve.autoscaling={min_replicas: 3, max_replicas: 2}", "min_replicas"),
                       ("serve.replica=2", "did you mean 'replicas'")]:
        with pytest.raises(ConfigError, match=words):
            load_config(None, [bad])


# --------------------------------------------------------------------------------------------
# One Ray Serve for the rest of the module
# --------------------------------------------------------------------------------------------

N_GOOD = 6


@pytest.fixture(scope="module")
def endpoint(ray_local, tmp_path_factory):
    """Serve on 127.0.0.1 with a tiny real bundle; yields a dict of what the tests need."""
    import ray.cloudpickle
    from ray import serve

    from steel.model import bundle as bundle_lib
    from steel.serve import app as serving

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    root = tmp_path_factory.mktemp("serve")
    images, bundle = root / "images", str(root / "bundle")
    images.mkdir()
    names = [f"t{i}.jpg" for i in range(N_GOOD)]
    for i, name in enumerate(names):
        (images / name).write_bytes(jpeg_bytes(i))
    for name, data in bad_inputs().items():
        (images / name).write_bytes(data)
    built, specs = tiny_models()
    decoded = np.stack([image_io.decode((images / n).read_bytes()) for n in names])
    bundle_lib.save_bundle(bundle, built, specs, {"test": "tiny"})
    save_thresholds(bundle, visible_thresholds(built, specs, decoded))
    thresholds = bundle_thresholds(bundle)

    cfg = ServeConfig(port=free_port(), route_prefix="/steel", max_batch_size=4, batch_wait_timeout_s=0.05,
                      max_image_bytes=300_000, request_timeout_s=60)
    serving.start(cfg)
    t0 = time.time()
    handle = serving.run(serving.build_app(bundle, ScoreConfig(), cfg, thresholds, predictor=FailOnBlackCascade), cfg)
    deploy_s = time.time() - t0
    try:
        yield {"url": f"http://127.0.0.1:{cfg.port}/steel", "port": cfg.port, "cfg": cfg, "bundle": bundle,
               "images": images, "names": names, "root": root, "handle": handle, "thresholds": thresholds,
               "deploy_s": deploy_s}
    finally:
        serve.delete(cfg.app_name)
        serve.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.mark.slow
@pytest.mark.timeout(400)  # includes the module's Serve start (setup)
def test_ready_health_and_routes(endpoint):
    from steel.model.bundle import resolve_bundle

    url = endpoint["url"]
    ready = requests.get(f"{url}/ready", timeout=30)
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["ready"] is True and body["bundle"]["version"] == resolve_bundle(endpoint["bundle"]).version
    assert body["warmup_s"] > 0
    assert {"decoded", "decode_s", "score_s"} <= set(body)
    assert requests.get(f"{url}/healthz", timeout=30).json() == {"status": "ok"}
    assert requests.get(f"{url}/score", timeout=30).status_code == 405
    missing = requests.get(f"{url}/nope", timeout=30)
    assert missing.status_code == 404 and "POST /score" in missing.json()["error"]


def _listeners(port: int) -> set[str]:
    """Addresses listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:
                if len(addr) == 8:
                    found.add(".".join(str(b) for b in bytes.fromhex(addr)[::-1]))
                else:
                    found.add(addr)
    return found


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_listens_only_on_loopback(endpoint):
    assert _listeners(endpoint["port"]) == {"127.0.0.1"}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_answers_equal_batch_scoring_rows_and_error_reasons(endpoint, tmp_path):
    """The endpoint and ``steel.score.run.score`` give the same rows and the same error reasons."""
    from steel.score import run as scoring
    from steel.serve.scorer import json_rows

    url, images, names = endpoint["url"], endpoint["images"], endpoint["names"]
    out = str(tmp_path / "scores")
    summary = scoring.score(endpoint["bundle"], str(images), out,
                            ScoreConfig(format="parquet", batch_size=4, images_per_shard=4, settle_s=0))
    assert summary["scored"] == N_GOOD and summary["errors"] == len(bad_inputs())
    batch_rows = pd.concat([score_io.read_rows_file(u) for u in score_io.complete_shards(out).values()])
    batch_errors = pd.concat([score_io.read_errors_file(u) for u in storage.list_files(storage.join(out, "errors"))])
    batch_errors = dict(zip(batch_errors["ImageId"], batch_errors["reason"]))

    # Single-image requests, concurrently (so serve.batch groups them), good and bad mixed.
    files = sorted(p.name for p in images.iterdir())

    def post(name):
        return name, requests.post(f"{url}/score", params={"id": name}, data=(images / name).read_bytes(), timeout=60)

    with cf.ThreadPoolExecutor(8) as pool:
        answers = dict(pool.map(post, files))
    online = []
    for name in names:
        r = answers[name]
        assert r.status_code == 200, r.text
        online.extend(json_rows(r.json()))
    for name, reason in batch_errors.items():
        r = answers[name]
        assert r.status_code == 422, (name, r.text)
        assert r.json() == {"ImageId": name, "error": reason, "status": 422}
    # The batch form gives the same answers.
    body = {"images": [{"id": n, "jpeg_b64": base64.b64encode((images / n).read_bytes()).decode()} for n in names]}
    r = requests.post(f"{url}/score/batch", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["bundle"]["version"] == answers[names[0]].json()["bundle_version"]
    via_batch = [row for a in r.json()["results"] for row in json_rows(a)]

    cols = ["ImageId", "ClassId", "EncodedPixels", *score_io.EXTRA_COLUMNS]
    expect = batch_rows[cols].sort_values(["ImageId", "ClassId"]).reset_index(drop=True)
    assert (expect["EncodedPixels"] != "").any()  # the thresholds make masks: the comparison means something
    for rows in (online, via_batch):
        got = pd.DataFrame(rows)[cols].sort_values(["ImageId", "ClassId"]).reset_index(drop=True)
        pd.testing.assert_frame_equal(got[["ImageId", "ClassId", "EncodedPixels"]],
                                      expect[["ImageId", "ClassId", "EncodedPixels"]], check_dtype=False)
        for c in score_io.EXTRA_COLUMNS:
            # TensorFlow's CPU kernels may round differently for another batch composition.
            np.testing.assert_allclose(got[c].to_numpy(float), expect[c].to_numpy(float), rtol=1e-5, atol=1e-6,
                                       err_msg=c)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_limits_bad_batches_and_replica_errors(endpoint):
    url, cfg = endpoint["url"], endpoint["cfg"]
    before = requests.get(f"{url}/ready", timeout=30).json()
    # Oversized: refused by Content-Length, and while streaming when the client sends no length.
    big = b"\xff\xd8" + b"\0" * cfg.max_image_bytes
    r = requests.post(f"{url}/score", data=big, timeout=30)
    assert r.status_code == 413 and "over the limit" in r.json()["error"]
    r = requests.post(f"{url}/score", data=iter([big[:100_000]] * 4), timeout=30)  # chunked, no length
    assert r.status_code == 413 and "over the limit" in r.json()["error"]
    r = requests.post(f"{url}/score/batch", data=b"{not json", timeout=30)
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    # A replica error is a 500 with the reason; the good image of the same batch is still answered.
    good = jpeg_bytes(1)
    body = {"images": [{"id": "black.jpg", "jpeg_b64": base64.b64encode(black_jpeg()).decode()},
                       {"id": "good.jpg", "jpeg_b64": base64.b64encode(good).decode()},
                       {"id": "empty.jpg", "jpeg_b64": ""}]}
    r = requests.post(f"{url}/score/batch", json=body, timeout=60)
    assert r.status_code == 500, r.text
    black, ok, empty = r.json()["results"]
    assert black["status"] == 500 and black["error"] == "scoring failed: RuntimeError: black image"
    assert ok["ImageId"] == "good.jpg" and len(ok["classes"]) == 4
    assert empty == {"ImageId": "empty.jpg", "error": "empty file (0 bytes)", "status": 422}
    r = requests.post(f"{url}/score", params={"id": "black.jpg"}, data=black_jpeg(), timeout=60)
    assert r.status_code == 500 and "black image" in r.json()["error"]
    after = requests.get(f"{url}/ready", timeout=30)
    assert after.status_code == 200  # the replica lives on
    # Only the black and the good image reached the cascade (twice the black one): refused bodies never do;
    # the empty one was decoded (and refused), the oversized and malformed bodies were not.
    assert after.json()["images"] - before["images"] == 3
    assert after.json()["decoded"] - before["decoded"] == 4


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_new_bundle_version_rolls_out_without_dropping_requests(endpoint):
    """Deploying a new bundle version under load: every request is answered, by the old or the new one."""
    from steel.model.bundle import read_manifest, resolve_bundle
    from steel.serve import app as serving

    old = endpoint["bundle"]
    new = str(endpoint["root"] / "bundle-v2")
    for uri in storage.list_files(old):
        storage.write_bytes(storage.join(new, storage.basename(uri)), storage.read_bytes(uri))
    manifest = read_manifest(new)
    manifest["version"] = "v2"
    storage.write_text(storage.join(new, "manifest.json"), json.dumps(manifest))
    v1, v2 = resolve_bundle(old).version, "v2"

    url, data = endpoint["url"], jpeg_bytes(3)
    results: list = []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            try:
                r = requests.post(f"{url}/score", params={"id": "x.jpg"}, data=data, timeout=120)
                results.append((r.status_code, r.json().get("bundle_version")))
            except Exception as e:  # noqa: BLE001 - a dropped request is what this test looks for
                results.append((None, repr(e)))

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        cfg = endpoint["cfg"]
        serving.run(serving.build_app(new, ScoreConfig(), cfg, endpoint["thresholds"], predictor=FailOnBlackCascade),
                    cfg)
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=150)
    codes = [c for c, _ in results]
    versions = [v for _, v in results]
    assert codes and all(c == 200 for c in codes), [r for r in results if r[0] != 200][:5]
    assert versions[0] == v1 and versions[-1] == v2 and set(versions) == {v1, v2}
    r = requests.get(f"{url}/ready", timeout=30)
    assert r.json()["bundle"]["version"] == v2


# --------------------------------------------------------------------------------------------
# Serve configs: configs/serve/quickstart.yaml and the RayService's serveConfigV2 (no Ray started)
# --------------------------------------------------------------------------------------------

def _serve_configs() -> dict[str, dict]:
    import yaml

    from tests.conftest import REPO

    out = {"configs/serve/quickstart.yaml": yaml.safe_load((REPO / "configs" / "serve" / "quickstart.yaml").read_text())}
    for doc in yaml.safe_load_all((REPO / "infra" / "kuberay" / "rayservice.yaml").read_text()):
        if doc and doc["kind"] == "RayService":
            out["rayservice.yaml"] = yaml.safe_load(doc["spec"]["serveConfigV2"])
    return out


def serve_config_errors(config: dict) -> list[str]:
    """What Serve would refuse (its schema; unknown deployment keys, which the schema lets through) and
    what our builder would refuse (import path, deployment name, args, the steel config they name)."""
    import importlib

    from ray.serve.schema import DeploymentSchema, ServeDeploySchema

    from steel.serve import app as serving
    from tests.conftest import REPO

    try:
        ServeDeploySchema.model_validate(config)
    except Exception as e:  # noqa: BLE001
        return [f"schema: {e}"]
    errors = []
    for app in config["applications"]:
        module, _, attr = app["import_path"].partition(":")
        if getattr(importlib.import_module(module), attr, None) is not serving.app_builder:
            errors.append(f"{app['import_path']}: not steel.serve.app:app_builder")
        for d in app.get("deployments", []):
            unknown = set(d) - set(DeploymentSchema.model_fields)
            if unknown:
                errors.append(f"deployment {d.get('name')}: unknown keys {sorted(unknown)}")
            if d.get("name") != serving.DEPLOYMENT:
                errors.append(f"deployment {d.get('name')!r}: the application has only {serving.DEPLOYMENT}")
        args = app.get("args", {})
        unknown = set(args) - {"bundle", "config", "thresholds", "set"}
        if unknown or not args.get("bundle"):
            errors.append(f"args: unknown {sorted(unknown)} or no bundle")
        config_path = str(args.get("config", "")).replace("/home/ray/steel/", "")  # the image's copy of the repo
        try:
            load_config(str(REPO / config_path) if config_path else None, args.get("set") or [])
        except Exception as e:  # noqa: BLE001
            errors.append(f"args.config: {e}")
    return errors


@pytest.mark.parametrize("name", ["configs/serve/quickstart.yaml", "rayservice.yaml"])
def test_serve_configs_pass_serve_schema_and_the_builder(name):
    config = _serve_configs()[name]
    assert not serve_config_errors(config)
    assert config["http_options"]["host"] == ("127.0.0.1" if name.startswith("configs") else "0.0.0.0")


@pytest.mark.parametrize("breakage, words", [
    (lambda c: c["applications"][0]["deployments"][0].update(num_replica=2), "unknown keys"),
    (lambda c: c["applications"][0]["deployments"][0].update(name="Endpoint"), "has only"),
    (lambda c: c["applications"][0].update(import_path="steel.serve.app:build_app"), "not steel.serve.app"),
    (lambda c: c["applications"][0]["args"].update(set=["serve.max_batch=4"]), "did you mean"),
    (lambda c: c.update(http_options={"port": "eighty"}), "schema"),
])
def test_serve_config_check_catches_mistakes(breakage, words):
    config = _serve_configs()["configs/serve/quickstart.yaml"]
    breakage(config)
    assert any(words in e for e in serve_config_errors(config)), serve_config_errors(config)


def test_cli_flags_reach_the_serve_config(tmp_path, monkeypatch, capsys):
    import contextlib

    from steel.cli import main
    from steel.core import ray_session
    from steel.serve import app as serving

    seen = {}
    monkeypatch.setattr(ray_session, "ray_session", lambda address=None: contextlib.nullcontext())
    monkeypatch.setattr(serving, "start", lambda cfg: seen.update(started=cfg))
    monkeypatch.setattr(serving, "build_app", lambda bundle, score_cfg, serve_cfg, thresholds=None:
                        seen.update(bundle=bundle, score=score_cfg, serve=serve_cfg, thresholds=thresholds) or "app")
    monkeypatch.setattr(serving, "run", lambda app, cfg: seen.update(app=app))
    config = tmp_path / "c.yaml"
    config.write_text("bundle: /b\nscore:\n  tta: hv\nserve:\n  port: 9001\n  replicas: 3\n")
    rc = main(["serve", "--config", str(config), "--max-batch-size", "4", "--batch-wait-s", "0.05",
               "--gpus-per-replica", "0.5", "--set", "serve.max_image_bytes=1000", "--detach"])
    assert rc == 0
    cfg = seen["serve"]
    assert seen["started"] is cfg and seen["app"] == "app" and seen["bundle"] == "/b"
    assert (cfg.port, cfg.replicas, cfg.max_batch_size, cfg.batch_wait_timeout_s, cfg.gpus_per_replica,
            cfg.max_image_bytes, cfg.host) == (9001, 3, 4, 0.05, 0.5, 1000, "127.0.0.1")
    assert seen["score"].tta == "hv"
    assert "http://127.0.0.1:9001/score" in capsys.readouterr().out
    assert main(["serve", "--config", str(config), "--max-batch-size", "0", "--detach"]) == 2
    assert "max_batch_size" in capsys.readouterr().err


def test_app_builder_reads_bundle_config_and_overrides(tmp_path):
    """What `serve run/deploy` calls: the bundle's thresholds and version, score.* and serve.* settings."""
    from steel.model import bundle as bundle_lib
    from steel.model.thresholds import default_thresholds
    from steel.serve import app as serving
    from tests.conftest import REPO

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"format_version": 1, "created_at": "2026-01-01T00:00:00Z",
                                                      "updated_at": "2026-01-02T00:00:00Z", "models": {}}))
    th = default_thresholds()
    th["binary"], th["tta"] = 0.25, "h"
    save_thresholds(str(bundle), th)
    app = serving.app_builder({"bundle": str(bundle), "config": str(REPO / "configs" / "quickstart.yaml"),
                               "set": ["serve.autoscaling={min_replicas: 1, max_replicas: 3}", "serve.gpus_per_replica=1"]})
    d = app._bound_deployment
    factory, uri, version, score_cfg, serve_cfg = d.init_args
    # The version batch scoring records for this bundle (a direct folder: a hash of weights and thresholds).
    assert (uri, version) == (str(bundle), bundle_lib.resolve_bundle(str(bundle)).version)
    assert version.startswith("b-")
    assert factory.thresholds["binary"] == 0.25 and factory.tta == "h" == score_cfg.tta  # tuned TTA, as batch
    assert factory.threads is None  # GPU replicas keep TensorFlow's default pools
    assert d.ray_actor_options["num_gpus"] == 1 and d._deployment_config.autoscaling_config.max_replicas == 3
    assert serve_cfg.max_batch_size == 8  # the default
    assert d._deployment_config.logging_config["enable_access_log"] is False  # serve.access_log's default
    with pytest.raises(ValueError, match="unknown args"):
        serving.app_builder({"bundle": str(bundle), "replicas": 2})
    with pytest.raises(FileNotFoundError, match="not a model bundle"):
        serving.app_builder({"bundle": str(tmp_path / "nothing")})
