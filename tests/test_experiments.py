"""Fast checks of the Shallow CNN experiment (experiments/shallow_cnn.py): data
loaders, the network's layout, a tiny end-to-end run and the loaders' errors."""
import json
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import uan_kernels
from experiments import shallow_cnn


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn", reason="the digits dataset ships with scikit-learn")
    return shallow_cnn.load_dataset("digits")


def test_digits_split_is_fixed_stratified_and_standardised(digits):
    assert digits.train_x.shape == (1437, 1, 8, 8) and digits.test_x.shape == (360, 1, 8, 8)
    assert digits.train_x.dtype == torch.float32 and digits.train_y.dtype == torch.int64
    assert digits.num_classes == 10 and digits.spatial_dims == 2
    again = shallow_cnn.load_dataset("digits")
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(digits, name), getattr(again, name)), name
    # Stratified: every class has (almost) the same share in both parts.
    train_share = torch.bincount(digits.train_y, minlength=10) / len(digits.train_y)
    test_share = torch.bincount(digits.test_y, minlength=10) / len(digits.test_y)
    assert torch.allclose(train_share, test_share, atol=0.005)
    assert abs(float(digits.train_x.mean())) < 1e-5 and abs(float(digits.train_x.std()) - 1) < 1e-5


@pytest.mark.parametrize("variant, expected_type, update", [
    ("bn", nn.BatchNorm2d, None),
    ("mn", uan_kernels.MixtureNorm, None),
    ("uan_weight", uan_kernels.UAN, "weight"),
    ("uan_ma", uan_kernels.UAN, "moving_average"),
])
def test_model_has_four_5x5_convs_and_the_norm_under_test_second(variant, expected_type, update):
    model = shallow_cnn.ShallowCNN(1, 10, shallow_cnn.norm_factory(variant, 2, num_components=3))
    assert len(model.convs) == 4
    for conv in model.convs:
        assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (5, 5) and conv.padding == (2, 2)
    assert [conv.out_channels for conv in model.convs] == list(shallow_cnn.CONV_WIDTHS)
    for slot, norm in enumerate(model.norms):
        if slot == 1:
            assert type(norm) is expected_type
            if update is not None:
                assert norm.update == update and norm.num_components == 3
        else:
            assert type(norm) is nn.BatchNorm2d
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)


def test_variants_of_one_seed_start_from_the_same_convolutions():
    def first_conv_weights(variant):
        torch.manual_seed(7)
        model = shallow_cnn.ShallowCNN(1, 10, shallow_cnn.norm_factory(variant, 2))
        return [conv.weight for conv in model.convs] + [model.head.weight]

    for a, b in zip(first_conv_weights("bn"), first_conv_weights("uan_weight")):
        assert torch.equal(a, b)


def test_one_dimensional_network_uses_conv1d_and_batchnorm1d():
    model = shallow_cnn.ShallowCNN(1, 10, shallow_cnn.norm_factory("uan_ma", 1), spatial_dims=1)
    assert all(isinstance(conv, nn.Conv1d) and conv.kernel_size == (5,) for conv in model.convs)
    assert [type(norm) for norm in model.norms] == [nn.BatchNorm1d, uan_kernels.UAN, nn.BatchNorm1d, nn.BatchNorm1d]
    assert model(torch.randn(6, 1, 40)).shape == (6, 10)


def test_training_is_deterministic(digits):
    small = digits.subset(64, 32)
    first, second = (shallow_cnn.train_run(small, "uan_weight", 0.005, seed=3, epochs=1, batch_size=32)
                     for _ in range(2))
    assert first.train_loss == second.train_loss and first.test_accuracy == second.test_accuracy


def test_tiny_run_writes_json_png_and_markdown(digits, tmp_path):
    out = tmp_path / "digits"
    shallow_cnn.main(["--epochs", "1", "--seeds", "0", "1", "--lrs", "0.005", "--max-train", "64",
                      "--max-test", "32", "--batch-size", "32", "--threads", "1", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["epochs"] == 1 and results["config"]["train_size"] == 64
    assert results["environment"]["torch"] == torch.__version__
    assert len(results["runs"]) == 2 * len(shallow_cnn.VARIANT_LABELS)
    for run in results["runs"]:
        for key in ("train_loss", "test_accuracy", "epoch_time_s", "epoch_cpu_s"):
            assert len(run[key]) == 1 and all(np.isfinite(run[key])), key
        assert all(0.0 <= acc <= 1.0 for acc in run["test_accuracy"])
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    for label in shallow_cnn.VARIANT_LABELS.values():
        assert f"| {label} | 0.005 |" in summary
    batchnorm_row = next(line for line in summary.splitlines() if line.startswith("| BatchNorm | 0.005 |"))
    assert batchnorm_row.count("| 1.00x |") == 2  # wall and CPU time relative to itself


def _write_cifar10(folder, corrupt=None):
    """A fake CIFAR-10 release with 4 images per file; ``corrupt`` names a file to spoil."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 3, 9, 1]}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)
    if corrupt is not None:
        (folder / corrupt).write_bytes(b"this is not a pickle")


def test_cifar_loader_reads_a_local_copy(tmp_path):
    _write_cifar10(tmp_path / "cifar-10-batches-py")
    data = shallow_cnn.load_dataset("cifar10", tmp_path)  # the parent of the release folder works too
    assert data.train_x.shape == (20, 3, 32, 32) and data.test_x.shape == (4, 3, 32, 32)
    assert data.num_classes == 10 and data.train_y.tolist()[:4] == [0, 3, 9, 1]


def test_missing_cifar_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data_batch_1.*test_batch"):
        shallow_cnn.load_dataset("cifar10", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="missing from .*: train, test"):
        shallow_cnn.load_dataset("cifar100", tmp_path)
    with pytest.raises(ValueError, match="--data-dir"):
        shallow_cnn.load_dataset("cifar10", None)


def test_malformed_cifar_pickle_is_a_clear_error(tmp_path):
    _write_cifar10(tmp_path, corrupt="data_batch_3")
    with pytest.raises(ValueError, match=r"data_batch_3: not a readable python pickle"):
        shallow_cnn.load_dataset("cifar10", tmp_path)
    with open(tmp_path / "data_batch_3", "wb") as handle:
        pickle.dump({b"data": np.zeros((4, 100), dtype=np.uint8), b"labels": [0, 1, 2, 3]}, handle)
    with pytest.raises(ValueError, match=r"data_batch_3: expected .*shape \(4, 100\)"):
        shallow_cnn.load_dataset("cifar10", tmp_path)
    with open(tmp_path / "data_batch_3", "wb") as handle:
        pickle.dump({b"pixels": []}, handle)
    with pytest.raises(ValueError, match=r"data_batch_3: expected a dict with b'data'"):
        shallow_cnn.load_dataset("cifar10", tmp_path)


def test_mnist1d_is_generated_offline():
    pytest.importorskip("mnist1d")
    data = shallow_cnn.load_dataset("mnist1d")
    assert data.train_x.shape == (4000, 1, 40) and data.test_x.shape == (1000, 1, 40)
    assert data.spatial_dims == 1 and set(data.train_y.unique().tolist()) == set(range(10))
