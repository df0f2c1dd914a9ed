"""Multi-host training for real: two "hosts" as network namespaces joined by veth (tests/netns_hosts.py).

Each launcher vlp supports starts one rank on each host through `vlp launch`, as
a user would type it on each machine (torchrun's static rendezvous, the
DeepSpeed launcher with --no_ssh and a hostfile vlp checks, accelerate's
multi-machine mode). Each run must have world size 2 and the same per-step
sample keys as a single-host run with the same global batch; its losses equal
that run's to float32 reduction-order noise (gloo sums over TCP here, DeepSpeed's
shared-memory allreduce within one host).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import netns_hosts
import pytest
from shard_helpers import tiny_shards

BIN = Path(sys.executable).parent
STEPS = 6
HOSTS = netns_hosts.Hosts(names=("host1", "host2"), subnet="10.99.1", bridge="vlpmhbr0", prefix="vlpmh")
# one xdist worker runs all of group "multihost": the tests share one multihost setup
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multihost")]


@pytest.fixture(scope="module")
def hosts():
    why = netns_hosts.missing()
    if why:
        if os.environ.get("VLP_CI") == "1":
            pytest.fail(f"the multi-host tests must run in CI: {why}")
        pytest.skip(why)
    yield HOSTS.up()
    HOSTS.down()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return tiny_shards(tmp_path_factory.mktemp("multihost"))


@pytest.fixture(scope="module")
def single_host(shards, tmp_path_factory) -> list[dict]:
    """The reference: the same two ranks on one host."""
    out = tmp_path_factory.mktemp("single") / "run"
    done = subprocess.run([str(BIN / "vlp"), "launch", "launch.procs_per_node=2", "launch.master_port=29641",
                           *_train(shards, out)], env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return _metrics(out)


def _env() -> dict[str, str]:
    # gloo finds its address through the interface, not the (unresolvable) hostname
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "eth0"}


def _train(shards: Path, out: Path) -> list[str]:
    return ["model.name=vlp-micro", f"data.sources=[{{shards: '{shards}'}}]", "data.workers=0", "train.batch_size=8",
            f"train.steps={STEPS}", "train.log_keys=true", "train.zero_stage=2", f"train.output_dir={out}"]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def _on_both_hosts(launch: list[str], train: list[str], cwd: Path) -> None:
    procs = [subprocess.Popen(HOSTS.enter(name, [str(BIN / "vlp"), "launch", *launch, f"launch.node_rank={rank}",
                                                 *train]),
                              env=_env(), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank, name in enumerate(HOSTS.names)]
    _wait_all_joined(procs)


def _wait_all_joined(procs: list[subprocess.Popen]) -> None:
    """Every node's launch exits 0, and the master's log says both ranks joined."""
    errs = []
    for proc in procs:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-4000:]
        errs.append(stderr)
    assert "vlp train: world size 2 on " in errs[0], errs[0][-3000:]


def _assert_same_steps(got: list[dict], want: list[dict]) -> None:
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    assert all(len(m["keys"]) == 2 * 8 for m in got)  # world size 2: both hosts' keys in every global batch
    assert [m["keys"] for m in got] == [m["keys"] for m in want]
    assert [m["loss"] for m in got] == pytest.approx([m["loss"] for m in want], rel=1e-5)


COMMON = ["launch.nodes=2", "launch.procs_per_node=1", f"launch.master_addr={HOSTS.addr('host1')}"]


def test_torchrun_across_two_hosts(hosts, shards, single_host, tmp_path):
    _on_both_hosts(["launch.launcher=torchrun", *COMMON, "launch.master_port=29642"], _train(shards, tmp_path / "run"),
                   tmp_path)
    _assert_same_steps(_metrics(tmp_path / "run"), single_host)


def test_deepspeed_launcher_across_two_hosts(hosts, shards, single_host, tmp_path):
    # vlp writes the hostfile from launch.hosts (each node its own copy, as on machines without shared disks)
    hosts = f"launch.hosts={','.join(HOSTS.names)}"
    for name in HOSTS.names:
        (tmp_path / name).mkdir()
    procs = [subprocess.Popen(HOSTS.enter(name, [str(BIN / "vlp"), "launch", "launch.launcher=deepspeed", *COMMON,
                                                 "launch.master_port=29643", hosts, f"launch.node_rank={rank}",
                                                 *_train(shards, tmp_path / "run")]),
                              env=_env(), cwd=tmp_path / name, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank, name in enumerate(HOSTS.names)]
    _wait_all_joined(procs)
    assert (tmp_path / "host2" / "logs" / "hostfile").read_text() == "host1 slots=1\nhost2 slots=1\n"
    _assert_same_steps(_metrics(tmp_path / "run"), single_host)


def test_accelerate_across_two_hosts(hosts, shards, single_host, tmp_path):
    # outside the checkout: the shipped accelerate file names launch/ds_zero2.json, found in the package
    _on_both_hosts(["launch.launcher=accelerate", *COMMON, "launch.master_port=29644"],
                   _train(shards, tmp_path / "run"), tmp_path)
    _assert_same_steps(_metrics(tmp_path / "run"), single_host)
