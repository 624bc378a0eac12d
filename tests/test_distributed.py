"""Several processes: torchrun's environment, gloo on CPU, and ``--nproc`` re-launching."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch.distributed as dist

from kdcache import distributed
from kdcache.errors import InvalidSpec

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


@pytest.fixture
def plain_process(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)


def test_a_single_process_needs_no_process_group(plain_process):
    assert distributed.rank_world() == (0, 1)
    assert distributed.is_main() and not distributed.under_torchrun()
    assert str(distributed.init_if_needed("cpu")) == "cpu"
    distributed.barrier()
    distributed.shutdown()
    assert not dist.is_initialized()


def test_rank_and_world_come_from_torchruns_environment(plain_process, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.rank_world() == (1, 2)
    assert not distributed.is_main() and distributed.under_torchrun()


@pytest.mark.parametrize("rank,world", [("2", "2"), ("0", "0"), ("x", "2")])
def test_an_impossible_rank_is_a_one_line_error(plain_process, monkeypatch, rank, world):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(InvalidSpec, match="torchrun or --nproc"):
        distributed.rank_world()


def test_world_size_without_a_rendezvous_address_is_a_one_line_error(plain_process, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InvalidSpec, match="MASTER_ADDR and MASTER_PORT"):
        distributed.init_if_needed("cpu")


def test_nproc_is_removed_from_the_relaunched_command():
    argv = ["precompute", "--nproc", "2", "--views", "3", "--nproc=4", "--out", "x"]
    assert distributed.strip_option(argv, "--nproc") == ["precompute", "--views", "3", "--out", "x"]


@pytest.mark.slow  # three Python processes importing torch
def test_two_torchrun_ranks_join_a_gloo_group_on_cpu(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent("""
        import torch, torch.distributed as dist
        from kdcache import distributed
        device = distributed.init_if_needed("cpu")
        rank, world = distributed.rank_world()
        total = torch.tensor([rank + 1.0])
        dist.all_reduce(total)
        distributed.barrier()
        print(f"rank {rank}/{world} {dist.get_backend()} {device} sum {total.item():.0f}", flush=True)
        distributed.shutdown()
    """))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(script)], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = sorted(line for line in out.stdout.splitlines() if line.startswith("rank"))
    assert lines == ["rank 0/2 gloo cpu sum 3", "rank 1/2 gloo cpu sum 3"]


@pytest.mark.slow  # three Python processes importing torch
def test_nproc_relaunches_the_command_as_n_processes(plain_process, capfd):
    assert distributed.launch(2, ["datasets", "--nproc", "2"]) == 0
    out = capfd.readouterr().out
    assert out.count("mnist5k") == 2  # each rank ran `kdcache datasets` once
