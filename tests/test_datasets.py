"""Dataset formats read from real (tiny) files, the device-side augmentation, models and optimizers."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from scipy.stats import chi2_contingency
from torch.utils.data import DataLoader
from torchvision.transforms import Normalize, v2

from clrx.config.build import build_optimizer, instantiate
from clrx.config.schema import compose_run
from clrx.data.augment import Pipeline, random_crop, random_flip
from clrx.data.datasets import digits_arrays
from clrx.data.splits import build_data, stratified_split
from clrx.errors import ConfigError
from clrx.schedules.apply import applied_momentum, apply_hyper, momentum_name
from clrx.schedules.policies import Hyper
from clrx.training.run import train
from tests.datafiles import CIFAR_SIZES

FORMATS = {  # option: (shape of one image, classes, training images, validation images)
    "cifar10": ((3, 32, 32), 10, CIFAR_SIZES["train"], CIFAR_SIZES["test"]),
    "cifar100": ((3, 32, 32), 100, CIFAR_SIZES["train"], CIFAR_SIZES["test"]),
    "mnist": ((1, 28, 28), 10, 64, 32),
    "fashion_mnist": ((1, 28, 28), 10, 64, 32),
    "imagefolder": ((3, 24, 24), 3, 36, 12),
}


def _dataset(option, root, *overrides):
    where = root / "folder" if option == "imagefolder" else root
    extra = ("dataset.image_size=24", "dataset.num_workers=0") if option == "imagefolder" else ()
    return compose_run(f"dataset={option}", f"dataset.root={where}", *extra, *overrides)


@pytest.mark.parametrize("option", FORMATS)
def test_each_format_loads_with_the_right_shape_labels_and_normalization(option, data_root):
    shape, classes, train_size, val_size = FORMATS[option]
    data = build_data(_dataset(option, data_root).dataset)
    assert (len(data.train), len(data.val), data.num_classes, data.in_chans) == (
        train_size,
        val_size,
        classes,
        shape[0],
    )
    assert len(data.classes) == classes
    images, labels = next(iter(DataLoader(data.train, 8, collate_fn=data.collate)))
    assert tuple(images.shape) == (8, *shape) and labels.dtype == torch.long
    assert 0 <= labels.min() and labels.max() < classes
    batch = data.pipeline(images, train=False)
    assert batch.dtype == torch.float32 and tuple(batch.shape) == (8, *shape)
    if option != "imagefolder":  # in memory as uint8, normalized on the device with the dataset's statistics
        assert images.dtype == torch.uint8
        mean = torch.tensor(data.pipeline.mean).view(1, -1, 1, 1)
        std = torch.tensor(data.pipeline.std).view(1, -1, 1, 1)
        assert torch.allclose(batch, (images.float() / 255 - mean) / std)
    else:  # decoded, cropped and normalized per image in the workers, with the model's statistics (test_resnet's)
        [normalize] = [t for t in data.val.transform.transforms if isinstance(t, v2.Normalize | Normalize)]
        assert tuple(normalize.mean) == (0.5, 0.5, 0.5) and tuple(normalize.std) == (0.5, 0.5, 0.5)
        assert -1 <= batch.min() and batch.max() <= 1  # (x - 0.5) / 0.5 of values in [0, 1]


@pytest.mark.parametrize("option", FORMATS)
def test_how_evaluation_prepares_an_image_is_said_for_whoever_feeds_the_logged_model(option, data_root):
    data = build_data(_dataset(option, data_root).dataset)
    said = data.preprocessing()
    assert said["classes"] == list(data.classes)
    if option != "imagefolder":
        images, _ = data.val[:4]
        stats = [torch.tensor(said["normalize"][key]).view(1, -1, 1, 1) for key in ("mean", "std")]
        assert torch.allclose(data.pipeline(images, train=False), (images.float() / 255 - stats[0]) / stats[1])
        assert "transform" not in said
    else:
        assert (
            said["transform"] == str(data.val.transform)
            and "Normalize(mean=tensor([0.5000, 0.5000, 0.5000])" in said["transform"]
        )
        assert "normalize" not in said


@pytest.mark.parametrize("option", FORMATS)
def test_one_short_training_run_per_format(option, data_root, store, tmp_path):
    uri, client = store
    overrides = ["trainer.epochs=1", "trainer.batch_size=8", "trainer.progress=false", f"tracking.uri={uri}"]
    if option == "imagefolder":
        overrides.append("dataset.num_workers=2")  # decoded in worker processes, as users run it
    result = train(_dataset(option, data_root, *overrides), tmp_path)
    val_size = FORMATS[option][3]
    assert result.steps == FORMATS[option][2] // 8
    correct = result.val_acc * val_size  # a count of the validation images, each counted once
    assert 0 <= correct <= val_size and correct == pytest.approx(round(correct), abs=1e-9)
    params = client.get_run(result.run_id).data.params
    assert params["dataset._target_"].endswith(option) and params["data.num_classes"] == str(FORMATS[option][1])
    classes = client.download_artifacts(result.run_id, "data/classes.txt", str(tmp_path))
    assert len(open(classes).read().splitlines()) == FORMATS[option][1]


@pytest.mark.parametrize("option", ["cifar10", "cifar100", "mnist", "fashion_mnist", "imagefolder"])
def test_missing_files_say_where_they_were_looked_for_and_how_to_get_them(option, tmp_path):
    with pytest.raises(ConfigError) as raised:
        build_data(_dataset(option, tmp_path).dataset)
    message = str(raised.value)
    assert raised.value.setting == "dataset.root" and str(tmp_path) in message and "\n" not in message
    if option != "imagefolder":
        assert "dataset.download=true" in message and "copy" in message


def test_limits_cut_each_part_to_a_fixed_subset(data_root):
    cfg = _dataset("cifar10", data_root, "dataset.limit_train=20", "dataset.limit_val=10")
    first, second = build_data(cfg.dataset), build_data(cfg.dataset)
    assert (len(first.train), len(first.val)) == (20, 10)
    assert torch.equal(first.train.labels, second.train.labels)
    with pytest.raises(ConfigError, match="dataset.limit_train: must be a positive whole number"):
        build_data(_dataset("mnist", data_root, "dataset.limit_train=0").dataset)


def _outcome(crops: torch.Tensor, candidates: torch.Tensor) -> list[int]:
    """Which of the possible (offset, flip) results each crop is."""
    flat = crops.flatten(1)
    return (flat[:, None, :] == candidates.flatten(1)[None]).all(dim=2).float().argmax(dim=1).tolist()


def test_batched_crop_and_flip_draw_like_torchvisions_transforms():
    """Same distribution over the 2 x (2p+1)^2 possible results as RandomCrop(padding=p) + RandomHorizontalFlip."""
    padding, size, draws = 2, 6, 3000
    image = torch.arange(1, size * size + 1, dtype=torch.float32).view(1, size, size)  # every pixel distinct
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    shifts = [padded[:, i : i + size, j : j + size] for i in range(2 * padding + 1) for j in range(2 * padding + 1)]
    candidates = torch.stack(shifts + [s.flip(2) for s in shifts])
    reference = v2.Compose([v2.RandomCrop(size, padding=padding), v2.RandomHorizontalFlip()])
    torch.manual_seed(0)
    theirs = _outcome(torch.stack([reference(image) for _ in range(draws)]), candidates)
    ours = _outcome(random_flip(random_crop(image.expand(draws, 1, size, size), padding)), candidates)
    counts = torch.zeros(2, len(candidates))
    for row, outcomes in enumerate((theirs, ours)):
        counts[row] = torch.bincount(torch.tensor(outcomes), minlength=len(candidates))
    assert (counts > 0).all()  # every offset and flip occurs in both
    assert chi2_contingency(counts.numpy()).pvalue > 1e-3
    flipped = counts[1, len(shifts) :].sum() / draws
    assert 0.45 < flipped < 0.55


def test_augmentation_is_for_training_batches_only():
    pipeline = Pipeline(crop_padding=4, flip=True, mean=(0.5,), std=(0.25,))
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    expected = (images.float() / 255 - 0.5) / 0.25
    assert torch.allclose(pipeline(images, train=False), expected)
    assert not torch.allclose(pipeline(images, train=True), expected)


@pytest.mark.parametrize("option", ["cifar_resnet18", "cifar_resnet56", "convnext_atto", "vit_tiny"])
def test_small_image_presets_keep_resolution_and_build_for_cifar(option):
    model = instantiate(compose_run(f"model={option}").model, "model", num_classes=10, in_chans=3)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    if option.startswith("cifar_resnet"):
        assert model.conv1.stride == (1, 1) and isinstance(model.maxpool, torch.nn.Identity)
    if option == "cifar_resnet56":
        assert 0.8e6 < sum(p.numel() for p in model.parameters()) < 0.9e6  # ResNet-56's 0.85M


def test_pretrained_weights_come_from_a_local_file_only(tmp_path):
    source = instantiate(compose_run("model=cifar_resnet18").model, "model", num_classes=100, in_chans=3)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    cfg = compose_run("model=cifar_resnet18", f"model.pretrained={tmp_path / 'weights.pth'}")
    model = instantiate(cfg.model, "model", num_classes=10, in_chans=3)
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert model.fc.out_features == 10  # the head does not fit: it starts new
    with pytest.raises(ConfigError, match="model.pretrained: .*missing.pth is not a file"):
        instantiate(
            compose_run(f"model.pretrained={tmp_path / 'missing.pth'}").model, "model", num_classes=10, in_chans=1
        )


def test_bias_and_norm_weights_can_be_exempt_from_weight_decay():
    model = instantiate(compose_run().model, "model", num_classes=10, in_chans=1)
    every = build_optimizer(compose_run().optimizer, model, lr=0.1)
    assert [group["weight_decay"] for group in every.param_groups] == [5e-4]
    exempt = build_optimizer(compose_run("optimizer.decay_bias_and_norm=false").optimizer, model, lr=0.1)
    decays = {group["weight_decay"]: group["params"] for group in exempt.param_groups}
    assert all(p.ndim <= 1 for p in decays[0.0]) and all(p.ndim > 1 for p in decays[5e-4])
    assert sum(map(len, decays.values())) == len(list(model.parameters()))


def test_channels_last_trains(tmp_path, store):
    uri, client = store
    cfg = compose_run("trainer.epochs=1", "trainer.channels_last=true", "trainer.progress=false", f"tracking.uri={uri}")
    assert train(cfg, tmp_path).val_acc > 0.1


@pytest.mark.parametrize(
    "option, name",
    [
        ("sgd", "momentum"),
        ("nesterov", "momentum"),
        ("rmsprop", "momentum"),
        ("adam", "beta1"),
        ("adamw", "beta1"),
        ("adagrad", None),
        ("adadelta", None),
    ],
)
def test_the_papers_optimizers_take_the_policys_momentum_where_they_have_one(option, name):
    model = torch.nn.Linear(4, 2)
    optimizer = build_optimizer(compose_run(f"optimizer={option}").optimizer, model, lr=0.1)
    assert momentum_name(optimizer) == name
    apply_hyper(optimizer, Hyper(0.05, 0.8 if name else None))
    assert optimizer.param_groups[0]["lr"] == 0.05 and applied_momentum(optimizer) == (0.8 if name else None)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()  # takes a step with the values written in


def test_digits_are_read_as_scikit_learn_loads_them():
    from sklearn.datasets import load_digits

    images, labels = digits_arrays()
    bunch = load_digits()
    assert torch.equal(images, torch.tensor(bunch.images, dtype=torch.float32))
    assert torch.equal(labels, torch.tensor(bunch.target))


@pytest.mark.parametrize("fraction", [0.2, 0.5])
def test_a_stratified_split_holds_out_the_fraction_of_every_class_the_same_way_each_time(fraction):
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 11 + [3] * 2)
    train, held = stratified_split(labels, fraction, seed=3)
    assert torch.equal(torch.sort(torch.cat([train, held])).values, torch.arange(len(labels)))  # disjoint, complete
    for label, count in enumerate([50, 30, 11, 2]):
        assert int((labels[held] == label).sum()) == round(fraction * count)
    assert torch.equal(train, train.sort().values) and torch.equal(held, held.sort().values)
    again = stratified_split(labels, fraction, seed=3)
    assert torch.equal(again[0], train) and torch.equal(again[1], held)
    assert not torch.equal(stratified_split(labels, fraction, seed=4)[1], held)


def test_image_folders_are_transformed_by_timms_recipe_with_the_models_statistics(data_root):
    names = lambda transform: [type(step).__name__ for step in transform.transforms]  # noqa: E731
    recipe = ("dataset.auto_augment=rand-m9-mstd0.5", "dataset.re_prob=0.25", "model=vit_tiny")
    data = build_data(_dataset("imagefolder", data_root, *recipe).dataset)
    train_steps, eval_steps = names(data.train.transform), names(data.val.transform)
    assert train_steps[:3] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "RandAugment"]
    assert train_steps[-1] == "RandomErasing" and "ColorJitter" not in train_steps  # auto-augment replaces it
    assert eval_steps[-2:] == ["MaybeToTensor", "Normalize"] and "RandomErasing" not in eval_steps
    vit = timm.get_pretrained_cfg("vit_tiny_patch16_224")
    resize = data.val.transform.transforms[0]
    assert resize.size == math.floor(24 / vit.crop_pct) and resize.interpolation.value == vit.interpolation
    assert tuple(data.val.transform.transforms[-1].mean) == vit.mean
    given = build_data(
        _dataset("imagefolder", data_root, "dataset.mean=[0.1,0.2,0.3]", "dataset.augment=false").dataset
    )
    assert tuple(given.train.transform.transforms[-1].mean) == (0.1, 0.2, 0.3)
    assert "RandomHorizontalFlip" not in names(given.train.transform)


@pytest.mark.parametrize("option", ["cifar10", "cifar100", "mnist", "fashion_mnist"])
def test_val_split_validates_on_a_stratified_held_out_part_and_keeps_the_test_set(option, data_root):
    whole = build_data(_dataset(option, data_root).dataset)
    assert whole.test is None  # by default the test set validates, as before
    data = build_data(_dataset(option, data_root, "dataset.val_split=0.25", "dataset.split_seed=1").dataset)
    fit, held = stratified_split(whole.train.labels, 0.25, seed=1)
    assert set(fit.tolist()).isdisjoint(held.tolist()) and len(fit) + len(held) == len(whole.train)
    assert torch.equal(data.train.images, whole.train.images[fit]) and torch.equal(
        data.val.images, whole.train.images[held]
    )
    assert torch.equal(data.val.labels, whole.train.labels[held])
    assert torch.equal(data.test.images, whole.val.images) and torch.equal(data.test.labels, whole.val.labels)
    for label, count in zip(*torch.unique(whole.train.labels, return_counts=True), strict=True):
        assert int((data.val.labels == label).sum()) == round(0.25 * int(count))  # stratified
    again = build_data(_dataset(option, data_root, "dataset.val_split=0.25", "dataset.split_seed=1").dataset)
    assert torch.equal(again.val.images, data.val.images)  # the same every run
    other = build_data(_dataset(option, data_root, "dataset.val_split=0.25", "dataset.split_seed=2").dataset)
    assert not torch.equal(other.val.images, data.val.images)


def test_a_held_out_folder_part_gets_the_evaluation_transforms_and_val_becomes_the_test_set(data_root, tmp_path):
    data = build_data(_dataset("imagefolder", data_root, "dataset.val_split=0.25").dataset)
    assert (len(data.train), len(data.val), len(data.test)) == (27, 9, 12)  # 3 of each class's 12 held out
    assert set(data.train.indices).isdisjoint(data.val.indices)
    assert Path(data.test.root).name == "val"
    evaluation = data.test.transform  # what the val/ folder's images get: resize and center crop, no augmentation
    for position in (0, 5):
        path, label = data.val.dataset.samples[data.val.indices[position]]
        image, got = data.val[position]
        assert got == label and torch.equal(image, evaluation(Image.open(path).convert("RGB")))
        assert torch.equal(image, data.val[position][0])  # the same every time: nothing random
    shutil.copytree(data_root / "folder" / "train", tmp_path / "folder" / "train")  # no val/ folder
    with pytest.raises(ConfigError, match="or train/<class>/ alone with dataset.val_split set"):
        build_data(_dataset("imagefolder", tmp_path).dataset)
    data = build_data(_dataset("imagefolder", tmp_path, "dataset.val_split=0.5").dataset)
    assert (len(data.train), len(data.val), data.test) == (18, 18, None)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["dataset.val_split=1.5"], "dataset.val_split: must be a number in (0, 1), the share of each class held out"),
        (["dataset.val_split=0"], "dataset.val_split: must be a number in (0, 1)"),
        (["dataset.val_split=0.01"], "dataset.val_split: holds out 0 of the 64 training images"),
        (["dataset.val_split=0.2", "dataset.split_seed=-1"], "dataset.split_seed: must be a whole number >= 0"),
    ],
)
def test_bad_val_splits_are_refused_with_the_setting(overrides, message, data_root):
    with pytest.raises(ConfigError) as raised:
        build_data(_dataset("mnist", data_root, *overrides).dataset)
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_a_stratified_split_is_the_same_in_another_process():
    labels = torch.arange(1000) % 7
    code = (
        "import json, torch; from clrx.data.splits import stratified_split; "
        "print(json.dumps(stratified_split(torch.arange(1000) % 7, 0.1, 5)[1].tolist()))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(done.stdout) == stratified_split(labels, 0.1, 5)[1].tolist()
