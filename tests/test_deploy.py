"""deploy/'s Kubernetes manifests: valid against Kubernetes' own schemas, the TF_CONFIG the
training Job builds as capstf reads it, and the paths and names the manifests share agreeing."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import kubernetes_validate
import pytest
import tensorflow as tf
import yaml

from capstf.cli import main as cli
from capstf.train import is_chief

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
# Job's podFailurePolicy is GA from 1.31; check every release from there to the newest the validator knows.
KUBERNETES_VERSIONS = ["1.31", "1.33", "1.35", "1.37"]


def resources(name):
    return {(r["kind"], r["metadata"]["name"]): r for r in yaml.safe_load_all((DEPLOY / name).read_text())}


def container(resource):
    [c] = resource["spec"]["template"]["spec"]["containers"]
    return c


def mounts(resource, c):
    """{mount path: (claim, subPath)} of a pod template's volume mounts that are PVCs."""
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for v in resource["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v}
    return {m["mountPath"]: (claims[m["name"]], m.get("subPath", "")) for m in c["volumeMounts"] if m["name"] in claims}


def flag(args, name):
    return args[args.index(name) + 1]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_are_valid_kubernetes(version):
    built_in = [r for f in sorted(DEPLOY.glob("*.yaml")) for r in yaml.safe_load_all(f.read_text())
                if r["apiVersion"] != "serving.kserve.io/v1beta1"]  # KServe's CRD schema is not in the validator
    assert {r["kind"] for r in built_in} == {"PersistentVolumeClaim", "Service", "Job", "Deployment"}
    for r in built_in:
        kubernetes_validate.validate(r, version, strict=True)  # strict: an unknown (misspelt) field fails


def test_strict_validation_rejects_a_misspelt_field():
    job = resources("train.yaml")[("Job", "capstf-train")]
    container(job)["volumeMount"] = container(job).pop("volumeMounts")
    with pytest.raises(kubernetes_validate.ValidationError, match="volumeMount"):
        kubernetes_validate.validate(job, KUBERNETES_VERSIONS[-1], strict=True)


def tf_config_of_pod(job, index):
    """Runs the Job's container command as its pod would, with the pod's index, up to the exec of
    its args, which here print the TF_CONFIG the command exported."""
    c = container(job)
    env = {e["name"]: e["value"] for e in c["env"]}
    printer = [sys.executable, "-c", "import os; print(os.environ['TF_CONFIG'])"]
    return subprocess.run(c["command"] + printer, env={**env, "JOB_COMPLETION_INDEX": str(index)},
                          capture_output=True, text=True, check=True).stdout


def test_training_job_builds_the_tf_config_of_each_worker():
    job = resources("train.yaml")[("Job", "capstf-train")]
    service = resources("train.yaml")[("Service", "capstf-train")]
    spec, c = job["spec"], container(job)
    workers = spec["completions"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] == workers == 2
    assert service["spec"]["clusterIP"] == "None" and spec["template"]["spec"]["subdomain"] == "capstf-train"
    assert service["spec"]["selector"] == {"job-name": "capstf-train"}  # the label the Job sets on its pods
    port = c["ports"][0]["containerPort"]
    # An Indexed Job's pod INDEX is named JOB-INDEX; under the headless Service its DNS name is
    # JOB-INDEX.SUBDOMAIN: the addresses every worker must list, in index order.
    addresses = [f"capstf-train-{i}.capstf-train:{port}" for i in range(workers)]
    chiefs = []
    for index in range(workers):
        os.environ["TF_CONFIG"] = tf_config_of_pod(job, index)
        try:
            json.loads(os.environ["TF_CONFIG"])  # valid JSON, or the resolver below would fail less clearly
            resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()  # what MultiWorkerMirroredStrategy reads
            assert resolver.cluster_spec().as_dict() == {"worker": addresses}
            assert (resolver.task_type, resolver.task_id) == ("worker", index)
            chiefs.append(is_chief(SimpleNamespace(cluster_resolver=resolver)))
        finally:
            del os.environ["TF_CONFIG"]
    assert chiefs == [True] + [False] * (workers - 1)  # worker 0 alone writes checkpoints and logs


def test_training_job_runs_capstf_train_multi_worker_and_survives_a_sigterm_checkpoint():
    job = resources("train.yaml")[("Job", "capstf-train")]
    c, pod = container(job), job["spec"]["template"]["spec"]
    args = c["args"]
    assert args[:2] == ["capstf", "train"] and flag(args, "--distribute") == "multi-worker"
    cli.commands["train"].make_context("train", args[2:])  # flags capstf train accepts
    # SIGTERM: capstf's exit code 143 after a checkpoint is retried (resumed), bad usage (2) is not.
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob" and rules[0]["onExitCodes"]["values"] == [2]
    assert pod["restartPolicy"] == "Never" and pod["terminationGracePeriodSeconds"] >= 60
    assert mounts(job, c)["/capstf"] == ("capstf", "")


def test_export_serving_and_kserve_read_the_model_the_job_trains():
    train = container(resources("train.yaml")[("Job", "capstf-train")])["args"]
    export_job = resources("export.yaml")[("Job", "capstf-export")]
    export = container(export_job)["args"]
    cli.commands["export"].make_context("export", export[2:])
    assert flag(export, "--model-dir") == flag(train, "--model-dir")
    claim = resources("storage.yaml")[("PersistentVolumeClaim", "capstf")]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # the workers, export and servers share it
    # capstf export writes EXPORT_DIR/capsnet/VERSION on the claim's exports/ folder ...
    assert mounts(export_job, container(export_job))["/capstf"] == ("capstf", "")
    assert flag(export, "--export-dir") == "/capstf/exports"
    # ... where TF Serving's model config looks (serving/models.config, mounted from a ConfigMap) ...
    serving = resources("tf-serving.yaml")[("Deployment", "capsnet-serving")]
    tf_serving = container(serving)
    base_path = re.search(r'base_path: "(.*)"', (ROOT / "serving" / "models.config").read_text())[1]
    assert base_path == "/models/capsnet" and mounts(serving, tf_serving)["/models"] == ("capstf", "exports")
    compose = yaml.safe_load((ROOT / "serving" / "compose.yaml").read_text())["services"]["tf-serving"]
    assert tf_serving["image"] == compose["image"]
    assert [p["containerPort"] for p in tf_serving["ports"]] == [8500, 8501]
    assert tf_serving["readinessProbe"]["httpGet"] == {"path": "/v1/models/capsnet/metadata", "port": "rest"}
    # ... and where KServe's storage initializer copies from, into its own TF Serving of the same release.
    inference_service = resources("kserve.yaml")[("InferenceService", "capsnet")]
    model = inference_service["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "tensorflow"
    assert model["storageUri"] == "pvc://capstf/exports/capsnet"
    assert "tensorflow/serving:" + model["runtimeVersion"] == compose["image"]
