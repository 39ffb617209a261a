"""configs/launch/kubernetes-indexed-job.yaml against the Kubernetes API schema (the
``kubernetes-validate`` package's OpenAPI-derived JSON schemas, strict: unknown fields
are errors) and the few cross-field facts a schema cannot check."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import REPO

kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (the test extra)")

MANIFEST = REPO / "configs" / "launch" / "kubernetes-indexed-job.yaml"
# Indexed Jobs are GA since 1.24; the oldest schema the package ships and its newest.
VERSIONS = ("1.25", kv.latest_version() if callable(getattr(kv, "latest_version", None)) else "1.30")


def documents() -> list[dict]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_document_is_valid_kubernetes(version):
    docs = documents()
    assert [d["kind"] for d in docs] == ["Service", "Job"]
    for doc in docs:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']} rejected by the {version} schema: {exc.message}")


def test_the_schema_check_rejects_an_unknown_field():
    """The check above can fail: a misspelt field is refused."""
    job = documents()[1]
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")
    with pytest.raises(kv.ValidationError):
        kv.validate(job, VERSIONS[-1], strict=True)


def _flag(args: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    assert len(values) == 1, (name, args)
    return values[0]


def test_ranks_rendezvous_and_gpus_agree():
    """What the schema cannot see: pod i is node rank i, every pod starts at once, the
    rendezvous name resolves through the headless Service, one rank per GPU asked for."""
    service, job = documents()
    spec = job["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    args = container["args"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(_flag(args, "--nnodes"))
    assert _flag(args, "--node-rank") == "$(JOB_COMPLETION_INDEX)"
    # Pod hostnames are <job>-<index>; with subdomain = the Service, <job>-0.<service> resolves.
    assert service["spec"]["clusterIP"] == "None"
    assert pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    assert _flag(args, "--master-addr") == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert int(_flag(args, "--master-port")) in [p["port"] for p in service["spec"]["ports"]]
    assert int(_flag(args, "--nproc-per-node")) == int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert args[args.index("-m") + 1 : args.index("-m") + 3] == ["harness.cli", "run"]
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/results", "/dev/shm"}
    assert any(a in ("--out=/results", "--out") for a in args)
