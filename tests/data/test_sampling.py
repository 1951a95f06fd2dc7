import numpy as np
import pytest
import torch

from skinlesion.core.errors import ConfigError
from skinlesion.data.sampling import (
    SAMPLERS,
    class_weights,
    draw_indices,
    sample_weights,
    weighted_indices,
)

# HAM10000 class counts (akiec, bcc, bkl, df, mel, nv, vasc).
HAM_COUNTS = (327, 514, 1099, 115, 1113, 6705, 142)
N_CLASSES = len(HAM_COUNTS)
N_DRAWS = 70_000


def ham_labels(seed: int = 0) -> np.ndarray:
    labels = np.repeat(np.arange(N_CLASSES), HAM_COUNTS)
    return np.random.default_rng(seed).permutation(labels)


def drawn_frequencies(labels: np.ndarray, power: float, seed: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    idx = draw_indices("weighted", labels, N_CLASSES, N_DRAWS, g, power=power)
    assert idx.shape == (N_DRAWS,)
    assert idx.min() >= 0 and idx.max() < len(labels)
    return np.bincount(labels[idx.numpy()], minlength=N_CLASSES) / N_DRAWS


def expected_frequencies(power: float) -> np.ndarray:
    # Each class carries count * count^-power of the total weight.
    mass = np.asarray(HAM_COUNTS, dtype=np.float64) ** (1 - power)
    return mass / mass.sum()


def test_power_one_is_uniform_over_classes() -> None:
    freq = drawn_frequencies(ham_labels(), power=1.0)
    np.testing.assert_allclose(freq, 1 / N_CLASSES, atol=0.01)


def test_power_zero_keeps_natural_frequencies() -> None:
    freq = drawn_frequencies(ham_labels(), power=0.0)
    natural = np.asarray(HAM_COUNTS) / sum(HAM_COUNTS)
    np.testing.assert_allclose(freq, natural, atol=0.01)


def test_power_half_lies_between() -> None:
    freq = drawn_frequencies(ham_labels(), power=0.5)
    natural = np.asarray(HAM_COUNTS) / sum(HAM_COUNTS)
    uniform = np.full(N_CLASSES, 1 / N_CLASSES)
    np.testing.assert_allclose(freq, expected_frequencies(0.5), atol=0.01)
    # Not every class lies between (bkl and mel overshoot 1/7 at power=0.5), but the classes far
    # from uniform do, and the draw as a whole is closer to uniform than natural sampling.
    far = [0, 3, 5, 6]  # akiec, df, nv, vasc
    lo, hi = np.minimum(natural, uniform), np.maximum(natural, uniform)
    assert np.all(freq[far] > lo[far]) and np.all(freq[far] < hi[far])
    tv_half = np.abs(freq - uniform).sum() / 2
    tv_natural = np.abs(natural - uniform).sum() / 2
    assert 0.1 < tv_half < tv_natural - 0.2
    assert freq[5] < natural[5] - 0.2
    assert freq[3] > 2 * natural[3]


def test_class_weights_values() -> None:
    labels = ham_labels()
    w = class_weights(labels, N_CLASSES, power=1.0)
    np.testing.assert_allclose(w, 1 / np.asarray(HAM_COUNTS))
    # Each class's images together carry the same total weight at power=1.
    per_image = sample_weights(labels, N_CLASSES, power=1.0)
    totals = np.bincount(labels, weights=per_image, minlength=N_CLASSES)
    np.testing.assert_allclose(totals, 1.0)
    np.testing.assert_allclose(class_weights(labels, N_CLASSES, power=0.0), 1.0)


def test_deterministic_for_seed() -> None:
    labels = ham_labels()
    for name in SAMPLERS:

        def draw(seed: int, name: str = name) -> torch.Tensor:
            g = torch.Generator().manual_seed(seed)
            return draw_indices(name, labels, N_CLASSES, 5_000, g, power=0.5)

        assert torch.equal(draw(7), draw(7))
        assert not torch.equal(draw(7), draw(8))


def test_absent_classes_never_drawn() -> None:
    counts = (50, 0, 300, 20, 0, 1000, 10)
    labels = np.repeat(np.arange(N_CLASSES), counts)
    w = class_weights(labels, N_CLASSES, power=1.0)
    assert np.all(np.isfinite(w))
    assert w[1] == 0 and w[4] == 0
    g = torch.Generator().manual_seed(0)
    idx = draw_indices("weighted", labels, N_CLASSES, 30_000, g, power=1.0)
    freq = np.bincount(labels[idx.numpy()], minlength=N_CLASSES) / len(idx)
    assert freq[1] == 0 and freq[4] == 0
    # The present classes share the draws equally.
    np.testing.assert_allclose(freq[[0, 2, 3, 5, 6]], 1 / 5, atol=0.015)


def test_random_draws_every_index_once_per_pass() -> None:
    labels = ham_labels()[:1000]
    n = len(labels)
    g = torch.Generator().manual_seed(0)
    idx = draw_indices("random", labels, N_CLASSES, 3 * n, g)
    assert idx.shape == (3 * n,)
    for p in range(3):
        assert sorted(idx[p * n : (p + 1) * n].tolist()) == list(range(n))
    # Shuffled, not in order, and passes differ.
    assert not torch.equal(idx[:n], torch.arange(n))
    assert not torch.equal(idx[:n], idx[n : 2 * n])
    # A partial last pass repeats no index.
    idx = draw_indices("random", labels, N_CLASSES, n + 100, torch.Generator().manual_seed(1))
    assert sorted(idx[:n].tolist()) == list(range(n))
    assert len(set(idx[n:].tolist())) == 100
    # Fewer draws than images: no repeats at all.
    idx = draw_indices("random", labels, N_CLASSES, 10, torch.Generator().manual_seed(2))
    assert len(set(idx.tolist())) == 10


def test_unknown_sampler_lists_known() -> None:
    labels = ham_labels()
    with pytest.raises(ValueError, match="unknown sampler 'balanced'") as info:
        draw_indices("balanced", labels, N_CLASSES, 10, torch.Generator())
    for name in SAMPLERS:
        assert name in str(info.value)


def test_default_power_is_one() -> None:
    # Balanced classes are the default: weights 1 / count, and each class drawn equally often.
    labels = ham_labels()
    np.testing.assert_allclose(class_weights(labels, N_CLASSES), 1 / np.asarray(HAM_COUNTS))
    np.testing.assert_allclose(
        sample_weights(labels, N_CLASSES), 1 / np.asarray(HAM_COUNTS)[labels]
    )
    by_name = draw_indices("weighted", labels, N_CLASSES, 1000, torch.Generator().manual_seed(3))
    direct = weighted_indices(labels, N_CLASSES, 1000, torch.Generator().manual_seed(3))
    explicit = draw_indices(
        "weighted", labels, N_CLASSES, 1000, torch.Generator().manual_seed(3), power=1.0
    )
    assert torch.equal(by_name, explicit)
    assert torch.equal(direct, explicit)


def test_single_image_class_and_absent_top_classes() -> None:
    # One df image weighs 1 (1 / 1), and classes above the largest label still get a weight 0.
    labels = np.array([0, 0, 0, 0, 3])
    w = class_weights(labels, N_CLASSES, power=0.5)
    np.testing.assert_allclose(w, [0.5, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(sample_weights(labels, N_CLASSES), [0.25] * 4 + [1.0])


def test_unknown_sampler_names_the_config_key() -> None:
    with pytest.raises(ConfigError, match=r"^sampler\.name: unknown sampler 'balanced'"):
        draw_indices("balanced", ham_labels(), N_CLASSES, 10, torch.Generator())


# -- several sources: balanced by source x class ---------------------------------------------------


def test_source_weights_known_values() -> None:
    """(1 / count(source, class)) ** power: class 0 has 2 images in source a, 1 in b."""
    labels = np.array([0, 0, 1, 0, 1, 2])
    sources = np.array(["a", "a", "a", "b", "b", "b"])
    np.testing.assert_allclose(sample_weights(labels, 3, 1.0, sources), [0.5, 0.5, 1, 1, 1, 1])
    np.testing.assert_allclose(
        sample_weights(labels, 3, 0.5, sources), [0.5**0.5, 0.5**0.5, 1, 1, 1, 1]
    )
    # Without sources the 3 images of class 0 share one count.
    np.testing.assert_allclose(sample_weights(labels, 3, 1.0), [1 / 3, 1 / 3, 0.5, 1 / 3, 0.5, 1])


def test_one_source_is_the_class_sampler() -> None:
    labels = ham_labels(3)
    one = np.full(len(labels), "ham10000")
    assert np.array_equal(
        sample_weights(labels, N_CLASSES, 0.7, one), sample_weights(labels, N_CLASSES, 0.7)
    )
    drawn = [
        draw_indices("weighted", labels, N_CLASSES, 5000, torch.Generator().manual_seed(1), 1.0, s)
        for s in (None, one)
    ]
    assert torch.equal(drawn[0], drawn[1])


def test_power_one_draws_every_source_x_class_equally() -> None:
    """HAM10000's 7 classes and a 3-class source of other sizes: 10 strata, each 1/10 of draws."""
    ham = ham_labels()
    other = np.repeat([2, 4, 5], [296, 404, 1450])  # ISIC 2017's bkl, mel, nv
    labels = np.concatenate([ham, other])
    sources = np.array(["ham"] * len(ham) + ["isic2017"] * len(other))
    g = torch.Generator().manual_seed(0)
    idx = draw_indices("weighted", labels, N_CLASSES, N_DRAWS, g, 1.0, sources).numpy()
    strata = np.char.add(sources[idx], labels[idx].astype(str))
    _, counts = np.unique(strata, return_counts=True)
    assert len(counts) == 10
    np.testing.assert_allclose(counts / N_DRAWS, 0.1, atol=0.01)
    # By class alone mel would be 1 of 7; here it is 2 strata of 10.
    assert np.mean(labels[idx] == 4) == pytest.approx(0.2, abs=0.01)


def test_random_sampler_takes_sources() -> None:
    labels = ham_labels()[:100]
    g = torch.Generator().manual_seed(0)
    idx = draw_indices("random", labels, N_CLASSES, 100, g, 1.0, np.full(100, "a"))
    assert sorted(idx.tolist()) == list(range(100))
