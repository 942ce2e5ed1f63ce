"""Fast checks of the Shallow CNN experiment (experiments/shallow_cnn.py): data
loaders, the network's layout, a tiny end-to-end run and the loaders' errors."""
import json
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import uan_kernels
from experiments import shallow_cnn, step_times


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
    assert len(results["runs"]) == 2 * len(shallow_cnn.BASE_VARIANTS)  # the default variants
    for run in results["runs"]:
        for key in ("train_loss", "test_accuracy", "epoch_time_s", "epoch_cpu_s"):
            assert len(run[key]) == 1 and all(np.isfinite(run[key])), key
        assert all(0.0 <= acc <= 1.0 for acc in run["test_accuracy"])
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    for variant in shallow_cnn.BASE_VARIANTS:
        assert f"| {shallow_cnn.VARIANT_LABELS[variant]} | 0.005 |" in summary
    batchnorm_row = next(line for line in summary.splitlines() if line.startswith("| BatchNorm | 0.005 |"))
    assert batchnorm_row.count("| 1.00x |") == 2  # wall and CPU time relative to itself


def test_step_times_pair_each_variant_with_batchnorm(digits, tmp_path):
    out = tmp_path / "step_times.md"
    times = step_times.main(["--dataset", "digits", "--variants", "mn", "uan_weight", "--rounds", "3",
                             "--batch-size", "64", "--threads", "1", "--out", str(out)])
    assert list(times) == ["bn", "mn", "uan_weight"]  # BatchNorm, the baseline, always runs
    assert all(len(t) == 3 and all(s > 0 for s in t) for t in times.values())
    table = out.read_text()
    steps_per_epoch = -(-len(digits.train_y) // 64)
    assert "3 paired rounds" in table and f"An epoch's training pass is {steps_per_epoch} such steps" in table
    assert "| BatchNorm | " in table and table.count("| 1.00 [1.00–1.00] |") >= 1
    for label in ("MixtureNorm", "UAN (weight)"):
        ratios = [line for line in table.splitlines() if line.startswith(f"| {label} |")]
        assert len(ratios) == 1 and ratios[0].endswith("] |")


def test_step_times_rejects_per_domain_variants_without_domains():
    with pytest.raises(SystemExit):
        step_times.parse_args(["--dataset", "digits", "--variants", "uan_weight_kD"])


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


# ---------------------------------------------------------------------------
# Multi-domain datasets
# ---------------------------------------------------------------------------


def test_multidomain_assignment_is_seeded_balanced_and_stable(digits):
    first = shallow_cnn.load_dataset("digits-multidomain")
    second = shallow_cnn.load_dataset("digits-multidomain")
    num_domains = len(shallow_cnn.DOMAINS)
    assert first.num_domains == num_domains and first.domain_names == tuple(d.name for d in shallow_cnn.DOMAINS)
    for name in ("train_x", "train_y", "test_x", "test_y", "train_domain", "test_domain"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    # Same examples and labels as the single-domain split, each in one domain, balanced.
    assert torch.equal(first.train_y, digits.train_y) and torch.equal(first.test_y, digits.test_y)
    for domain, size in ((first.train_domain, 1437), (first.test_domain, 360)):
        counts = torch.bincount(domain, minlength=num_domains)
        assert domain.shape == (size,) and int(counts.max() - counts.min()) <= 1
    # Domains are mixed in order (so every batch mixes them), and a subset keeps each example's domain.
    assert len(set(first.train_domain[:16].tolist())) > 1
    small = first.subset(100, 50)
    assert torch.equal(small.train_domain, first.train_domain[:100]) and torch.equal(small.test_x, first.test_x[:50])
    # Standardised overall, while the domains keep very different statistics.
    assert abs(float(first.train_x.mean())) < 1e-4 and abs(float(first.train_x.std()) - 1) < 1e-4
    stds = [float(first.train_x[first.train_domain == d].std()) for d in range(num_domains)]
    assert max(stds) > 3 * min(stds)


def test_multidomain_transforms_act_as_described():
    """One repeated pattern through each domain: noise-free domains give exact
    affine copies of it (x5 contrast, sign flip), the noisy one does not."""
    pattern = torch.linspace(-1.5, 1.5, 12)
    x = pattern.expand(40, 1, 12).clone()
    y = torch.zeros(40, dtype=torch.int64)
    base = shallow_cnn.SplitData("toy", x, y, x[:8].clone(), y[:8], 2)
    data = shallow_cnn.make_multidomain(base)
    by_name = {name: data.train_x[data.train_domain == d] for d, name in enumerate(data.domain_names)}

    def centred(t):
        return t[0, 0] - t[0, 0].mean()

    identity = centred(by_name["identity"])
    assert torch.allclose(centred(by_name["contrast"]), 5 * identity, atol=1e-5)
    assert torch.allclose(centred(by_name["inverted"]), -identity, atol=1e-5)
    for name in ("identity", "contrast", "inverted"):
        assert torch.allclose(by_name[name], by_name[name][:1].expand_as(by_name[name])), name
    assert float((by_name["noisy"] - by_name["identity"][:1]).std()) > 0.1


def test_domain_component_information_bounds():
    counts = [10, 10, 10, 10]
    assert shallow_cnn.domain_component_information([[0.5, 0.3, 0.2]] * 4, counts) == pytest.approx(0, abs=1e-12)
    assert shallow_cnn.domain_component_information(np.eye(4), counts) == pytest.approx(1.0)
    permuted = np.eye(4)[:, [2, 0, 3, 1]]
    assert shallow_cnn.domain_component_information(permuted, counts) == pytest.approx(1.0)
    partial = shallow_cnn.domain_component_information([[0.9, 0.1], [0.1, 0.9], [0.5, 0.5], [0.5, 0.5]], counts)
    assert 0 < partial < 0.5


def test_per_domain_k_variants_need_domains(digits):
    with pytest.raises(ValueError, match="multi-domain"):
        shallow_cnn.norm_factory("uan_weight_kD", 2)
    layer = shallow_cnn.norm_factory("uan_ma_kD", 2, num_components=3, num_domains=4)(16)
    assert isinstance(layer, uan_kernels.UAN) and layer.num_components == 4 and layer.update == "moving_average"
    with pytest.raises(SystemExit):
        shallow_cnn.parse_args(["--dataset", "digits", "--variants", "uan_weight_kD"])
    assert shallow_cnn.parse_args(["--dataset", "digits-multidomain"]).variants == [
        "bn", "mn", "uan_weight", "uan_ma", "uan_weight_kD", "uan_ma_kD"]


def test_tiny_multidomain_run_reports_domains_and_responsibilities(digits, tmp_path):
    out = tmp_path / "digits-multidomain"
    variants = ["bn", "uan_weight", "uan_ma_kD"]
    shallow_cnn.main(["--dataset", "digits-multidomain", "--epochs", "2", "--seeds", "0", "1", "--lrs", "0.005",
                      "--variants", *variants, "--max-train", "64", "--max-test", "40", "--batch-size", "32",
                      "--threads", "1", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    domains = results["config"]["domains"]
    names = [d.name for d in shallow_cnn.DOMAINS]
    assert domains["names"] == names and sum(domains["test_counts"]) == 40 and sum(domains["train_counts"]) == 64
    counts = np.asarray(domains["test_counts"], dtype=float)
    assert len(results["runs"]) == 2 * len(variants)
    for run in results["runs"]:
        per_domain = np.asarray(run["test_accuracy_per_domain"])
        assert per_domain.shape == (2, len(names))
        # The domains partition the test set: their accuracies, weighted by size, give the overall one.
        assert np.allclose(per_domain @ counts / counts.sum(), run["test_accuracy"], atol=1e-12)
        if run["variant"] == "bn":
            assert run["tau_per_domain"] is None
        else:
            tau = np.asarray(run["tau_per_domain"])
            assert tau.shape == (len(names), 4 if run["variant"] == "uan_ma_kD" else 3)
            assert np.all(tau >= 0) and np.allclose(tau.sum(1), 1.0, atol=1e-6)
            # Per channel the score can only be higher than for the channel-averaged table (I(D;K|C) >= I(D;K)
            # when the channel carries no domain information, as here: every element has every channel).
            overall = shallow_cnn.domain_component_information(tau, counts)
            assert overall - 1e-9 <= run["domain_info_per_channel"] <= 1.0
    summary = (out / "summary.md").read_text()
    assert "## Test accuracy per domain" in summary and "## Responsibilities per domain" in summary
    assert "| UAN (moving average, K = D = 4) | 0.005 |" in summary
    assert "## Paired differences" in summary
    for name in ("curves.png", "responsibilities.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    # The summary's per-domain table is the mean of the runs' final per-domain accuracies.
    bn_row = next(line for line in summary.split("## Test accuracy per domain")[1].splitlines()
                  if line.startswith("| BatchNorm | 0.005 |"))
    bn_runs = [run for run in results["runs"] if run["variant"] == "bn"]
    first_domain = np.mean([100 * run["test_accuracy_per_domain"][-1][0] for run in bn_runs])
    assert bn_row.split("|")[4].strip().startswith(f"{first_domain:.2f} ±")


def test_norm_slot_moves_the_layer_under_test():
    model = shallow_cnn.ShallowCNN(1, 10, shallow_cnn.norm_factory("uan_weight", 2), norm_slot=0)
    assert [type(norm) for norm in model.norms] == [uan_kernels.UAN] + [nn.BatchNorm2d] * 3
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)
    assert shallow_cnn.parse_args([]).norm_slot == 2
    with pytest.raises(SystemExit):
        shallow_cnn.parse_args(["--norm-slot", "5"])
