"""Profiling on the cluster's GPUs (planner.profiling Auto), the pure parts: keys and label values,
the Job, its state, the retry backoff, and the Job's command run for real on a tiny model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from distserve_operator import profiling
from distserve_operator.api import DistServeDeploymentSpec, parse_spec
from distserve_operator.profiling import Phase

LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")


def _spec(**over: Any) -> DistServeDeploymentSpec:
    raw: dict[str, Any] = {
        "model": {"name": "facebook/opt-13b", "dtype": "float16"},
        "slo": {"ttftMillis": 200, "tpotMillis": 100},
        "workload": {"requestsPerSecond": "10", "inputTokens": {"mean": 512}, "outputTokens": {"mean": 128}},
        "cluster": {
            "gpu": {"type": "H100-SXM"},
            "gpusPerNode": 4,
            "nodeSelector": {"nvidia.com/gpu.product": "H100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
        "worker": {"image": "registry.example/distserve-worker:1.2"},
        "planner": {"profiling": {"mode": "Auto"}},
    }
    for k, v in over.items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) and isinstance(raw.get(k), dict) else v
    return parse_spec(raw)


def test_label_values_are_valid_and_keep_long_names_apart() -> None:
    assert profiling.label_value("facebook/opt-13b") == "facebook-opt-13b"
    assert profiling.label_value("/odd name_") == "odd-name"
    long_a, long_b = "org/" + "x" * 70 + "-a", "org/" + "x" * 70 + "-b"
    a, b = profiling.label_value(long_a), profiling.label_value(long_b)
    assert a != b and len(a) <= 63 and len(b) <= 63
    for value in (a, b, profiling.label_value("Qwen/Qwen2.5-7B-Instruct"), profiling.label_value("a@b")):
        assert LABEL_VALUE.match(value), value


def test_the_key_names_one_job_per_model_gpu_and_dtype() -> None:
    key = profiling.key_of(_spec())
    assert key == profiling.ProfileKey("facebook/opt-13b", "H100-SXM", "float16")
    # Another deployment of the same model on the same GPUs shares it; a dtype or a GPU does not.
    assert profiling.key_of(_spec(slo={"ttftMillis": 50})).job_name(1) == key.job_name(1)
    assert profiling.key_of(_spec(model={"name": "facebook/opt-13b", "dtype": "bfloat16"})) != key
    custom = {"gpu": {"type": "Custom", "memoryGiB": 48, "tflops": 300, "hbmGBps": 900}}
    assert profiling.key_of(_spec(cluster=custom)).gpu == "Custom-48GiB-300TFLOPs-900GBps"
    assert len(key.job_name(12)) <= 63 and key.config_map_name.startswith("distserve-profile-")
    assert key.selector()["distserve.io/profile-model"] == "facebook-opt-13b"
    cm = profiling.render_config_map(key, "{}", key.job_name(1))
    assert (
        key.matches(cm) and cm["metadata"]["annotations"]["distserve.io/profile-model"] == "facebook/opt-13b"
    )
    other = profiling.render_config_map(
        profiling.ProfileKey("facebook-opt-13b", "H100-SXM", "float16"), "{}", ""
    )
    # Sanitising maps both models onto one label value: the annotations tell them apart.
    assert (
        other["metadata"]["labels"]["distserve.io/profile-model"]
        == key.selector()["distserve.io/profile-model"]
    )
    assert not key.matches(other)


def test_auto_applies_only_without_a_given_profile() -> None:
    assert profiling.wanted(_spec())
    assert not profiling.wanted(_spec(planner={"profiling": {"mode": "Off"}}))
    assert not profiling.wanted(_spec(planner={"profiling": {"mode": "Auto"}, "profileConfigMap": "mine"}))
    assert parse_spec({**_spec().to_wire(), "planner": {}}).planner.profiling.mode.value == "Off"


def test_the_job_runs_the_profile_cli_where_the_workers_run() -> None:
    spec = _spec(
        model={
            "name": "facebook/opt-13b",
            "dtype": "float16",
            "source": {"kind": "PVC", "claimName": "weights", "path": "opt-13b"},
        }
    )
    key = profiling.key_of(spec)
    job = profiling.render_job(spec, key, attempt=3, deadline_seconds=600, previous_failure="OOM")
    assert job["metadata"]["annotations"]["distserve.io/profile-previous-failure"] == "OOM"
    assert job["metadata"]["name"] == key.job_name(3)
    assert "ownerReferences" not in job["metadata"]  # shared by deployments: owned by none
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["activeDeadlineSeconds"] == 600
    assert job["spec"]["ttlSecondsAfterFinished"] >= 6 * 3600  # outlives the backoff's default cap
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "H100"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert job["spec"]["template"]["metadata"]["labels"]["distserve.io/profile-attempt"] == "3"
    (c,) = pod["containers"]
    assert c["image"] == "registry.example/distserve-worker:1.2"
    # Every TP size the search considers (up to gpusPerNode) is measured, on the largest's GPUs.
    assert profiling.searched_tp(spec) == (1, 2, 3, 4) == profiling.job_tp(spec)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "4" == c["resources"]["requests"]["nvidia.com/gpu"]
    assert job["metadata"]["annotations"]["distserve.io/profile-tp"] == "1,2,3,4"
    assert c["command"][:3] == ["python", "-c", profiling.RUNNER]
    flags = c["command"][5:]
    assert flags[flags.index("--model-name") + 1] == "facebook/opt-13b"
    assert (
        flags[flags.index("--model-source") + 1] == "PVC"
        and flags[flags.index("--model-path") + 1] == "opt-13b"
    )
    assert flags[flags.index("--dtype") + 1] == "float16" and flags[flags.index("--device") + 1] == "cuda"
    assert flags[flags.index("--tp") + 1] == "1,2,3,4"
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert {"name": "DISTSERVE_MODEL_ROOT", "value": "/models"} in c["env"]
    assert any(v.get("persistentVolumeClaim", {}).get("claimName") == "weights" for v in pod["volumes"])
    assert (
        c["securityContext"]["readOnlyRootFilesystem"]
        and {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    )
    cpu = profiling.render_job(_spec(cluster={"gpu": {"type": "CPU"}}), key, attempt=1, deadline_seconds=60)
    cpu_c = cpu["spec"]["template"]["spec"]["containers"][0]
    assert cpu_c["command"][cpu_c["command"].index("--device") + 1] == "cpu"
    assert "nvidia.com/gpu" not in json.dumps(cpu_c.get("resources", {}))


def test_backoff_doubles_and_is_capped() -> None:
    assert [profiling.backoff_seconds(n, base=10, cap=100) for n in (1, 2, 3, 4, 5, 500)] == [
        10,
        20,
        40,
        80,
        100,
        100,
    ]
    failed_at = datetime(2026, 1, 1, tzinfo=UTC)
    state = profiling.JobState(Phase.FAILED, "x", finished=failed_at)
    due = profiling.retry_due(state, 2, base=10, cap=100, now=failed_at + timedelta(seconds=5))
    assert due == failed_at + timedelta(seconds=20)
    assert profiling.retry_due(state, 2, base=10, cap=100, now=failed_at + timedelta(seconds=20)) is None


def _pod(phase: str, **terminated: Any) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if terminated:
        status["containerStatuses"] = [{"name": "profile", "state": {"terminated": terminated}}]
    return {"status": status}


def test_job_state_from_the_job_and_its_pod() -> None:
    job: dict[str, Any] = {"metadata": {"creationTimestamp": "2026-01-01T00:00:00Z"}, "status": {}}
    unscheduled = {
        "status": {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "message": "0/3 nodes: insufficient nvidia.com/gpu",
                }
            ],
        }
    }
    pending = profiling.job_state(job, [unscheduled])
    assert pending.phase is Phase.PENDING and "insufficient nvidia.com/gpu" in pending.message
    pulling = {
        "status": {
            "phase": "Pending",
            "containerStatuses": [
                {
                    "name": "profile",
                    "state": {"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}},
                }
            ],
        }
    }
    assert profiling.job_state(job, [pulling]).message == "ImagePullBackOff: no such image"
    assert profiling.job_state({**job, "status": {"active": 1, "ready": 1}}, []).phase is Phase.RUNNING
    done = {**job, "status": {"succeeded": 1, "completionTime": "2026-01-01T00:10:00Z"}}
    ok = profiling.job_state(done, [_pod("Succeeded", exitCode=0, message='{"format":"x"}')])
    assert ok.phase is Phase.SUCCEEDED and ok.result == '{"format":"x"}'
    lost = profiling.job_state(done, [])
    assert lost.phase is Phase.FAILED and "termination message" in lost.message
    failed = {
        **job,
        "status": {
            "failed": 1,
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "BackoffLimitExceeded",
                    "message": "Job has reached the specified backoff limit",
                    "lastTransitionTime": "2026-01-01T00:05:00Z",
                }
            ],
        },
    }
    state = profiling.job_state(
        failed, [_pod("Failed", exitCode=2, reason="Error", message="loading\ncannot profile: CUDA OOM\n")]
    )
    assert state.phase is Phase.FAILED and state.finished == datetime(2026, 1, 1, 0, 5, tzinfo=UTC)
    assert state.message.startswith("BackoffLimitExceeded: Job has reached")
    assert "exit code 2 (Error): loading | cannot profile: CUDA OOM" in state.message


def test_a_rejected_profile_stays_rejected_while_its_configmap_does() -> None:
    from distserve_operator.api import Condition

    ok = profiling.Outcome(
        Phase.SUCCEEDED, "profile in ConfigMap distserve-profile-abc", config_map="distserve-profile-abc"
    )
    assert profiling.replan_with(ok, "analytical (A100-80GB roofline)", "ns")
    assert not profiling.replan_with(ok, "ConfigMap ns/distserve-profile-abc: distserve profile (...)", "ns")
    assert not profiling.replan_with(ok, "ConfigMap ns/distserve-profile-abc (opt on H100)", "ns")
    assert profiling.replan_with(ok, "ConfigMap ns/distserve-profile-abcd: another", "ns")
    rejected = profiling.rejected(ok, "no candidate meets the SLO")
    cond = Condition(
        type="Profiled", status="False", reason="Rejected", message=rejected.message, last_transition_time="t"
    )
    kept = profiling.keep_rejection(cond, ok)
    assert (
        kept is not None
        and kept.phase is Phase.REJECTED
        and not profiling.replan_with(kept, "analytical", "ns")
    )
    other = profiling.Outcome(Phase.SUCCEEDED, "m", config_map="distserve-profile-def")
    assert profiling.keep_rejection(cond, other) is other  # another stored profile: planned with again


def test_a_failure_is_announced_once_per_job() -> None:
    from distserve_operator.api import Condition

    failed = profiling.Outcome(Phase.FAILED, "profiling Job j-1 failed (attempt 1): OOM; attempt 2 at T")
    assert profiling.newly_failed(None, failed)
    seen = Condition(
        type="Profiled", status="False", reason="Failed", message=failed.message, last_transition_time="t"
    )
    assert not profiling.newly_failed(seen, failed)
    assert profiling.newly_failed(
        seen, profiling.Outcome(Phase.FAILED, "profiling Job j-2 failed (attempt 2): OOM")
    )
    assert not profiling.newly_failed(None, profiling.Outcome(Phase.PENDING, "x"))


def test_the_jobs_command_writes_a_compact_profile_as_its_termination_message(tmp_path: Path) -> None:
    """The container's command as rendered, on a tiny random Llama on CPU (model flags swapped for
    speed), at the TP sizes the Job measures on a 4-GPU node: the tiny model's 2 key/value heads
    split over TP2 only, TP3 and TP4 are skipped."""
    message, out = tmp_path / "termination-log", tmp_path / "profile.json"
    tp = ",".join(map(str, profiling.job_tp(_spec())))
    flags = ["--random-llama", "tiny", "--quick", "--repetitions", "1", "--quiet", "--tp", tp]
    done = subprocess.run(
        [sys.executable, "-c", profiling.RUNNER, str(message), str(out), *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    text = message.read_text()
    assert len(text.encode()) <= profiling.TERMINATION_MESSAGE_LIMIT and "\n" not in text
    from distserve_planner import profiles

    profile = profiles.parse(text)
    assert profile.model == "random-llama-tiny" and [e.tp for e in profile.entries] == [1, 2]
