import logging
import math

import pytest
import torch
from diffusers import DDPMScheduler

from lora_scripts.errors import TrainingError
from lora_scripts.families.objective import DiffusionObjective, NoisedBatch, sample_noise
from lora_scripts.training.metrics import MetricsLogger, smooth
from lora_scripts.training.loop import _guard_nonfinite, _Loop


@pytest.fixture
def sched():
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def test_noise_offset_shifts_channel_means():
    latents = torch.zeros(64, 4, 8, 8)
    plain = sample_noise(latents, 0.0, torch.Generator().manual_seed(0))
    offset = sample_noise(latents, 1.0, torch.Generator().manual_seed(0))
    # A per-(sample, channel) constant: the spread of channel means grows from ~1/8 to ~1.
    assert plain.mean(dim=(2, 3)).std() < 0.3 < offset.mean(dim=(2, 3)).std()


def test_targets(sched):
    latents, noise, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([10, 900])
    batch = DiffusionObjective(sched).noisy(latents, noise, t)
    assert torch.equal(DiffusionObjective(sched).target(batch), noise)
    v_sched = DDPMScheduler.from_config(sched.config, prediction_type="v_prediction")
    a = v_sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - v_sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(batch.noisy, a * latents + s * noise, atol=1e-6)
    assert torch.allclose(DiffusionObjective(v_sched).target(batch), a * noise - s * latents, atol=1e-6)


def test_zero_terminal_snr_schedule_and_its_losses(sched):
    """Lin et al. 2023: the rescaled schedule reaches SNR 0 at its last step, keeps the first step's SNR, and
    with v-prediction every loss weight stays finite (epsilon's would divide by zero there)."""
    z = DiffusionObjective(DDPMScheduler.from_config(sched.config, prediction_type="v_prediction",
                                                     rescale_betas_zero_snr=True))
    plain = DiffusionObjective(sched)
    t = torch.tensor([0, 500, 999])
    assert z.snr(t)[-1] == 0 and plain.snr(t)[-1] > 0
    assert math.isclose(z.snr(t)[0].item(), plain.snr(t)[0].item(), rel_tol=1e-4)
    assert "zero-terminal-SNR" in z.describe() and z.describe().startswith("v-prediction")
    latents, noise = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    batch = z.noisy(latents, noise, t)
    assert torch.allclose(batch.noisy[-1], noise[-1], atol=1e-6)  # pure noise at the last step
    assert torch.allclose(z.target(batch)[-1], -latents[-1], atol=1e-5)  # v = -x0 there
    loss = z.loss(torch.zeros_like(latents), batch, min_snr_gamma=5.0)
    assert torch.isfinite(loss)
    eps = DiffusionObjective(DDPMScheduler.from_config(sched.config, rescale_betas_zero_snr=True))
    assert torch.isfinite(eps.loss(torch.zeros_like(latents), eps.noisy(latents, noise, t), min_snr_gamma=5.0))


def test_objective_refuses_an_unknown_prediction_type(sched):
    with pytest.raises(ValueError, match="sample"):
        DiffusionObjective(DDPMScheduler.from_config(sched.config, prediction_type="sample"))


def test_min_snr_weights(sched):
    t = torch.tensor([5, 999])
    pred, target = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    objective = DiffusionObjective(sched)
    batch = NoisedBatch(torch.zeros(2, 1, 2, 2), target, t, torch.zeros(2, 1, 2, 2))  # epsilon: target = noise
    plain = objective.loss(pred, batch, None)
    weighted = objective.loss(pred, batch, 5.0)
    s = objective.snr(t)
    assert s[0] > 5 > s[1]  # low noise: SNR above gamma, gets down-weighted; high noise keeps weight 1
    expected = ((5.0 / s[0]) + 1.0) / 2
    assert plain.item() == 1.0 and math.isclose(weighted.item(), expected.item(), rel_tol=1e-5)


def test_nonfinite_loss_stops_after_three_steps():
    loop = _Loop()
    loop.last_loss = float("nan")
    _guard_nonfinite(loop)
    _guard_nonfinite(loop)
    with pytest.raises(TrainingError, match="for 3 steps in a row"):
        _guard_nonfinite(loop)
    loop.last_loss, loop.nonfinite = 0.1, 2
    _guard_nonfinite(loop)
    assert loop.nonfinite == 0


def test_divergence_warning(tmp_path, caplog):
    m = MetricsLogger(tmp_path, tmp_path / "logs", "t")
    with caplog.at_level(logging.WARNING):
        for i in range(60):
            m.log(i + 1, 0, 0.1, 1e-4, 0.0)
        assert "climbing" not in caplog.text
        for i in range(60, 120):
            m.log(i + 1, 0, 0.1 + 0.02 * (i - 60), 1e-4, 0.0)
    m.close()
    assert "loss is climbing" in caplog.text and "learning_rate" in caplog.text
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert len((tmp_path / "loss.csv").read_text().splitlines()) == 121


def test_smooth_is_bias_corrected():
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])


def test_second_ctrl_c_stops_at_once():
    from lora_scripts.training.loop import _StopSignals

    loop = _Loop()
    with _StopSignals(loop) as handler:
        handler._handle(2, None)  # first: finish the step, then save and exit
        assert loop.stop_requested
        with pytest.raises(KeyboardInterrupt):
            handler._handle(2, None)


def test_sigterm_asks_for_a_checkpoint_like_a_first_ctrl_c():
    """Schedulers, `docker stop` and `kill` end a process with SIGTERM and a grace period: the run saves, and the
    handlers before it are back once it ends."""
    import os
    import signal
    import threading

    from lora_scripts.training.loop import _StopSignals

    if threading.current_thread() is not threading.main_thread():  # no handler there: the signal would end pytest
        pytest.skip("signal handlers are installed on the main thread only")
    loop, before = _Loop(), signal.getsignal(signal.SIGTERM)
    with _StopSignals(loop):
        os.kill(os.getpid(), signal.SIGTERM)
        assert loop.stop_requested
    assert signal.getsignal(signal.SIGTERM) is before
