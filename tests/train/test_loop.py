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
    # The validation bar is drawn (its 0 % frame always; tqdm skips the 100 % frame of a pass
    # faster than its refresh interval, so that frame depends on the machine's speed).
    assert re.search(r"validation: +\d+%\|[^|]*\| [01]/1 ", err)
    assert "nan" not in err.lower()
