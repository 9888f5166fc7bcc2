import re

from pipeline.config import TrainConfig
from pipeline.train.launch import train


def test_one_bar_counts_the_runs_steps_and_never_shows_nan(dataset, tmp_path, capsys):
    # 4 training images at batch 2: 2 steps an epoch, 6 in the run.
    train(TrainConfig(data=str(dataset), backbone="tiny", cache_dir=str(tmp_path / "cache"),
                      run_dir=str(tmp_path / "run"), epochs=3, batch_size=2, e2e_every=0,
                      loader_workers=0, overlays=0, extract_missing=True, tensorboard=False))
    err = capsys.readouterr().err
    steps = re.findall(r"steps \d-\d: +\d+%\|[^|]*\| (\d)/(\d) ", err)
    assert steps and {total for _, total in steps} == {"6"}
    assert [int(done) for done, _ in steps][-1] == 6
    # Off a terminal (captured here, or a log file) the nested validation bar is not drawn:
    # its cursor moves would fill a log with escape codes.
    assert "validation:" not in err
    assert "nan" not in err.lower()


def _diverging(dataset, tmp_path, **kw):
    return TrainConfig(data=str(dataset), backbone="tiny", cache_dir=str(tmp_path / "cache"),
                       run_dir=str(tmp_path / "run"), batch_size=2, e2e_every=0, lr=1e9,
                       lora_lr=1e9, loader_workers=0, overlays=0, extract_missing=True,
                       tensorboard=False, device="cpu", **kw)


def test_a_diverged_run_stops_at_its_step_and_saves_nothing_of_it(dataset, tmp_path):
    import pytest

    from pipeline.train.divergence import DivergedError

    # Step 1 is finite; step 2's training loss is NaN. (The legacy decoder: the detail
    # decoder's BatchNorm keeps a training loss finite that its validation finds NaN, below.)
    with pytest.raises(DivergedError) as raised:
        train(_diverging(dataset, tmp_path, steps=4, val_every=2, decoder="legacy"))
    assert str(raised.value) == (
        "training diverged at step 2: the training loss is nan. Likely cause: learning rates "
        "too high for this data (--lr 1e+09, --lora-lr 1e+09), or an fp16 overflow (--amp "
        "fp16: try bf16). Start a new run with lower rates (e.g. --lr 1e+08 --lora-lr 1e+08; "
        "--overwrite to reuse the run directory); nothing from step 2 on was saved (last.pt "
        "and best.pt hold earlier validated steps, if any)")
    run = tmp_path / "run"
    assert not any((run / name).exists() for name in ("last.pt", "best.pt", "report.json"))
    # The weights after step 1 already give a non-finite validation loss: stopped there.
    with pytest.raises(DivergedError, match="diverged at step 1: the validation loss is nan"):
        train(_diverging(dataset, tmp_path, steps=4, val_every=1, overwrite=True))  # detail
    assert not (run / "last.pt").exists() and not (run / "metrics.jsonl").exists()


_BEST_ON_EACH_RANK = '''
import sys
from pathlib import Path

import torch

from pipeline.distributed import DistributedContext
from pipeline.train.loop import _leaders_best

context = DistributedContext.from_env(backend="gloo")
run_dir = Path(sys.argv[1] if context.is_leader else sys.argv[2])
torch.save(_leaders_best(run_dir, context), Path(sys.argv[3]) / f"rank{context.rank}.pt")
torch.distributed.destroy_process_group()
'''


def test_every_process_scores_the_leaders_best_checkpoint_without_a_run_directory(tmp_path):
    """The final mirrored validation runs on every process; on other machines the run
    directory may not exist, so best.pt reaches them from the leader (two real processes)."""
    import os
    import subprocess
    import sys

    import torch
    from conftest import subprocess_env

    leader_run = tmp_path / "run"
    leader_run.mkdir()
    best = {"decoder": {"head.weight": torch.arange(6.0).reshape(2, 3)},
            "lora": {"a": torch.ones(2)}, "state": {"step": 7, "best": {"step": 5}},
            "optimizer": {"state": {}}, "config": {}}
    torch.save(best, leader_run / "best.pt")
    script = tmp_path / "best_on_each_rank.py"
    script.write_text(_BEST_ON_EACH_RANK)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    result = subprocess.run(
        [torchrun, "--nproc-per-node", "2", str(script), str(leader_run),
         str(tmp_path / "not-on-this-machine"), str(tmp_path)],
        env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert torch.equal(got["decoder"]["head.weight"], best["decoder"]["head.weight"])
        assert torch.equal(got["lora"]["a"], best["lora"]["a"])
        assert got["state"] == best["state"]
