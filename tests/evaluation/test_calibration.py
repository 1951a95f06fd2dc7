import numpy as np
import pytest
import torch

from skinlesion.evaluation.calibration import apply_temperature, fit_temperature, softmax


def nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    probs = apply_temperature(logits, temperature)
    return float(-np.log(probs[np.arange(len(y)), y]).mean())


def calibrated_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits z with labels drawn from softmax(z): T = 1 is the truth for z itself."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=2.0, size=(n, 7))
    y = (softmax(z).cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return z, y


@pytest.mark.parametrize("true_temperature", [0.5, 2.0])
def test_recovers_known_temperature(true_temperature: float) -> None:
    z, y = calibrated_data(20_000, seed=0)
    # softmax(z * T0 / T) equals the true softmax(z) at T = T0.
    fitted = fit_temperature(z * true_temperature, y)
    assert fitted == pytest.approx(true_temperature, rel=0.10)


def test_nll_never_increases() -> None:
    z, y = calibrated_data(5_000, seed=1)
    for scale in (0.3, 1.0, 3.0):
        logits = z * scale
        fitted = fit_temperature(logits, y)
        assert nll(logits, y, fitted) <= nll(logits, y, 1.0) + 1e-12
    # Pure noise logits: the best temperature flattens them towards uniform.
    noise = np.random.default_rng(2).normal(scale=3.0, size=(2_000, 7))
    labels = np.random.default_rng(3).integers(0, 7, size=2_000)
    fitted = fit_temperature(noise, labels)
    assert fitted > 3.0
    assert nll(noise, labels, fitted) <= nll(noise, labels, 1.0)


def test_accepts_torch_tensors_and_float32() -> None:
    z, y = calibrated_data(2_000, seed=4)
    from_numpy = fit_temperature(z * 2.0, y)
    from_torch = fit_temperature(torch.tensor(z * 2.0, dtype=torch.float32), torch.tensor(y))
    assert from_torch == pytest.approx(from_numpy, rel=1e-4)
    probs = apply_temperature(torch.tensor(z, dtype=torch.float32), 1.5)
    assert probs.dtype == np.float64


def test_temperature_one_is_identity_and_rows_sum_to_one() -> None:
    z, _ = calibrated_data(100, seed=5)
    np.testing.assert_allclose(apply_temperature(z, 1.0), softmax(z))
    reference = torch.softmax(torch.tensor(z), dim=1).numpy()
    np.testing.assert_allclose(softmax(z), reference, atol=1e-12)
    for temperature in (0.1, 1.0, 7.0):
        probs = apply_temperature(z, temperature)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0)
        # Temperature changes confidence, never the predicted class.
        np.testing.assert_array_equal(probs.argmax(axis=1), z.argmax(axis=1))


def test_softmax_is_stable_for_large_logits() -> None:
    probs = softmax(np.array([[1000.0, 0.0, -1000.0], [-5000.0, -5000.0, -5000.0]]))
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs, [[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])


def test_rejects_bad_input() -> None:
    z, y = calibrated_data(10, seed=6)
    with pytest.raises(ValueError, match=r"^temperature must be > 0, got 0\.0$"):
        apply_temperature(z, 0.0)
    with pytest.raises(ValueError, match=r"^temperature must be > 0, got nan$"):
        apply_temperature(z, float("nan"))
    with pytest.raises(ValueError, match=r"^need logits \(n, k\) and labels \(n,\), got \(10, 7\)"):
        fit_temperature(z, y[:5])
    with pytest.raises(ValueError, match=r"^labels must lie in \[0, 7\)$"):
        fit_temperature(z, np.full(10, 7))
    with pytest.raises(ValueError, match=r"^labels must lie in \[0, 7\)$"):
        fit_temperature(z, np.full(10, -1))
    with pytest.raises(ValueError, match=r"^logits contain NaN or inf$"):
        fit_temperature(np.where(np.eye(10, 7) > 0, np.inf, z), y)
    with pytest.raises(ValueError, match=r"^need logits"):
        fit_temperature(np.zeros((0, 7)), np.zeros(0, dtype=int))


def test_softmax_of_one_row() -> None:
    np.testing.assert_allclose(softmax(np.log([1.0, 3.0])), [0.25, 0.75])
    np.testing.assert_allclose(apply_temperature(np.log([1.0, 9.0]), 2.0), [0.25, 0.75])


def test_fit_is_the_minimum_and_takes_whole_float_labels() -> None:
    z, y = calibrated_data(3_000, seed=7)
    logits = z * 1.7
    fitted = fit_temperature(logits, y)
    # A minimum, not merely close to the truth: a step of 0.1% either way costs NLL.
    best = nll(logits, y, fitted)
    assert best < nll(logits, y, fitted * 1.001)
    assert best < nll(logits, y, fitted / 1.001)
    assert fit_temperature(logits, y.astype(np.float64)) == fitted
