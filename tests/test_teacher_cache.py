"""TeacherCache: a cached run trains like an uncached one, skips the teacher after epoch 1, and misses safely."""

import pytest
import torch
from conftest import tiny_batches, tiny_unet
from monai.data import DataLoader, Dataset, MetaTensor
from monai.losses import DiceCELoss

from medkd.knowledge.teacher_cache import TeacherCache, sample_ids_from_meta
from medkd.training.engines import DistillationTrainer, iteration_losses

EPOCHS = 3


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks: one intra-op thread is faster, and far faster when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def samples(n: int = 12, size: int = 32) -> list[dict]:
    """Per-sample dicts of MetaTensors named by file, as a loading transform gives them to a DataLoader."""
    batch = tiny_batches(n=1, batch_size=n, size=size, seed=3)[0]
    return [
        {
            "image": MetaTensor(batch["image"][i], meta={"filename_or_obj": f"case_{i:02d}.nii.gz"}),
            "label": MetaTensor(batch["label"][i], meta={"filename_or_obj": f"case_{i:02d}_seg.nii.gz"}),
        }
        for i in range(n)
    ]


def loader(data: list[dict], transform=None) -> DataLoader:
    generator = torch.Generator().manual_seed(0)  # shuffled: batches mix other samples at every epoch
    return DataLoader(Dataset(data, transform), batch_size=4, shuffle=True, generator=generator)


def train(data_loader, cache: TeacherCache | None) -> tuple[DistillationTrainer, list[int]]:
    teacher = tiny_unet((8, 16, 32), seed=0)
    students = {"sp": tiny_unet((4, 8, 8), seed=1), "sf": tiny_unet((4, 8, 8), seed=2)}
    trainer = DistillationTrainer(
        device="cpu",
        max_epochs=EPOCHS,
        train_data_loader=data_loader,
        students=students,
        optimizers={n: torch.optim.Adam(s.parameters(), lr=1e-2) for n, s in students.items()},
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True),
        teacher=teacher,
        routes="diversified",
        teacher_cache=cache,
    )
    forwards: list[int] = []  # the epoch of every teacher forward during training
    teacher.register_forward_hook(lambda *_: forwards.append(trainer.state.epoch))
    trainer.run()
    return trainer, [forwards.count(e) for e in range(1, EPOCHS + 1)]


def test_batches_carry_per_sample_ids():
    batch = next(iter(DataLoader(Dataset(samples()), batch_size=4)))
    assert isinstance(batch["image"], MetaTensor)
    assert sample_ids_from_meta(batch) == [f"case_{i:02d}.nii.gz" for i in range(4)]
    assert sample_ids_from_meta({"image": torch.zeros(2, 1, 4, 4)}) is None


@pytest.mark.parametrize("verify", [True, False])
def test_cached_run_equals_uncached_and_skips_the_teacher_after_epoch_1(verify):
    data = samples()
    plain, plain_forwards = train(loader(data), None)
    cache = TeacherCache(verify=verify)
    cached, cached_forwards = train(loader(data), cache)

    assert plain_forwards == [3, 3, 3]
    # epoch 1 fills the cache; with verify, the first hit is recomputed once and checked; then no teacher forward
    assert cached_forwards == ([3, 1, 0] if verify else [3, 0, 0])
    assert len(cache) == 12 and cache.misses == 3 and cache.hits == 6 and cache.enabled
    for name in plain.students:
        for (k, a), b in zip(
            plain.students[name].state_dict().items(), cached.students[name].state_dict().values(), strict=True
        ):
            assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), (name, k)
    cached_losses = iteration_losses(cached.state.output)
    for k, v in iteration_losses(plain.state.output).items():
        assert v == pytest.approx(cached_losses[k], rel=1e-5, abs=1e-6), k


def test_get_misses_until_every_sample_of_the_batch_is_cached():
    data = samples(6)
    first = next(iter(DataLoader(Dataset(data[:4]), batch_size=4)))
    cache = TeacherCache()
    logits, features = torch.randn(4, 2, 8, 8), {"layer": torch.randn(4, 16, 2, 2)}
    assert cache.get(first, "cpu") is None  # empty
    cache.put(first, logits, features)
    hit = cache.get(first, "cpu")
    assert hit is not None and torch.equal(hit[0], logits) and torch.equal(hit[1]["layer"], features["layer"])
    mixed = next(iter(DataLoader(Dataset([data[4], data[1], data[0], data[5]]), batch_size=4)))
    assert cache.get(mixed, "cpu") is None  # case_04 and case_05 were never seen
    reordered = next(iter(DataLoader(Dataset([data[3], data[1]]), batch_size=2)))
    got = cache.get(reordered, "cpu")
    assert torch.equal(got[0], logits[[3, 1]]) and torch.equal(got[1]["layer"], features["layer"][[3, 1]])
    assert (cache.hits, cache.misses) == (2, 2)
    logits.zero_()  # the cache holds copies, not views of the batch
    assert cache.get(first, "cpu")[0].abs().sum() > 0


def test_batches_without_ids_or_with_repeated_ids_are_not_cached():
    cache = TeacherCache()
    plain = {"image": torch.zeros(2, 1, 4, 4), "label": torch.zeros(2, 1, 4, 4)}
    cache.put(plain, torch.zeros(2, 2, 4, 4), {})
    assert len(cache) == 0 and cache.get(plain, "cpu") is None
    crops = next(iter(DataLoader(Dataset([samples(1)[0]] * 2), batch_size=2)))  # two crops of one file
    cache.put(crops, torch.zeros(2, 2, 4, 4), {})
    assert len(cache) == 0 and cache.get(crops, "cpu") is None


def test_random_inputs_before_the_teacher_are_detected_and_the_cache_turned_off():
    torch.manual_seed(0)

    def jitter(item: dict) -> dict:  # random augmentation before the network: the cache must not be used
        return dict(item, image=item["image"] + torch.randn_like(item["image"]))

    cache = TeacherCache()
    with pytest.warns(UserWarning, match="differ from recomputed ones"):
        _, forwards = train(loader(samples(), jitter), cache)
    assert forwards == [3, 3, 3] and not cache.enabled and len(cache) == 0
