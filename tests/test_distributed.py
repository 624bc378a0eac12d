"""Several processes: torchrun's environment, gloo on CPU, and ``--nproc`` re-launching."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch.distributed as dist

from kdcache import distributed
from kdcache.cache.store import open_cache
from kdcache.errors import InvalidSpec
from kdcache.teacher.config import PrecomputeConfig
from kdcache.teacher.precompute import precompute

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
        import sys, torch, torch.distributed as dist
        from pathlib import Path
        from kdcache import distributed
        device = distributed.init_if_needed("cpu")
        rank, world = distributed.rank_world()
        total = torch.tensor([rank + 1.0])
        dist.all_reduce(total)
        distributed.barrier()
        report = f"rank {rank}/{world} {dist.get_backend()} {device} sum {total.item():.0f}"
        (Path(sys.argv[1]) / f"rank{rank}.txt").write_text(report)  # one file each: a shared stdout interleaves
        distributed.shutdown()
    """))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(script), str(tmp_path)], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert lines == ["rank 0/2 gloo cpu sum 3", "rank 1/2 gloo cpu sum 3"]


@pytest.mark.slow  # three Python processes importing torch
def test_nproc_relaunches_the_command_as_n_processes(plain_process, capfd):
    assert distributed.launch(2, ["datasets", "--nproc", "2"]) == 0
    out = capfd.readouterr().out
    assert out.count("mnist5k") == 2  # each rank ran `kdcache datasets` once


def assert_same_cache(got_path: str, want_path: str) -> None:
    got, want = open_cache(got_path), open_cache(want_path)
    assert got.id == want.id and got.complete
    np.testing.assert_array_equal(got.labels(), want.labels())
    for name in want.array_names:
        a, b = got.read_samples(name, 0, want.num_samples), want.read_samples(name, 0, want.num_samples)
        assert a.tobytes() == b.tobytes(), name  # same CPU, same batches: the very same bytes


@pytest.mark.slow  # three Python processes importing torch
def test_two_ranks_split_the_shards_and_write_the_one_process_cache_then_train_with_ddp(tmp_path, teacher_weights):
    settings = dict(dataset="fake:64", teacher="cnn", weights=teacher_weights, views=3, batch_size=20,
                    chunk_samples=4, augment="rrc+flip+mixup", progress=False)  # 4 shards of 16 samples
    single = precompute(PrecomputeConfig(out=str(tmp_path / "one"), **settings))
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(f"""
        import hashlib, torch
        from kdcache import distributed
        from kdcache.teacher.config import PrecomputeConfig
        from kdcache.teacher.precompute import precompute
        from kdcache.cache.store import open_cache
        from kdcache.student.config import TrainConfig
        from kdcache.student.train import train
        torch.set_num_threads(1)
        rank, world = distributed.rank_world()
        mine = []
        result = precompute(PrecomputeConfig(out={str(tmp_path / "two")!r}, **{settings!r}),
                            on_batch=lambda inputs, logits: mine.append(len(inputs)))
        run = train(TrainConfig(dataset="fake:64", model="cnn", out={str(tmp_path / "run")!r}, cache=result.path,
                                epochs=2, batch_size=8, device="cpu", progress=False))
        digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in run.model.parameters())).hexdigest()
        report = (f"rank {{rank}} ran {{sum(mine)}} views {{result.views_computed}} path {{result.path}} "
                  f"model {{digest}} epochs {{len(run.metrics)}} test {{run.final['test_top1']:.6f}}")
        open({str(tmp_path)!r} + f"/rank{{rank}}.txt", "w").write(report)  # one file each: a shared stdout interleaves
    """))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(script)], capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [(tmp_path / f"rank{r}.txt").read_text().split() for r in range(2)]
    assert [line[:4] for line in lines] == [["rank", "0", "ran", "96"], ["rank", "1", "ran", "96"]]  # 2 shards each
    (r0, r1) = lines
    assert r0[5] == r1[5] == str(64 * 3)  # the views of every rank, counted once
    assert r0[7] == r1[7] == single.path.replace("/one/", "/two/")
    assert_same_cache(r0[7], single.path)
    assert r0[9] == r1[9]  # DDP: both ranks end with the same student
    assert (tmp_path / "run" / "model.pt").exists() and r0[11] == "2"
    # each rank evaluated its share of the test split; the all-reduced figure is the whole split's
    from kdcache.student.evaluate import evaluate_weights

    whole = evaluate_weights("cnn", str(tmp_path / "run" / "model.pt"), "fake:64", size=32, device="cpu")
    assert r0[13] == r1[13] == f"{whole['top1']:.6f}"


@pytest.mark.slow  # three Python processes importing torch
def test_nproc_flag_precomputes_with_two_processes(tmp_path, teacher_weights):
    args = ["precompute", "--dataset", "fake:64", "--teacher", "cnn", "--weights", teacher_weights,
            "--out", str(tmp_path / "root"), "--views", "3", "--batch-size", "50", "--device", "cpu", "--quiet",
            "--nproc", "2"]
    out = subprocess.run([sys.executable, "-m", "kdcache", *args], capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    printed = [line for line in out.stdout.splitlines() if line.startswith("cache ")]
    assert len(printed) == 1 and "192 views" in printed[0]  # rank 0 reports for both
    path = printed[0].split(" written to ")[1].split(":")[0]
    settings = dict(dataset="fake:64", teacher="cnn", weights=teacher_weights, views=3, batch_size=50,
                    device="cpu", progress=False)
    assert_same_cache(path, precompute(PrecomputeConfig(out=str(tmp_path / "one"), **settings)).path)


def test_launch_passes_on_the_ranks_status_without_torchruns_report(monkeypatch):
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def failing(codes):
        def run(args):
            assert args.nproc_per_node == "2" and args.module and args.training_script == "kdcache"
            raise ChildFailedError("kdcache", {r: ProcessFailure(local_rank=r, pid=r + 1, exitcode=c,
                                                                 error_file="/nonexistent")
                                               for r, c in enumerate(codes)})
        return run

    monkeypatch.setattr(torchrun, "run", failing([2, -15]))  # bad input on rank 0; rank 1 stopped by torchrun
    assert distributed.launch(2, ["train", "--nproc", "2"]) == 2
    monkeypatch.setattr(torchrun, "run", failing([-15, 1]))
    assert distributed.launch(2, ["train"]) == 1
    monkeypatch.setattr(torchrun, "run", lambda args: None)
    assert distributed.launch(2, ["train"]) == 0


@pytest.mark.parametrize("command", [
    ["precompute", "--dataset", "fake:8", "--teacher", "cnn", "--weights", "{tmp}/none.pt", "--out", "{tmp}/c"],
    ["train", "--dataset", "fake:8", "--model", "nosuchnet", "--out", "{tmp}/r"],
    ["train", "--dataset", "fake:8", "--model", "cnn", "--cache", "{tmp}/missing", "--out", "{tmp}/r"],
])
def test_bad_input_under_nproc_is_one_line_before_any_rank_starts(command, tmp_path, capsys, monkeypatch):
    from tests_support import run_cli

    monkeypatch.setattr(distributed, "launch", lambda *a: pytest.fail("ranks started despite bad input"))
    code, _, err = run_cli([a.replace("{tmp}", str(tmp_path)) for a in command] + ["--nproc", "2"], capsys)
    assert code == 2 and err.startswith("Error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "c").exists() and not (tmp_path / "r").exists()
