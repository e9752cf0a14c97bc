"""torchrun on CPU (gloo): ranks give exactly the single process's results, and a rank that fails
stops every rank with one line naming it. Each run is a few seconds of the tiny model per rank."""
import json
import subprocess
import sys
import time

import pytest

from conftest import ROOT, tiny_flags
from test_cli import ENV, untimed

# torchrun gives each rank one thread unless told otherwise; the reference gets one too, since the
# float reductions of a matmul can depend on the thread count
ONE_THREAD = {**ENV, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
RESULTS = ("final_info.json", "seed_0/final_info.json", "seed_1/final_info.json", "seed_0/sweep.json",
           "seed_1/sweep.json", "seed_0/spliced_kl.json", "seed_0/detection_horizon.json")


def torchrun(n: int, *args, script=ROOT / "experiment.py"):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--standalone",
                           str(script), *args], capture_output=True, text=True, timeout=300, env=ONE_THREAD, cwd=ROOT)


def files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_dir):
    """The single-process run the distributed ones must repeat."""
    out = tmp_path_factory.mktemp("single") / "run"
    res = subprocess.run([sys.executable, str(ROOT / "experiment.py"), *tiny_flags(out, model_dir, "--seeds=0,1")],
                         capture_output=True, text=True, timeout=300, env=ONE_THREAD, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.mark.parametrize("n", [2, 3])  # 3 ranks, 2 seeds: ranks 0 and 2 split seed 0's sweep
def test_ranks_give_the_single_process_results(tmp_path, model_dir, reference, n):
    out = tmp_path / "run"
    res = torchrun(n, *tiny_flags(out, model_dir, "--seeds=0,1"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert files(out) == files(reference), "a rank wrote what a single process does not, or left something out"
    for name in RESULTS:
        assert untimed(out / name) == untimed(reference / name), name
    for name in ("config.json", "seed_1/config.json"):
        mine, ref = (json.loads((d / name).read_text()) for d in (out, reference))
        assert {k for k in mine if mine[k] != ref[k]} == {"out_dir"}, name
    assert (out / "command.txt").read_text() == (reference / "command.txt").read_text().replace(str(reference), str(out))
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["status"] == "complete" and meta["world_size"] == n


FAIL = """import os, sys
sys.path.insert(0, {root!r})
import experiment as ex
if os.environ["RANK"] == {rank!r}:
    def fail(*args, **kwargs):
        raise RuntimeError("injected failure")
    setattr(ex, {name!r}, fail)
ex.exit_rank(ex.main(sys.argv[1:]))  # as experiment.py does under torchrun
"""


def our_lines(res) -> list[str]:
    return [l for l in res.stderr.splitlines() if l.startswith("experiment.py:")]


@pytest.mark.parametrize("rank,name", [("1", "run_sweep"),   # a member, in its share of the sweep
                                       ("0", "train_sae")])  # the lead, before it hands out the SAE
def test_a_failing_rank_stops_every_rank_with_one_line(tmp_path, model_dir, rank, name):
    """Without --seeds both ranks share the one run: the lead trains, both measure half the sweep."""
    script = tmp_path / "failing.py"
    script.write_text(FAIL.format(root=str(ROOT), rank=rank, name=name))
    out = tmp_path / "run"
    t0 = time.time()
    res = torchrun(2, *tiny_flags(out, model_dir), script=script)
    assert time.time() - t0 < 120, "a rank waited on the failed one"
    assert res.returncode != 0  # torchrun exits 1 when a rank fails, whatever the rank's own code
    assert our_lines(res) == [f"experiment.py: error: rank {rank}: RuntimeError: injected failure"], res.stderr[-3000:]
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["status"] == "failed" and meta["error"].startswith(f"rank {rank}:")
    assert not (out / "final_info.json").exists()


def test_a_rank_that_cannot_make_its_seed_folder(tmp_path, model_dir):
    """Bad input only rank 1 meets (seed_1 is a file): the usage error, named by rank."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "seed_1").write_text("in the way")
    res = torchrun(2, *tiny_flags(out, model_dir, "--seeds=0,1"))
    assert res.returncode != 0
    assert our_lines(res) == [f"experiment.py: error: rank 1: --out_dir {out / 'seed_1'} exists and is not a folder"]
    assert not (out / "final_info.json").exists() and (out / "seed_0" / "final_info.json").exists()
