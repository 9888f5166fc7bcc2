from pipeline.config import TrainConfig
from pipeline.distributed import DistributedContext
from pipeline.train.run_data import RunData
from pipeline.train.setup import prepare


def test_close_ends_the_persistent_loader_workers_at_once(dataset, tmp_path):
    config = TrainConfig(data=str(dataset), backbone="tiny", cache_dir=str(tmp_path / "cache"),
                         run_dir=str(tmp_path / "run"), batch_size=2, loader_workers=2,
                         memory_cache_mb=0, augment_copies=0, extract_missing=True,
                         tensorboard=False)
    prepared = prepare(config)
    data = RunData(prepared, prepared.cache, DistributedContext())
    for live in (False, True):
        next(iter(data.train_loader(live)))  # starts each loader's persistent workers
    workers = [w for loader in data.loaders.values() if loader._iterator is not None
               for w in loader._iterator._workers]
    assert len(workers) == 4 and all(w.is_alive() for w in workers)
    data.close()
    assert not any(w.is_alive() for w in workers)
    assert all(loader._iterator is None for loader in data.loaders.values())
    data.close()  # twice (the end of the run, then interpreter exit) is harmless
    # The loaders still work after a close: a later pass starts new workers.
    assert next(iter(data.train_loader(False)))["features"]
